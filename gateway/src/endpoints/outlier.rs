//! Outlier ejection: an endpoint that fails `consecutive_failures` times in
//! a row gets no requests for a while (`base_ejection`, doubled for each
//! ejection that follows within `max_ejection` of the last one's end, up
//! to `max_ejection`). At most `max_ejected_percent` of an upstream's
//! endpoints are out at once, and at least one may be. An ejection ends by
//! itself when its time is up; the next request to look finds the
//! endpoint usable again.
//!
//! Reports and checks stay off locks and clocks on the path every request
//! takes: a success after a success writes nothing, and checking an
//! endpoint that is not out reads one flag.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{Now, Outcome};
use crate::config::model::OutlierDetection;

/// One endpoint's record: its run of failures and its ejection. Shared by
/// the runtimes of a reload, so an endpoint that stays keeps it.
#[derive(Debug, Default)]
pub struct Endpoint {
    failures: AtomicU32,
    /// Set while ejected; `ejection.until` says until when.
    out: AtomicBool,
    ejection: Mutex<Ejection>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Ejection {
    until: Option<Instant>,
    /// Ejections in a row, each within `max_ejection` of the last one's end.
    times: u32,
    /// When the last ejection ended.
    back_at: Option<Instant>,
}

impl Endpoint {
    fn ejection(&self) -> std::sync::MutexGuard<'_, Ejection> {
        self.ejection.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Failures in a row so far.
    pub fn failures(&self) -> u32 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Until when it is ejected, if it is at `now`.
    pub fn ejected_until(&self, now: Instant) -> Option<Instant> {
        if !self.out.load(Ordering::Acquire) {
            return None;
        }
        self.ejection().until.filter(|u| *u > now)
    }
}

/// What a report or a check changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Ejected until then, for the `times`-th time in a row.
    Ejected { until: Instant, times: u32 },
    /// It would have been ejected, but `max_ejected_percent` of the
    /// upstream's endpoints are out already.
    AtLimit,
    /// Its ejection time is up: usable again.
    Back,
}

/// The endpoints of one upstream under one outlier policy.
#[derive(Debug)]
pub struct Upstream {
    policy: OutlierDetection,
    endpoints: Vec<Arc<Endpoint>>,
    /// Ejections are decided one at a time, so the limit holds.
    deciding: Mutex<()>,
}

impl Upstream {
    /// `endpoints` are the records to use, one per endpoint in order:
    /// new ones, or those of a previous config for endpoints that stay.
    pub fn new(policy: OutlierDetection, endpoints: Vec<Arc<Endpoint>>) -> Self {
        Upstream {
            policy,
            endpoints,
            deciding: Mutex::new(()),
        }
    }

    pub fn policy(&self) -> &OutlierDetection {
        &self.policy
    }

    /// The record of endpoint `index`, to carry over a reload.
    pub fn endpoint(&self, index: usize) -> Option<&Arc<Endpoint>> {
        self.endpoints.get(index)
    }

    /// How many of the endpoints may be out at once: `max_ejected_percent`
    /// of them, rounded down, but at least one.
    fn max_out(&self) -> usize {
        (self.endpoints.len() * usize::from(self.policy.max_ejected_percent) / 100).max(1)
    }

    /// How many are ejected at `now`.
    pub fn ejected(&self, now: Instant) -> usize {
        self.endpoints
            .iter()
            .filter(|e| e.ejected_until(now).is_some())
            .count()
    }

    /// Whether endpoint `index` may get requests now. An ejection whose
    /// time is up ends here, and says so (`Some(Change::Back)`).
    pub fn usable(&self, index: usize, now: &mut Now) -> (bool, Option<Change>) {
        let Some(e) = self.endpoints.get(index) else {
            return (true, None);
        };
        if !e.out.load(Ordering::Acquire) {
            return (true, None);
        }
        let mut ejection = e.ejection();
        let now = now.get();
        match ejection.until {
            Some(until) if now < until => (false, None),
            _ => {
                ejection.until = None;
                ejection.back_at = Some(now);
                e.failures.store(0, Ordering::Release);
                let was_out = e.out.swap(false, Ordering::AcqRel);
                (true, was_out.then_some(Change::Back))
            }
        }
    }

    /// Count an attempt's outcome at endpoint `index`.
    pub fn report(&self, index: usize, outcome: Outcome, now: &mut Now) -> Option<Change> {
        let e = self.endpoints.get(index)?;
        match outcome {
            Outcome::Success => {
                if e.failures.load(Ordering::Relaxed) != 0 {
                    e.failures.store(0, Ordering::Relaxed);
                }
                None
            }
            Outcome::Failure => {
                let failures = e.failures.fetch_add(1, Ordering::AcqRel) + 1;
                if failures < self.policy.consecutive_failures || e.out.load(Ordering::Acquire) {
                    return None;
                }
                self.eject(e, now.get())
            }
        }
    }

    fn eject(&self, e: &Endpoint, now: Instant) -> Option<Change> {
        let _one_at_a_time = self.deciding.lock().unwrap_or_else(|p| p.into_inner());
        if e.out.load(Ordering::Acquire) {
            return None;
        }
        // Counted again from zero either way: at the limit, the next try
        // comes after another run of failures, not at every one.
        e.failures.store(0, Ordering::Release);
        if self.ejected(now) >= self.max_out() {
            return Some(Change::AtLimit);
        }
        let mut ejection = e.ejection();
        // An endpoint that stayed in for `max_ejection` starts over.
        let in_a_row = ejection
            .back_at
            .is_none_or(|back| now.saturating_duration_since(back) < self.policy.max_ejection);
        let times = if in_a_row {
            ejection.times.saturating_add(1)
        } else {
            1
        };
        let until = now + ejection_time(&self.policy, times);
        *ejection = Ejection {
            until: Some(until),
            times,
            back_at: None,
        };
        e.out.store(true, Ordering::Release);
        Some(Change::Ejected { until, times })
    }
}

