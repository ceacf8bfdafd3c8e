//! The file format: the only structs in meshgate that derive serde.
//!
//! Every table rejects unknown keys. Values that validation may need to point at
//! are `Spanned`, so an error can name file:line:col. Names of listeners, routes
//! and upstreams are the keys of flat tables; references between them are by name.

use std::fmt;

use indexmap::IndexMap;
use schemars::JsonSchema;
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

impl JsonSchema for RawDuration {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "A duration with a unit, in quotes: \"250ms\", \"15s\", \"2m\", \"1h\", \"1m 30s\" (units ns us ms s m h); at most \"24h\".",
            "examples": ["250ms", "15s", "1m 30s"]
        })
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
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawGateway {
    #[schemars(with = "Option<String>")]
    pub name: Option<Spanned<String>>,
    #[schemars(with = "Option<i64>")]
    pub workers: Option<Spanned<i64>>,
    pub work_stealing: Option<bool>,
    #[schemars(with = "Option<RawDuration>")]
    pub shutdown_grace_period: Option<Spanned<RawDuration>>,
    #[schemars(with = "Option<RawDuration>")]
    pub shutdown_delay: Option<Spanned<RawDuration>>,
    #[schemars(with = "Option<String>")]
    pub header_case: Option<Spanned<String>>,
    #[schemars(with = "Option<String>")]
    pub http1_engine: Option<Spanned<String>>,
    #[schemars(with = "Option<i64>")]
    pub max_pending_head_bytes: Option<Spanned<i64>>,
    #[schemars(with = "Option<RawOverload>")]
    pub overload: Option<Spanned<RawOverload>>,
    #[schemars(with = "Option<String>")]
    pub upgrade_socket: Option<Spanned<String>>,
}

/// `[gateway] overload = { memory = "..." }`
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawOverload {
    #[schemars(with = "Option<String>")]
    pub memory: Option<Spanned<String>>,
}

/// `[admin]`
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    #[schemars(with = "Option<String>")]
    pub listen: Option<Spanned<String>>,
}

/// `[telemetry]`
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawTelemetry {
    #[schemars(with = "Option<String>")]
    pub access_log: Option<Spanned<String>>,
    #[schemars(with = "Option<String>")]
    pub access_log_file: Option<Spanned<String>>,
    #[schemars(with = "Option<RawTracing>")]
    pub tracing: Option<Spanned<RawTracing>>,
}

/// `[telemetry.tracing]`
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawTracing {
    pub enabled: Option<bool>,
    #[schemars(with = "Option<String>")]
    pub endpoint: Option<Spanned<String>>,
    #[schemars(with = "Option<String>")]
    pub service_name: Option<Spanned<String>>,
    #[schemars(with = "Option<f64>")]
    pub sample_ratio: Option<Spanned<f64>>,
    pub resource: Option<IndexMap<String, String>>,
    #[schemars(with = "Option<RawDuration>")]
    pub export_interval: Option<Spanned<RawDuration>>,
    #[schemars(with = "Option<RawDuration>")]
    pub export_timeout: Option<Spanned<RawDuration>>,
    #[schemars(with = "Option<i64>")]
    pub queue_size: Option<Spanned<i64>>,
}

/// `[listeners.NAME]`
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawListener {
    #[schemars(with = "String")]
    pub bind: Spanned<String>,
    #[schemars(with = "Option<String>")]
    pub direction: Option<Spanned<String>>,
    #[schemars(with = "Option<Vec<String>>")]
    pub trusted_proxies: Option<Vec<Spanned<String>>>,
    #[schemars(with = "Option<RawListenerTls>")]
    pub tls: Option<Spanned<RawListenerTls>>,
    #[schemars(with = "Option<RawListenerLimits>")]
    pub limits: Option<Spanned<RawListenerLimits>>,
}

/// A listener's `limits = { ... }`
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawListenerLimits {
    #[schemars(with = "Option<i64>")]
    pub max_connections: Option<Spanned<i64>>,
    #[schemars(with = "Option<i64>")]
    pub max_request_header_bytes: Option<Spanned<i64>>,
    #[schemars(with = "Option<i64>")]
    pub max_request_headers: Option<Spanned<i64>>,
    #[schemars(with = "Option<i64>")]
    pub max_uri_bytes: Option<Spanned<i64>>,
    #[schemars(with = "Option<RawDuration>")]
    pub idle_timeout: Option<Spanned<RawDuration>>,
    #[schemars(with = "Option<RawDuration>")]
    pub header_read_timeout: Option<Spanned<RawDuration>>,
    #[schemars(with = "Option<RawDuration>")]
    pub handshake_timeout: Option<Spanned<RawDuration>>,
    #[schemars(with = "Option<i64>")]
    pub max_requests_per_connection: Option<Spanned<i64>>,
    #[schemars(with = "Option<RawDuration>")]
    pub body_read_timeout: Option<Spanned<RawDuration>>,
}

