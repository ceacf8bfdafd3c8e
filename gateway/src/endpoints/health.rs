//! Active health of one endpoint: the results of its checks decide
//! whether it is healthy. The first result decides at once (an endpoint
//! is assumed healthy until its first check); after that it takes
//! `unhealthy` failures in a row to go out and `healthy` passes in a row
//! to come back. Checks are scheduled from here too: each endpoint's next
//! one is due at its own time, spread over the interval, so a reload or a
//! start does not check every endpoint at once.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Instant, SystemTime};

use super::balance::nanos;
use crate::config::model::HealthCheck;

const UNKNOWN: u8 = 0;
const HEALTHY: u8 = 1;
const UNHEALTHY: u8 = 2;

#[derive(Debug, Default)]
pub struct Record {
    state: AtomicU8,
    /// Results in a row that disagree with `state`.
    run: AtomicU32,
    /// When the next check is due ([`nanos`]); 0: not scheduled yet.
    due: AtomicU64,
    /// A check is under way.
    busy: AtomicBool,
    last: Mutex<Option<Last>>,
}

/// The last check's result, for `/upstreams`.
#[derive(Debug, Clone)]
pub struct Last {
    pub at: SystemTime,
    pub passed: bool,
    /// What it saw: `200`, `connection refused`, `timed out`, ...
    pub detail: String,
}

/// A change of an endpoint's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turned {
    Healthy,
    Unhealthy,
}

impl Record {
    /// Whether checks let it get requests: not known to be unhealthy.
    pub fn usable(&self) -> bool {
        self.state.load(Ordering::Relaxed) != UNHEALTHY
    }

    pub fn is_unhealthy(&self) -> bool {
        self.state.load(Ordering::Relaxed) == UNHEALTHY
    }

    pub fn last(&self) -> Option<Last> {
        self.last.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Claim the check that is due at `now`, and schedule the next one.
    /// A record never checked gets its first time at a random point of the
    /// interval.
    pub fn claim(&self, policy: &HealthCheck, now: Instant) -> bool {
        let now_ns = nanos(now);
        let interval = u64::try_from(policy.interval.as_nanos()).unwrap_or(u64::MAX);
        let due = self.due.load(Ordering::Relaxed);
        if due == 0 {
            let first = now_ns + fastrand::u64(0..interval.max(1));
            let _ =
                self.due
                    .compare_exchange(0, first.max(1), Ordering::Relaxed, Ordering::Relaxed);
            return false;
        }
        if due > now_ns || self.busy.swap(true, Ordering::AcqRel) {
            return false;
        }
        // From the due time, not from now: checks keep their place.
        let next = if now_ns - due > interval {
            now_ns + interval
        } else {
            due + interval
        };
        self.due.store(next, Ordering::Relaxed);
        true
    }

    /// A check's result; the change it makes, if any.
    pub fn record(&self, policy: &HealthCheck, passed: bool, detail: String) -> Option<Turned> {
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(Last {
            at: SystemTime::now(),
            passed,
            detail,
        });
        self.busy.store(false, Ordering::Release);
        let state = self.state.load(Ordering::Relaxed);
        let (agrees, to, needed) = match (state, passed) {
            (UNKNOWN, true) => (false, HEALTHY, 1),
            (UNKNOWN, false) => (false, UNHEALTHY, 1),
            (HEALTHY, true) | (UNHEALTHY, false) => (true, state, 0),
            (_, true) => (false, HEALTHY, policy.healthy),
            (_, false) => (false, UNHEALTHY, policy.unhealthy),
        };
        if agrees {
            self.run.store(0, Ordering::Relaxed);
            return None;
        }
        let run = self.run.fetch_add(1, Ordering::Relaxed) + 1;
        if run < needed {
            return None;
        }
        self.run.store(0, Ordering::Relaxed);
        self.state.store(to, Ordering::Relaxed);
        match (state, to) {
            // The first result confirming the assumption changes nothing.
            (UNKNOWN, HEALTHY) => None,
            (_, HEALTHY) => Some(Turned::Healthy),
            _ => Some(Turned::Unhealthy),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::model::HealthCheckKind;
    use std::time::Duration;

    fn policy() -> HealthCheck {
        HealthCheck {
            kind: HealthCheckKind::Http,
            path: "/".into(),
            host: None,
            expect_status: vec![],
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            healthy: 2,
            unhealthy: 3,
        }
    }

    #[test]
    fn first_result_decides_then_runs_do() {
        let p = policy();
        let r = Record::default();
        assert!(r.usable());
        assert_eq!(
            r.record(&p, false, "refused".into()),
            Some(Turned::Unhealthy)
        );
        assert!(!r.usable());
        assert_eq!(r.record(&p, true, "200".into()), None);
        assert_eq!(
            r.record(&p, false, "503".into()),
            None,
            "a failure breaks the run"
        );
        assert_eq!(r.record(&p, true, "200".into()), None);
        assert_eq!(r.record(&p, true, "200".into()), Some(Turned::Healthy));
        assert!(r.usable());
        for _ in 0..2 {
            assert_eq!(r.record(&p, false, "timed out".into()), None);
        }
        assert_eq!(
            r.record(&p, false, "timed out".into()),
            Some(Turned::Unhealthy)
        );
        assert_eq!(r.last().map(|l| l.detail), Some("timed out".to_string()));

        let fresh = Record::default();
        assert_eq!(fresh.record(&p, true, "200".into()), None);
        assert!(fresh.usable());
    }

    #[test]
    fn checks_are_spread_then_come_every_interval() {
        let p = policy();
        let r = Record::default();
        let t0 = Instant::now();
        assert!(!r.claim(&p, t0), "the first call only schedules");
        let first = r.due.load(Ordering::Relaxed);
        assert!(first >= nanos(t0) && first < nanos(t0 + p.interval));
        let at_due = t0 + p.interval;
        assert!(r.claim(&p, at_due));
        assert!(!r.claim(&p, at_due + p.interval * 2), "one at a time");
        r.record(&p, true, "200".into());
        assert!(r.claim(&p, at_due + p.interval * 2));
        assert!(!r.claim(&p, at_due + p.interval * 2));
    }
}
