//! Circuit breaking for one upstream (`limits`): at most `max_requests`
//! in flight, and at most `max_connections` open; past either a request
//! waits, among at most `max_pending` others, for at most
//! `queue_timeout`. A request that cannot wait, or waits in vain, is
//! refused (503 `upstream_overloaded`) naming the limit, so an overloaded
//! upstream gets no more than it can take and clients learn at once.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

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
/// one, which only room under `max_connections` allows. Attempts that
/// find none wait in line; each change hands what it freed to the first
/// in line that can use it.
#[derive(Debug)]
pub struct Connections {
    max: AtomicUsize,
    counts: Mutex<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    open: usize,
    claimed: usize,
    /// Per endpoint: open, claimed.
    at: HashMap<SocketAddr, (usize, usize)>,
    /// Waiting attempts, first come first: told when a connection was
    /// claimed for them.
    line: VecDeque<(SocketAddr, oneshot::Sender<()>)>,
}

impl Counts {
    /// Whether an attempt at `addr` can have a connection now: an idle
    /// one there (open, not claimed), or room for a new one.
    fn free_for(&self, addr: SocketAddr, max: usize) -> bool {
        let (open_here, claimed_here) = self.at.get(&addr).copied().unwrap_or_default();
        // Claims past an endpoint's open connections are connections about
        // to open: they take room as the open ones do.
        let committed: usize = self
            .at
            .values()
            .map(|(open, claimed)| *open.max(claimed))
            .sum();
        self.claimed < max && (open_here > claimed_here || committed < max)
    }

    fn claim(&mut self, addr: SocketAddr) {
        self.claimed += 1;
        self.at.entry(addr).or_default().1 += 1;
    }

    fn unclaim(&mut self, addr: SocketAddr) {
        self.claimed = self.claimed.saturating_sub(1);
        if let Some(at) = self.at.get_mut(&addr) {
            at.1 = at.1.saturating_sub(1);
            if *at == (0, 0) {
                self.at.remove(&addr);
            }
        }
    }

    /// Hand what is free to the waiting attempts, in their order.
    fn serve_line(&mut self, max: usize) {
        let mut i = 0;
        while i < self.line.len() {
            let addr = self.line[i].0;
            if !self.free_for(addr, max) {
                i += 1;
                continue;
            }
            let Some((_, tell)) = self.line.remove(i) else {
                break;
            };
            self.claim(addr);
            if tell.send(()).is_err() {
                // It stopped waiting meanwhile.
                self.unclaim(addr);
            }
        }
    }
}

impl Connections {
    pub fn new(max: u32) -> Self {
        Connections {
            max: AtomicUsize::new(max as usize),
            counts: Mutex::default(),
        }
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn max(&self) -> usize {
        self.max.load(Ordering::Relaxed)
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

    /// A connection to `addr` closed: room for a waiting attempt.
    pub fn closed(&self, addr: SocketAddr) {
        let mut c = self.counts();
        c.open = c.open.saturating_sub(1);
        if let Some(at) = c.at.get_mut(&addr) {
            at.0 = at.0.saturating_sub(1);
            if *at == (0, 0) {
                c.at.remove(&addr);
            }
        }
        c.serve_line(self.max());
    }

    /// A new `max_connections` (a reload): more room may serve the line.
    fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Relaxed);
        self.counts().serve_line(max);
    }

    /// A connection for an attempt at `addr` at once, when one is free and
    /// nobody waits; else a place in line.
    fn claim_or_wait(self: &Arc<Self>, addr: SocketAddr) -> Result<Claim, Waiting> {
        let mut c = self.counts();
        if c.line.is_empty() && c.free_for(addr, self.max()) {
            c.claim(addr);
            return Ok(self.claim_made(addr));
        }
        let (tell, told) = oneshot::channel();
        c.line.push_back((addr, tell));
        // Those ahead may wait for what this one can use (another endpoint's
        // idle connection): it need not wait behind them.
        c.serve_line(self.max());
        Err(Waiting {
            connections: self.clone(),
            addr,
            told: Some(told),
        })
    }

    fn claim_made(self: &Arc<Self>, addr: SocketAddr) -> Claim {
        Claim {
            connections: self.clone(),
            addr,
        }
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
        let max = self.connections.max();
        let mut c = self.connections.counts();
        c.unclaim(self.addr);
        c.serve_line(max);
    }
}