/// A listener's `tls = { ... }`
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawListenerTls {
    #[schemars(with = "Vec<String>")]
    pub certs: Spanned<Vec<Spanned<String>>>,
    #[schemars(with = "Option<String>")]
    pub min_version: Option<Spanned<String>>,
    #[schemars(with = "Option<Vec<String>>")]
    pub alpn: Option<Spanned<Vec<Spanned<String>>>>,
    #[schemars(with = "Option<String>")]
    pub client_ca: Option<Spanned<String>>,
    #[schemars(with = "Option<String>")]
    pub client_auth: Option<Spanned<String>>,
    pub forward_identity: Option<bool>,
    #[schemars(with = "Option<i64>")]
    pub session_tickets: Option<Spanned<i64>>,
}

/// `[policies.NAME]`: authorization.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawPolicy {
    #[schemars(with = "Option<Vec<RawRule>>")]
    pub allow: Option<Vec<Spanned<RawRule>>>,
    #[schemars(with = "Option<Vec<RawRule>>")]
    pub deny: Option<Vec<Spanned<RawRule>>>,
    #[schemars(with = "Option<String>")]
    pub default: Option<Spanned<String>>,
    #[schemars(with = "Option<String>")]
    pub mode: Option<Spanned<String>>,
}

/// One `allow`/`deny` rule; every condition given must hold.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    /// A pattern or a list of them; kept as a value because serde's untagged
    /// enums drop spans.
    #[schemars(with = "Option<serde_json::Value>")]
    pub identity: Option<Spanned<toml::Value>>,
    /// A CIDR or a list of them.
    #[schemars(with = "Option<serde_json::Value>")]
    pub source: Option<Spanned<toml::Value>>,
    #[schemars(with = "Option<Vec<String>>")]
    pub methods: Option<Spanned<Vec<Spanned<String>>>>,
    #[schemars(with = "Option<String>")]
    pub path_prefix: Option<Spanned<String>>,
    #[schemars(with = "Option<IndexMap<String, String>>")]
    pub headers: Option<Spanned<IndexMap<Spanned<String>, Spanned<String>>>>,
}

/// `[certs.NAME]`
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawCert {
    #[schemars(with = "String")]
    pub cert: Spanned<String>,
    #[schemars(with = "String")]
    pub key: Spanned<String>,
}

/// An upstream's `tls = { ... }`
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawUpstreamTls {
    #[schemars(with = "Option<String>")]
    pub ca: Option<Spanned<String>>,
    #[schemars(with = "Option<String>")]
    pub cert: Option<Spanned<String>>,
    #[schemars(with = "Option<String>")]
    pub key: Option<Spanned<String>>,
    #[schemars(with = "Option<String>")]
    pub sni: Option<Spanned<String>>,
    #[schemars(with = "Option<String>")]
    pub verify: Option<Spanned<String>>,
}

/// `[rate_limits.NAME]`
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    #[schemars(with = "String")]
    pub key: Spanned<String>,
    #[schemars(with = "i64")]
    pub rate: Spanned<i64>,
    #[schemars(with = "Option<RawDuration>")]
    pub per: Option<Spanned<RawDuration>>,
    #[schemars(with = "Option<i64>")]
    pub burst: Option<Spanned<i64>>,
    #[schemars(with = "Option<String>")]
    pub mode: Option<Spanned<String>>,
    #[schemars(with = "Option<String>")]
    pub scope: Option<Spanned<String>>,
    pub headers_on_allowed: Option<bool>,
    #[schemars(with = "Option<i64>")]
    pub max_keys: Option<Spanned<i64>>,
    #[schemars(with = "Option<i64>")]
    pub batch: Option<Spanned<i64>>,
}

