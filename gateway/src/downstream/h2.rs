//! HTTP/2 client connections, served by meshgate's own accept loop over
//! Pingora's HTTP/2 sessions, for what Pingora's loop does not bound:
//!
//! - the preface and SETTINGS exchange must finish within the listener's
//!   `handshake_timeout`;
//! - a connection with no open stream for `idle_timeout` gets a GOAWAY and
//!   closes (Pingora's closes the socket without one);
//! - after `max_requests_per_connection` streams the client gets a GOAWAY
//!   and opens a new connection for more;
//! - streams the client cancels are a budget
//!   ([`crate::proxy::conn::RESET_BURST`], refilled at
//!   [`crate::proxy::conn::RESET_RATE`] per second): a client that cancels faster gets a GOAWAY
//!   `ENHANCE_YOUR_CALM` (HTTP/2 Rapid Reset). A stream cancelled before it
//!   was forwarded is not forwarded (the proxy asks
//!   [`crate::proxy::conn::client_cancelled`]);
//! - SETTINGS and PING frames from the client are capped the same way
//!   (`FrameCaps`): a flood of them gets `ENHANCE_YOUR_CALM`.
//!
//! Each stream is served by the proxy as Pingora's loop would, in a task
//! of its own, with the connection's state in a task-local so that the
//! proxy can count a cancel against its connection.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use pingora::apps::HttpServerApp;
use pingora::protocols::http::v2::server::{handshake, H2Accept, HttpSession};
use pingora::protocols::http::ServerSession;
use pingora::protocols::{Digest, Stream};
use pingora::server::ShutdownWatch;
use tokio::sync::Notify;

use crate::proxy::conn::{with_budget, CancelBudget};
use crate::telemetry::metrics::metrics;

/// Rejected (malformed) streams a connection may open in all.
const MAX_REJECTED: usize = 32;
/// How long a connection told to go away may take to finish its streams
/// and close, before it is dropped.
const DRAIN: Duration = Duration::from_secs(5);

/// What bounds one HTTP/2 connection, from its listener.
#[derive(Debug, Clone)]
pub struct H2Limits {
    pub listener: String,
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_requests: usize,
}

/// Why a connection was sent a GOAWAY (the `reason` label).
pub const GOAWAY_REASONS: &[&str] = &[
    "idle",
    "max_requests",
    "reset_flood",
    "frame_flood",
    "malformed",
    "shutdown",
];

/// One connection's state, shared with its streams' tasks.
struct H2Conn {
    /// Cancels and control frames the client may still send.
    budget: Arc<CancelBudget>,
    /// Streams being served, and a wake-up when one ends.
    active: AtomicUsize,
    ended: Notify,
}

impl H2Conn {
    fn new(listener: String) -> Arc<Self> {
        Arc::new(H2Conn {
            budget: CancelBudget::new(listener),
            active: AtomicUsize::new(0),
            ended: Notify::new(),
        })
    }

    /// Done once no stream has been open for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let ended = self.ended.notified();
            if self.active.load(Ordering::Acquire) == 0 {
                tokio::select! {
                    () = pingora::time::sleep(idle) => return,
                    () = ended => {}
                }
            } else {
                ended.await;
            }
        }
    }
}

/// Counts a stream as open for its task's life.
struct Open(Arc<H2Conn>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
        self.0.ended.notify_waiters();
    }
}

fn goaway(listener: &str, why: &str) {
    metrics().goaways.with_label_values(&[listener, why]).inc();
}

