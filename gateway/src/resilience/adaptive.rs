//! Adaptive concurrency (`concurrency = "adaptive"`): the number of
//! requests an upstream may have in flight follows its latency. Every
//! [`WINDOW`] the mean time to a response head is compared with the
//! lowest window mean of the last [`MIN_RTT_WINDOWS`] windows: at or near
//! that minimum the limit grows (by its square root), above it the limit
//! shrinks in proportion (by at most half per window). Requests past the
//! limit are refused at once (503 `upstream_overloaded`), so a queue
//! builds in front of meshgate's clients, not inside the upstream, and
//! the latency of what is served stays near the upstream's unloaded
//! latency.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often the limit moves.
pub const WINDOW: Duration = Duration::from_millis(100);
/// The minimum latency is the lowest window mean of this many windows
/// (10 s), so a lasting change of the upstream's own speed is learnt.
pub const MIN_RTT_WINDOWS: usize = 100;
/// The limit's bounds.
pub const MIN_LIMIT: u32 = 2;
pub const INITIAL_LIMIT: u32 = 32;
/// Latency up to this much over the minimum counts as "at the minimum".
const TOLERANCE: f64 = 1.1;
/// Windows with fewer samples say nothing.
const MIN_SAMPLES: u32 = 3;

#[derive(Debug)]
pub struct Adaptive {
    max_limit: u32,
    limit: AtomicU32,
    in_flight: Arc<AtomicU32>,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// The limit as a real number (smooth growth).
    limit: f64,
    window_start: Option<Instant>,
    sum: f64,
    samples: u32,
    /// Recent window means, newest last.
    means: VecDeque<f64>,
}

/// One request in flight, counted until dropped.
#[derive(Debug)]
pub struct Slot(Arc<AtomicU32>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Adaptive {
    /// `max_limit`: the upstream's `max_requests` (the limit never passes it).
    pub fn new(max_limit: u32) -> Self {
        let max_limit = max_limit.max(MIN_LIMIT);
        let initial = INITIAL_LIMIT.clamp(MIN_LIMIT, max_limit);
        Adaptive {
            max_limit,
            limit: AtomicU32::new(initial),
            in_flight: Arc::new(AtomicU32::new(0)),
            state: Mutex::new(State {
                limit: f64::from(initial),
                window_start: None,
                sum: 0.0,
                samples: 0,
                means: VecDeque::with_capacity(MIN_RTT_WINDOWS),
            }),
        }
    }

    pub fn limit(&self) -> u32 {
        self.limit.load(Ordering::Relaxed)
    }

    /// A place under the limit, if there is one.
    pub fn try_enter(&self) -> Option<Slot> {
        let limit = self.limit.load(Ordering::Relaxed);
        self.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(self.in_flight.clone()))
    }

    /// A response head (or a failure) came `rtt` after its attempt began.
    pub fn sample(&self, rtt: Duration, now: Instant) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let start = *s.window_start.get_or_insert(now);
        s.sum += rtt.as_secs_f64();
        s.samples += 1;
        if now.saturating_duration_since(start) < WINDOW {
            return;
        }
        let (sum, samples) = (s.sum, s.samples);
        s.window_start = Some(now);
        s.sum = 0.0;
        s.samples = 0;
        if samples < MIN_SAMPLES {
            return;
        }
        let mean = sum / f64::from(samples);
        if s.means.len() == MIN_RTT_WINDOWS {
            s.means.pop_front();
        }
        s.means.push_back(mean);
        let min = s.means.iter().copied().fold(f64::INFINITY, f64::min);
        let gradient = (TOLERANCE * min / mean).clamp(0.5, 1.0);
        let next = if gradient < 1.0 {
            s.limit * gradient
        } else {
            s.limit + s.limit.sqrt()
        };
        s.limit = next.clamp(f64::from(MIN_LIMIT), f64::from(self.max_limit));
        self.limit.store(s.limit as u32, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feed `windows` windows of `rtt` samples.
    fn feed(a: &Adaptive, t: &mut Instant, windows: usize, rtt: Duration) {
        for _ in 0..windows {
            for _ in 0..MIN_SAMPLES {
                a.sample(rtt, *t);
            }
            *t += WINDOW;
            a.sample(rtt, *t);
        }
    }

    #[test]
    fn grows_at_the_minimum_and_shrinks_when_latency_rises() {
        let a = Adaptive::new(1000);
        let mut t = Instant::now();
        assert_eq!(a.limit(), INITIAL_LIMIT);
        feed(&a, &mut t, 20, Duration::from_millis(10));
        let grown = a.limit();
        assert!(grown > INITIAL_LIMIT * 4, "{grown}");
        // Latency doubles: the limit halves, window by window, to the floor.
        feed(&a, &mut t, 20, Duration::from_millis(40));
        assert_eq!(a.limit(), MIN_LIMIT);
        // Back to the minimum: it grows again.
        feed(&a, &mut t, 5, Duration::from_millis(10));
        assert!(a.limit() > MIN_LIMIT * 2, "{}", a.limit());
    }

    #[test]
    fn never_past_max_requests_and_refuses_past_the_limit() {
        let a = Adaptive::new(40);
        let mut t = Instant::now();
        feed(&a, &mut t, 50, Duration::from_millis(5));
        assert_eq!(a.limit(), 40);
        let slots: Vec<Slot> = (0..40).filter_map(|_| a.try_enter()).collect();
        assert_eq!(slots.len(), 40);
        assert!(a.try_enter().is_none());
        drop(slots);
        assert!(a.try_enter().is_some());
    }
}
