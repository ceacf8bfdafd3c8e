//! Rate limiting: named policies (`[rate_limits.NAME]`) that routes list.
//! Each policy is a keyed GCRA limiter, in this process ([`limiter`]) or in
//! Redis, shared by all gateways ([`global`]); a request must be allowed by
//! every policy of its route. Shadow policies count and log what
//! they would limit but never block. Responses carry the IETF `RateLimit` and
//! `RateLimit-Policy` fields (draft-ietf-httpapi-ratelimit-headers).

pub mod client_ip;
pub mod global;
pub mod limiter;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::HeaderMap;

use crate::config::model::{LimitMode, LimitScope, OnError, RateLimit, RateLimitKey};
use crate::telemetry::metrics::metrics;
use global::{BackendError, LocalCache, Lookup, RedisBackend};
use limiter::{Decision, KeyedLimiter};

/// How often idle keys are evicted from every policy.
pub const EVICTION_INTERVAL: Duration = Duration::from_secs(10);

/// A compiled policy: its config and its limiter state.
pub struct Policy {
    pub model: RateLimit,
    state: State,
}

enum State {
    Local(KeyedLimiter),
    Global {
        cache: LocalCache,
        /// Refill interval: `per / rate`.
        interval: Duration,
        batch: u32,
    },
}

impl Policy {
    pub fn build(model: &RateLimit) -> Option<Arc<Policy>> {
        let interval = model.per.checked_div(model.rate)?;
        let state = match model.scope {
            LimitScope::Local => State::Local(KeyedLimiter::new(
                model.rate,
                model.per,
                model.burst,
                model.max_keys,
            )?),
            LimitScope::Global { batch } => State::Global {
                cache: LocalCache::new(interval, batch, model.max_keys),
                interval,
                batch,
            },
        };
        Some(Arc::new(Policy {
            model: model.clone(),
            state,
        }))
    }

    pub fn evict_idle(&self) {
        let keys = match &self.state {
            State::Local(l) => {
                l.evict_idle();
                l.keys()
            }
            State::Global { cache, .. } => {
                cache.evict_idle(Instant::now());
                cache.keys()
            }
        };
        metrics()
            .rate_limit_keys
            .with_label_values(&[self.model.name.as_str()])
            .set(keys as i64);
    }

    async fn decide(
        &self,
        key: &str,
        backend: Option<&RedisBackend>,
        deadline: Instant,
    ) -> Result<Decision, BackendError> {
        match &self.state {
            State::Local(l) => Ok(l.check(key)),
            State::Global {
                cache,
                interval,
                batch,
            } => {
                let Some(backend) = backend else {
                    let e = BackendError::Unavailable;
                    e.count();
                    return Err(e);
                };
                // Waiting for another request's Redis call counts against
                // the same deadline as making one.
                loop {
                    match cache.lookup(key, Instant::now()) {
                        Lookup::Decided(d) => return Ok(d),
                        Lookup::Wait(mut answered) => {
                            let left = deadline.saturating_duration_since(Instant::now());
                            if tokio::time::timeout(left, answered.changed())
                                .await
                                .is_err()
                            {
                                let e = BackendError::Timeout;
                                e.count();
                                return Err(e);
                            }
                        }
                        Lookup::Fetch(guard) => {
                            let redis_key =
                                format!("{}{}:{key}", backend.model.key_prefix, self.model.name);
                            // A key the cache cannot hold could not spend a batch.
                            let want = if guard.is_some() { *batch } else { 1 };
                            let grant = backend
                                .take(&redis_key, *interval, self.model.burst, want, deadline)
                                .await?;
                            let decision = cache.record(key, grant, Instant::now());
                            drop(guard);
                            return Ok(decision);
                        }
                    }
                }
            }
        }
    }
}

/// What a request is keyed by.
pub struct KeyInputs<'a> {
    pub client_ip: Option<IpAddr>,
    pub headers: &'a HeaderMap,
    pub route: &'a str,
    /// The client certificate's identity (mTLS listeners).
    pub identity: Option<&'a str>,
}

fn key_of(policy: &RateLimit, inputs: &KeyInputs<'_>) -> String {
    match &policy.key {
        RateLimitKey::ClientIp => inputs
            .client_ip
            .map(|ip| ip.to_string())
            .unwrap_or_default(),
        // Requests without the header share one bucket: leaving it out must
        // not be a way around the limit.
        RateLimitKey::Header(name) => inputs
            .headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .unwrap_or_default(),
        RateLimitKey::Route => inputs.route.to_string(),
        // Clients without a certificate identity share one bucket.
        RateLimitKey::Identity => inputs.identity.unwrap_or_default().to_string(),
    }
}

/// The outcome for one request across its route's policies.
#[derive(Default)]
pub struct Verdict {
    /// The enforcing policy that refused the request, and when to retry.
    pub limited: Option<(String, Duration)>,
    /// The enforcing global policy that could not reach Redis, when
    /// `on_error = "deny"`.
    pub unavailable: Option<String>,
    /// Shadow policies that would have refused it.
    pub shadow_limited: Vec<String>,
    /// Global policies that could not ask Redis (and let the request through
    /// unless listed in `unavailable`).
    pub backend_errors: Vec<String>,
    /// `RateLimit-Policy` and `RateLimit` values, when the response should carry them.
    pub headers: Option<(String, String)>,
}

