//! Global rate limits: one GCRA budget per key, kept in Redis and shared by
//! every gateway that points at the same Redis.
//!
//! Each decision is one `EVALSHA` of [`GCRA_SCRIPT`], which reads Redis's own
//! clock (so gateways' clocks do not matter), updates the key's theoretical
//! arrival time and sets it to expire once the bucket is full again (so Redis
//! holds only active keys). A call may take up to `batch` units at once; the
//! gateway then spends the rest locally ([`LocalCache`]). A refusal is cached
//! until its retry time, which is exact: no gateway can make a key's next
//! allowed time earlier.
//!
//! Every call is bounded by `[redis] timeout`. After a few failures in a row
//! calls are skipped for a short while (answered by `on_error` at once), so a
//! dead Redis costs requests nothing and a slow one costs at most `timeout`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::watch;

use crate::config::model::Redis;
use crate::telemetry::metrics::metrics;

use super::limiter::Decision;

/// GCRA over microseconds. `KEYS[1]`: the key. ARGV: emission interval (µs,
/// may be fractional), burst, units wanted. Returns {granted, remaining,
/// retry_after_us (until the next unit), full_in_us}. The stored time is
/// written with `%.3f` because Lua's default formatting keeps only 14
/// digits, fewer than a microsecond timestamp has.
pub const GCRA_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local tolerance = interval * burst
local tat = tonumber(redis.call('GET', KEYS[1])) or now
-- Work relative to now: absolute times are only a quarter microsecond apart.
local ahead = tat - now
if ahead < 0 then ahead = 0 end
local available = math.floor((tolerance - ahead) / interval + 1e-6)
if available < 1 then
  return {0, 0, math.ceil(ahead + interval - tolerance), math.ceil(ahead)}
end
local granted = math.min(want, available)
ahead = ahead + granted * interval
redis.call('SET', KEYS[1], string.format('%.3f', now + ahead), 'PX', math.ceil(ahead / 1000))
local next_unit = math.max(0, math.ceil(ahead + interval - tolerance))
return {granted, available - granted, next_unit, math.ceil(ahead)}
";

/// Failures in a row after which calls are skipped for [`SKIP_FOR`].
const FAILURES_BEFORE_SKIPPING: u32 = 3;
/// How long calls are skipped; then one request at a time finds out whether
/// Redis is back.
const SKIP_FOR: Duration = Duration::from_millis(500);
/// Leased units live `batch × interval` or this, whichever is longer: long
/// enough to be spent at high rates, short enough that a quiet gateway holds
/// back at most `batch - 1` units for a second.
const MIN_LEASE: Duration = Duration::from_secs(1);
/// TCP keepalive probes on the Redis connection start after this much
/// silence and repeat at this interval.
const TCP_KEEPALIVE: Duration = Duration::from_secs(5);
/// Data unacknowledged this long ends the connection (TCP_USER_TIMEOUT).
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(5);
/// A new connection gets this long, whatever `timeout` is: a request stops
/// waiting at `timeout`, but the attempt carries on for the next one.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum BackendError {
    #[error("Redis did not answer within the timeout")]
    Timeout,
    #[error("Redis calls are paused after repeated failures")]
    Unavailable,
    #[error("Redis error: {0}")]
    Redis(String),
}

impl BackendError {
    /// Values of the `kind` label.
    pub const KINDS: [&'static str; 3] = crate::telemetry::names::RATE_LIMIT_BACKEND_ERROR_KINDS;

    /// Count it in `meshgate_rate_limit_backend_errors_total`.
    pub fn count(&self) {
        metrics()
            .rate_limit_backend_errors
            .with_label_values(&[self.kind()])
            .inc();
    }

    pub fn kind(&self) -> &'static str {
        match self {
            BackendError::Timeout => "timeout",
            BackendError::Unavailable => "unavailable",
            BackendError::Redis(_) => "error",
        }
    }
}

/// What Redis granted for one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// Units taken (0: refused).
    pub granted: u32,
    /// Units still available at once after this grant.
    pub remaining: u32,
    /// Time until the next unit is available (zero while some remain).
    pub retry_after: Duration,
    /// Time until the bucket is full again.
    pub full_in: Duration,
}

