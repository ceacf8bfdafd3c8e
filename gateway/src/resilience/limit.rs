//! Circuit breaking for one upstream (`limits`): at most `max_requests`
//! in flight, and at most `max_connections` open; past either a request
//! waits, among at most `max_pending` others, for at most
//! `queue_timeout`. A request that cannot wait, or waits in vain, is
//! refused (503 `upstream_overloaded`) naming the limit, so an overloaded
//! upstream gets no more than it can take and clients learn at once.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use crate::config::model::UpstreamLimits;

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// Waited `queue_timeout` for one of the `max_requests`.
    MaxRequests,
    /// `max_pending` were waiting already.
    MaxPending,
    /// The adaptive concurrency limit was reached.
    Concurrency,
    /// Waited `queue_timeout` for a connection within `max_connections`.
    MaxConnections,
}

impl Overflow {
    /// The limit named `label` (the inverse of [`Self::as_str`]).
    pub fn from_label(label: &str) -> Option<Self> {
        [
            Overflow::MaxRequests,
            Overflow::MaxPending,
            Overflow::Concurrency,
            Overflow::MaxConnections,
        ]
        .into_iter()
        .find(|o| o.as_str() == label)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Overflow::MaxRequests => "max_requests",
            Overflow::MaxPending => "max_pending",
            Overflow::Concurrency => "concurrency",
            Overflow::MaxConnections => "max_connections",
        }
    }
}

