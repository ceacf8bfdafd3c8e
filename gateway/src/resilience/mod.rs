//! What a failed attempt means for its request: whether to try again,
//! after how long, and whether the upstream can afford it ([`budget`]);
//! whether to hedge it ([`hedge`]); and whether the upstream takes a
//! request at all now ([`limit`], [`adaptive`]).
//! Every HTTP driver runs its own attempt loop and asks here; nothing is
//! decided in a driver's callbacks.

pub mod adaptive;
pub mod budget;
pub mod hedge;
pub mod limit;

use std::time::{Duration, Instant};

use http::Method;

use crate::config::model::RetryPolicy;

/// Why an attempt failed, as `retries.on` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    ConnectFailure,
    /// The connection broke before the response head.
    Reset,
    /// No response head within the attempt's time.
    Timeout,
    /// The endpoint answered with this status.
    Status(u16),
}

impl Reason {
    /// The `reason` label of `meshgate_upstream_retries_total`.
    pub fn label(self) -> &'static str {
        match self {
            Reason::ConnectFailure => "connect_failure",
            Reason::Reset => "reset",
            Reason::Timeout => "timeout",
            Reason::Status(500) => "500",
            Reason::Status(502) => "502",
            Reason::Status(503) => "503",
            Reason::Status(504) => "504",
            Reason::Status(_) => "5xx",
        }
    }
}

/// What the request is, as far as retrying it goes.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub method: &'a Method,
    /// Body bytes read so far (or declared).
    pub body_bytes: u64,
    /// Pingora could not keep the whole body to replay it.
    pub body_truncated: bool,
    /// Some of the response has gone to the client.
    pub response_started: bool,
    /// A protocol upgrade (WebSocket).
    pub upgrade: bool,
    /// Until the route's deadline.
    pub remaining: Duration,
}

/// The answer for a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Try another attempt after `wait`.
    Retry { wait: Duration },
    /// The failure goes to the client; why, for the log.
    GiveUp(&'static str),
    /// As `GiveUp`, because the upstream's retry budget is spent (counted).
    BudgetExhausted,
}

/// Whether `retries.on` lists `reason` (`false` with `retries = false`).
pub fn retried_on(policy: Option<&RetryPolicy>, reason: Reason) -> bool {
    let Some(p) = policy else {
        return false;
    };
    match reason {
        Reason::ConnectFailure => p.on.connect_failure,
        Reason::Reset => p.on.reset,
        Reason::Timeout => p.on.timeout,
        Reason::Status(s) => p.on.statuses.contains(&s),
    }
}

/// Decide on a failed attempt: `retries` of the policy's retries were
/// made before it.
pub fn decide(
    policy: Option<&RetryPolicy>,
    budget: Option<&budget::Budget>,
    reason: Reason,
    retries: u32,
    req: &Request<'_>,
    now: Instant,
) -> Verdict {
    let Some(p) = policy else {
        return Verdict::GiveUp("retries = false");
    };
    if !retried_on(Some(p), reason) {
        return Verdict::GiveUp("not in retries.on");
    }
    if req.response_started {
        return Verdict::GiveUp("the response had begun");
    }
    if req.upgrade {
        return Verdict::GiveUp("an upgrade is not retried");
    }
    if !p.methods.contains(req.method) {
        return Verdict::GiveUp("its method is not in retries.methods");
    }
    if req.body_truncated || req.body_bytes > p.body_limit {
        return Verdict::GiveUp("its body is over retries.body_limit");
    }
    if retries.saturating_add(1) >= p.attempts {
        return Verdict::GiveUp("no attempts left");
    }
    let wait = backoff(p, retries);
    if wait >= req.remaining {
        return Verdict::GiveUp("the route's timeout comes first");
    }
    if budget.is_some_and(|b| !b.withdraw(now)) {
        return Verdict::BudgetExhausted;
    }
    Verdict::Retry { wait }
}

/// A gRPC request's `grpc-timeout` (`1..=8` digits and a unit: `H`, `M`,
/// `S`, `m`, `u`, `n`), which caps its deadline.
pub fn grpc_timeout(value: &[u8]) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b"H" => Duration::from_secs(n.checked_mul(3600)?),
        b"M" => Duration::from_secs(n.checked_mul(60)?),
        b"S" => Duration::from_secs(n),
        b"m" => Duration::from_millis(n),
        b"u" => Duration::from_micros(n),
        b"n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The HTTP status a gRPC answer's `grpc-status` stands for, where a
/// retry or outlier detection should see it: `UNAVAILABLE` (14) is a
/// `503`.
pub fn grpc_status_as_http(grpc_status: &[u8]) -> Option<u16> {
    (grpc_status == b"14").then_some(503)
}

