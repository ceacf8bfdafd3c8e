//! What a request's stages know of the connection that carries it. The
//! driver that serves the connection (the keep-alive loop, the HTTP/2
//! accept loop) sets it for each request's task; the stages read and
//! update it. Kept here, below the drivers, so the stages never import a
//! driver.

use std::cell::Cell;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use pingora::protocols::http::ServerSession;
use tokio::sync::Notify;

use crate::telemetry::metrics::metrics;

/// Streams a client may cancel at once, and how many more it may cancel
/// per second after that, before its connection is told to calm down.
pub const RESET_BURST: f64 = 100.0;
pub const RESET_RATE: f64 = 10.0;

/// What became of the request head the keep-alive loop last handed to
/// Pingora. Pingora answers a head it cannot parse (`400`) or a `CONNECT`
/// (`405`) itself and drops the connection, without a hook; the proxy
/// marks each request it takes, so one Pingora refused, or the client left
/// unfinished, is logged by the loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Not taken by the proxy (yet).
    Handed,
    /// The proxy took it, and logs it.
    Taken,
}

/// An HTTP/2 connection's budget of client cancels (and control frames):
/// past it, the connection is told to calm down.
pub struct CancelBudget {
    listener: String,
    /// Tokens for client cancels, and when they were last refilled.
    resets: Mutex<(f64, Instant)>,
    /// Set once the client has used more than its share; `why` says of what.
    calm: Notify,
    calmed: AtomicBool,
    why: Mutex<&'static str>,
}

impl CancelBudget {
    pub fn new(listener: String) -> Arc<Self> {
        Arc::new(CancelBudget {
            listener,
            resets: Mutex::new((RESET_BURST, Instant::now())),
            calm: Notify::new(),
            calmed: AtomicBool::new(false),
            why: Mutex::new("reset_flood"),
        })
    }

    /// The client cancelled a stream of this connection.
    pub fn record_cancel(&self) {
        metrics()
            .client_resets
            .with_label_values(&[&self.listener])
            .inc();
        let mut bucket = self.resets.lock().unwrap_or_else(|p| p.into_inner());
        let (tokens, at) = &mut *bucket;
        let now = Instant::now();
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * RESET_RATE).min(RESET_BURST);
        *at = now;
        *tokens -= 1.0;
        if *tokens < 0.0 {
            self.calm_down("reset_flood");
        }
    }

    /// The client used more than its share of `why` (a GOAWAY reason).
    pub fn calm_down(&self, why: &'static str) {
        if !self.calmed.swap(true, Ordering::AcqRel) {
            *self.why.lock().unwrap_or_else(|p| p.into_inner()) = why;
            self.calm.notify_one();
        }
    }

    /// Whether the connection was told to calm down, and why.
    pub fn calmed_for(&self) -> Option<&'static str> {
        self.calmed
            .load(Ordering::Acquire)
            .then(|| *self.why.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Done once the connection is told to calm down.
    pub async fn calmed(&self) {
        loop {
            let notified = self.calm.notified();
            if self.calmed.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }
}

tokio::task_local! {
    static FATE: Cell<Fate>;
    static LISTENER: Arc<str>;
    static BUDGET: Arc<CancelBudget>;
}

/// Run `fut` (a connection's HTTP/1 loop) with the fate of its requests
/// and the name of the listener it arrived on. Not an `async fn`: one would
/// hold room for `fut` twice (as its argument and inside the scopes), and
/// an idle connection's task holds this future.
pub fn with_fate<F: Future>(listener: Arc<str>, fut: F) -> impl Future<Output = F::Output> {
    LISTENER.scope(listener, FATE.scope(Cell::new(Fate::Handed), fut))
}

/// `f` of the name of the listener the current request's connection
/// arrived on (`None` outside a connection's task): a reload that moves
/// the listener keeps its name, not its address.
pub fn with_listener<R>(f: impl FnOnce(Option<&str>) -> R) -> R {
    if let Ok(name) = LISTENER.try_with(Arc::clone) {
        return f(Some(&name));
    }
    if let Ok(budget) = BUDGET.try_with(Arc::clone) {
        return f(Some(&budget.listener));
    }
    f(None)
}

/// The keep-alive loop hands Pingora a head; what becomes of it is told by
/// [`fate`] afterwards.
pub fn head_handed() {
    let _ = FATE.try_with(|f| f.set(Fate::Handed));
}

/// What became of the head handed last (`Taken` outside a loop).
pub fn fate() -> Fate {
    FATE.try_with(Cell::get).unwrap_or(Fate::Taken)
}

/// The proxy took the request the loop handed over: it logs it itself.
pub fn request_taken() {
    let _ = FATE.try_with(|f| f.set(Fate::Taken));
}

/// Run `fut` (an HTTP/2 stream's task) with its connection's budget.
///
/// Not an `async fn`, as [`with_fate`]: each stream's task would hold room
/// for `fut` twice.
pub fn with_budget<F: Future>(
    budget: Arc<CancelBudget>,
    fut: F,
) -> impl Future<Output = F::Output> {
    BUDGET.scope(budget, fut)
}

/// Whether the client has already cancelled (reset) this HTTP/2 stream; if
/// so the cancel is counted against its connection. `false` for HTTP/1 and
/// for a stream still open.
pub fn client_cancelled(session: &mut ServerSession) -> bool {
    let Some(idle) = session.watch_h2_stream_close() else {
        return false;
    };
    let mut idle = std::pin::pin!(idle);
    let mut cx = Context::from_waker(Waker::noop());
    // Ready with a reason: RST_STREAM (or GOAWAY) from the client.
    let cancelled = matches!(idle.as_mut().poll(&mut cx), Poll::Ready(Ok(_)));
    if cancelled {
        record_cancel();
    }
    cancelled
}

/// Count a cancel by the client against the current stream's connection.
pub fn record_cancel() {
    let _ = BUDGET.try_with(|b| b.record_cancel());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_request_knows_its_connections_listener_by_name() {
        let name = || with_listener(|n| n.map(str::to_string));
        assert_eq!(name(), None);
        let http1 = with_fate("public".into(), async { name() }).await;
        assert_eq!(http1.as_deref(), Some("public"));
        let h2 = with_budget(CancelBudget::new("edge".into()), async { name() }).await;
        assert_eq!(h2.as_deref(), Some("edge"));
    }
}
