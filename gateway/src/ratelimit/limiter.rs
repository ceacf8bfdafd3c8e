//! A keyed GCRA limiter (governor) with bounded memory.
//!
//! Keys live in a concurrent map. Every cleanup (`evict_idle`, run by a
//! background task every few seconds) drops keys whose bucket is full again,
//! which is exactly the state a new key starts in, so eviction never changes
//! a decision. Between cleanups the map is capped at `max_keys`: when it is
//! full, idle keys are evicted at once (at most once a second); if it is
//! still full, every request of the policy shares one overflow bucket until
//! keys go idle. Inventing keys then buys an attacker less, never more, and
//! memory stays bounded.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// `remaining`: requests that may still go at once; `full_in`: time until
    /// the bucket is full again.
    Allowed { remaining: u32, full_in: Duration },
    /// `retry_after`: when the next request will be allowed.
    Limited { retry_after: Duration },
}

type Inner<C> = RateLimiter<String, DashMapStateStore<String>, C, StateInformationMiddleware>;
type Overflow<C> = RateLimiter<NotKeyed, InMemoryState, C, StateInformationMiddleware>;

pub struct KeyedLimiter<C: Clock = DefaultClock> {
    inner: Inner<C>,
    /// The bucket every request shares while the map is full: outside the
    /// map, so the map never holds more than `max_keys` keys.
    overflow: Overflow<C>,
    emission: Duration,
    burst: u32,
    max_keys: usize,
    /// Milliseconds since `created` of the last forced eviction.
    last_forced_eviction: AtomicU64,
    created: Instant,
}

/// Shortest gap between two evictions forced by a full key map.
const FORCED_EVICTION_GAP_MS: u64 = 1000;

impl KeyedLimiter<DefaultClock> {
    pub fn new(rate: u32, per: Duration, burst: u32, max_keys: usize) -> Option<Self> {
        Self::with_clock(rate, per, burst, max_keys, DefaultClock::default())
    }
}

impl<C: Clock + Clone> KeyedLimiter<C> {
    /// `rate` requests per `per`, up to `burst` at once. `None` when the
    /// numbers make no quota (validation rules that out).
    pub fn with_clock(
        rate: u32,
        per: Duration,
        burst: u32,
        max_keys: usize,
        clock: C,
    ) -> Option<Self> {
        let emission = per.checked_div(rate)?;
        let quota = Quota::with_period(emission)?.allow_burst(NonZeroU32::new(burst)?);
        let overflow = RateLimiter::direct_with_clock(quota, clock.clone())
            .with_middleware::<StateInformationMiddleware>();
        let inner = RateLimiter::dashmap_with_clock(quota, clock)
            .with_middleware::<StateInformationMiddleware>();
        Some(KeyedLimiter {
            inner,
            overflow,
            emission,
            burst,
            max_keys,
            last_forced_eviction: AtomicU64::new(0),
            created: Instant::now(),
        })
    }

    pub fn check(&self, key: &str) -> Decision {
        let checked = if self.inner.len() >= self.max_keys && !self.make_room() {
            self.overflow.check()
        } else {
            self.inner.check_key(&key.to_string())
        };
        match checked {
            Ok(snapshot) => {
                let remaining = snapshot.remaining_burst_capacity();
                Decision::Allowed {
                    remaining,
                    full_in: self.emission * (self.burst - remaining.min(self.burst)),
                }
            }
            Err(not_until) => Decision::Limited {
                retry_after: not_until.wait_time_from(self.inner.clock().now()),
            },
        }
    }

    /// The map is full: evict idle keys now unless that was just done.
    /// Whether there is room afterwards.
    fn make_room(&self) -> bool {
        let now_ms = self.created.elapsed().as_millis() as u64;
        let last = self.last_forced_eviction.load(Ordering::Relaxed);
        if now_ms.saturating_sub(last) >= FORCED_EVICTION_GAP_MS
            && self
                .last_forced_eviction
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.evict_idle();
        }
        self.inner.len() < self.max_keys
    }

    /// Drop keys whose bucket is full again, and give the memory back.
    pub fn evict_idle(&self) {
        self.inner.retain_recent();
        self.inner.shrink_to_fit();
    }

    pub fn keys(&self) -> usize {
        self.inner.len()
    }
}