/// An attempt waiting in line for a connection. Dropped (it waited in
/// vain, or its client left) after a connection was claimed for it, it
/// gives that back.
struct Waiting {
    connections: Arc<Connections>,
    addr: SocketAddr,
    told: Option<oneshot::Receiver<()>>,
}

impl Waiting {
    /// `None` if the line dropped it without a claim (it does not).
    async fn claimed(&mut self) -> Option<Claim> {
        let told = self.told.as_mut()?;
        let sent = told.await.is_ok();
        self.told = None;
        sent.then(|| self.connections.claim_made(self.addr))
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        let Some(mut told) = self.told.take() else {
            return;
        };
        let max = self.connections.max();
        let mut c = self.connections.counts();
        if told.try_recv().is_ok() {
            c.unclaim(self.addr);
            c.serve_line(max);
        } else {
            // Still in line: leave it.
            drop(told);
            c.line.retain(|(_, tell)| !tell.is_closed());
        }
    }
}

/// Counts a waiting request until it stops waiting (also when its client
/// leaves and the wait is dropped).
struct Pending<'a>(&'a AtomicUsize);

impl Drop for Pending<'_> {
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
                    c.set_max(max as usize);
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
        let _pending = Pending(&self.pending);
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
        let mut waiting = match conns.claim_or_wait(addr) {
            Ok(claim) => return Ok(Some(claim)),
            Err(waiting) => waiting,
        };
        let before = self.pending.fetch_add(1, Ordering::AcqRel);
        let _pending = Pending(&self.pending);
        if before >= self.settings.max_pending as usize {
            return Err(Overflow::MaxPending);
        }
        match tokio::time::timeout(self.settings.queue_timeout, waiting.claimed()).await {
            Ok(Some(claim)) => Ok(Some(claim)),
            Ok(None) | Err(_) => Err(Overflow::MaxConnections),
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

    #[tokio::test(start_paused = true)]
    async fn waiting_attempts_get_connections_first_come_first_served() {
        let gate = Gate::new(
            UpstreamLimits {
                max_connections: Some(1),
                max_requests: 100,
                max_pending: 10,
                queue_timeout: Duration::from_secs(1),
            },
            None,
        );
        let conns = gate.connections.clone().unwrap();
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let held = gate.connection(a).await.unwrap().unwrap();
        conns.opened(a);
        let (first, second) = (gate.connection(a), gate.connection(a));
        tokio::pin!(first, second);
        assert!(futures_poll_once(first.as_mut()).is_none());
        assert!(futures_poll_once(second.as_mut()).is_none());
        // A third joins the line after them.
        let third = gate.connection(a);
        tokio::pin!(third);
        assert!(futures_poll_once(third.as_mut()).is_none());
        drop(held);
        assert!(futures_poll_once(second.as_mut()).is_none());
        assert!(futures_poll_once(third.as_mut()).is_none());
        let first = first.await.unwrap().unwrap();
        assert!(futures_poll_once(third.as_mut()).is_none());
        drop(first);
        let _second = second.await.unwrap().unwrap();
        // The third gives up in vain; nothing stays claimed for it.
        assert_eq!(third.await.unwrap_err(), Overflow::MaxConnections);
        assert_eq!(gate.pending(), 0);
        assert_eq!(conns.counts().claimed, 1);
        assert!(conns.counts().line.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn connections_about_to_open_count_against_the_limit() {
        let gate = Gate::new(
            UpstreamLimits {
                max_connections: Some(2),
                max_requests: 100,
                max_pending: 10,
                queue_timeout: Duration::from_secs(1),
            },
            None,
        );
        let conns = gate.connections.clone().unwrap();
        let (a, b, c): (SocketAddr, SocketAddr, SocketAddr) = (
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.1:2".parse().unwrap(),
            "127.0.0.1:3".parse().unwrap(),
        );
        // One idle connection at `a`; an attempt at `b` is opening one.
        conns.opened(a);
        let _b = gate.connection(b).await.unwrap().unwrap();
        // `c` would be a third.
        assert_eq!(
            gate.connection(c).await.unwrap_err(),
            Overflow::MaxConnections
        );
        // `a`'s idle one is free, even with `c` waiting in line ahead.
        let waiting_c = gate.connection(c);
        tokio::pin!(waiting_c);
        assert!(futures_poll_once(waiting_c.as_mut()).is_none());
        let _a = gate.connection(a).await.unwrap().unwrap();
    }

    fn futures_poll_once<F: std::future::Future>(f: std::pin::Pin<&mut F>) -> Option<F::Output> {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match f.poll(&mut cx) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        }
    }
}
