//! Choosing one endpoint of an upstream: weighted round robin, weighted
//! random, power of two choices by load (`least_request`) or by peak-EWMA
//! latency times load (`ewma`), and a consistent-hash ring (pingora's
//! ketama). Every algorithm picks only among the endpoints `accept` lets
//! through (usable, not tried yet, ...), so the caller decides which may
//! get a request and the balancer only which of those does.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use pingora_ketama::{Bucket, Continuum};

use crate::config::model::LoadBalancing;

/// How fast a latency estimate forgets (Finagle's and Linkerd's default).
const DECAY: Duration = Duration::from_secs(10);
/// The latency assumed of an endpoint that has not answered yet.
const DEFAULT_RTT_NANOS: f64 = 1_000_000.0;
/// Ring points per endpoint are proportional to its weight, scaled so the
/// heaviest endpoint has this many "weight units" (ketama makes 160 points
/// per unit).
const RING_MAX_WEIGHT: u64 = 100;

/// One endpoint's load: requests in flight and a latency estimate.
#[derive(Debug, Default)]
pub struct Load {
    in_flight: AtomicU32,
    /// Peak-EWMA latency in nanoseconds (`f64` bits); 0: none yet.
    ewma: AtomicU64,
    /// When `ewma` was last updated, in nanoseconds since [`epoch`].
    stamp: AtomicU64,
}

/// The instant the balancer's clock counts from.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

pub fn nanos(t: Instant) -> u64 {
    u64::try_from(t.saturating_duration_since(epoch()).as_nanos()).unwrap_or(u64::MAX)
}