#[cfg(test)]
mod tests {
    use governor::clock::FakeRelativeClock;

    use super::*;

    fn limiter(
        rate: u32,
        per: Duration,
        burst: u32,
        max_keys: usize,
    ) -> (KeyedLimiter<FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        (
            KeyedLimiter::with_clock(rate, per, burst, max_keys, clock.clone()).unwrap(),
            clock,
        )
    }

    fn allowed(d: Decision) -> bool {
        matches!(d, Decision::Allowed { .. })
    }

    #[test]
    fn burst_then_refill_at_the_rate() {
        // 10 per second, bursts of 3.
        let (l, clock) = limiter(10, Duration::from_secs(1), 3, 100);
        assert_eq!(
            l.check("a"),
            Decision::Allowed {
                remaining: 2,
                full_in: Duration::from_millis(100)
            }
        );
        assert!(allowed(l.check("a")));
        assert_eq!(
            l.check("a"),
            Decision::Allowed {
                remaining: 0,
                full_in: Duration::from_millis(300)
            }
        );
        assert_eq!(
            l.check("a"),
            Decision::Limited {
                retry_after: Duration::from_millis(100)
            }
        );
        clock.advance(Duration::from_millis(99));
        assert!(!allowed(l.check("a")));
        clock.advance(Duration::from_millis(1));
        assert!(allowed(l.check("a")));
        assert!(!allowed(l.check("a")));
        // A full second refills the whole burst, no more.
        clock.advance(Duration::from_secs(1));
        for _ in 0..3 {
            assert!(allowed(l.check("a")));
        }
        assert!(!allowed(l.check("a")));
    }

    #[test]
    fn keys_are_independent() {
        let (l, _) = limiter(1, Duration::from_secs(60), 1, 100);
        assert!(allowed(l.check("a")));
        assert!(!allowed(l.check("a")));
        assert!(allowed(l.check("b")));
    }

    #[test]
    fn idle_keys_are_evicted_and_memory_stays_bounded() {
        let (l, clock) = limiter(100, Duration::from_secs(1), 5, 1_000);
        for i in 0..1_000 {
            assert!(allowed(l.check(&format!("client-{i}"))));
        }
        assert_eq!(l.keys(), 1_000);
        // Map full and nothing idle yet: new keys share the overflow bucket.
        for _ in 0..5 {
            assert!(allowed(l.check("newcomer-1")));
        }
        assert!(!allowed(l.check("newcomer-2")), "overflow bucket is shared");
        assert_eq!(l.keys(), 1_000, "the overflow bucket is no key");
        // Once buckets are full again, eviction empties the map.
        clock.advance(Duration::from_secs(1));
        l.evict_idle();
        assert_eq!(l.keys(), 0);
        for i in 0..50_000 {
            l.check(&format!("burst-{i}"));
            if i % 10_000 == 0 {
                clock.advance(Duration::from_secs(1));
            }
        }
        assert!(l.keys() <= 1_000, "map grew to {}", l.keys());
    }

    #[test]
    fn eviction_never_changes_a_decision() {
        let (l, clock) = limiter(1, Duration::from_secs(10), 2, 100);
        assert!(allowed(l.check("a")));
        assert!(allowed(l.check("a")));
        l.evict_idle();
        assert!(
            !allowed(l.check("a")),
            "a limited key must survive eviction"
        );
        // governor evicts a key one emission interval after its bucket is full
        // again (here 2 x 10 s + 10 s).
        clock.advance(Duration::from_secs(31));
        l.evict_idle();
        assert_eq!(l.keys(), 0);
        assert!(allowed(l.check("a")));
    }
}
