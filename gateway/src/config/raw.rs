//! The file format: the only structs in meshgate that derive serde.
//!
//! Every table rejects unknown keys. Values that validation may need to point at
//! are `Spanned`, so an error can name file:line:col. Names of listeners, routes
//! and upstreams are the keys of flat tables; references between them are by name.

use std::fmt;

use indexmap::IndexMap;
use serde::Deserialize;
use toml::Spanned;

/// A duration as written (`"15s"`), parsed by validation. Its own type so a
/// bare number is refused as "expected a duration with a unit", which
/// validation turns into a fix that names the unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawDuration(pub String);

impl std::ops::Deref for RawDuration {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RawDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What serde's "expected ..." says for a [`RawDuration`]; validation
/// recognises it.
pub const EXPECTED_DURATION: &str = "a duration with a unit";

impl<'de> Deserialize<'de> for RawDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = RawDuration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(EXPECTED_DURATION)
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawDuration, E> {
                Ok(RawDuration(v.to_string()))
            }
        }
        d.deserialize_str(Visitor)
    }
}

/// `[gateway]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGateway {
    pub name: Option<Spanned<String>>,
    pub workers: Option<Spanned<i64>>,
    pub work_stealing: Option<bool>,
    pub shutdown_grace_period: Option<Spanned<RawDuration>>,
    pub shutdown_delay: Option<Spanned<RawDuration>>,
    pub header_case: Option<Spanned<String>>,
    pub max_pending_head_bytes: Option<Spanned<i64>>,
    pub overload: Option<Spanned<RawOverload>>,
    pub upgrade_socket: Option<Spanned<String>>,
}

/// `[gateway] overload = { memory = "..." }`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOverload {
    pub memory: Option<Spanned<String>>,
}

/// `[admin]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub listen: Option<Spanned<String>>,
}

/// `[telemetry]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTelemetry {
    pub access_log: Option<Spanned<String>>,
    pub access_log_file: Option<Spanned<String>>,
    pub tracing: Option<Spanned<RawTracing>>,
}

/// `[telemetry.tracing]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTracing {
    pub enabled: Option<bool>,
    pub endpoint: Option<Spanned<String>>,
    pub service_name: Option<Spanned<String>>,
    pub sample_ratio: Option<Spanned<f64>>,
    pub resource: Option<IndexMap<String, String>>,
    pub export_interval: Option<Spanned<RawDuration>>,
    pub export_timeout: Option<Spanned<RawDuration>>,
    pub queue_size: Option<Spanned<i64>>,
}

/// `[listeners.NAME]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListener {
    pub bind: Spanned<String>,
    pub direction: Option<Spanned<String>>,
    pub trusted_proxies: Option<Vec<Spanned<String>>>,
    pub tls: Option<Spanned<RawListenerTls>>,
    pub limits: Option<Spanned<RawListenerLimits>>,
}

/// A listener's `limits = { ... }`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListenerLimits {
    pub max_connections: Option<Spanned<i64>>,
    pub max_request_header_bytes: Option<Spanned<i64>>,
    pub max_request_headers: Option<Spanned<i64>>,
    pub max_uri_bytes: Option<Spanned<i64>>,
    pub idle_timeout: Option<Spanned<RawDuration>>,
    pub header_read_timeout: Option<Spanned<RawDuration>>,
    pub handshake_timeout: Option<Spanned<RawDuration>>,
    pub max_requests_per_connection: Option<Spanned<i64>>,
    pub body_read_timeout: Option<Spanned<RawDuration>>,
}

/// A listener's `tls = { ... }`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListenerTls {
    pub certs: Spanned<Vec<Spanned<String>>>,
    pub min_version: Option<Spanned<String>>,
    pub alpn: Option<Spanned<Vec<Spanned<String>>>>,
    pub client_ca: Option<Spanned<String>>,
    pub client_auth: Option<Spanned<String>>,
    pub forward_identity: Option<bool>,
    pub session_tickets: Option<Spanned<i64>>,
}

/// `[policies.NAME]`: authorization.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPolicy {
    pub allow: Option<Vec<Spanned<RawRule>>>,
    pub deny: Option<Vec<Spanned<RawRule>>>,
    pub default: Option<Spanned<String>>,
    pub mode: Option<Spanned<String>>,
}

/// One `allow`/`deny` rule; every condition given must hold.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    /// A pattern or a list of them; kept as a value because serde's untagged
    /// enums drop spans.
    pub identity: Option<Spanned<toml::Value>>,
    /// A CIDR or a list of them.
    pub source: Option<Spanned<toml::Value>>,
    pub methods: Option<Spanned<Vec<Spanned<String>>>>,
    pub path_prefix: Option<Spanned<String>>,
    pub headers: Option<Spanned<IndexMap<Spanned<String>, Spanned<String>>>>,
}