/// The wait before retry number `retries + 1`: exponential from `backoff`,
/// capped at `max_backoff`, with full jitter down to `backoff`.
pub fn backoff(p: &RetryPolicy, retries: u32) -> Duration {
    let factor = 1u32.checked_shl(retries).unwrap_or(u32::MAX);
    let cap = p
        .backoff
        .checked_mul(factor)
        .unwrap_or(p.max_backoff)
        .min(p.max_backoff);
    let low = p.backoff.min(cap);
    let span = (cap - low).as_nanos() as u64;
    low + Duration::from_nanos(if span == 0 {
        0
    } else {
        fastrand::u64(0..=span)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::model::RetryBudget;

    fn req(method: &Method) -> Request<'_> {
        Request {
            method,
            body_bytes: 0,
            body_truncated: false,
            response_started: false,
            upgrade: false,
            remaining: Duration::from_secs(10),
        }
    }

    #[test]
    fn defaults_retry_idempotent_requests_once_on_connect_reset_and_503() {
        let p = RetryPolicy::default();
        let now = Instant::now();
        let get = Method::GET;
        for reason in [Reason::ConnectFailure, Reason::Reset, Reason::Status(503)] {
            assert!(matches!(
                decide(Some(&p), None, reason, 0, &req(&get), now),
                Verdict::Retry { .. }
            ));
            assert_eq!(
                decide(Some(&p), None, reason, 1, &req(&get), now),
                Verdict::GiveUp("no attempts left")
            );
        }
        for reason in [Reason::Timeout, Reason::Status(500), Reason::Status(502)] {
            assert_eq!(
                decide(Some(&p), None, reason, 0, &req(&get), now),
                Verdict::GiveUp("not in retries.on")
            );
        }
        let post = Method::POST;
        assert_eq!(
            decide(Some(&p), None, Reason::Status(503), 0, &req(&post), now),
            Verdict::GiveUp("its method is not in retries.methods")
        );
        assert_eq!(
            decide(None, None, Reason::Status(503), 0, &req(&get), now),
            Verdict::GiveUp("retries = false")
        );
    }

    #[test]
    fn never_once_the_response_began_nor_an_upgrade_nor_a_body_too_large() {
        let p = RetryPolicy::default();
        let now = Instant::now();
        let get = Method::GET;
        let mut r = req(&get);
        r.response_started = true;
        assert_eq!(
            decide(Some(&p), None, Reason::Reset, 0, &r, now),
            Verdict::GiveUp("the response had begun")
        );
        let mut r = req(&get);
        r.upgrade = true;
        assert!(matches!(
            decide(Some(&p), None, Reason::Reset, 0, &r, now),
            Verdict::GiveUp(_)
        ));
        let put = Method::PUT;
        let mut r = req(&put);
        r.body_bytes = p.body_limit + 1;
        assert!(matches!(
            decide(Some(&p), None, Reason::Reset, 0, &r, now),
            Verdict::GiveUp(_)
        ));
        let mut r = req(&put);
        r.body_truncated = true;
        assert!(matches!(
            decide(Some(&p), None, Reason::Reset, 0, &r, now),
            Verdict::GiveUp(_)
        ));
        let mut r = req(&get);
        r.remaining = Duration::from_millis(1);
        assert_eq!(
            decide(Some(&p), None, Reason::Reset, 0, &r, now),
            Verdict::GiveUp("the route's timeout comes first")
        );
    }

    #[test]
    fn grpc_timeouts_and_statuses() {
        assert_eq!(grpc_timeout(b"100m"), Some(Duration::from_millis(100)));
        assert_eq!(grpc_timeout(b"2S"), Some(Duration::from_secs(2)));
        assert_eq!(grpc_timeout(b"1H"), Some(Duration::from_secs(3600)));
        assert_eq!(grpc_timeout(b"5u"), Some(Duration::from_micros(5)));
        for bad in [&b""[..], b"m", b"123456789m", b"10x", b"-1S", b"1.5S"] {
            assert_eq!(grpc_timeout(bad), None, "{bad:?}");
        }
        assert_eq!(grpc_status_as_http(b"14"), Some(503));
        assert_eq!(grpc_status_as_http(b"0"), None);
        assert_eq!(grpc_status_as_http(b"2"), None);
    }

    #[test]
    fn backoff_grows_with_jitter_within_its_bounds() {
        let p = RetryPolicy {
            backoff: Duration::from_millis(25),
            max_backoff: Duration::from_millis(250),
            ..RetryPolicy::default()
        };
        for retries in 0..8 {
            let cap = (Duration::from_millis(25) * (1 << retries)).min(Duration::from_millis(250));
            for _ in 0..50 {
                let w = backoff(&p, retries);
                assert!(
                    w >= Duration::from_millis(25) && w <= cap,
                    "{retries}: {w:?}"
                );
            }
        }
        let none = RetryPolicy {
            backoff: Duration::ZERO,
            max_backoff: Duration::ZERO,
            ..RetryPolicy::default()
        };
        assert_eq!(backoff(&none, 3), Duration::ZERO);
    }

    #[test]
    fn an_exhausted_budget_stops_retries() {
        let p = RetryPolicy {
            attempts: 10,
            ..RetryPolicy::default()
        };
        let b = budget::Budget::new(RetryBudget {
            ratio: 0.0,
            min_per_second: 1,
        });
        let now = Instant::now();
        let get = Method::GET;
        let mut allowed = 0;
        for _ in 0..100 {
            if matches!(
                decide(Some(&p), Some(&b), Reason::Reset, 0, &req(&get), now),
                Verdict::Retry { .. }
            ) {
                allowed += 1;
            }
        }
        // One a second over the 10 s window.
        assert_eq!(allowed, 10);
        assert_eq!(
            decide(Some(&p), Some(&b), Reason::Reset, 0, &req(&get), now),
            Verdict::BudgetExhausted
        );
    }
}