/// `[redis]`: the store behind `scope = "global"` rate limits.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawRedis {
    #[schemars(with = "Option<String>")]
    pub url: Option<Spanned<String>>,
    /// A Redis Cluster's nodes, instead of `url`.
    #[schemars(with = "Option<Vec<String>>")]
    pub cluster: Option<Spanned<Vec<Spanned<String>>>>,
    /// The CA (PEM) that signs the Redis server's certificate (rediss://).
    #[schemars(with = "Option<String>")]
    pub ca: Option<Spanned<String>>,
    #[schemars(with = "Option<String>")]
    pub on_error: Option<Spanned<String>>,
    #[schemars(with = "Option<RawDuration>")]
    pub timeout: Option<Spanned<RawDuration>>,
    #[schemars(with = "Option<String>")]
    pub key_prefix: Option<Spanned<String>>,
}

/// `[routes.NAME]`
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    #[schemars(with = "Option<Vec<String>>")]
    pub listeners: Option<Spanned<Vec<Spanned<String>>>>,
    #[schemars(with = "Option<String>")]
    pub host: Option<Spanned<String>>,
    #[schemars(with = "Option<String>")]
    pub path: Option<Spanned<String>>,
    #[schemars(with = "Option<String>")]
    pub path_prefix: Option<Spanned<String>>,
    #[schemars(with = "Option<String>")]
    pub path_regex: Option<Spanned<String>>,
    #[schemars(with = "Option<Vec<String>>")]
    pub methods: Option<Spanned<Vec<Spanned<String>>>>,
    #[schemars(with = "Option<IndexMap<String, String>>")]
    pub headers: Option<Spanned<IndexMap<Spanned<String>, Spanned<String>>>>,
    #[schemars(with = "Option<String>")]
    pub upstream: Option<Spanned<String>>,
    #[schemars(with = "Option<IndexMap<String, i64>>")]
    pub split: Option<Spanned<IndexMap<Spanned<String>, Spanned<i64>>>>,
    #[schemars(with = "Option<RawRespond>")]
    pub respond: Option<Spanned<RawRespond>>,
    #[schemars(with = "Option<RawRedirect>")]
    pub redirect: Option<Spanned<RawRedirect>>,
    #[schemars(with = "Option<String>")]
    pub strip_prefix: Option<Spanned<String>>,
    #[schemars(with = "Option<RawHeaderRewrite>")]
    pub request_headers: Option<Spanned<RawHeaderRewrite>>,
    #[schemars(with = "Option<RawHeaderRewrite>")]
    pub response_headers: Option<Spanned<RawHeaderRewrite>>,
    #[schemars(with = "Option<RawDuration>")]
    pub timeout: Option<Spanned<RawDuration>>,
    #[schemars(with = "Option<Vec<String>>")]
    pub rate_limits: Option<Spanned<Vec<Spanned<String>>>>,
    #[schemars(with = "Option<Vec<String>>")]
    pub policies: Option<Spanned<Vec<Spanned<String>>>>,
    #[schemars(with = "Option<i64>")]
    pub max_body_bytes: Option<Spanned<i64>>,
    #[schemars(with = "Option<String>")]
    pub buffer_request_body: Option<Spanned<String>>,
    #[schemars(with = "Option<RawToggle<RawRetries>>")]
    pub retries: Option<Spanned<RawToggle<RawRetries>>>,
    #[schemars(with = "Option<RawHedge>")]
    pub hedge: Option<Spanned<RawHedge>>,
}

/// A route's `hedge = { after, max }`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawHedge {
    #[schemars(with = "Option<RawDuration>")]
    pub after: Option<Spanned<RawDuration>>,
    #[schemars(with = "Option<i64>")]
    pub max: Option<Spanned<i64>>,
}

/// `respond = { status, body, content_type }`
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawRespond {
    #[schemars(with = "Option<i64>")]
    pub status: Option<Spanned<i64>>,
    pub body: Option<String>,
    #[schemars(with = "Option<String>")]
    pub content_type: Option<Spanned<String>>,
}

/// `redirect = { location, status }`
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawRedirect {
    #[schemars(with = "String")]
    pub location: Spanned<String>,
    #[schemars(with = "Option<i64>")]
    pub status: Option<Spanned<i64>>,
}

/// `request_headers` / `response_headers = { set, add, remove }`
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawHeaderRewrite {
    #[schemars(with = "Option<IndexMap<String, String>>")]
    pub set: Option<IndexMap<Spanned<String>, Spanned<String>>>,
    #[schemars(with = "Option<IndexMap<String, String>>")]
    pub add: Option<IndexMap<Spanned<String>, Spanned<String>>>,
    #[schemars(with = "Option<Vec<String>>")]
    pub remove: Option<Vec<Spanned<String>>>,
}