/// `[certs.NAME]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCert {
    pub cert: Spanned<String>,
    pub key: Spanned<String>,
}

/// An upstream's `tls = { ... }`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstreamTls {
    pub ca: Option<Spanned<String>>,
    pub cert: Option<Spanned<String>>,
    pub key: Option<Spanned<String>>,
    pub sni: Option<Spanned<String>>,
    pub verify: Option<Spanned<String>>,
}

/// `[rate_limits.NAME]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    pub key: Spanned<String>,
    pub rate: Spanned<i64>,
    pub per: Option<Spanned<RawDuration>>,
    pub burst: Option<Spanned<i64>>,
    pub mode: Option<Spanned<String>>,
    pub scope: Option<Spanned<String>>,
    pub headers_on_allowed: Option<bool>,
    pub max_keys: Option<Spanned<i64>>,
    pub batch: Option<Spanned<i64>>,
}

/// `[redis]`: the store behind `scope = "global"` rate limits.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRedis {
    pub url: Spanned<String>,
    pub on_error: Option<Spanned<String>>,
    pub timeout: Option<Spanned<RawDuration>>,
    pub key_prefix: Option<Spanned<String>>,
}

/// `[routes.NAME]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub listeners: Option<Spanned<Vec<Spanned<String>>>>,
    pub host: Option<Spanned<String>>,
    pub path: Option<Spanned<String>>,
    pub path_prefix: Option<Spanned<String>>,
    pub path_regex: Option<Spanned<String>>,
    pub methods: Option<Spanned<Vec<Spanned<String>>>>,
    pub headers: Option<Spanned<IndexMap<Spanned<String>, Spanned<String>>>>,
    pub upstream: Option<Spanned<String>>,
    pub split: Option<Spanned<IndexMap<Spanned<String>, Spanned<i64>>>>,
    pub respond: Option<Spanned<RawRespond>>,
    pub redirect: Option<Spanned<RawRedirect>>,
    pub strip_prefix: Option<Spanned<String>>,
    pub request_headers: Option<Spanned<RawHeaderRewrite>>,
    pub response_headers: Option<Spanned<RawHeaderRewrite>>,
    pub timeout: Option<Spanned<RawDuration>>,
    pub rate_limits: Option<Spanned<Vec<Spanned<String>>>>,
    pub policies: Option<Spanned<Vec<Spanned<String>>>>,
    pub max_body_bytes: Option<Spanned<i64>>,
    pub buffer_request_body: Option<Spanned<String>>,
    pub retries: Option<Spanned<RawToggle<RawRetries>>>,
    pub hedge: Option<Spanned<RawHedge>>,
}

/// A route's `hedge = { after, max }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHedge {
    pub after: Option<Spanned<RawDuration>>,
    pub max: Option<Spanned<i64>>,
}

/// `respond = { status, body, content_type }`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRespond {
    pub status: Option<Spanned<i64>>,
    pub body: Option<String>,
    pub content_type: Option<Spanned<String>>,
}

/// `redirect = { location, status }`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRedirect {
    pub location: Spanned<String>,
    pub status: Option<Spanned<i64>>,
}

/// `request_headers` / `response_headers = { set, add, remove }`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHeaderRewrite {
    pub set: Option<IndexMap<Spanned<String>, Spanned<String>>>,
    pub add: Option<IndexMap<Spanned<String>, Spanned<String>>>,
    pub remove: Option<Vec<Spanned<String>>>,
}

/// `[upstreams.NAME]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    /// A string `"host:port"` or a table `{ addr = "host:port", weight = 3 }`; kept as a
    /// value because serde's untagged enums drop spans.
    pub endpoints: Spanned<Vec<Spanned<toml::Value>>>,
    pub protocol: Option<Spanned<String>>,
    pub connect_timeout: Option<Spanned<RawDuration>>,
    pub read_timeout: Option<Spanned<RawDuration>>,
    pub write_timeout: Option<Spanned<RawDuration>>,
    pub idle_timeout: Option<Spanned<RawDuration>>,
    pub connect_retries: Option<Spanned<i64>>,
    pub tls: Option<Spanned<RawUpstreamTls>>,
    pub outlier: Option<Spanned<RawOutlier>>,
    pub load_balancing: Option<Spanned<String>>,
    pub hash_key: Option<Spanned<String>>,
    pub slow_start: Option<Spanned<RawDuration>>,
    pub panic_threshold: Option<Spanned<i64>>,
    pub health_check: Option<Spanned<RawHealthCheck>>,
    pub discovery: Option<Spanned<String>>,
    pub retry_budget: Option<Spanned<RawToggle<RawRetryBudget>>>,
    pub limits: Option<Spanned<RawUpstreamLimits>>,
    pub concurrency: Option<Spanned<String>>,
}