/// Serve one HTTP/2 connection until it closes.
pub async fn serve<A: HttpServerApp + Send + Sync + 'static>(
    app: &Arc<A>,
    stream: Stream,
    limits: H2Limits,
    shutdown: ShutdownWatch,
    listener_stopped: ShutdownWatch,
) {
    let conn_state = H2Conn::new(limits.listener.clone());
    let digest = Arc::new(Digest {
        ssl_digest: stream.get_ssl_digest(),
        timing_digest: stream.get_timing_digest(),
        proxy_digest: stream.get_proxy_digest(),
        socket_digest: stream.get_socket_digest(),
    });
    let stream: Stream = Box::new(FrameCaps::new(stream, conn_state.budget.clone()));
    let mut conn = match pingora::time::timeout(
        limits.handshake_timeout,
        handshake(stream, app.h2_options()),
    )
    .await
    {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            log::debug!("HTTP/2 handshake failed: {e}");
            return;
        }
        Err(_) => {
            log::debug!("HTTP/2 handshake not done within handshake_timeout");
            metrics()
                .rejected
                .with_label_values(&[&limits.listener, "header_timeout"])
                .inc();
            return;
        }
    };
    let mut shutdown_watch = shutdown.clone();
    // A reload that removes or moves the listener drains its connections.
    let mut listener_watch = listener_stopped;
    let mut listening = true;
    let mut served = 0usize;
    let mut rejected = 0usize;
    // Set once a GOAWAY went out: then the streams in flight finish, and
    // the connection closes, within DRAIN.
    let mut drain_until: Option<Instant> = None;
    let mut calmed = false;
    loop {
        let drain_deadline = drain_until.map(|d| d.saturating_duration_since(Instant::now()));
        let accepted = tokio::select! {
            biased;
            () = conn_state.budget.calmed(), if !calmed => {
                calmed = true;
                goaway(&limits.listener, conn_state.budget.calmed_for().unwrap_or("reset_flood"));
                conn.abrupt_shutdown(h2::Reason::ENHANCE_YOUR_CALM);
                // Let the GOAWAY go out; the connection then ends.
                drain_until = Some(Instant::now() + DRAIN);
                continue;
            }
            _ = shutdown_watch.changed(), if drain_until.is_none() => {
                goaway(&limits.listener, "shutdown");
                conn.graceful_shutdown();
                drain_until = Some(Instant::now() + DRAIN);
                continue;
            }
            changed = listener_watch.changed(), if drain_until.is_none() && listening => {
                match changed {
                    Ok(()) if *listener_watch.borrow() => {
                        goaway(&limits.listener, "shutdown");
                        conn.graceful_shutdown();
                        drain_until = Some(Instant::now() + DRAIN);
                    }
                    Ok(()) => {}
                    // No one can stop the listener any more.
                    Err(_) => listening = false,
                }
                continue;
            }
            () = conn_state.idle_for(limits.idle_timeout), if drain_until.is_none() => {
                // Nothing in flight: a GOAWAY saying so, and the close, at
                // once (a graceful one would wait a round trip for a PING
                // an idle client may never answer).
                goaway(&limits.listener, "idle");
                conn.abrupt_shutdown(h2::Reason::NO_ERROR);
                drain_until = Some(Instant::now() + DRAIN);
                continue;
            }
            () = pingora::time::sleep(drain_deadline.unwrap_or_default()), if drain_deadline.is_some() => return,
            accepted = HttpSession::from_h2_conn(&mut conn, digest.clone()) => accepted,
        };
        match accepted {
            Err(e) => {
                // The h2 layer's own GOAWAY for streams reset before they
                // were accepted (more than its max_pending_accept_reset_streams).
                let calmed = e.root_cause().downcast_ref::<h2::Error>().is_some_and(|e| {
                    e.is_go_away() && e.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM)
                });
                if calmed && drain_until.is_none() {
                    goaway(&limits.listener, "reset_flood");
                }
                log::debug!("HTTP/2 connection ended: {e}");
                return;
            }
            Ok(None) => return,
            Ok(Some(H2Accept::Rejected)) => {
                rejected += 1;
                if rejected > MAX_REJECTED && drain_until.is_none() {
                    goaway(&limits.listener, "malformed");
                    conn.abrupt_shutdown(h2::Reason::ENHANCE_YOUR_CALM);
                    drain_until = Some(Instant::now() + DRAIN);
                }
            }
            Ok(Some(H2Accept::Session(session))) => {
                served += 1;
                conn_state.active.fetch_add(1, Ordering::AcqRel);
                let open = Open(conn_state.clone());
                let app = app.clone();
                let shutdown = shutdown.clone();
                tokio::spawn(with_budget(conn_state.budget.clone(), async move {
                    let _open = open;
                    app.process_new_http(ServerSession::new_http2(session), &shutdown)
                        .await;
                }));
                if served >= limits.max_requests && drain_until.is_none() {
                    goaway(&limits.listener, "max_requests");
                    conn.graceful_shutdown();
                    drain_until = Some(Instant::now() + DRAIN);
                }
            }
        }
    }
}

