//! One upstream's endpoints, each with the record meshgate keeps of it,
//! and the choice of the endpoint for each attempt: usable ones first
//! (not ejected; past the panic threshold, all), new and recovered ones
//! ramping up under `slow_start`, the balancer choosing among them.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::balance::{nanos, Balancer, Load};
use super::health::{self, Turned};
use super::outlier::{Change, Record};
use super::{Now, Outcome};
use crate::config::model::{HealthCheck, LoadBalancing, OutlierDetection, Upstream};

/// Under slow start, the share a just-added endpoint gets of what it will
/// get once ramped (Envoy's `min_weight_percent`).
const RAMP_FLOOR: f64 = 0.1;

/// What meshgate knows of one endpoint. Shared by the configs of a reload
/// (and the sets of a discovery refresh) while the endpoint stays.
#[derive(Debug, Default)]
pub struct Endpoint {
    pub outlier: Record,
    pub health: health::Record,
    pub load: Load,
    /// Slow start: when its ramp began ([`nanos`]); 0 for none.
    ramp: AtomicU64,
}

impl Endpoint {
    /// Begin a slow-start ramp at `now`.
    pub fn start_ramp(&self, now: Instant) {
        self.ramp.store(nanos(now).max(1), Ordering::Relaxed);
    }

    /// Whether it is ramping up at `now` (under `window`).
    fn ramping(&self, window: Option<Duration>, now: &Now) -> Option<f64> {
        let window = window?;
        let start = self.ramp.load(Ordering::Relaxed);
        if start == 0 {
            return None;
        }
        let elapsed = nanos(now.get()).saturating_sub(start) as f64;
        let share = elapsed / window.as_nanos() as f64;
        if share >= 1.0 {
            let _ = self
                .ramp
                .compare_exchange(start, 0, Ordering::Relaxed, Ordering::Relaxed);
            return None;
        }
        Some(share.max(RAMP_FLOOR))
    }
}

/// Counts one request in flight at an endpoint until dropped.
#[derive(Debug)]
pub struct InFlight(Arc<Endpoint>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.load.end();
    }
}

/// An upstream's settings that decide among its endpoints.
#[derive(Debug, Clone)]
pub struct Policy {
    pub outlier: Option<OutlierDetection>,
    pub load_balancing: LoadBalancing,
    pub slow_start: Option<Duration>,
    pub panic_threshold: u8,
    pub health_check: Option<HealthCheck>,
}

impl Policy {
    pub fn of(u: &Upstream) -> Self {
        Policy {
            outlier: u.outlier,
            load_balancing: u.load_balancing.clone(),
            slow_start: u.slow_start,
            panic_threshold: u.panic_threshold,
            health_check: u.health_check.clone(),
        }
    }
}

#[derive(Debug)]
pub struct Member {
    pub addr: SocketAddr,
    pub weight: u32,
    pub record: Arc<Endpoint>,
}

/// An endpoint's state as operators see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Healthy,
    /// Its health checks fail.
    Unhealthy,
    Ejected {
        until: Instant,
    },
    SlowStart,
}

impl State {
    /// Its name in `/upstreams` and in `meshgate_upstream_endpoints{state}`
    /// (one of `names::ENDPOINT_STATES`).
    pub fn name(self) -> &'static str {
        match self {
            State::Healthy => "healthy",
            State::Unhealthy => "unhealthy",
            State::Ejected { .. } => "ejected",
            State::SlowStart => "slow_start",
        }
    }
}

/// The endpoint chosen for an attempt, and the endpoints found back from
/// ejection while choosing (for the log).
#[derive(Debug)]
pub struct Selection {
    pub index: Option<usize>,
    pub back: Vec<usize>,
}

#[derive(Debug)]
pub struct EndpointSet {
    policy: Policy,
    members: Vec<Member>,
    balancer: Balancer,
    /// Ejections are decided one at a time, so the limit holds.
    deciding: Mutex<()>,
}