/// The connection to `[redis]`, shared by every global policy.
pub struct RedisBackend {
    pub model: Redis,
    client: Client,
    /// Made on first use, from inside a request, because the connection's
    /// tasks need a tokio runtime and the first config is built before any.
    /// Dropped after repeated timeouts, so a connection that went silent
    /// (host gone, no reset) is replaced rather than waited on.
    manager: Mutex<Option<Conn>>,
    script: redis::Script,
    failures: AtomicU32,
    /// Milliseconds since `epoch` until which calls are skipped.
    skip_until_ms: AtomicU64,
    /// A call is finding out whether Redis is back; others skip meanwhile.
    probing: AtomicBool,
    epoch: Instant,
}

/// `[redis] ca` as the trust anchors of a `rediss://` connection.
fn certs(pem: &[u8]) -> redis::TlsCertificates {
    redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(pem.to_vec()),
    }
}

/// One Redis server, or a Redis Cluster (`[redis] cluster`).
/// Both boxed: made once per config, and of very different sizes.
enum Client {
    Single(Box<redis::Client>),
    Cluster(Box<redis::cluster::ClusterClient>),
}

/// A connection to either; one budget's key hashes to one slot, so a
/// cluster keeps each budget on one shard and the script runs there.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// Clears `probing` when the probe ends, however it ends.
struct Probe<'a>(&'a AtomicBool);

impl Drop for Probe<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl RedisBackend {
    pub fn new(model: &Redis) -> Result<Self, BackendError> {
        use redis::io::tcp::{socket2::TcpKeepalive, TcpSettings};
        use redis::IntoConnectionInfo;
        let tcp = || {
            TcpSettings::default()
                .set_nodelay(true)
                .set_keepalive(
                    TcpKeepalive::new()
                        .with_time(TCP_KEEPALIVE)
                        .with_interval(TCP_KEEPALIVE),
                )
                // Unanswered writes end the connection instead of
                // retransmitting for many minutes.
                .set_user_timeout(TCP_USER_TIMEOUT)
        };
        let client = if model.cluster.is_empty() {
            let info = model
                .url
                .as_str()
                .into_connection_info()
                .map_err(|e| BackendError::Redis(e.to_string()))?
                .set_tcp_settings(tcp());
            let client = match &model.ca {
                Some((_, pem)) => redis::Client::build_with_tls(info, certs(pem)),
                None => redis::Client::open(info),
            };
            Client::Single(Box::new(
                client.map_err(|e| BackendError::Redis(e.to_string()))?,
            ))
        } else {
            // Every call is bounded by `[redis] timeout` (as for one server);
            // one retry follows a slot that moved (MOVED, ASK).
            let cluster =
                redis::cluster::ClusterClientBuilder::new(model.cluster.iter().map(String::as_str))
                    .connection_timeout(CONNECT_TIMEOUT)
                    .response_timeout(model.timeout.max(CONNECT_TIMEOUT))
                    .retries(1)
                    .min_retry_wait(50)
                    .max_retry_wait(500)
                    .tcp_settings(tcp());
            let cluster = match &model.ca {
                Some((_, pem)) => cluster.certs(certs(pem)),
                None => cluster,
            };
            let cluster = cluster
                .build()
                .map_err(|e| BackendError::Redis(e.to_string()))?;
            Client::Cluster(Box::new(cluster))
        };
        Ok(RedisBackend {
            model: model.clone(),
            client,
            manager: Mutex::new(None),
            script: redis::Script::new(GCRA_SCRIPT),
            failures: AtomicU32::new(0),
            skip_until_ms: AtomicU64::new(0),
            probing: AtomicBool::new(false),
            epoch: Instant::now(),
        })
    }

