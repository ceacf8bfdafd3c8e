//! Circuit breaking for one upstream (`limits`): at most `max_requests`
//! in flight; past it a request waits, first come first served, among at
//! most `max_pending` others, for at most `queue_timeout`. A request that
//! cannot wait, or waits in vain, is refused (503 `upstream_overloaded`)
//! naming the limit, so an overloaded upstream gets no more than it can
//! take and clients learn at once.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

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
}

impl Overflow {
    pub fn as_str(self) -> &'static str {
        match self {
            Overflow::MaxRequests => "max_requests",
            Overflow::MaxPending => "max_pending",
            Overflow::Concurrency => "concurrency",
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
    pub fn new(settings: UpstreamLimits) -> Self {
        Gate {
            settings,
            permits: Arc::new(Semaphore::new(settings.max_requests as usize)),
            pending: AtomicUsize::new(0),
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn requests_past_the_limit_wait_in_line_then_are_refused() {
        let gate = Gate::new(UpstreamLimits {
            max_requests: 2,
            max_pending: 1,
            queue_timeout: Duration::from_secs(1),
        });
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

    fn futures_poll_once<F: std::future::Future>(f: std::pin::Pin<&mut F>) -> Option<F::Output> {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match f.poll(&mut cx) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        }
    }
}