impl EndpointSet {
    pub fn new(policy: Policy, members: Vec<Member>) -> Self {
        let weights: Vec<(SocketAddr, u32)> = members.iter().map(|m| (m.addr, m.weight)).collect();
        EndpointSet {
            balancer: Balancer::new(&policy.load_balancing, &weights),
            policy,
            members,
            deciding: Mutex::new(()),
        }
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    pub fn member(&self, i: usize) -> Option<&Member> {
        self.members.get(i)
    }

    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// The record of the endpoint at `addr` not `taken` yet, to carry it
    /// into the next set.
    pub fn record_at(&self, addr: SocketAddr, taken: &mut [bool]) -> Option<Arc<Endpoint>> {
        let i = (0..self.members.len())
            .find(|&i| self.members[i].addr == addr && !taken.get(i).copied().unwrap_or(true))?;
        taken[i] = true;
        Some(self.members[i].record.clone())
    }

    /// How many of the endpoints may be out at once: `max_ejected_percent`
    /// of them, rounded down, but at least one.
    fn max_out(&self, policy: &OutlierDetection) -> usize {
        (self.members.len() * usize::from(policy.max_ejected_percent) / 100).max(1)
    }

    /// Choose the endpoint for an attempt. In order: one usable, not in
    /// `tried`, and let through by its slow-start ramp; one usable; one not
    /// tried; any. Usable: not ejected, or every endpoint when fewer than
    /// `panic_threshold` percent are. `key` places the request on a hash
    /// ring (`consistent_hash`).
    pub fn select(&self, tried: &[usize], key: Option<&[u8]>) -> Selection {
        let now = Now::default();
        let back = RefCell::new(Vec::new());
        let detecting = self.policy.outlier.is_some();
        let checking = self.policy.health_check.is_some();
        let usable = |i: usize| match self.members.get(i) {
            None => false,
            Some(m) if checking && m.record.health.is_unhealthy() => false,
            Some(_) if !detecting => true,
            Some(m) => {
                let (ok, change) = m.record.outlier.usable(&now);
                if change == Some(Change::Back) {
                    back.borrow_mut().push(i);
                    if self.policy.slow_start.is_some() {
                        m.record.start_ramp(now.get());
                    }
                }
                ok
            }
        };
        let n = self.members.len();
        let index = if n <= 1 {
            (n == 1).then(|| {
                usable(0);
                0
            })
        } else {
            let panic = self.policy.panic_threshold > 0
                && (0..n).filter(|&i| usable(i)).count() * 100
                    < n * usize::from(self.policy.panic_threshold);
            let usable = |i: usize| panic || usable(i);
            let ramped = |i: usize| {
                self.members[i]
                    .record
                    .ramping(self.policy.slow_start, &now)
                    .is_none_or(|share| fastrand::f64() < share)
            };
            let cost = |i: usize| self.cost(i, &now);
            let pick = |accept: &dyn Fn(usize) -> bool| self.balancer.pick(key, accept, &cost);
            // A ramping endpoint keeps the pick with the probability of
            // its share so far; else the pick goes to another.
            let fresh = |i: usize| !tried.contains(&i) && usable(i);
            pick(&fresh)
                .and_then(|i| {
                    if ramped(i) {
                        Some(i)
                    } else {
                        self.balancer
                            .pick_again(&|j| j != i && fresh(j), &cost)
                            .or(Some(i))
                    }
                })
                .or_else(|| pick(&usable))
                .or_else(|| pick(&|i| !tried.contains(&i)))
                .or_else(|| pick(&|_| true))
        };
        Selection {
            index,
            back: back.into_inner(),
        }
    }

    /// An endpoint's load for the two-choice algorithms: in-flight requests
    /// (`ewma`: times its latency), per unit of weight.
    fn cost(&self, i: usize, now: &Now) -> f64 {
        let Some(m) = self.members.get(i) else {
            return f64::MAX;
        };
        let load = f64::from(m.record.load.in_flight()) + 1.0;
        let latency = match self.policy.load_balancing {
            LoadBalancing::Ewma => m.record.load.latency(nanos(now.get())),
            _ => 1.0,
        };
        latency * load / f64::from(m.weight.max(1))
    }

    /// Count a request in flight at endpoint `i` until the guard drops.
    pub fn in_flight(&self, i: usize) -> Option<InFlight> {
        let m = self.members.get(i)?;
        m.record.load.begin();
        Some(InFlight(m.record.clone()))
    }

    /// Count how an attempt at endpoint `i` ended, after `rtt` (to its
    /// answer, or to its failure). It may eject the endpoint.
    pub fn report(&self, i: usize, outcome: Outcome, rtt: Duration, now: &Now) -> Option<Change> {
        let m = self.members.get(i)?;
        if self.policy.load_balancing == LoadBalancing::Ewma {
            m.record.load.observe(rtt, now.get());
        }
        let policy = self.policy.outlier.as_ref()?;
        if !m.record.outlier.count(policy, outcome) {
            return None;
        }
        let _one_at_a_time = self.deciding.lock().unwrap_or_else(|p| p.into_inner());
        // Counted again from zero either way: at the limit, the next try
        // comes after another run of failures, not at every one.
        m.record.outlier.forgive();
        if self.ejected(now.get()) >= self.max_out(policy) {
            return m.record.outlier.first_held_in().then_some(Change::AtLimit);
        }
        m.record.outlier.eject(policy, now.get())
    }

    /// The endpoints whose health check is due at `now`, each claimed (the
    /// caller runs the check and gives [`EndpointSet::health_result`]).
    pub fn due_checks(&self, now: Instant) -> Vec<usize> {
        let Some(policy) = &self.policy.health_check else {
            return Vec::new();
        };
        (0..self.members.len())
            .filter(|&i| self.members[i].record.health.claim(policy, now))
            .collect()
    }

    /// A health check's result for endpoint `i`; the change it makes. An
    /// endpoint that turns healthy ramps up under `slow_start`.
    pub fn health_result(&self, i: usize, passed: bool, detail: String) -> Option<Turned> {
        let policy = self.policy.health_check.as_ref()?;
        let m = self.members.get(i)?;
        let turned = m.record.health.record(policy, passed, detail);
        if turned == Some(Turned::Healthy) && self.policy.slow_start.is_some() {
            m.record.start_ramp(Instant::now());
        }
        turned
    }

    /// How many are ejected at `now`.
    pub fn ejected(&self, now: Instant) -> usize {
        if self.policy.outlier.is_none() {
            return 0;
        }
        self.members
            .iter()
            .filter(|m| m.record.outlier.ejected_until(now).is_some())
            .count()
    }

    /// Each endpoint's state at `now`.
    pub fn state(&self, i: usize, now: &Now) -> Option<State> {
        let m = self.members.get(i)?;
        if self.policy.health_check.is_some() && m.record.health.is_unhealthy() {
            return Some(State::Unhealthy);
        }
        let ejected = || {
            self.policy.outlier?;
            m.record.outlier.ejected_until(now.get())
        };
        if let Some(until) = ejected() {
            return Some(State::Ejected { until });
        }
        if m.record.ramping(self.policy.slow_start, now).is_some() {
            return Some(State::SlowStart);
        }
        Some(State::Healthy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::model::HashKey;

    fn policy(failures: u32, percent: u8) -> Policy {
        Policy {
            outlier: Some(OutlierDetection {
                consecutive_failures: failures,
                base_ejection: Duration::from_secs(10),
                max_ejection: Duration::from_secs(60),
                max_ejected_percent: percent,
            }),
            load_balancing: LoadBalancing::RoundRobin,
            slow_start: None,
            panic_threshold: 0,
            health_check: None,
        }
    }

    fn set(n: usize, policy: Policy) -> EndpointSet {
        EndpointSet::new(
            policy,
            (0..n)
                .map(|i| Member {
                    addr: SocketAddr::from(([127, 0, 0, 1], 9000 + i as u16)),
                    weight: 1,
                    record: Arc::default(),
                })
                .collect(),
        )
    }

    fn fail(s: &EndpointSet, i: usize, times: u32, at: Instant) -> Vec<Change> {
        (0..times)
            .filter_map(|_| s.report(i, Outcome::Failure, Duration::ZERO, &Now::at(at)))
            .collect()
    }

    fn picks(s: &EndpointSet, n: usize) -> Vec<usize> {
        let mut c = vec![0; s.len()];
        for _ in 0..n {
            c[s.select(&[], None).index.unwrap()] += 1;
        }
        c
    }

    #[test]
    fn ejected_endpoints_get_nothing_until_back() {
        let t0 = Instant::now();
        let s = set(4, policy(3, 50));
        assert!(fail(&s, 1, 2, t0).is_empty());
        assert!(matches!(
            fail(&s, 1, 1, t0)[..],
            [Change::Ejected { times: 1, .. }]
        ));
        assert_eq!(s.ejected(t0), 1);
        let c = picks(&s, 400);
        assert_eq!(c[1], 0, "{c:?}");
        assert_eq!(c.iter().sum::<usize>(), 400);
    }

    #[test]
    fn at_most_the_percentage_is_out_but_always_one_may_be() {
        let t0 = Instant::now();
        let s = set(4, policy(1, 50));
        assert!(matches!(fail(&s, 0, 1, t0)[..], [Change::Ejected { .. }]));
        assert!(matches!(fail(&s, 1, 1, t0)[..], [Change::Ejected { .. }]));
        assert_eq!(fail(&s, 2, 1, t0), vec![Change::AtLimit]);
        assert_eq!(s.ejected(t0), 2);
        let later = t0 + Duration::from_secs(10);
        assert!(matches!(
            fail(&s, 2, 1, later)[..],
            [Change::Ejected { .. }]
        ));

        let zero = set(3, policy(1, 0));
        assert!(matches!(
            fail(&zero, 0, 1, t0)[..],
            [Change::Ejected { .. }]
        ));
        assert_eq!(fail(&zero, 1, 1, t0), vec![Change::AtLimit]);
    }

    #[test]
    fn with_none_usable_all_are_used_and_panic_threshold_says_when() {
        let t0 = Instant::now();
        let s = set(2, policy(1, 100));
        fail(&s, 0, 1, t0);
        fail(&s, 1, 1, t0);
        let c = picks(&s, 100);
        assert!(c[0] > 0 && c[1] > 0, "{c:?}");

        // 1 of 4 usable (25%) is below a 50% threshold: all get requests.
        let mut p = policy(1, 100);
        p.panic_threshold = 50;
        let s = set(4, p);
        for i in 0..3 {
            fail(&s, i, 1, t0);
        }
        assert!(picks(&s, 400).iter().all(|c| *c > 0));
        // 2 of 4 (50%) is not below it: only the usable ones.
        let later = t0 + Duration::from_secs(10);
        s.select(&[], None);
        let _ = s.state(0, &Now::at(later));
        assert!(s.members[0].record.outlier.usable(&Now::at(later)).0);
        let c = picks(&s, 400);
        assert_eq!(c[1] + c[2], 0, "{c:?}");
    }

    #[test]
    fn unhealthy_endpoints_get_nothing_until_healthy_again() {
        use crate::config::model::HealthCheckKind;
        let mut p = policy(5, 50);
        let hc = HealthCheck {
            kind: HealthCheckKind::Tcp,
            path: "/".into(),
            host: None,
            expect_status: vec![],
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            healthy: 2,
            unhealthy: 1,
        };
        p.health_check = Some(hc);
        let s = set(3, p);
        assert_eq!(
            s.health_result(2, false, "refused".into()),
            Some(Turned::Unhealthy)
        );
        assert_eq!(s.state(2, &Now::default()), Some(State::Unhealthy));
        assert_eq!(picks(&s, 300)[2], 0);
        assert_eq!(s.health_result(2, true, "connected".into()), None);
        assert_eq!(
            s.health_result(2, true, "connected".into()),
            Some(Turned::Healthy)
        );
        assert!(picks(&s, 300)[2] > 0);
        // Every endpoint due once its first (spread) time has come.
        let t0 = Instant::now();
        assert!(s.due_checks(t0).is_empty());
        assert_eq!(s.due_checks(t0 + Duration::from_secs(1)), vec![0, 1, 2]);
        assert!(s.due_checks(t0 + Duration::from_secs(1)).is_empty());
    }

    #[test]
    fn every_state_has_its_metric_label() {
        let states = [
            State::Healthy,
            State::Unhealthy,
            State::Ejected {
                until: Instant::now(),
            },
            State::SlowStart,
        ];
        for s in states {
            assert!(
                crate::telemetry::names::ENDPOINT_STATES.contains(&s.name()),
                "{s:?}"
            );
        }
        assert_eq!(states.len(), crate::telemetry::names::ENDPOINT_STATES.len());
    }

    #[test]
    fn tried_endpoints_are_avoided_while_others_remain() {
        let s = set(3, policy(5, 50));
        for _ in 0..50 {
            let i = s.select(&[0, 2], None).index.unwrap();
            assert_eq!(i, 1);
        }
        assert!(s.select(&[0, 1, 2], None).index.is_some());
    }

    #[test]
    fn slow_start_ramps_a_new_endpoint_up() {
        let mut p = policy(5, 50);
        p.slow_start = Some(Duration::from_secs(3600));
        let s = set(2, p);
        s.members[1].record.start_ramp(Instant::now());
        let c = picks(&s, 2000);
        // At the floor: 10% of its round-robin share (1000).
        assert!((40..170).contains(&c[1]), "{c:?}");
        assert!(matches!(
            s.state(1, &Now::default()),
            Some(State::SlowStart)
        ));
        // Ramped (the same records under a window long past): the full share.
        let mut p = policy(5, 50);
        p.slow_start = Some(Duration::from_nanos(1));
        let members = s
            .members
            .iter()
            .map(|m| Member {
                addr: m.addr,
                weight: m.weight,
                record: m.record.clone(),
            })
            .collect();
        let s = EndpointSet::new(p, members);
        let c = picks(&s, 2000);
        assert!(c[1] > 900, "{c:?}");
        assert!(matches!(s.state(1, &Now::default()), Some(State::Healthy)));
    }

    #[test]
    fn least_request_avoids_the_busy_endpoint() {
        let mut p = policy(5, 50);
        p.load_balancing = LoadBalancing::LeastRequest;
        let s = set(3, p);
        let _busy: Vec<InFlight> = (0..20).filter_map(|_| s.in_flight(0)).collect();
        let c = picks(&s, 300);
        assert_eq!(c[0], 0, "{c:?}");
        drop(_busy);
        assert_eq!(s.members[0].record.load.in_flight(), 0);
    }

    #[test]
    fn consistent_hash_keeps_a_key_on_its_endpoint_while_usable() {
        let mut p = policy(1, 50);
        p.load_balancing = LoadBalancing::ConsistentHash(HashKey::Path);
        let s = set(4, p);
        let home = s.select(&[], Some(b"user-7")).index.unwrap();
        for _ in 0..20 {
            assert_eq!(s.select(&[], Some(b"user-7")).index, Some(home));
        }
        fail(&s, home, 1, Instant::now());
        let moved = s.select(&[], Some(b"user-7")).index.unwrap();
        assert_ne!(moved, home);
    }
}