/// Control frames a client may send at once, and per second after that.
const SETTINGS_BURST: f64 = 20.0;
const SETTINGS_RATE: f64 = 2.0;
const PING_BURST: f64 = 50.0;
const PING_RATE: f64 = 5.0;

const FRAME_SETTINGS: u8 = 0x4;
const FRAME_PING: u8 = 0x6;
const FLAG_ACK: u8 = 0x1;
const PREFACE_LEN: usize = 24;
const FRAME_HEADER: usize = 9;

/// The client's side of an HTTP/2 connection, read through a count of its
/// SETTINGS and PING frames (acknowledgements of ours excluded): each has
/// a budget, and a client over one is told to calm down. The h2 crate
/// answers every such frame and has no cap of its own.
struct FrameCaps {
    inner: Stream,
    budget: Arc<CancelBudget>,
    /// Preface bytes still to skip.
    preface: usize,
    /// The frame header being read, and how much of it has been.
    header: [u8; FRAME_HEADER],
    have: usize,
    /// Payload bytes of the current frame still to skip.
    payload: usize,
    settings: (f64, Instant),
    pings: (f64, Instant),
}

impl FrameCaps {
    fn new(inner: Stream, budget: Arc<CancelBudget>) -> Self {
        let now = Instant::now();
        FrameCaps {
            inner,
            budget,
            preface: PREFACE_LEN,
            header: [0; FRAME_HEADER],
            have: 0,
            payload: 0,
            settings: (SETTINGS_BURST, now),
            pings: (PING_BURST, now),
        }
    }

    /// Account for bytes the client sent.
    fn scan(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.preface > 0 {
                let n = self.preface.min(bytes.len());
                self.preface -= n;
                bytes = &bytes[n..];
            } else if self.payload > 0 {
                let n = self.payload.min(bytes.len());
                self.payload -= n;
                bytes = &bytes[n..];
            } else {
                let n = (FRAME_HEADER - self.have).min(bytes.len());
                self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
                self.have += n;
                bytes = &bytes[n..];
                if self.have == FRAME_HEADER {
                    self.have = 0;
                    self.frame();
                }
            }
        }
    }

    fn frame(&mut self) {
        let h = self.header;
        self.payload = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
        let (kind, flags) = (h[3], h[4]);
        if flags & FLAG_ACK != 0 {
            return;
        }
        let (bucket, burst, rate) = match kind {
            FRAME_SETTINGS => (&mut self.settings, SETTINGS_BURST, SETTINGS_RATE),
            FRAME_PING => (&mut self.pings, PING_BURST, PING_RATE),
            _ => return,
        };
        let now = Instant::now();
        bucket.0 = (bucket.0 + now.duration_since(bucket.1).as_secs_f64() * rate).min(burst);
        bucket.1 = now;
        bucket.0 -= 1.0;
        if bucket.0 < 0.0 {
            self.budget.calm_down("frame_flood");
        }
    }
}

impl std::fmt::Debug for FrameCaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameCaps")
            .field("inner", &self.inner)
            .finish()
    }
}

impl tokio::io::AsyncRead for FrameCaps {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if result.is_ready() {
            let this = &mut *self;
            this.scan(&buf.filled()[before..]);
        }
        result
    }
}

impl tokio::io::AsyncWrite for FrameCaps {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl FrameCaps {
    fn io(&self) -> &Stream {
        &self.inner
    }

    fn io_mut(&mut self) -> &mut Stream {
        &mut self.inner
    }
}

crate::delegate_stream_traits!(FrameCaps, io, io_mut);