    async fn connection(&self) -> Result<Conn, BackendError> {
        if let Some(c) = self
            .manager
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            return Ok(c.clone());
        }
        let conn = match &self.client {
            Client::Single(client) => {
                // Every call is bounded by `[redis] timeout` here; the
                // crate's own response timeout (500 ms) would race it and
                // report a timeout as an error.
                let config = ConnectionManagerConfig::new()
                    .set_response_timeout(None)
                    .set_connection_timeout(Some(CONNECT_TIMEOUT))
                    .set_number_of_retries(1)
                    .set_min_delay(Duration::from_millis(50))
                    .set_max_delay(Duration::from_millis(500));
                Conn::Single(
                    ConnectionManager::new_lazy_with_config((**client).clone(), config)
                        .map_err(|e| BackendError::Redis(e.to_string()))?,
                )
            }
            // A cluster connection learns the slots from a node first: made
            // here, within the call's time (the caller's timeout).
            Client::Cluster(client) => Conn::Cluster(
                client
                    .get_async_connection()
                    .await
                    .map_err(|e| BackendError::Redis(e.to_string()))?,
            ),
        };
        let mut slot = self.manager.lock().unwrap_or_else(|p| p.into_inner());
        Ok(slot.get_or_insert(conn).clone())
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Take up to `want` units of `key` from a bucket of `burst` units that
    /// refills one unit per `interval`, answering by `deadline` at the latest.
    /// Failures are counted in `meshgate_rate_limit_backend_errors_total`.
    pub async fn take(
        &self,
        key: &str,
        interval: Duration,
        burst: u32,
        want: u32,
        deadline: Instant,
    ) -> Result<Grant, BackendError> {
        let result = self
            .take_uncounted(key, interval, burst, want, deadline)
            .await;
        if let Err(e) = &result {
            e.count();
        }
        result
    }

    async fn take_uncounted(
        &self,
        key: &str,
        interval: Duration,
        burst: u32,
        want: u32,
        deadline: Instant,
    ) -> Result<Grant, BackendError> {
        let _probe = if self.failures.load(Ordering::Relaxed) >= FAILURES_BEFORE_SKIPPING {
            // Failing: skip for a while, then let one call at a time probe.
            if self.now_ms() < self.skip_until_ms.load(Ordering::Relaxed)
                || self
                    .probing
                    .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                    .is_err()
            {
                return Err(BackendError::Unavailable);
            }
            Some(Probe(&self.probing))
        } else {
            None
        };
        let wait = deadline.saturating_duration_since(Instant::now());
        if wait.is_zero() {
            // Out of time before asking: not Redis's fault, not recorded.
            return Err(BackendError::Timeout);
        }
        let started = Instant::now();
        let result = self.call(key, interval, burst, want, wait).await;
        match &result {
            Ok(_) => metrics()
                .rate_limit_backend_duration
                .observe(started.elapsed().as_secs_f64()),
            // A call that had much less than the full timeout (a route's
            // second global policy) says little about Redis. The first call
            // of a request has the timeout less the microseconds spent
            // since the request's deadline was set: that one counts.
            Err(BackendError::Timeout) if wait < self.model.timeout.mul_f32(0.9) => return result,
            Err(_) => {}
        }
        self.record(&result);
        result
    }

    async fn call(
        &self,
        key: &str,
        interval: Duration,
        burst: u32,
        want: u32,
        wait: Duration,
    ) -> Result<Grant, BackendError> {
        let started = Instant::now();
        let mut conn = match tokio::time::timeout(wait, self.connection()).await {
            Ok(conn) => conn?,
            Err(_) => return Err(BackendError::Timeout),
        };
        let wait = wait.saturating_sub(started.elapsed());
        // Fractional microseconds: whole ones would round 1s/300000 (3.33µs)
        // down to 3µs, 11% more than the limit.
        let interval_us = format!("{:.3}", interval.as_nanos() as f64 / 1000.0);
        let mut invocation = self.script.key(key);
        invocation.arg(interval_us).arg(burst).arg(want);
        let reply = tokio::time::timeout(
            wait,
            invocation.invoke_async::<(i64, i64, i64, i64)>(&mut conn),
        )
        .await;
        let (granted, remaining, retry_us, full_us) = match reply {
            Err(_) => return Err(BackendError::Timeout),
            Ok(Err(e)) if e.is_timeout() => return Err(BackendError::Timeout),
            Ok(Err(e)) => return Err(BackendError::Redis(e.to_string())),
            Ok(Ok(v)) => v,
        };
        let clamp = |v: i64| u32::try_from(v.max(0)).unwrap_or(u32::MAX);
        let micros = |v: i64| Duration::from_micros(v.max(0) as u64);
        Ok(Grant {
            granted: clamp(granted),
            remaining: clamp(remaining),
            retry_after: micros(retry_us),
            full_in: micros(full_us),
        })
    }

