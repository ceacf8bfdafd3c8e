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

use async_trait::async_trait;
use http::HeaderMap;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

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

/// Check `policies` in order; all must allow. A policy consumes a unit even
/// when a later one refuses the request. `backend` serves global policies.
pub async fn check(
    policies: &[Arc<Policy>],
    inputs: &KeyInputs<'_>,
    backend: Option<&RedisBackend>,
) -> Verdict {
    let mut verdict = Verdict::default();
    // (policy, remaining, reset) per enforcing policy; formatted only when a
    // header will be sent.
    let mut shown: Vec<(&RateLimit, u32, Duration)> = Vec::new();
    let mut show = false;
    // One deadline for all of the request's global policies.
    let deadline = Instant::now() + backend.map_or(Duration::ZERO, |b| b.model.timeout);
    for p in policies {
        let m = &p.model;
        if verdict.unavailable.is_some() && matches!(m.scope, LimitScope::Global { .. }) {
            // Already refused for want of Redis; asking again only adds delay.
            continue;
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
            (Decision::Limited { retry_after }, LimitMode::Enforce) => {
                if verdict.limited.is_none() {
                    verdict.limited = Some((m.name.clone(), retry_after));
                }
                show = true;
            }
            (Decision::Limited { .. }, LimitMode::Shadow) => {
                verdict.shadow_limited.push(m.name.clone())
            }
            _ => {}
        }
        // Shadow policies stay invisible to clients.
        if m.mode == LimitMode::Enforce {
            show |= m.headers_on_allowed;
            shown.push((m, remaining, reset));
        }
    }
    if show && !shown.is_empty() {
        let policy = shown
            .iter()
            .map(|(m, _, _)| format!("\"{}\";q={};w={}", m.name, m.rate, ceil_secs(m.per)))
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

/// Whole seconds, rounded up (header fields and `Retry-After` count seconds).
pub fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// Evicts idle keys from the policies of the running config.
pub struct EvictIdleKeys {
    pub runtime: Arc<arc_swap::ArcSwap<crate::runtime::Runtime>>,
}

#[async_trait]
impl BackgroundService for EvictIdleKeys {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(EVICTION_INTERVAL);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    for p in &self.runtime.load().policies {
                        p.evict_idle();
                    }
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}