impl Load {
    pub fn begin(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    pub fn end(&self) {
        let _ = self
            .in_flight
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Count one answer (or failure) that took `rtt`: a slower one than
    /// the estimate replaces it at once (the peak); a faster one pulls it
    /// down as fast as time since the last update allows.
    pub fn observe(&self, rtt: Duration, now: Instant) {
        let now = nanos(now);
        let rtt = rtt.as_nanos() as f64;
        let prev = f64::from_bits(self.ewma.load(Ordering::Relaxed));
        let next = if rtt > prev || prev == 0.0 {
            rtt
        } else {
            let elapsed = now.saturating_sub(self.stamp.load(Ordering::Relaxed)) as f64;
            let w = (-elapsed / DECAY.as_nanos() as f64).exp();
            prev * w + rtt * (1.0 - w)
        };
        self.ewma.store(next.to_bits(), Ordering::Relaxed);
        self.stamp.store(now, Ordering::Relaxed);
    }

    /// The latency estimate at `now`: it decays while nothing is observed,
    /// so a slow endpoint is tried again after a while.
    pub fn latency(&self, now: u64) -> f64 {
        let ewma = f64::from_bits(self.ewma.load(Ordering::Relaxed));
        if ewma == 0.0 {
            return DEFAULT_RTT_NANOS;
        }
        let elapsed = now.saturating_sub(self.stamp.load(Ordering::Relaxed)) as f64;
        (ewma * (-elapsed / DECAY.as_nanos() as f64).exp()).max(1.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    RoundRobin,
    Random,
    LeastRequest,
    Ewma,
    Hash,
}

/// The balancer of one endpoint set.
pub struct Balancer {
    kind: Kind,
    /// Running sums of the weights: endpoint `i` owns
    /// `cumulative[i-1]..cumulative[i]`.
    cumulative: Vec<u64>,
    total: u64,
    next: AtomicU64,
    /// Coprime with `total`: stepping by it visits every weight unit once
    /// per cycle, spread out rather than in runs of one endpoint.
    stride: u64,
    ring: Option<(Continuum, Vec<SocketAddr>)>,
}

impl std::fmt::Debug for Balancer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balancer")
            .field("kind", &self.kind)
            .field("cumulative", &self.cumulative)
            .finish_non_exhaustive()
    }
}

impl Balancer {
    /// `endpoints`: each one's address and weight (at least 1), in order.
    pub fn new(algorithm: &LoadBalancing, endpoints: &[(SocketAddr, u32)]) -> Self {
        let kind = match algorithm {
            LoadBalancing::RoundRobin => Kind::RoundRobin,
            LoadBalancing::Random => Kind::Random,
            LoadBalancing::LeastRequest => Kind::LeastRequest,
            LoadBalancing::Ewma => Kind::Ewma,
            LoadBalancing::ConsistentHash(_) => Kind::Hash,
        };
        let cumulative: Vec<u64> = endpoints
            .iter()
            .scan(0u64, |sum, (_, w)| {
                *sum += u64::from((*w).max(1));
                Some(*sum)
            })
            .collect();
        let total = cumulative.last().copied().unwrap_or(0);
        let ring = (kind == Kind::Hash).then(|| {
            let heaviest = endpoints
                .iter()
                .map(|(_, w)| u64::from(*w))
                .max()
                .unwrap_or(1);
            let buckets: Vec<Bucket> = endpoints
                .iter()
                .map(|(addr, w)| {
                    let scaled = (u64::from(*w) * RING_MAX_WEIGHT).div_ceil(heaviest.max(1));
                    Bucket::new(*addr, scaled.clamp(1, RING_MAX_WEIGHT) as u32)
                })
                .collect();
            (
                Continuum::new(&buckets),
                endpoints.iter().map(|(a, _)| *a).collect(),
            )
        });
        Balancer {
            kind,
            cumulative,
            total,
            next: AtomicU64::new(fastrand::u64(..)),
            stride: stride_for(total),
            ring,
        }
    }

    fn len(&self) -> usize {
        self.cumulative.len()
    }

    /// The endpoint owning weight unit `unit`.
    fn at(&self, unit: u64) -> usize {
        self.cumulative.partition_point(|c| *c <= unit)
    }

    fn tries(&self) -> usize {
        self.len() * 2
    }

    /// Pick one endpoint `accept` lets through. `key` places the request on
    /// the ring (`consistent_hash`; without one, `least_request`); `cost`
    /// is an endpoint's load for the two-choice algorithms.
    pub fn pick(
        &self,
        key: Option<&[u8]>,
        accept: &dyn Fn(usize) -> bool,
        cost: &dyn Fn(usize) -> f64,
    ) -> Option<usize> {
        if self.total == 0 {
            return None;
        }
        match self.kind {
            Kind::RoundRobin => (0..self.tries())
                .map(|_| {
                    let n = self.next.fetch_add(1, Ordering::Relaxed);
                    self.at(n.wrapping_mul(self.stride) % self.total)
                })
                .find(|i| accept(*i))
                .or_else(|| self.scan(accept)),
            Kind::Random => self.random(accept),
            Kind::LeastRequest | Kind::Ewma => self.two_choices(accept, cost),
            Kind::Hash => match (key, &self.ring) {
                (Some(key), Some((ring, addrs))) => ring
                    .node_iter(key)
                    .take(self.len() * 8)
                    .filter_map(|a| addrs.iter().position(|x| x == a))
                    .find(|i| accept(*i))
                    .or_else(|| self.two_choices(accept, cost)),
                _ => self.two_choices(accept, cost),
            },
        }
    }

    /// Another pick that leaves the round-robin order as it is (for a
    /// pick the caller turned down): weighted random, or two choices.
    pub fn pick_again(
        &self,
        accept: &dyn Fn(usize) -> bool,
        cost: &dyn Fn(usize) -> f64,
    ) -> Option<usize> {
        if self.total == 0 {
            return None;
        }
        match self.kind {
            Kind::LeastRequest | Kind::Ewma => self.two_choices(accept, cost),
            _ => self.random(accept),
        }
    }

    fn random(&self, accept: &dyn Fn(usize) -> bool) -> Option<usize> {
        (0..self.tries())
            .map(|_| self.at(fastrand::u64(0..self.total)))
            .find(|i| accept(*i))
            .or_else(|| self.scan(accept))
    }

    /// The cheaper of two random picks (power of two choices): close to
    /// the least loaded endpoint without looking at all of them, and
    /// without every gateway thread piling onto the same one.
    fn two_choices(
        &self,
        accept: &dyn Fn(usize) -> bool,
        cost: &dyn Fn(usize) -> f64,
    ) -> Option<usize> {
        let a = self.random(accept)?;
        let b = (0..self.tries())
            .map(|_| self.at(fastrand::u64(0..self.total)))
            .find(|i| *i != a && accept(*i))
            .or_else(|| self.scan(&|i| i != a && accept(i)));
        match b {
            Some(b) if cost(b) < cost(a) => Some(b),
            _ => Some(a),
        }
    }

    /// The first accepted endpoint from a random start.
    fn scan(&self, accept: &dyn Fn(usize) -> bool) -> Option<usize> {
        let n = self.len();
        let start = fastrand::usize(0..n);
        (0..n).map(|k| (start + k) % n).find(|i| accept(*i))
    }
}

/// A step near 0.618 of `total` that shares no factor with it.
fn stride_for(total: u64) -> u64 {
    if total <= 2 {
        return 1;
    }
    let mut s = (total as f64 * 0.618) as u64 | 1;
    while gcd(s, total) != 1 {
        s += 1;
    }
    s
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::model::HashKey;

    fn addrs(n: usize) -> Vec<(SocketAddr, u32)> {
        (0..n)
            .map(|i| (SocketAddr::from(([127, 0, 0, 1], 9000 + i as u16)), 1))
            .collect()
    }

    fn counts(b: &Balancer, n: usize, picks: usize, accept: &dyn Fn(usize) -> bool) -> Vec<usize> {
        let mut c = vec![0; n];
        for _ in 0..picks {
            c[b.pick(None, accept, &|_| 0.0).unwrap()] += 1;
        }
        c
    }

    #[test]
    fn round_robin_keeps_weights_exactly_each_cycle() {
        let mut eps = addrs(3);
        eps[0].1 = 1;
        eps[1].1 = 3;
        eps[2].1 = 6;
        let b = Balancer::new(&LoadBalancing::RoundRobin, &eps);
        assert_eq!(counts(&b, 3, 1000, &|_| true), vec![100, 300, 600]);
        // Spread out: no endpoint gets its whole share in one run.
        let seq: Vec<usize> = (0..10)
            .map(|_| b.pick(None, &|_| true, &|_| 0.0).unwrap())
            .collect();
        assert!(
            seq.windows(6).all(|w| w.iter().any(|i| *i != w[0])),
            "{seq:?}"
        );
    }

    #[test]
    fn every_algorithm_picks_only_what_is_accepted() {
        for lb in [
            LoadBalancing::RoundRobin,
            LoadBalancing::Random,
            LoadBalancing::LeastRequest,
            LoadBalancing::Ewma,
            LoadBalancing::ConsistentHash(HashKey::Path),
        ] {
            let b = Balancer::new(&lb, &addrs(5));
            let c = counts(&b, 5, 500, &|i| i == 1 || i == 3);
            assert_eq!(c[0] + c[2] + c[4], 0, "{lb:?}: {c:?}");
            assert!(c[1] > 0 && c[3] > 0, "{lb:?}: {c:?}");
            assert_eq!(b.pick(Some(b"k"), &|_| false, &|_| 0.0), None);
        }
    }

    #[test]
    fn two_choices_prefer_the_cheaper() {
        let b = Balancer::new(&LoadBalancing::LeastRequest, &addrs(4));
        let mut c = [0; 4];
        for _ in 0..4000 {
            c[b.pick(None, &|_| true, &|i| if i == 2 { 100.0 } else { 1.0 })
                .unwrap()] += 1;
        }
        // Endpoint 2 wins only when both picks are it: never, as they differ.
        assert_eq!(c[2], 0, "{c:?}");
    }

    #[test]
    fn hash_keeps_keys_and_moves_few_when_one_is_added() {
        let before = Balancer::new(&LoadBalancing::ConsistentHash(HashKey::Path), &addrs(5));
        let after = Balancer::new(&LoadBalancing::ConsistentHash(HashKey::Path), &addrs(6));
        let place = |b: &Balancer, k: usize| {
            b.pick(Some(format!("user-{k}").as_bytes()), &|_| true, &|_| 0.0)
                .unwrap()
        };
        let mut moved = 0;
        for k in 0..1000 {
            assert_eq!(place(&before, k), place(&before, k));
            if place(&before, k) != place(&after, k) {
                moved += 1;
                assert_eq!(place(&after, k), 5, "a key moved between old endpoints");
            }
        }
        assert!(moved <= 1000 / 6 + 50, "{moved} of 1000 moved");
        // An endpoint not accepted: its keys go to the next on the ring.
        let k = (0..1000).find(|k| place(&before, *k) == 0).unwrap();
        let key = format!("user-{k}");
        let other = before
            .pick(Some(key.as_bytes()), &|i| i != 0, &|_| 0.0)
            .unwrap();
        assert_ne!(other, 0);
    }

    #[test]
    fn latency_estimate_takes_peaks_at_once_and_forgets_slowly() {
        let t0 = Instant::now();
        let load = Load::default();
        assert_eq!(load.latency(nanos(t0)), DEFAULT_RTT_NANOS);
        load.observe(Duration::from_millis(800), t0);
        let at = |s: u64| nanos(t0 + Duration::from_secs(s));
        assert!((load.latency(at(0)) - 8e8).abs() < 1e3);
        assert!(load.latency(at(10)) < 8e8 * 0.4);
        load.observe(Duration::from_millis(1), t0 + Duration::from_millis(10));
        assert!(
            load.latency(at(0)) > 7e8,
            "one fast answer does not erase a slow past"
        );
        load.begin();
        load.begin();
        load.end();
        assert_eq!(load.in_flight(), 1);
        load.end();
        load.end();
        assert_eq!(load.in_flight(), 0);
    }

    #[test]
    fn weights_are_scaled_for_the_ring_and_huge_ones_are_fine() {
        let mut eps = addrs(2);
        eps[0].1 = 1_000_000;
        eps[1].1 = 1;
        let b = Balancer::new(&LoadBalancing::ConsistentHash(HashKey::Path), &eps);
        assert!(b.pick(Some(b"x"), &|_| true, &|_| 0.0).is_some());
        let rr = Balancer::new(&LoadBalancing::RoundRobin, &eps);
        assert!(rr.pick(None, &|_| true, &|_| 0.0).is_some());
    }
}
