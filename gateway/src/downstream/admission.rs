//! Who gets a listener's connection slots (`limits.max_connections`).
//!
//! Each listener has its own accept loop, and this is its filter: while
//! the listener has room, a new connection is accepted at once. When it is
//! full, the connection that has waited longest for its next request (an
//! idle keep-alive one, or a new one that has sent nothing) is closed to
//! make room, and counted. When every connection is busy, the accept loop
//! waits for one to end: new connections stay in the kernel's backlog,
//! where clients wait (or time out) as they would for any busy server,
//! instead of being accepted and reset.
//!
//! Under memory overload (`[gateway] overload`, [`crate::lifecycle::overloaded`]) new connections are refused.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::listeners::ConnectionFilter;
use prometheus::IntGauge;
use tokio::sync::Notify;

use crate::runtime::Runtime;
use crate::telemetry::metrics::metrics;

/// How often a full listener looks again at its limit, which a reload may
/// have raised, while no connection ends.
const RECHECK: Duration = Duration::from_secs(1);

/// One listener's slots.
pub struct Admission {
    pub listener: String,
    runtime: Arc<ArcSwap<Runtime>>,
    /// Connections open now.
    open: AtomicUsize,
    /// A slot came free.
    freed: Notify,
    /// Connections waiting for a request, by when they started to wait.
    waiting: Mutex<BTreeMap<u64, Arc<Notify>>>,
    next: AtomicU64,
    gauge: IntGauge,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission")
            .field("listener", &self.listener)
            .field("open", &self.open)
            .finish()
    }
}

impl Admission {
    /// The slots of the listener named `listener`; kept by name, so that a
    /// listener moved or restarted by a reload keeps its count.
    /// `rt`: the runtime that has the listener (a reload's, before it is
    /// swapped in), for its gauge of open connections.
    pub fn new(listener: &str, runtime: Arc<ArcSwap<Runtime>>, rt: &Runtime) -> Arc<Self> {
        let gauge = rt.connections_gauge(rt.listener_named(listener));
        Arc::new(Admission {
            listener: listener.to_string(),
            runtime,
            open: AtomicUsize::new(0),
            freed: Notify::new(),
            waiting: Mutex::new(BTreeMap::new()),
            next: AtomicU64::new(0),
            gauge,
        })
    }

    fn max_connections(&self) -> Option<usize> {
        let rt = self.runtime.load();
        rt.listener_named(&self.listener)
            .and_then(|i| rt.config.listeners.get(i))
            .and_then(|l| l.limits.max_connections)
    }

    /// Whether a waiting connection may be closed to make room: only when
    /// the listener has a limit.
    pub fn limited(&self) -> bool {
        self.max_connections().is_some()
    }

    /// Count a connection as open until the guard drops.
    pub fn opened(self: &Arc<Self>) -> Open {
        self.open.fetch_add(1, Ordering::AcqRel);
        self.gauge.inc();
        Open(self.clone())
    }

    /// Register a connection as waiting for its next request; the guard
    /// says when it should close to make room.
    pub fn waiting(self: &Arc<Self>) -> Waiting {
        let seq = self.next.fetch_add(1, Ordering::Relaxed);
        let close = Arc::new(Notify::new());
        self.lock().insert(seq, close.clone());
        Waiting {
            admission: self.clone(),
            seq,
            close,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Arc<Notify>>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tell the connection that has waited longest to close; whether there
    /// was one.
    fn evict_longest_waiting(&self) -> bool {
        let Some((_, close)) = self.lock().pop_first() else {
            return false;
        };
        close.notify_one();
        metrics()
            .connections_evicted
            .with_label_values(&[&self.listener])
            .inc();
        true
    }
}

#[async_trait]
impl ConnectionFilter for Admission {
    async fn should_accept(&self, _peer: Option<&SocketAddr>) -> bool {
        if crate::lifecycle::overloaded() {
            crate::lifecycle::shed("connection");
            return false;
        }
        let mut counted = false;
        loop {
            let Some(max) = self.max_connections() else {
                return true;
            };
            let freed = self.freed.notified();
            if self.open.load(Ordering::Acquire) < max || self.evict_longest_waiting() {
                return true;
            }
            if !counted {
                // Once per connection held back.
                counted = true;
                metrics()
                    .rejected
                    .with_label_values(&[&self.listener, "connection_limit"])
                    .inc();
            }
            // Accept nothing more until a connection ends.
            let _ = tokio::time::timeout(RECHECK, freed).await;
        }
    }
}

/// An open connection's slot.
pub struct Open(Arc<Admission>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        self.0.gauge.dec();
        self.0.freed.notify_waiters();
    }
}

/// A connection waiting for a request, which the listener may ask to close.
pub struct Waiting {
    admission: Arc<Admission>,
    seq: u64,
    close: Arc<Notify>,
}

impl Waiting {
    /// Done when the listener needs this connection's slot.
    pub async fn evicted(&self) {
        self.close.notified().await
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.admission.lock().remove(&self.seq);
    }
}