    fn record(&self, result: &Result<Grant, BackendError>) {
        let Err(e) = result else {
            if self.failures.swap(0, Ordering::Relaxed) > 0 {
                log::info!("Redis at {} answers again", self.model.redacted_url());
            }
            return;
        };
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures == 1 {
            log::warn!(
                "Redis at {} is failing ({e}); global rate limits follow on_error = \"{}\" until it answers",
                self.model.redacted_url(),
                self.model.on_error.as_str()
            );
        }
        if failures < FAILURES_BEFORE_SKIPPING {
            return;
        }
        if *e == BackendError::Timeout {
            // The connection may be dead without knowing it: start afresh.
            *self.manager.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
        self.skip_until_ms.store(
            self.now_ms() + SKIP_FOR.as_millis() as u64,
            Ordering::Relaxed,
        );
    }
}

/// What a gateway remembers of one key of a global policy.
#[derive(Debug)]
struct Entry {
    /// Redis has no unit for this key until then (refused, or drained by
    /// the last grant).
    refused_until: Option<Instant>,
    /// Units taken from Redis and not spent yet, usable until `lease_until`.
    lease: u32,
    lease_until: Instant,
    /// What Redis reported at the last grant, for the `RateLimit` field.
    remaining: u32,
    full_at: Instant,
    /// Set while one request asks Redis for this key; dropping it wakes the
    /// requests waiting for that answer.
    fetching: Option<watch::Sender<()>>,
}

impl Entry {
    fn empty(now: Instant) -> Self {
        Entry {
            refused_until: None,
            lease: 0,
            lease_until: now,
            remaining: 0,
            full_at: now,
            fetching: None,
        }
    }

    fn idle(&self, now: Instant) -> bool {
        self.fetching.is_none()
            && self.refused_until.is_none_or(|t| t <= now)
            && (self.lease == 0 || self.lease_until <= now)
    }
}

/// What the cache says about a request.
pub enum Lookup<'a> {
    Decided(Decision),
    /// Ask Redis. With a guard, other requests for the key wait for this
    /// answer instead of asking too (batch > 1), until the guard is dropped.
    Fetch(Option<FetchGuard<'a>>),
    /// Another request is asking Redis for this key; wait for it, then look again.
    Wait(watch::Receiver<()>),
}

/// Marks a key as being fetched; clears the mark (waking waiters) when
/// dropped, also when the request is cancelled mid-call.
pub struct FetchGuard<'a> {
    cache: &'a LocalCache,
    key: String,
}

impl Drop for FetchGuard<'_> {
    fn drop(&mut self) {
        let mut entries = self.cache.lock();
        if let Some(e) = entries.get_mut(&self.key) {
            e.fetching = None;
        }
    }
}

/// The gateway-local half of a global policy: cached refusals and leased
/// units, bounded by the policy's `max_keys`.
pub struct LocalCache {
    entries: Mutex<HashMap<String, Entry>>,
    max_keys: usize,
    interval: Duration,
    /// One Redis call per key at a time. Only with batch > 1: each call then
    /// brings units for the requests waiting on it, while with batch = 1 it
    /// would serialise a hot key's requests for nothing.
    single_flight: bool,
}