/// `[upstreams.NAME]`
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    /// A string `"host:port"` or a table `{ addr = "host:port", weight = 3 }`; kept as a
    /// value because serde's untagged enums drop spans.
    #[schemars(with = "Vec<serde_json::Value>")]
    pub endpoints: Spanned<Vec<Spanned<toml::Value>>>,
    #[schemars(with = "Option<String>")]
    pub protocol: Option<Spanned<String>>,
    #[schemars(with = "Option<RawDuration>")]
    pub connect_timeout: Option<Spanned<RawDuration>>,
    #[schemars(with = "Option<RawDuration>")]
    pub read_timeout: Option<Spanned<RawDuration>>,
    #[schemars(with = "Option<RawDuration>")]
    pub write_timeout: Option<Spanned<RawDuration>>,
    #[schemars(with = "Option<RawDuration>")]
    pub idle_timeout: Option<Spanned<RawDuration>>,
    #[schemars(with = "Option<i64>")]
    pub connect_retries: Option<Spanned<i64>>,
    #[schemars(with = "Option<RawUpstreamTls>")]
    pub tls: Option<Spanned<RawUpstreamTls>>,
    #[schemars(with = "Option<RawOutlier>")]
    pub outlier: Option<Spanned<RawOutlier>>,
    #[schemars(with = "Option<String>")]
    pub load_balancing: Option<Spanned<String>>,
    #[schemars(with = "Option<String>")]
    pub hash_key: Option<Spanned<String>>,
    #[schemars(with = "Option<RawDuration>")]
    pub slow_start: Option<Spanned<RawDuration>>,
    #[schemars(with = "Option<i64>")]
    pub panic_threshold: Option<Spanned<i64>>,
    #[schemars(with = "Option<RawHealthCheck>")]
    pub health_check: Option<Spanned<RawHealthCheck>>,
    #[schemars(with = "Option<String>")]
    pub discovery: Option<Spanned<String>>,
    #[schemars(with = "Option<RawToggle<RawRetryBudget>>")]
    pub retry_budget: Option<Spanned<RawToggle<RawRetryBudget>>>,
    #[schemars(with = "Option<RawUpstreamLimits>")]
    pub limits: Option<Spanned<RawUpstreamLimits>>,
    #[schemars(with = "Option<String>")]
    pub concurrency: Option<Spanned<String>>,
}

/// An upstream's `limits = { ... }` (circuit breaking).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawUpstreamLimits {
    #[schemars(with = "Option<i64>")]
    pub max_connections: Option<Spanned<i64>>,
    #[schemars(with = "Option<i64>")]
    pub max_requests: Option<Spanned<i64>>,
    #[schemars(with = "Option<i64>")]
    pub max_pending: Option<Spanned<i64>>,
    #[schemars(with = "Option<RawDuration>")]
    pub queue_timeout: Option<Spanned<RawDuration>>,
}

/// An upstream's `retry_budget = { ... }`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawRetryBudget {
    #[schemars(with = "Option<f64>")]
    pub ratio: Option<Spanned<f64>>,
    #[schemars(with = "Option<i64>")]
    pub min_per_second: Option<Spanned<i64>>,
}

/// A route's `retries = { ... }`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawRetries {
    #[schemars(with = "Option<i64>")]
    pub attempts: Option<Spanned<i64>>,
    #[schemars(with = "Option<Vec<String>>")]
    pub on: Option<Spanned<Vec<Spanned<String>>>>,
    #[schemars(with = "Option<RawDuration>")]
    pub per_try_timeout: Option<Spanned<RawDuration>>,
    #[schemars(with = "Option<RawDuration>")]
    pub backoff: Option<Spanned<RawDuration>>,
    #[schemars(with = "Option<RawDuration>")]
    pub max_backoff: Option<Spanned<RawDuration>>,
    #[schemars(with = "Option<Vec<String>>")]
    pub methods: Option<Spanned<Vec<Spanned<String>>>>,
    #[schemars(with = "Option<String>")]
    pub body_limit: Option<Spanned<String>>,
}

/// `[resolver]`: where `dns` and `srv` discovery ask.
#[derive(Debug, Deserialize, Default, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawResolver {
    #[schemars(with = "Option<Vec<String>>")]
    pub nameservers: Option<Spanned<Vec<Spanned<String>>>>,
    #[schemars(with = "Option<RawDuration>")]
    pub timeout: Option<Spanned<RawDuration>>,
    #[schemars(with = "Option<RawDuration>")]
    pub min_ttl: Option<Spanned<RawDuration>>,
    #[schemars(with = "Option<RawDuration>")]
    pub max_ttl: Option<Spanned<RawDuration>>,
}

