//! The process's background services, each a Pingora background service
//! over the running config: idle rate-limit keys evicted, certificate
//! files watched for changes, memory sampled for overload, endpoints
//! health-checked and discovered.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use crate::ratelimit::EVICTION_INTERVAL;
use crate::runtime::certs::WATCH_INTERVAL;
use crate::runtime::Runtime;

/// Evicts idle keys from the policies of the running config.
pub struct EvictIdleKeys {
    pub runtime: Arc<ArcSwap<Runtime>>,
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

/// Closes the fast lane's idle upstream connections that expired or that
/// their upstream closed, in pools no request has looked at since.
pub struct SweepIdleUpstreams;

#[async_trait]
impl BackgroundService for SweepIdleUpstreams {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(crate::lane::pool::SWEEP_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => crate::lane::pool::sweep(),
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// How often due health checks and discovery refreshes are looked for;
/// each endpoint's interval and each answer's TTL decide when they run.
const ENDPOINTS_TICK: Duration = Duration::from_millis(100);

/// Watches the running config's endpoints, off the request path: runs
/// each health check when it is due, and looks up the names of `dns` and
/// `srv` upstreams again when their answers' TTL runs out. Work started
/// under a config that a reload replaced still reports to that config's
/// pool and to the endpoint records the next config shares.
pub struct WatchEndpoints {
    pub runtime: Arc<ArcSwap<Runtime>>,
}

#[async_trait]
impl BackgroundService for WatchEndpoints {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(ENDPOINTS_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let rt = self.runtime.load_full();
                    let now = std::time::Instant::now();
                    for (u, pool) in rt.upstreams.iter().enumerate() {
                        if let Some((members, due)) = pool.due_checks() {
                            for i in due {
                                let (rt, members) = (rt.clone(), members.clone());
                                tokio::spawn(async move {
                                    if let Some(pool) = rt.upstreams.get(u) {
                                        pool.check(&members, i, &rt.certs).await;
                                    }
                                });
                            }
                        }
                        let Some(discoverer) = rt.discoverer.clone().filter(|_| pool.refresh_due(now)) else {
                            continue;
                        };
                        let rt = rt.clone();
                        tokio::spawn(async move {
                            if let Some(pool) = rt.upstreams.get(u) {
                                let (answers, ttl) = discoverer.look_up(pool.discovery, &pool.entries).await;
                                pool.refreshed(answers, ttl, discoverer.settings.min_ttl);
                            }
                        });
                    }
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// Polls the certificate files of the running config.
pub struct WatchCertFiles {
    pub runtime: Arc<ArcSwap<Runtime>>,
}

#[async_trait]
impl BackgroundService for WatchCertFiles {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(WATCH_INTERVAL);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let rt = self.runtime.load_full();
                    // File reads and key parsing stay off the async threads.
                    let _ = tokio::task::spawn_blocking(move || rt.certs.refresh_all()).await;
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// How often memory is looked at (`[gateway] overload`).
const SAMPLE: Duration = Duration::from_millis(250);

/// The process's resident memory, in bytes (`VmRSS` of /proc/self/status).
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// Whether memory `resident` puts the gateway in overload, given whether
/// it is in it now (leaving needs 5% below the threshold).
fn decide(threshold: Option<u64>, resident: u64, now: bool) -> bool {
    match threshold {
        None => false,
        Some(t) if now => resident > t / 20 * 19,
        Some(t) => resident > t,
    }
}

/// Graceful overload (`[gateway] overload = { memory = "..." }`): while
/// the process's resident memory is above the threshold, new connections
/// are refused and new requests on open ones get `503 overloaded`
/// ([`crate::lifecycle::overloaded`]), so the gateway sheds load instead of
/// being killed for memory. It leaves the state once memory is back below
/// 95% of the threshold (so it does not flap at the line).
pub struct OverloadWatch {
    pub runtime: Arc<ArcSwap<Runtime>>,
}

#[async_trait]
impl BackgroundService for OverloadWatch {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        loop {
            let threshold = self.runtime.load().config.gateway.overload_memory;
            let now = crate::lifecycle::overloaded();
            let resident = resident_bytes().unwrap_or(0);
            let next = decide(threshold, resident, now);
            if next != now {
                crate::lifecycle::set_overloaded(next);
                let mib = |b: u64| b / (1024 * 1024);
                if next {
                    log::warn!(
                        "overload: resident memory {} MiB is over gateway.overload.memory ({} MiB): new connections are refused and new requests get 503 until it falls",
                        mib(resident),
                        mib(threshold.unwrap_or(0))
                    );
                } else {
                    log::info!(
                        "overload over: resident memory {} MiB; serving as usual",
                        mib(resident)
                    );
                }
            }
            tokio::select! {
                () = tokio::time::sleep(SAMPLE) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overload_starts_above_the_threshold_and_ends_five_percent_below() {
        let t = Some(1000);
        assert!(!decide(t, 1000, false));
        assert!(decide(t, 1001, false));
        assert!(decide(t, 951, true), "still in it just below the line");
        assert!(!decide(t, 950, true));
        assert!(!decide(None, u64::MAX, true), "off without a threshold");
    }

    #[test]
    fn resident_memory_is_read() {
        let rss = resident_bytes().expect("/proc/self/statm");
        assert!(rss > 1024 * 1024, "{rss}");
    }
}
