//! Hedging (a route's `hedge`): which requests may go to a second
//! endpoint while their first attempt still waits, when the next hedge is
//! due, and whether the upstream can afford it. The race itself is the
//! driver's (it owns its attempts).

use std::time::Instant;

use http::Method;

use super::budget::Budget;
use crate::config::model::HedgePolicy;

/// The policy that applies to this request: only idempotent requests
/// without a body (a hedge sends the request again while the first may
/// still be served), never an upgrade.
pub fn applies<'a>(
    policy: Option<&'a HedgePolicy>,
    method: &Method,
    has_body: bool,
    upgrade: bool,
) -> Option<&'a HedgePolicy> {
    policy.filter(|_| method.is_idempotent() && !has_body && !upgrade)
}

/// When the next hedge is due: `after` since the latest attempt began,
/// while fewer than `max` were sent and before the deadline.
pub fn next_due(
    p: &HedgePolicy,
    sent: u32,
    latest_attempt: Instant,
    deadline: Option<Instant>,
) -> Option<Instant> {
    if sent >= p.max {
        return None;
    }
    let due = latest_attempt.checked_add(p.after)?;
    match deadline {
        Some(d) if due >= d => None,
        _ => Some(due),
    }
}

/// Whether a hedge may be sent now: hedges are paid from the upstream's
/// retry budget, as retries are (`false` when it is spent).
pub fn afford(budget: Option<&Budget>, now: Instant) -> bool {
    budget.is_none_or(|b| b.withdraw(now))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::model::RetryBudget;
    use std::time::Duration;

    const P: HedgePolicy = HedgePolicy {
        after: Duration::from_millis(100),
        max: 2,
    };

    #[test]
    fn only_bodyless_idempotent_requests_are_hedged() {
        assert!(applies(Some(&P), &Method::GET, false, false).is_some());
        assert!(applies(Some(&P), &Method::DELETE, false, false).is_some());
        assert!(applies(Some(&P), &Method::POST, false, false).is_none());
        assert!(applies(Some(&P), &Method::PATCH, false, false).is_none());
        assert!(applies(Some(&P), &Method::PUT, true, false).is_none());
        assert!(applies(Some(&P), &Method::GET, false, true).is_none());
        assert!(applies(None, &Method::GET, false, false).is_none());
    }

    #[test]
    fn hedges_follow_the_latest_attempt_up_to_max_and_the_deadline() {
        let t = Instant::now();
        let ms = Duration::from_millis;
        assert_eq!(next_due(&P, 0, t, None), Some(t + ms(100)));
        assert_eq!(next_due(&P, 1, t + ms(100), None), Some(t + ms(200)));
        assert_eq!(next_due(&P, 2, t, None), None);
        // Not sent when the route's deadline comes first.
        assert_eq!(next_due(&P, 0, t, Some(t + ms(100))), None);
        assert_eq!(next_due(&P, 0, t, Some(t + ms(101))), Some(t + ms(100)));
    }

    #[test]
    fn hedges_are_paid_from_the_retry_budget() {
        let now = Instant::now();
        let budget = Budget::new(RetryBudget {
            ratio: 0.0,
            min_per_second: 1,
        });
        let mut granted = 0;
        for _ in 0..100 {
            granted += usize::from(afford(Some(&budget), now));
        }
        assert!((1..=10).contains(&granted), "granted {granted}");
        assert!(afford(None, now));
    }
}