/// A request's place among the `max_requests`, given back when dropped.
#[derive(Debug)]
pub struct Permit(#[allow(dead_code, reason = "held for its drop")] OwnedSemaphorePermit);

#[derive(Debug)]
pub struct Gate {
    pub settings: UpstreamLimits,
    permits: Arc<Semaphore>,
    pending: AtomicUsize,
    /// `max_connections`, when set.
    pub connections: Option<Arc<Connections>>,
}

/// The connections open to an upstream (told by each connection as it
/// opens and closes), and the attempts that hold or are about to open
/// one ("claimed"), in all and per endpoint. An HTTP/1.1 attempt holds
/// one connection: an idle one of its endpoint from the pool, else a new
/// one, which only room under `max_connections` allows.
#[derive(Debug)]
pub struct Connections {
    max: AtomicUsize,
    counts: Mutex<Counts>,
    changed: Notify,
}

#[derive(Debug, Default)]
struct Counts {
    open: usize,
    claimed: usize,
    at: HashMap<SocketAddr, (usize, usize)>,
}

impl Connections {
    pub fn new(max: u32) -> Self {
        Connections {
            max: AtomicUsize::new(max as usize),
            counts: Mutex::default(),
            changed: Notify::new(),
        }
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Connections open now, in use or idle.
    pub fn open(&self) -> usize {
        self.counts().open
    }

    /// A connection to `addr` opened.
    pub fn opened(&self, addr: SocketAddr) {
        let mut c = self.counts();
        c.open += 1;
        c.at.entry(addr).or_default().0 += 1;
    }

    /// A connection to `addr` closed.
    pub fn closed(&self, addr: SocketAddr) {
        {
            let mut c = self.counts();
            c.open = c.open.saturating_sub(1);
            if let Some(at) = c.at.get_mut(&addr) {
                at.0 = at.0.saturating_sub(1);
                if *at == (0, 0) {
                    c.at.remove(&addr);
                }
            }
        }
        self.changed.notify_waiters();
    }

    /// A connection for an attempt at `addr`, if one is free for it: an
    /// idle one there (open, not claimed), or room for a new one.
    fn try_claim(self: &Arc<Self>, addr: SocketAddr) -> Option<Claim> {
        let max = self.max.load(Ordering::Relaxed);
        let mut c = self.counts();
        let (open_here, claimed_here) = c.at.get(&addr).copied().unwrap_or_default();
        if c.claimed >= max || (open_here <= claimed_here && c.open >= max) {
            return None;
        }
        c.claimed += 1;
        c.at.entry(addr).or_default().1 += 1;
        Some(Claim {
            connections: self.clone(),
            addr,
        })
    }
}

/// An attempt's connection under `max_connections`, given back when the
/// attempt ends (its connection is back in the pool by then, or closed).
#[derive(Debug)]
pub struct Claim {
    connections: Arc<Connections>,
    addr: SocketAddr,
}

impl Drop for Claim {
    fn drop(&mut self) {
        {
            let mut c = self.connections.counts();
            c.claimed = c.claimed.saturating_sub(1);
            if let Some(at) = c.at.get_mut(&self.addr) {
                at.1 = at.1.saturating_sub(1);
                if *at == (0, 0) {
                    c.at.remove(&self.addr);
                }
            }
        }
        self.connections.changed.notify_waiters();
    }
}

/// Counts a waiting request until it stops waiting (also when its client
/// leaves and the wait is dropped).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Gate {
    /// `counted`: the connections a gate being replaced counts (a reload
    /// that changed `limits`): the open ones stay counted, under the new
    /// `max_connections`.
    pub fn new(settings: UpstreamLimits, counted: Option<Arc<Connections>>) -> Self {
        Gate {
            settings,
            permits: Arc::new(Semaphore::new(settings.max_requests as usize)),
            pending: AtomicUsize::new(0),
            connections: settings.max_connections.map(|max| match counted {
                Some(c) => {
                    c.max.store(max as usize, Ordering::Relaxed);
                    c.changed.notify_waiters();
                    c
                }
                None => Arc::new(Connections::new(max)),
            }),
        }
    }

    /// Requests waiting now.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Acquire)
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> usize {
        (self.settings.max_requests as usize).saturating_sub(self.permits.available_permits())
    }

    /// A place among the `max_requests`: at once if one is free, else
    /// after waiting in line.
    pub async fn enter(&self) -> Result<Permit, Overflow> {
        if let Ok(p) = self.permits.clone().try_acquire_owned() {
            return Ok(Permit(p));
        }
        let before = self.pending.fetch_add(1, Ordering::AcqRel);
        let _waiting = Waiting(&self.pending);
        if before >= self.settings.max_pending as usize {
            return Err(Overflow::MaxPending);
        }
        match tokio::time::timeout(
            self.settings.queue_timeout,
            self.permits.clone().acquire_owned(),
        )
        .await
        {
            Ok(Ok(p)) => Ok(Permit(p)),
            _ => Err(Overflow::MaxRequests),
        }
    }
}

impl Gate {
    /// A connection for an attempt at `addr` within `max_connections`
    /// (`None` when there is no such limit): at once if one is free, else
    /// after waiting among the `max_pending` for one to close or come back
    /// to the pool.
    pub async fn connection(&self, addr: SocketAddr) -> Result<Option<Claim>, Overflow> {
        let Some(conns) = &self.connections else {
            return Ok(None);
        };
        if let Some(claim) = conns.try_claim(addr) {
            return Ok(Some(claim));
        }
        let before = self.pending.fetch_add(1, Ordering::AcqRel);
        let _waiting = Waiting(&self.pending);
        if before >= self.settings.max_pending as usize {
            return Err(Overflow::MaxPending);
        }
        let deadline = tokio::time::Instant::now() + self.settings.queue_timeout;
        loop {
            // Registered before the check, so a change between the two wakes it.
            let changed = conns.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(claim) = conns.try_claim(addr) {
                return Ok(Some(claim));
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return Err(Overflow::MaxConnections);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn requests_past_the_limit_wait_in_line_then_are_refused() {
        let gate = Gate::new(
            UpstreamLimits {
                max_connections: None,
                max_requests: 2,
                max_pending: 1,
                queue_timeout: Duration::from_secs(1),
            },
            None,
        );
        let a = gate.enter().await.unwrap();
        let _b = gate.enter().await.unwrap();
        assert_eq!(gate.in_flight(), 2);
        // A third waits; a fourth finds the line full.
        let third = gate.enter();
        tokio::pin!(third);
        assert!(futures_poll_once(third.as_mut()).is_none());
        assert_eq!(gate.pending(), 1);
        assert_eq!(gate.enter().await.unwrap_err(), Overflow::MaxPending);
        // A place frees: the one waiting gets it.
        drop(a);
        let _c = third.await.unwrap();
        assert_eq!(gate.pending(), 0);
        // Nobody leaves: a waiter gives up after queue_timeout.
        let start = tokio::time::Instant::now();
        assert_eq!(gate.enter().await.unwrap_err(), Overflow::MaxRequests);
        assert_eq!(start.elapsed(), Duration::from_secs(1));
        assert_eq!(gate.pending(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn connections_are_reused_within_max_or_waited_for() {
        let gate = Gate::new(
            UpstreamLimits {
                max_connections: Some(2),
                max_requests: 100,
                max_pending: 1,
                queue_timeout: Duration::from_secs(1),
            },
            None,
        );
        let conns = gate.connections.clone().unwrap();
        let (a, b): (SocketAddr, SocketAddr) = (
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.1:2".parse().unwrap(),
        );
        // Two attempts at `a` open two connections: the limit.
        let first = gate.connection(a).await.unwrap().unwrap();
        conns.opened(a);
        let second = gate.connection(a).await.unwrap().unwrap();
        conns.opened(a);
        assert_eq!(conns.open(), 2);
        // A third waits; a fourth finds the line full.
        let third = gate.connection(a);
        tokio::pin!(third);
        assert!(futures_poll_once(third.as_mut()).is_none());
        assert_eq!(gate.connection(a).await.unwrap_err(), Overflow::MaxPending);
        // The first attempt ends, its connection idle in the pool: the
        // waiting one takes it.
        drop(first);
        let third = third.await.unwrap().unwrap();
        assert_eq!(conns.open(), 2);
        // An idle connection to `a` is no use for `b`: full, so it waits
        // in vain ...
        drop(second);
        let start = tokio::time::Instant::now();
        assert_eq!(
            gate.connection(b).await.unwrap_err(),
            Overflow::MaxConnections
        );
        assert_eq!(start.elapsed(), Duration::from_secs(1));
        // ... until that connection closes and makes room.
        conns.closed(a);
        let _b = gate.connection(b).await.unwrap().unwrap();
        drop(third);
        assert_eq!(gate.pending(), 0);
    }

    fn futures_poll_once<F: std::future::Future>(f: std::pin::Pin<&mut F>) -> Option<F::Output> {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match f.poll(&mut cx) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        }
    }
}
