//! Outlier ejection of one endpoint: a run of `consecutive_failures`
//! failures ejects it for `base_ejection`, doubled for each ejection that
//! follows within `max_ejection` of the last one's end, up to
//! `max_ejection`. An ejection ends by itself when its time is up; the
//! next request to look finds the endpoint usable again. How many of an
//! upstream's endpoints may be out at once is the set's decision
//! ([`super::set`]).
//!
//! Counting and checking stay off locks and clocks on the path every
//! request takes: a success after a success writes nothing, and checking
//! an endpoint that is not out reads one flag.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{Now, Outcome};
use crate::config::model::OutlierDetection;

/// One endpoint's run of failures and its ejection.
#[derive(Debug, Default)]
pub struct Record {
    failures: AtomicU32,
    /// Set while ejected; `ejection.until` says until when.
    out: AtomicBool,
    /// Held in by `max_ejected_percent` since its last success (said once).
    held_in: AtomicBool,
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

impl Record {
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

    /// Whether it may get requests now. An ejection whose time is up ends
    /// here, and says so.
    pub fn usable(&self, now: &Now) -> (bool, Option<Change>) {
        if !self.out.load(Ordering::Acquire) {
            return (true, None);
        }
        let mut ejection = self.ejection();
        let now = now.get();
        match ejection.until {
            Some(until) if now < until => (false, None),
            _ => {
                ejection.until = None;
                ejection.back_at = Some(now);
                self.failures.store(0, Ordering::Release);
                let was_out = self.out.swap(false, Ordering::AcqRel);
                (true, was_out.then_some(Change::Back))
            }
        }
    }

    /// Count an outcome; `true` when it completes a run of failures that
    /// ejects (the caller then decides, with [`Record::eject`]).
    pub fn count(&self, policy: &OutlierDetection, outcome: Outcome) -> bool {
        match outcome {
            Outcome::Success => {
                if self.failures.load(Ordering::Relaxed) != 0 {
                    self.failures.store(0, Ordering::Relaxed);
                    self.held_in.store(false, Ordering::Relaxed);
                }
                false
            }
            Outcome::Failure => {
                let failures = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
                failures >= policy.consecutive_failures && !self.out.load(Ordering::Acquire)
            }
        }
    }

    /// Whether this is the first time the limit holds it in since its last
    /// success or ejection (so the log says it once, not at every run).
    pub fn first_held_in(&self) -> bool {
        !self.held_in.swap(true, Ordering::Relaxed)
    }

    /// Start counting failures from zero again.
    pub fn forgive(&self) {
        self.failures.store(0, Ordering::Release);
    }

    /// Eject it at `now`, unless it is out already.
    pub fn eject(&self, policy: &OutlierDetection, now: Instant) -> Option<Change> {
        let mut ejection = self.ejection();
        if self.out.load(Ordering::Acquire) {
            return None;
        }
        // An endpoint that stayed in for `max_ejection` starts over.
        let in_a_row = ejection
            .back_at
            .is_none_or(|back| now.saturating_duration_since(back) < policy.max_ejection);
        let times = if in_a_row {
            ejection.times.saturating_add(1)
        } else {
            1
        };
        let until = now + ejection_time(policy, times);
        *ejection = Ejection {
            until: Some(until),
            times,
            back_at: None,
        };
        self.failures.store(0, Ordering::Release);
        self.held_in.store(false, Ordering::Relaxed);
        self.out.store(true, Ordering::Release);
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

    fn policy(failures: u32) -> OutlierDetection {
        OutlierDetection {
            consecutive_failures: failures,
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(60),
            max_ejected_percent: 50,
        }
    }

    #[test]
    fn a_run_of_failures_ejects_and_a_success_breaks_it() {
        let p = policy(3);
        let r = Record::default();
        assert!(!r.count(&p, Outcome::Failure));
        assert!(!r.count(&p, Outcome::Failure));
        assert!(!r.count(&p, Outcome::Success));
        assert_eq!(r.failures(), 0);
        assert!(!r.count(&p, Outcome::Failure));
        assert!(!r.count(&p, Outcome::Failure));
        assert!(r.count(&p, Outcome::Failure));
    }

    #[test]
    fn ejected_until_its_time_is_up() {
        let t0 = Instant::now();
        let p = policy(1);
        let r = Record::default();
        assert_eq!(
            r.eject(&p, t0),
            Some(Change::Ejected {
                until: t0 + Duration::from_secs(10),
                times: 1
            })
        );
        assert_eq!(r.eject(&p, t0), None, "out already");
        assert!(
            !r.count(&p, Outcome::Failure),
            "no second ejection while out"
        );
        assert_eq!(r.usable(&Now::at(t0)), (false, None));
        assert_eq!(r.ejected_until(t0), Some(t0 + Duration::from_secs(10)));
        let later = t0 + Duration::from_secs(10);
        assert_eq!(r.usable(&Now::at(later)), (true, Some(Change::Back)));
        assert_eq!(r.usable(&Now::at(later)), (true, None));
        assert_eq!(r.ejected_until(later), None);
    }

    #[test]
    fn ejections_in_a_row_double_up_to_the_maximum() {
        let p = policy(1);
        let r = Record::default();
        let mut t = Instant::now();
        let mut secs = Vec::new();
        for _ in 0..5 {
            let Some(Change::Ejected { until, .. }) = r.eject(&p, t) else {
                panic!("not ejected");
            };
            secs.push((until - t).as_secs());
            t = until;
            assert_eq!(r.usable(&Now::at(t)).1, Some(Change::Back));
        }
        assert_eq!(secs, vec![10, 20, 40, 60, 60]);
        // In for max_ejection: the next ejection is the first again.
        t += Duration::from_secs(60);
        assert_eq!(
            r.eject(&p, t),
            Some(Change::Ejected {
                until: t + Duration::from_secs(10),
                times: 1
            })
        );
    }
}