/// How long the `times`-th ejection in a row lasts.
fn ejection_time(policy: &OutlierDetection, times: u32) -> Duration {
    let factor = 1u32
        .checked_shl(times.saturating_sub(1))
        .unwrap_or(u32::MAX);
    policy
        .base_ejection
        .checked_mul(factor)
        .unwrap_or(policy.max_ejection)
        .min(policy.max_ejection)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(failures: u32, percent: u8) -> OutlierDetection {
        OutlierDetection {
            consecutive_failures: failures,
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(60),
            max_ejected_percent: percent,
        }
    }

    fn upstream(n: usize, failures: u32, percent: u8) -> Upstream {
        Upstream::new(
            policy(failures, percent),
            (0..n).map(|_| Arc::new(Endpoint::default())).collect(),
        )
    }

    fn fail(u: &Upstream, i: usize, times: u32, at: Instant) -> Vec<Change> {
        (0..times)
            .filter_map(|_| u.report(i, Outcome::Failure, &mut Now::at(at)))
            .collect()
    }

    #[test]
    fn ejected_after_consecutive_failures_and_back_when_time_is_up() {
        let t0 = Instant::now();
        let u = upstream(4, 3, 50);
        assert!(fail(&u, 1, 2, t0).is_empty());
        assert_eq!(u.usable(1, &mut Now::at(t0)), (true, None));
        let changes = fail(&u, 1, 1, t0);
        assert_eq!(
            changes,
            vec![Change::Ejected {
                until: t0 + Duration::from_secs(10),
                times: 1
            }]
        );
        assert_eq!(u.usable(1, &mut Now::at(t0)), (false, None));
        assert_eq!(u.ejected(t0), 1);
        // Others are untouched.
        assert_eq!(u.usable(0, &mut Now::at(t0)), (true, None));
        let later = t0 + Duration::from_secs(10);
        assert_eq!(u.usable(1, &mut Now::at(later)), (true, Some(Change::Back)));
        assert_eq!(u.usable(1, &mut Now::at(later)), (true, None));
        assert_eq!(u.ejected(later), 0);
    }

    #[test]
    fn a_success_breaks_the_run() {
        let t0 = Instant::now();
        let u = upstream(2, 3, 50);
        for _ in 0..10 {
            assert!(fail(&u, 0, 2, t0).is_empty());
            assert_eq!(u.report(0, Outcome::Success, &mut Now::at(t0)), None);
        }
        assert_eq!(u.endpoint(0).map(|e| e.failures()), Some(0));
        assert_eq!(u.ejected(t0), 0);
    }

    #[test]
    fn ejections_in_a_row_double_up_to_the_maximum() {
        let mut t = Instant::now();
        let u = upstream(2, 1, 50);
        let mut times = Vec::new();
        for _ in 0..5 {
            let Some(Change::Ejected { until, .. }) =
                u.report(0, Outcome::Failure, &mut Now::at(t))
            else {
                panic!("not ejected");
            };
            times.push(until - t);
            t = until;
            assert_eq!(u.usable(0, &mut Now::at(t)).1, Some(Change::Back));
        }
        let secs: Vec<u64> = times.iter().map(Duration::as_secs).collect();
        assert_eq!(secs, vec![10, 20, 40, 60, 60]);
        // In for max_ejection: the next ejection is the first again.
        t += Duration::from_secs(60);
        assert_eq!(
            u.report(0, Outcome::Failure, &mut Now::at(t)),
            Some(Change::Ejected {
                until: t + Duration::from_secs(10),
                times: 1
            })
        );
    }

    #[test]
    fn at_most_the_percentage_is_out_but_always_one_may_be() {
        let t0 = Instant::now();
        let u = upstream(4, 1, 50);
        assert!(matches!(fail(&u, 0, 1, t0)[..], [Change::Ejected { .. }]));
        assert!(matches!(fail(&u, 1, 1, t0)[..], [Change::Ejected { .. }]));
        assert_eq!(fail(&u, 2, 1, t0), vec![Change::AtLimit]);
        assert_eq!(u.ejected(t0), 2);
        assert_eq!(u.usable(2, &mut Now::at(t0)), (true, None));
        // Once one is back, another may go.
        let later = t0 + Duration::from_secs(10);
        assert!(matches!(
            fail(&u, 2, 1, later)[..],
            [Change::Ejected { .. }]
        ));

        let zero = upstream(3, 1, 0);
        assert!(matches!(
            fail(&zero, 0, 1, t0)[..],
            [Change::Ejected { .. }]
        ));
        assert_eq!(fail(&zero, 1, 1, t0), vec![Change::AtLimit]);

        let single = upstream(1, 1, 50);
        assert!(matches!(
            fail(&single, 0, 1, t0)[..],
            [Change::Ejected { .. }]
        ));
    }

    #[test]
    fn records_carry_over_to_a_new_upstream() {
        let t0 = Instant::now();
        let old = upstream(2, 1, 50);
        fail(&old, 1, 1, t0);
        let kept = old.endpoint(1).cloned().into_iter();
        let new = Upstream::new(
            policy(1, 50),
            kept.chain([Arc::new(Endpoint::default())]).collect(),
        );
        assert_eq!(new.usable(0, &mut Now::at(t0)), (false, None));
        assert_eq!(new.usable(1, &mut Now::at(t0)), (true, None));
    }
}