/// An upstream's `health_check = { ... }`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawHealthCheck {
    #[schemars(with = "Option<String>")]
    pub kind: Option<Spanned<String>>,
    #[schemars(with = "Option<String>")]
    pub path: Option<Spanned<String>>,
    #[schemars(with = "Option<String>")]
    pub host: Option<Spanned<String>>,
    #[schemars(with = "Option<Vec<i64>>")]
    pub expect_status: Option<Spanned<Vec<Spanned<i64>>>>,
    #[schemars(with = "Option<RawDuration>")]
    pub interval: Option<Spanned<RawDuration>>,
    #[schemars(with = "Option<RawDuration>")]
    pub timeout: Option<Spanned<RawDuration>>,
    #[schemars(with = "Option<i64>")]
    pub healthy: Option<Spanned<i64>>,
    #[schemars(with = "Option<i64>")]
    pub unhealthy: Option<Spanned<i64>>,
}

/// A feature that is on by default: `KEY = false` (or `true`), or
/// `KEY = { ... }` with its settings.
#[derive(Debug)]
pub enum RawToggle<T> {
    Enabled(bool),
    Table(T),
}

impl<T: JsonSchema> JsonSchema for RawToggle<T> {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        format!("Toggle_{}", T::schema_name()).into()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "`false` turns it off, `true` keeps the defaults, a table sets them.",
            "anyOf": [{ "type": "boolean" }, generator.subschema_for::<T>()]
        })
    }
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
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawOutlierTable {
    #[schemars(with = "Option<i64>")]
    pub consecutive_failures: Option<Spanned<i64>>,
    #[schemars(with = "Option<RawDuration>")]
    pub base_ejection: Option<Spanned<RawDuration>>,
    #[schemars(with = "Option<RawDuration>")]
    pub max_ejection: Option<Spanned<RawDuration>>,
    #[schemars(with = "Option<i64>")]
    pub max_ejected_percent: Option<Spanned<i64>>,
}

/// `[egress]`
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawEgress {
    #[schemars(with = "Option<RawEgressAllow>")]
    pub allow: Option<Spanned<RawEgressAllow>>,
    #[schemars(with = "Option<String>")]
    pub ca: Option<Spanned<String>>,
    /// Host name -> an address or a list of them (`ip` or `ip:port`).
    #[schemars(with = "Option<IndexMap<String, serde_json::Value>>")]
    pub resolve: Option<IndexMap<Spanned<String>, Spanned<toml::Value>>>,
    #[schemars(with = "Option<Vec<String>>")]
    pub deny_networks: Option<Vec<Spanned<String>>>,
    #[schemars(with = "Option<RawDuration>")]
    pub connect_timeout: Option<Spanned<RawDuration>>,
    #[schemars(with = "Option<RawDuration>")]
    pub timeout: Option<Spanned<RawDuration>>,
    #[schemars(with = "Option<RawDuration>")]
    pub tunnel_idle_timeout: Option<Spanned<RawDuration>>,
    #[schemars(with = "Option<i64>")]
    pub passthrough_port: Option<Spanned<i64>>,
}

/// `[egress.allow]`
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawEgressAllow {
    #[schemars(with = "Vec<String>")]
    pub hosts: Spanned<Vec<Spanned<String>>>,
    #[schemars(with = "Option<Vec<i64>>")]
    pub ports: Option<Spanned<Vec<Spanned<i64>>>>,
}

/// The whole file, for its JSON Schema only (`meshgate schema`): validation
/// reads the sections one by one, so each keeps its own errors.
#[derive(JsonSchema)]
#[schemars(
    deny_unknown_fields,
    title = "meshgate config",
    description = "meshgate's config file (TOML). Every key: docs/config.md."
)]
#[allow(dead_code, reason = "read by schemars only")]
pub struct RawRoot {
    /// Files read after this one (paths or globs, relative to this file).
    include: Option<Vec<String>>,
    gateway: Option<RawGateway>,
    admin: Option<RawAdmin>,
    telemetry: Option<RawTelemetry>,
    listeners: Option<IndexMap<String, RawListener>>,
    routes: Option<IndexMap<String, RawRoute>>,
    upstreams: Option<IndexMap<String, RawUpstream>>,
    rate_limits: Option<IndexMap<String, RawRateLimit>>,
    redis: Option<RawRedis>,
    certs: Option<IndexMap<String, RawCert>>,
    policies: Option<IndexMap<String, RawPolicy>>,
    egress: Option<RawEgress>,
    resolver: Option<RawResolver>,
}
