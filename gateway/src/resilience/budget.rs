//! An upstream's retry budget: over the last [`WINDOW_SECONDS`] seconds,
//! retries may add at most `ratio` of its requests plus `min_per_second`
//! per second, so an upstream that fails everything sees about
//! `1 + ratio` times its traffic, not `attempts` times. Counted in
//! one-second slots with atomics: a request adds one to its slot, a retry
//! checks the window and adds one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crate::config::model::RetryBudget;
use crate::endpoints::balance::nanos;

pub const WINDOW_SECONDS: u64 = 10;

#[derive(Debug, Default)]
struct Slot {
    /// The second these counts are of (since the balancer's epoch), +1 so
    /// 0 means never used.
    second: AtomicU64,
    requests: AtomicU64,
    retries: AtomicU64,
}

#[derive(Debug)]
pub struct Budget {
    pub settings: RetryBudget,
    slots: [Slot; WINDOW_SECONDS as usize],
}

fn second_of(t: Instant) -> u64 {
    nanos(t) / 1_000_000_000 + 1
}

impl Budget {
    pub fn new(settings: RetryBudget) -> Self {
        Budget {
            settings,
            slots: Default::default(),
        }
    }

    /// The slot of `second`, emptied first if it held an older second.
    fn slot(&self, second: u64) -> &Slot {
        let slot = &self.slots[(second % WINDOW_SECONDS) as usize];
        let held = slot.second.load(Ordering::Acquire);
        if held != second
            && slot
                .second
                .compare_exchange(held, second, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            slot.requests.store(0, Ordering::Release);
            slot.retries.store(0, Ordering::Release);
        }
        slot
    }

    /// Count a request (its first attempt).
    pub fn deposit(&self, now: Instant) {
        self.slot(second_of(now))
            .requests
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Take a retry from the budget if there is room.
    pub fn withdraw(&self, now: Instant) -> bool {
        let second = second_of(now);
        let slot = self.slot(second);
        let (mut requests, mut retries) = (0u64, 0u64);
        for s in &self.slots {
            let at = s.second.load(Ordering::Acquire);
            if at != 0 && at + WINDOW_SECONDS > second {
                requests += s.requests.load(Ordering::Relaxed);
                retries += s.retries.load(Ordering::Relaxed);
            }
        }
        let allowed = self.settings.ratio * requests as f64
            + f64::from(self.settings.min_per_second) * WINDOW_SECONDS as f64;
        if (retries + 1) as f64 > allowed {
            return false;
        }
        slot.retries.fetch_add(1, Ordering::Relaxed);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn retries_follow_the_request_rate_and_the_window_moves_on() {
        let b = Budget::new(RetryBudget {
            ratio: 0.2,
            min_per_second: 0,
        });
        let t0 = Instant::now();
        for _ in 0..100 {
            b.deposit(t0);
        }
        let allowed = (0..100).filter(|_| b.withdraw(t0)).count();
        assert_eq!(allowed, 20);
        // Eleven seconds on, the old requests are out of the window.
        let later = t0 + Duration::from_secs(11);
        assert!(!b.withdraw(later));
        b.deposit(later);
        for _ in 0..4 {
            b.deposit(later);
        }
        assert!(b.withdraw(later));
        assert!(!b.withdraw(later));
    }
}