impl LocalCache {
    pub fn new(interval: Duration, batch: u32, max_keys: usize) -> Self {
        LocalCache {
            entries: Mutex::new(HashMap::new()),
            max_keys,
            interval,
            single_flight: batch > 1,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Decide from the cache, or say who asks Redis.
    pub fn lookup(&self, key: &str, now: Instant) -> Lookup<'_> {
        let mut entries = self.lock();
        if let Some(e) = entries.get_mut(key) {
            if e.lease > 0 && e.lease_until > now {
                e.lease -= 1;
                return Lookup::Decided(Decision::Allowed {
                    remaining: e.remaining.saturating_add(e.lease),
                    full_in: e.full_at.saturating_duration_since(now),
                });
            }
            if let Some(until) = e.refused_until.filter(|t| *t > now) {
                return Lookup::Decided(Decision::Limited {
                    retry_after: until - now,
                });
            }
            if let Some(fetching) = &e.fetching {
                return Lookup::Wait(fetching.subscribe());
            }
        }
        if !self.single_flight {
            return Lookup::Fetch(None);
        }
        if !entries.contains_key(key) {
            if entries.len() >= self.max_keys {
                // Beyond max_keys every request asks Redis itself.
                return Lookup::Fetch(None);
            }
            entries.insert(key.to_string(), Entry::empty(now));
        }
        let Some(entry) = entries.get_mut(key) else {
            return Lookup::Fetch(None);
        };
        entry.fetching = Some(watch::channel(()).0);
        Lookup::Fetch(Some(FetchGuard {
            cache: self,
            key: key.to_string(),
        }))
    }

    /// Turn Redis's answer into a decision and remember what it allows.
    pub fn record(&self, key: &str, grant: Grant, now: Instant) -> Decision {
        let leased = grant.granted.saturating_sub(1);
        let decision = if grant.granted == 0 {
            Decision::Limited {
                retry_after: grant.retry_after,
            }
        } else {
            Decision::Allowed {
                remaining: grant.remaining.saturating_add(leased),
                full_in: grant.full_in,
            }
        };
        let mut entries = self.lock();
        if !entries.contains_key(key) {
            // A single grant that leaves units: nothing worth remembering.
            let plain = grant.granted == 1 && grant.retry_after.is_zero();
            if plain || entries.len() >= self.max_keys {
                return decision;
            }
            entries.insert(key.to_string(), Entry::empty(now));
        }
        let Some(entry) = entries.get_mut(key) else {
            return decision;
        };
        // Until the next unit, Redis would refuse this key (once any leased
        // units are spent): no gateway can make that time earlier.
        entry.refused_until = (!grant.retry_after.is_zero()).then(|| now + grant.retry_after);
        if grant.granted > 0 {
            // Units still leased (another call's) stay; the new ones add up.
            let kept = if entry.lease_until > now {
                entry.lease
            } else {
                0
            };
            entry.lease = kept.saturating_add(leased);
            // Units not spent in time are dropped, so a quiet gateway cannot
            // hoard a key's budget.
            entry.lease_until = now + self.interval.saturating_mul(leased.max(1)).max(MIN_LEASE);
        }
        entry.remaining = grant.remaining;
        entry.full_at = now + grant.full_in;
        decision
    }

    /// Drop entries that no longer change a decision.
    pub fn evict_idle(&self, now: Instant) {
        self.lock().retain(|_, e| !e.idle(now));
    }

    pub fn keys(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(granted: u32, remaining: u32, retry_ms: u64) -> Grant {
        Grant {
            granted,
            remaining,
            retry_after: Duration::from_millis(retry_ms),
            full_in: Duration::from_millis(100),
        }
    }

    /// The cached decision, if any (a fetch or wait is `None`).
    fn decided(cache: &LocalCache, key: &str, now: Instant) -> Option<Decision> {
        match cache.lookup(key, now) {
            Lookup::Decided(d) => Some(d),
            _ => None,
        }
    }

    #[test]
    fn refusal_is_cached_until_retry_time() {
        let cache = LocalCache::new(Duration::from_millis(10), 1, 100);
        let t0 = Instant::now();
        assert!(matches!(cache.lookup("k", t0), Lookup::Fetch(None)));
        let d = cache.record("k", grant(0, 0, 30), t0);
        assert_eq!(
            d,
            Decision::Limited {
                retry_after: Duration::from_millis(30)
            }
        );
        assert_eq!(
            decided(&cache, "k", t0 + Duration::from_millis(10)),
            Some(Decision::Limited {
                retry_after: Duration::from_millis(20)
            })
        );
        // At the retry time Redis is asked again.
        assert_eq!(decided(&cache, "k", t0 + Duration::from_millis(30)), None);
        cache.evict_idle(t0 + Duration::from_millis(30));
        assert_eq!(cache.keys(), 0);
    }

    #[test]
    fn leased_units_are_spent_locally_then_expire() {
        let cache = LocalCache::new(Duration::from_secs(1), 3, 100);
        let t0 = Instant::now();
        // Redis granted 3: one for this request, two leased for 2s.
        let d = cache.record("k", grant(3, 5, 0), t0);
        assert!(matches!(d, Decision::Allowed { remaining: 7, .. }));
        assert!(matches!(
            decided(&cache, "k", t0),
            Some(Decision::Allowed { remaining: 6, .. })
        ));
        assert!(matches!(
            decided(&cache, "k", t0 + Duration::from_millis(5)),
            Some(Decision::Allowed { remaining: 5, .. })
        ));
        assert_eq!(decided(&cache, "k", t0 + Duration::from_millis(5)), None);

        // A second grant while units are still leased adds to them.
        cache.record("j", grant(3, 5, 0), t0);
        cache.record("j", grant(3, 2, 0), t0);
        let spent = (0..10)
            .filter(|_| decided(&cache, "j", t0).is_some())
            .count();
        assert_eq!(spent, 4);

        cache.record("x", grant(3, 5, 0), t0);
        assert_eq!(decided(&cache, "x", t0 + Duration::from_secs(2)), None);
        cache.evict_idle(t0 + Duration::from_secs(2));
        assert_eq!(cache.keys(), 0);

        // At high rates a lease still lives long enough to be spent.
        let fast = LocalCache::new(Duration::from_micros(1), 3, 100);
        fast.record("k", grant(3, 5, 0), t0);
        assert!(decided(&fast, "k", t0 + Duration::from_millis(500)).is_some());
    }

    #[tokio::test]
    async fn with_batches_one_request_asks_redis_and_the_others_wait_for_it() {
        let cache = LocalCache::new(Duration::from_millis(10), 5, 100);
        let t0 = Instant::now();
        let Lookup::Fetch(Some(guard)) = cache.lookup("k", t0) else {
            panic!("the first request should fetch");
        };
        let Lookup::Wait(mut waiter) = cache.lookup("k", t0) else {
            panic!("the second request should wait");
        };
        cache.record("k", grant(5, 0, 0), t0);
        drop(guard);
        // Woken (the sender is gone), the waiter finds a leased unit.
        assert!(waiter.changed().await.is_err());
        assert!(decided(&cache, "k", t0).is_some());

        // A cancelled fetch wakes its waiters too, and the next request asks again.
        let Lookup::Fetch(Some(guard)) = cache.lookup("j", t0) else {
            panic!("fetch");
        };
        let Lookup::Wait(mut waiter) = cache.lookup("j", t0) else {
            panic!("wait");
        };
        drop(guard);
        assert!(waiter.changed().await.is_err());
        assert!(matches!(cache.lookup("j", t0), Lookup::Fetch(Some(_))));
    }

    #[test]
    fn single_grants_are_not_cached_and_the_cache_is_bounded() {
        let cache = LocalCache::new(Duration::from_millis(10), 1, 2);
        let t0 = Instant::now();
        cache.record("a", grant(1, 5, 0), t0);
        assert_eq!(cache.keys(), 0);
        for k in ["a", "b", "c", "d"] {
            cache.record(k, grant(0, 0, 1000), t0);
        }
        assert_eq!(cache.keys(), 2);
        // A key that did not fit is still decided, by Redis.
        assert!(matches!(cache.lookup("c", t0), Lookup::Fetch(None)));
    }

    #[test]
    fn error_kinds_are_the_documented_label_values() {
        for e in [
            BackendError::Timeout,
            BackendError::Unavailable,
            BackendError::Redis("x".into()),
        ] {
            assert!(BackendError::KINDS.contains(&e.kind()));
        }
    }
}