/// An upstream's `limits = { ... }` (circuit breaking).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstreamLimits {
    pub max_connections: Option<Spanned<i64>>,
    pub max_requests: Option<Spanned<i64>>,
    pub max_pending: Option<Spanned<i64>>,
    pub queue_timeout: Option<Spanned<RawDuration>>,
}

/// An upstream's `retry_budget = { ... }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetryBudget {
    pub ratio: Option<Spanned<f64>>,
    pub min_per_second: Option<Spanned<i64>>,
}

/// A route's `retries = { ... }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetries {
    pub attempts: Option<Spanned<i64>>,
    pub on: Option<Spanned<Vec<Spanned<String>>>>,
    pub per_try_timeout: Option<Spanned<RawDuration>>,
    pub backoff: Option<Spanned<RawDuration>>,
    pub max_backoff: Option<Spanned<RawDuration>>,
    pub methods: Option<Spanned<Vec<Spanned<String>>>>,
    pub body_limit: Option<Spanned<String>>,
}

/// `[resolver]`: where `dns` and `srv` discovery ask.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawResolver {
    pub nameservers: Option<Spanned<Vec<Spanned<String>>>>,
    pub timeout: Option<Spanned<RawDuration>>,
    pub min_ttl: Option<Spanned<RawDuration>>,
    pub max_ttl: Option<Spanned<RawDuration>>,
}

/// An upstream's `health_check = { ... }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealthCheck {
    pub kind: Option<Spanned<String>>,
    pub path: Option<Spanned<String>>,
    pub host: Option<Spanned<String>>,
    pub expect_status: Option<Spanned<Vec<Spanned<i64>>>>,
    pub interval: Option<Spanned<RawDuration>>,
    pub timeout: Option<Spanned<RawDuration>>,
    pub healthy: Option<Spanned<i64>>,
    pub unhealthy: Option<Spanned<i64>>,
}

/// A feature that is on by default: `KEY = false` (or `true`), or
/// `KEY = { ... }` with its settings.
#[derive(Debug)]
pub enum RawToggle<T> {
    Enabled(bool),
    Table(T),
}

/// `outlier = false` (or `true`), or `outlier = { ... }`.
pub type RawOutlier = RawToggle<RawOutlierTable>;

/// What serde's "expected ..." says for a [`RawToggle`].
pub const EXPECTED_TOGGLE: &str = "`false`, `true` or a table of settings";

impl<'de, T: Deserialize<'de>> Deserialize<'de> for RawToggle<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for Visitor<T> {
            type Value = RawToggle<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(EXPECTED_TOGGLE)
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<RawToggle<T>, E> {
                Ok(RawToggle::Enabled(v))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<RawToggle<T>, A::Error> {
                // The table's own deserializer, so its keys keep their spans.
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(RawToggle::Table)
            }
        }
        d.deserialize_any(Visitor(std::marker::PhantomData))
    }
}

/// `outlier = { ... }` on an upstream.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOutlierTable {
    pub consecutive_failures: Option<Spanned<i64>>,
    pub base_ejection: Option<Spanned<RawDuration>>,
    pub max_ejection: Option<Spanned<RawDuration>>,
    pub max_ejected_percent: Option<Spanned<i64>>,
}

/// `[egress]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEgress {
    pub allow: Option<Spanned<RawEgressAllow>>,
    pub ca: Option<Spanned<String>>,
    /// Host name -> an address or a list of them (`ip` or `ip:port`).
    pub resolve: Option<IndexMap<Spanned<String>, Spanned<toml::Value>>>,
    pub deny_networks: Option<Vec<Spanned<String>>>,
    pub connect_timeout: Option<Spanned<RawDuration>>,
    pub timeout: Option<Spanned<RawDuration>>,
    pub tunnel_idle_timeout: Option<Spanned<RawDuration>>,
    pub passthrough_port: Option<Spanned<i64>>,
}

/// `[egress.allow]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEgressAllow {
    pub hosts: Spanned<Vec<Spanned<String>>>,
    pub ports: Option<Spanned<Vec<Spanned<i64>>>>,
}