/// Check `policies` in order; all must allow. The first refusal ends the
/// check: a policy before it has consumed a unit, one after it is neither
/// asked nor charged, so a client over a narrow limit listed first does not
/// drain a shared one listed after it. `backend` serves global policies.
pub async fn check(
    policies: &[Arc<Policy>],
    inputs: &KeyInputs<'_>,
    backend: Option<&RedisBackend>,
) -> Verdict {
    let mut verdict = Verdict::default();
    // (policy, remaining, reset) per enforcing policy; formatted only when a
    // header will be sent.
    let mut shown: Vec<(&RateLimit, u32, Duration)> = Vec::new();
    // One deadline for all of the request's global policies.
    let deadline = Instant::now() + backend.map_or(Duration::ZERO, |b| b.model.timeout);
    for p in policies {
        let m = &p.model;
        if verdict.limited.is_some() || verdict.unavailable.is_some() {
            // Refused: charging later policies would let a refused client
            // drain budgets others share (and cost Redis round trips).
            break;
        }
        let decision = match p.decide(&key_of(m, inputs), backend, deadline).await {
            Ok(d) => d,
            Err(e) => {
                metrics()
                    .rate_limit_decisions
                    .with_label_values(&[m.name.as_str(), "backend_error"])
                    .inc();
                log::debug!("rate limit {}: {e}", m.name);
                verdict.backend_errors.push(m.name.clone());
                let deny = backend.is_none_or(|b| b.model.on_error == OnError::Deny);
                if deny && m.mode == LimitMode::Enforce && verdict.unavailable.is_none() {
                    verdict.unavailable = Some(m.name.clone());
                }
                // Nothing is known about the budget, so no header field.
                continue;
            }
        };
        let outcome = match (decision, m.mode) {
            (Decision::Allowed { .. }, _) => "allowed",
            (Decision::Limited { .. }, LimitMode::Shadow) => "shadow_limited",
            (Decision::Limited { .. }, LimitMode::Enforce) => "limited",
        };
        metrics()
            .rate_limit_decisions
            .with_label_values(&[m.name.as_str(), outcome])
            .inc();
        let (remaining, reset) = match decision {
            Decision::Allowed { remaining, full_in } => (remaining, full_in),
            Decision::Limited { retry_after } => (0, retry_after),
        };
        match (decision, m.mode) {
            // The last policy asked: a refusal ends the check.
            (Decision::Limited { retry_after }, LimitMode::Enforce) => {
                verdict.limited = Some((m.name.clone(), retry_after));
            }
            (Decision::Limited { .. }, LimitMode::Shadow) => {
                verdict.shadow_limited.push(m.name.clone())
            }
            _ => {}
        }
        // Shadow policies stay invisible to clients.
        if m.mode == LimitMode::Enforce {
            shown.push((m, remaining, reset));
        }
    }
    // A 429 names every enforcing policy asked; an allowed response only
    // those that ask for headers on allowed responses.
    let refused = verdict.limited.is_some();
    shown.retain(|(m, _, _)| refused || m.headers_on_allowed);
    if !shown.is_empty() {
        let policy = shown
            .iter()
            .map(|(m, _, _)| {
                let (q, w) = quota(m.rate, m.per);
                format!("\"{}\";q={q};w={w}", m.name)
            })
            .collect::<Vec<_>>()
            .join(", ");
        let limit = shown
            .iter()
            .map(|(m, r, t)| format!("\"{}\";r={};t={}", m.name, r, ceil_secs(*t)))
            .collect::<Vec<_>>()
            .join(", ");
        verdict.headers = Some((policy, limit));
    }
    verdict
}

/// `RateLimit-Policy`'s quota `q` in a window of `w` whole seconds: `rate`
/// per `per` scaled to the window (rounded down, never below `rate`), so
/// `rate = 5, per = "500ms"` is `q=10;w=1`, not 5 in a second.
fn quota(rate: u32, per: Duration) -> (u64, u64) {
    let w = ceil_secs(per).max(1);
    let per_nanos = per.as_nanos().max(1);
    let q = u128::from(rate) * u128::from(w) * 1_000_000_000 / per_nanos;
    (u64::try_from(q).unwrap_or(u64::MAX).max(u64::from(rate)), w)
}

/// Whole seconds, rounded up (header fields and `Retry-After` count seconds).
pub fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_advertised_quota_is_the_rate_over_a_whole_second_window() {
        let ms = Duration::from_millis;
        assert_eq!(quota(100, Duration::from_secs(1)), (100, 1));
        assert_eq!(quota(100, Duration::from_secs(60)), (100, 60));
        // Sub-second periods scale up to the one-second window.
        assert_eq!(quota(5, ms(500)), (10, 1));
        assert_eq!(quota(1, ms(10)), (100, 1));
        // A period that is not whole seconds: the window rounds up and the
        // quota scales with it, rounded down.
        assert_eq!(quota(3, ms(1500)), (4, 2));
        assert_eq!(quota(7, ms(2500)), (8, 3));
    }
}
