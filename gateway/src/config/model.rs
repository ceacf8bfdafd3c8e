//! The validated config: what the rest of meshgate reads. No serde here; every
//! value has been checked, defaults are filled in, and names are resolved.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method, StatusCode};

/// Defaults, documented in `docs/config.md`.
pub const DEFAULT_GATEWAY_NAME: &str = "meshgate";
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9901";
pub const DEFAULT_SHUTDOWN_GRACE_PERIOD: Duration = Duration::from_secs(5);
/// Chosen by measurement: docs/performance.md, optimisation log.
pub const DEFAULT_WORK_STEALING: bool = true;
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_ROUTE_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_CONNECT_RETRIES: u32 = 1;
pub const DEFAULT_REDIRECT_STATUS: u16 = 302;
/// Chosen by measurement: docs/performance.md, optimisation log.
pub const DEFAULT_SESSION_TICKETS: u8 = 1;

/// A whole, valid gateway configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub gateway: GatewaySettings,
    pub admin: Admin,
    pub telemetry: Telemetry,
    /// In file order.
    pub listeners: Vec<Listener>,
    /// In file order; the order breaks ties between equally specific routes.
    pub routes: Vec<Route>,
    pub upstreams: Vec<Upstream>,
    pub rate_limits: Vec<RateLimit>,
    /// The store for `scope = "global"` rate limits.
    pub redis: Option<Redis>,
    /// `[certs]`, loaded and checked.
    pub certs: Vec<CertFiles>,
    /// `[policies]`: authorization.
    pub policies: Vec<AuthzPolicy>,
    /// `[egress]`: what `egress` listeners let out beyond their routes.
    pub egress: Option<Egress>,
    /// `[resolver]`: where `dns` and `srv` discovery ask.
    pub resolver: Resolver,
    /// Hash of the file's text, to tell configs apart in metrics and logs.
    pub source_hash: String,
    /// What is valid but almost certainly not meant (a policy with no
    /// rules), one rendered line each with file:line:col: `check` prints
    /// them, `run` and reload log them.
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Telemetry {
    pub access_log: AccessLogFormat,
    /// `None`: standard output.
    pub access_log_file: Option<std::path::PathBuf>,
    /// `None`: tracing off (no spans, no exporter).
    pub tracing: Option<Tracing>,
}

pub const DEFAULT_OTLP_ENDPOINT: &str = "http://127.0.0.1:4318/v1/traces";
pub const DEFAULT_SERVICE_NAME: &str = "meshgate";
pub const DEFAULT_SAMPLE_RATIO: f64 = 1.0;
pub const DEFAULT_EXPORT_INTERVAL: Duration = Duration::from_secs(1);
pub const DEFAULT_EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_TRACE_QUEUE: usize = 4096;

#[derive(Debug, Clone, PartialEq)]
pub struct Tracing {
    /// OTLP/HTTP (protobuf) traces URL.
    pub endpoint: String,
    pub service_name: String,
    /// For traces this gateway starts; an incoming sampled flag is followed.
    pub sample_ratio: f64,
    /// Extra resource attributes.
    pub resource: Vec<(String, String)>,
    pub export_interval: Duration,
    pub export_timeout: Duration,
    pub queue_size: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessLogFormat {
    Json,
    Text,
    Off,
}

impl AccessLogFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            AccessLogFormat::Json => "json",
            AccessLogFormat::Text => "text",
            AccessLogFormat::Off => "off",
        }
    }
}

/// `[gateway]`: settings of the whole process.
#[derive(Debug, Clone)]
pub struct GatewaySettings {
    pub name: String,
    /// Worker threads for the proxy; `None` = one per core.
    pub workers: Option<usize>,
    /// One tokio runtime shared by the workers (tasks may move between
    /// them), or one single-threaded runtime per worker.
    pub work_stealing: bool,
    pub shutdown_grace_period: Duration,
    /// From SIGTERM to closing the listeners: `/readyz` answers 503 while
    /// connections are still accepted, so load balancers stop sending first.
    pub shutdown_delay: Duration,
    pub header_case: HeaderCase,
    /// Which driver serves HTTP/1.1 requests.
    pub http1_engine: Http1Engine,
    /// Bytes all unfinished request heads may hold together; past it the
    /// oldest are cut.
    pub max_pending_head_bytes: usize,
    /// Resident memory over which load is shed; `None`: never.
    pub overload_memory: Option<u64>,
    /// Where a new process (`run --upgrade`) takes the listening sockets
    /// over from this one.
    pub upgrade_socket: PathBuf,
}

pub const DEFAULT_UPGRADE_SOCKET: &str = "/run/meshgate/upgrade.sock";

/// Which driver serves HTTP/1.1 requests (`gateway.http1_engine`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Http1Engine {
    /// Pingora's HTTP/1 server and proxy, for every request.
    Pingora,
    /// meshgate's own driver for the requests it serves (plain keep-alive
    /// HTTP/1.1 to HTTP/1.1 upstreams); every other request still goes to
    /// Pingora.
    #[default]
    Fast,
}

impl Http1Engine {
    pub fn as_str(self) -> &'static str {
        match self {
            Http1Engine::Pingora => "pingora",
            Http1Engine::Fast => "fast",
        }
    }
}

/// How field names of forwarded HTTP/1 messages are written
/// (`gateway.header_case`). Names are case-insensitive (RFC 9110 §5.1);
/// keeping each one's case costs Pingora a second map per message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HeaderCase {
    /// As they came in; the fields meshgate adds in their usual spelling.
    #[default]
    Preserve,
    /// Lower case, as HTTP/2 carries them (Envoy's and HAProxy's default).
    Lowercase,
}

impl HeaderCase {
    pub fn as_str(self) -> &'static str {
        match self {
            HeaderCase::Preserve => "preserve",
            HeaderCase::Lowercase => "lowercase",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Admin {
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// North-south, into the cluster or VM.
    Ingress,
    /// North-south, out of it.
    Egress,
    /// East-west, service to service.
    Mesh,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
            Direction::Mesh => "mesh",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Listener {
    pub name: String,
    pub bind: SocketAddr,
    pub direction: Direction,
    /// Peers whose `x-forwarded-for` is believed (see ratelimit::client_ip).
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// TLS termination; `None`: plain HTTP (HTTP/1.1 and h2c).
    pub tls: Option<ListenerTls>,
    pub limits: ListenerLimits,
}

pub const DEFAULT_MAX_REQUEST_HEADER_BYTES: usize = 64 * 1024;
/// Unfinished request heads of all connections together: 512 heads at the
/// default `max_request_header_bytes`, or several thousand of usual size.
pub const DEFAULT_MAX_PENDING_HEAD_BYTES: usize = 32 * 1024 * 1024;
pub const DEFAULT_MAX_REQUEST_HEADERS: usize = 100;
pub const DEFAULT_MAX_URI_BYTES: usize = 8 * 1024;
pub const DEFAULT_LISTENER_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// From a TLS connection's start to its ClientHello, whole; and for an
/// egress tunnel's ClientHello.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// NGINX's `keepalive_requests`.
pub const DEFAULT_MAX_REQUESTS_PER_CONNECTION: usize = 1000;
/// Longest wait for each read of a request body.
pub const DEFAULT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest request body a route accepts unless it says otherwise: ten times
/// NGINX's 1 MiB, which file uploads outgrow (docs/config.md says why).
pub const DEFAULT_MAX_BODY_BYTES: u64 = 10 * 1024 * 1024;
/// Pingora replays at most this much of a request body it has read ahead.
pub const MAX_BUFFER_REQUEST_BODY: u64 = 64 * 1024;

/// Bounds on what one client may send or hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerLimits {
    /// Connections served at once; `None`: no limit.
    pub max_connections: Option<usize>,
    /// Request line and header fields together.
    pub max_request_header_bytes: usize,
    pub max_request_headers: usize,
    pub max_uri_bytes: usize,
    /// How long a kept-alive connection may wait for its next request.
    pub idle_timeout: Duration,
    /// Longest a request head may take to arrive whole: a new
    /// connection's first from the connection's start, later ones from
    /// their first byte; `None`: no total deadline (each read still has
    /// `idle_timeout`).
    pub header_read_timeout: Option<Duration>,
    /// Longest a TLS client may take to send its ClientHello, and an
    /// HTTP/2 client its preface and SETTINGS.
    pub handshake_timeout: Duration,
    /// Requests served on one connection before it is closed (HTTP/1:
    /// `Connection: close` on the last answer; HTTP/2: a GOAWAY).
    pub max_requests_per_connection: usize,
    /// Longest wait for each read of a request body (HTTP/1).
    pub body_read_timeout: Duration,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        ListenerLimits {
            max_connections: None,
            max_request_header_bytes: DEFAULT_MAX_REQUEST_HEADER_BYTES,
            max_request_headers: DEFAULT_MAX_REQUEST_HEADERS,
            max_uri_bytes: DEFAULT_MAX_URI_BYTES,
            idle_timeout: DEFAULT_LISTENER_IDLE_TIMEOUT,
            header_read_timeout: Some(DEFAULT_HEADER_READ_TIMEOUT),
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_requests_per_connection: DEFAULT_MAX_REQUESTS_PER_CONNECTION,
            body_read_timeout: DEFAULT_BODY_READ_TIMEOUT,
        }
    }
}

/// A `[certs.NAME]` entry: file paths, resolved against the config file's
/// directory (what they held is loaded beside the model:
/// [`super::Material`]).
#[derive(Debug, Clone, PartialEq)]
pub struct CertFiles {
    pub name: String,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
}

/// A PEM bundle of CA certificates (loaded beside the model).
#[derive(Debug, Clone, PartialEq)]
pub struct CaBundle {
    pub path: PathBuf,
    /// SHA-256 over the certificates' DER: the bundle's content, for
    /// telling a changed file from an unchanged one.
    pub fingerprint: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ListenerTls {
    /// `[certs]` names; the first is served when no SNI matches.
    pub certs: Vec<String>,
    pub min_version: TlsVersion,
    pub alpn: Alpn,
    /// CAs that sign acceptable client certificates; `None`: no client auth.
    pub client_ca: Option<CaBundle>,
    pub client_auth: ClientAuth,
    /// Send the peer's identity upstream in `x-meshgate-peer-identity`.
    pub forward_identity: bool,
    /// Session tickets sent after a TLS 1.3 handshake.
    pub session_tickets: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsVersion {
    V1_2,
    V1_3,
}

/// Protocols offered by ALPN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alpn {
    /// `["h2", "http/1.1"]`: HTTP/2 preferred.
    H2H1,
    H1,
    H2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// A client certificate is required (handshake fails without one).
    Require,
    /// Checked when presented; requests without one have no identity.
    Optional,
}

/// TLS to an upstream.
#[derive(Debug, Clone)]
pub struct UpstreamTls {
    /// Trusted CAs; `None`: the system trust store.
    pub ca: Option<CaBundle>,
    /// Client certificate presented to the upstream (mTLS).
    pub client: Option<CertFilesRef>,
    /// Server name sent and, without `verify`, checked against the certificate.
    pub sni: String,
    /// Identity the upstream's certificate must carry (URI or DNS SAN).
    pub verify: Option<crate::types::identity::IdentityPattern>,
}

/// A cert/key pair named by path rather than by `[certs]` (loaded beside
/// the model).
#[derive(Debug, Clone, PartialEq)]
pub struct CertFilesRef {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
}

pub const DEFAULT_RATE_LIMIT_PER: Duration = Duration::from_secs(1);
pub const DEFAULT_MAX_KEYS: usize = 100_000;

#[derive(Debug, Clone, PartialEq)]
pub struct RateLimit {
    pub name: String,
    pub key: RateLimitKey,
    /// `rate` requests per `per`, up to `burst` at once.
    pub rate: u32,
    pub per: Duration,
    pub burst: u32,
    pub mode: LimitMode,
    /// Send `RateLimit`/`RateLimit-Policy` on allowed responses too.
    pub headers_on_allowed: bool,
    pub max_keys: usize,
    pub scope: LimitScope,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitScope {
    /// A budget per gateway process.
    Local,
    /// One budget shared through `[redis]`; `batch` units are taken from
    /// Redis per round trip and spent locally.
    Global { batch: u32 },
}

pub const DEFAULT_REDIS_TIMEOUT: Duration = Duration::from_millis(20);
pub const DEFAULT_REDIS_KEY_PREFIX: &str = "meshgate:rl:";

#[derive(Clone, PartialEq)]
pub struct Redis {
    /// `redis://[user:password@]host:port/db` or `unix:///path`; empty
    /// with `cluster`.
    pub url: String,
    /// A Redis Cluster's nodes (`redis://host:port`), any of which tells
    /// the others; empty for one server at `url`.
    pub cluster: Vec<String>,
    /// `ca`: the file, and the certificates it held at load, that a
    /// `rediss://` server's certificate must chain to (else the system's).
    pub ca: Option<(std::path::PathBuf, std::sync::Arc<Vec<u8>>)>,
    pub on_error: OnError,
    /// Longest a request waits for Redis, connecting included.
    pub timeout: Duration,
    /// Prepended to every key meshgate writes.
    pub key_prefix: String,
}

impl Redis {
    /// The URL with any password replaced, for logs and the admin API.
    pub fn redacted_url(&self) -> String {
        if self.cluster.is_empty() {
            redact_secrets(&self.url)
        } else {
            format!("cluster {}", redact_secrets(&self.cluster.join(", ")))
        }
    }
}

impl std::fmt::Debug for Redis {
    /// Never prints the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redis")
            .field("url", &self.redacted_url())
            .field("ca", &self.ca.as_ref().map(|(path, _)| path))
            .field("on_error", &self.on_error)
            .field("timeout", &self.timeout)
            .field("key_prefix", &self.key_prefix)
            .finish()
    }
}

/// `text` with the passwords of URLs in it replaced by `***`: the password
/// of `scheme://user:password@host` (or `scheme://password@host`), and
/// `pass=`/`password=` query parameters (redis unix sockets).
pub fn redact_secrets(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let (head, tail) = rest.split_at(at + 3);
        out.push_str(head);
        let end = tail
            .find(|c: char| c == '/' || c == '"' || c == '\'' || c.is_whitespace())
            .unwrap_or(tail.len());
        match tail[..end].rfind('@') {
            Some(amp) => {
                let userinfo = &tail[..amp];
                match userinfo.split_once(':') {
                    Some((user, _)) => out.push_str(&format!("{user}:***")),
                    None => out.push_str("***"),
                }
                rest = &tail[amp..];
            }
            None => rest = tail,
        }
    }
    out.push_str(rest);
    for param in ["pass=", "password="] {
        let mut masked = String::with_capacity(out.len());
        let mut rest = out.as_str();
        while let Some(pos) = rest.find(param) {
            let starts_param = pos == 0 || matches!(rest.as_bytes()[pos - 1], b'?' | b'&');
            let (head, tail) = rest.split_at(pos + param.len());
            masked.push_str(head);
            let end = tail
                .find(|c: char| c == '&' || c == '"' || c == '\'' || c.is_whitespace())
                .unwrap_or(tail.len());
            if starts_param && end > 0 {
                masked.push_str("***");
                rest = &tail[end..];
            } else {
                rest = tail;
            }
        }
        masked.push_str(rest);
        out = masked;
    }
    out
}

/// What a global limit does when Redis cannot answer within `timeout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    /// Let the request through (fail open).
    Allow,
    /// Refuse it with 503 (fail closed).
    Deny,
}

impl OnError {
    pub fn as_str(self) -> &'static str {
        match self {
            OnError::Allow => "allow",
            OnError::Deny => "deny",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum RateLimitKey {
    ClientIp,
    Header(HeaderName),
    Route,
    /// The identity of the client certificate (mTLS).
    Identity,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitMode {
    Enforce,
    Shadow,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostMatch {
    /// Lower-case, without port.
    Exact(String),
    /// `*.example.com`, stored as the suffix `.example.com`.
    Wildcard(String),
}

#[derive(Debug, Clone)]
pub enum PathMatch {
    Exact(String),
    Prefix(String),
    Regex(regex::Regex),
}

impl PathMatch {
    /// Text that identifies the matcher, for comparing routes and for `/config`.
    pub fn describe(&self) -> (&'static str, &str) {
        match self {
            PathMatch::Exact(p) => ("path", p),
            PathMatch::Prefix(p) => ("path_prefix", p),
            PathMatch::Regex(r) => ("path_regex", r.as_str()),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Route {
    pub name: String,
    /// Names of the listeners this route is served on (all of them when the file
    /// names none).
    pub listeners: Vec<String>,
    pub host: Option<HostMatch>,
    pub path: Option<PathMatch>,
    /// Sorted and deduplicated; empty = any method.
    pub methods: Vec<Method>,
    /// Sorted by name; each must be present with exactly this value.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub action: Action,
    pub timeout: Duration,
    /// Applied to every response of the route, forwarded or generated.
    pub response_headers: HeaderRewrite,
    /// Names of `[rate_limits]` policies, checked in this order.
    pub rate_limits: Vec<String>,
    /// Names of `[policies]` (authorization); all must allow.
    pub policies: Vec<String>,
    /// Largest request body accepted.
    pub max_body_bytes: u64,
    /// Request bodies of declared length up to this are read whole before
    /// an upstream is chosen; 0: bodies are streamed as they come.
    pub buffer_request_body: u64,
    /// `None`: `retries = false`.
    pub retries: Option<RetryPolicy>,
    /// `None`: no hedging (the default).
    pub hedge: Option<HedgePolicy>,
}

/// A route's `hedge`: a bodyless idempotent request with no response head
/// after `after` is sent to another endpoint too, up to `max` times; the
/// first response wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HedgePolicy {
    pub after: Duration,
    pub max: u32,
}

/// A route's `retries`: which failed attempts are tried again, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub attempts: u32,
    pub on: RetryOn,
    /// Bounds each attempt's wait for the response head; `None`: only the
    /// route's `timeout` (and the upstream's `read_timeout`).
    pub per_try_timeout: Option<Duration>,
    pub backoff: Duration,
    pub max_backoff: Duration,
    /// Sorted; only these are retried.
    pub methods: Vec<Method>,
    /// A request whose body is larger is not retried (its body cannot be
    /// replayed).
    pub body_limit: u64,
}

/// `retries.on`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RetryOn {
    pub connect_failure: bool,
    pub reset: bool,
    pub timeout: bool,
    /// Statuses from the upstream that are retried (5xx).
    pub statuses: Vec<u16>,
}

impl RetryPolicy {
    /// Pingora replays at most this much of a request body.
    pub const MAX_BODY_LIMIT: u64 = 64 * 1024;
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 2,
            on: RetryOn {
                connect_failure: true,
                reset: true,
                timeout: false,
                statuses: vec![503],
            },
            per_try_timeout: None,
            backoff: Duration::from_millis(25),
            max_backoff: Duration::from_millis(250),
            methods: ["DELETE", "GET", "HEAD", "OPTIONS", "PUT", "TRACE"]
                .iter()
                .filter_map(|m| Method::from_bytes(m.as_bytes()).ok())
                .collect(),
            body_limit: Self::MAX_BODY_LIMIT,
        }
    }
}

/// An upstream's `retry_budget`: retries may add at most `ratio` of its
/// recent requests, plus `min_per_second`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryBudget {
    pub ratio: f64,
    pub min_per_second: u32,
}

impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudget {
            ratio: 0.2,
            min_per_second: 10,
        }
    }
}

/// An authorization policy: deny rules win, then allow rules, then `default`.
#[derive(Debug, Clone, PartialEq)]
pub struct AuthzPolicy {
    pub name: String,
    pub allow: Vec<AuthzRule>,
    pub deny: Vec<AuthzRule>,
    pub default_allow: bool,
    /// Shadow: count and log would-be denials, never block.
    pub mode: LimitMode,
}

/// Conditions of one rule; all given must hold (an empty list: any).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AuthzRule {
    /// Any of these matches the client certificate's identity.
    pub identity: Vec<crate::types::identity::IdentityPattern>,
    /// The client IP (behind `trusted_proxies`) is in any of these.
    pub source: Vec<ipnet::IpNet>,
    pub methods: Vec<Method>,
    pub path_prefix: Option<String>,
    /// Each present with exactly this value.
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

#[derive(Debug, Clone)]
pub enum Action {
    /// Proxy to one upstream, or to one of several by weight.
    Forward(Forward),
    Respond {
        status: StatusCode,
        body: bytes::Bytes,
        content_type: HeaderValue,
    },
    Redirect {
        location: HeaderValue,
        status: StatusCode,
    },
}

#[derive(Debug, Clone)]
pub struct Forward {
    /// (upstream name, weight); weights are > 0.
    pub targets: Vec<(String, u32)>,
    pub strip_prefix: Option<String>,
    pub request_headers: HeaderRewrite,
}

#[derive(Debug, Clone, Default)]
pub struct HeaderRewrite {
    pub set: Vec<FieldValue>,
    pub add: Vec<FieldValue>,
    pub remove: Vec<HeaderName>,
}

/// A field a rewrite sets or adds. `spelled` is the name as the config
/// writes it: HTTP/1 carries that spelling while names keep their case.
#[derive(Debug, Clone)]
pub struct FieldValue {
    pub name: HeaderName,
    pub spelled: bytes::Bytes,
    pub value: HeaderValue,
}

impl HeaderRewrite {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamProtocol {
    Http1,
    /// HTTP/2 with prior knowledge over plain TCP (gRPC backends).
    H2c,
    /// HTTP/2 over TLS (ALPN `h2`); needs `tls`.
    H2,
}

impl UpstreamProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamProtocol::Http1 => "http1",
            UpstreamProtocol::H2c => "h2c",
            UpstreamProtocol::H2 => "h2",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Upstream {
    pub name: String,
    pub endpoints: Vec<Endpoint>,
    pub protocol: UpstreamProtocol,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub write_timeout: Duration,
    pub idle_timeout: Duration,
    pub connect_retries: u32,
    pub tls: Option<UpstreamTls>,
    /// Ejection of endpoints that keep failing; `None`: `outlier = false`.
    pub outlier: Option<OutlierDetection>,
    pub load_balancing: LoadBalancing,
    /// A new or recovered endpoint's share ramps up over this.
    pub slow_start: Option<Duration>,
    /// Percent: with fewer usable endpoints than this share, all get requests.
    pub panic_threshold: u8,
    pub health_check: Option<HealthCheck>,
    pub discovery: Discovery,
    /// `None`: `retry_budget = false` (retries are limited only by their policy).
    pub retry_budget: Option<RetryBudget>,
    pub limits: UpstreamLimits,
    /// `concurrency = "adaptive"`: the in-flight limit follows latency.
    pub adaptive_concurrency: bool,
}

/// An upstream's `limits`: at most `max_requests` in flight; past it a
/// request waits (first come, first served) among at most `max_pending`
/// for at most `queue_timeout`, else gets 503 `upstream_overloaded`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamLimits {
    /// Connections open to the upstream at once, in use or idle in the
    /// pool; `None`: no limit (HTTP/1.1 upstreams only).
    pub max_connections: Option<u32>,
    pub max_requests: u32,
    pub max_pending: u32,
    pub queue_timeout: Duration,
}

impl Default for UpstreamLimits {
    fn default() -> Self {
        UpstreamLimits {
            max_connections: None,
            max_requests: 10_000,
            max_pending: 1_000,
            queue_timeout: Duration::from_secs(1),
        }
    }
}

/// `discovery`: where an upstream's endpoints come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Discovery {
    /// Looked up once, at load; every address of a name is an endpoint.
    Static,
    /// A/AAAA looked up again at their TTL.
    Dns,
    /// Each entry an SRV name; targets, ports and weights from the records.
    Srv,
}

impl Discovery {
    pub fn as_str(self) -> &'static str {
        match self {
            Discovery::Static => "static",
            Discovery::Dns => "dns",
            Discovery::Srv => "srv",
        }
    }
}

/// `[resolver]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolver {
    /// Empty: the system's (/etc/resolv.conf).
    pub nameservers: Vec<SocketAddr>,
    pub timeout: Duration,
    pub min_ttl: Duration,
    pub max_ttl: Duration,
}

impl Default for Resolver {
    fn default() -> Self {
        Resolver {
            nameservers: Vec::new(),
            timeout: Duration::from_secs(2),
            min_ttl: Duration::from_secs(1),
            max_ttl: Duration::from_secs(300),
        }
    }
}

/// `health_check = { ... }`: each endpoint asked every `interval`;
/// `unhealthy` failures in a row take it out, `healthy` passes bring it back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub kind: HealthCheckKind,
    /// `http`: the request's path (and query).
    pub path: String,
    /// `http` and `grpc`: the Host (`:authority`) sent; `None`: the
    /// upstream's `tls.sni`, or the endpoint's address.
    pub host: Option<String>,
    /// `http`: the statuses that pass; empty: any 2xx or 3xx.
    pub expect_status: Vec<u16>,
    pub interval: Duration,
    pub timeout: Duration,
    pub healthy: u32,
    pub unhealthy: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthCheckKind {
    Http,
    Tcp,
    Grpc,
}

impl HealthCheckKind {
    pub fn as_str(self) -> &'static str {
        match self {
            HealthCheckKind::Http => "http",
            HealthCheckKind::Tcp => "tcp",
            HealthCheckKind::Grpc => "grpc",
        }
    }
}

impl HealthCheck {
    pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
    pub const DEFAULT_HEALTHY: u32 = 2;
    pub const DEFAULT_UNHEALTHY: u32 = 3;

    /// Whether an `http` check's answer passes.
    pub fn passes(&self, status: u16) -> bool {
        if self.expect_status.is_empty() {
            (200..400).contains(&status)
        } else {
            self.expect_status.contains(&status)
        }
    }
}

/// `load_balancing`: how an endpoint is chosen among the usable ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadBalancing {
    /// Weighted round robin.
    RoundRobin,
    /// The less loaded (in-flight requests per weight) of two random picks.
    LeastRequest,
    /// The lower of two random picks by peak-EWMA latency times load.
    Ewma,
    /// Weighted random.
    Random,
    /// A ring of endpoints by the request's key; `least_request` without one.
    ConsistentHash(HashKey),
}

impl LoadBalancing {
    pub fn as_str(&self) -> &'static str {
        match self {
            LoadBalancing::RoundRobin => "round_robin",
            LoadBalancing::LeastRequest => "least_request",
            LoadBalancing::Ewma => "ewma",
            LoadBalancing::Random => "random",
            LoadBalancing::ConsistentHash(_) => "consistent_hash",
        }
    }
}

impl HashKey {
    /// As written in the config.
    pub fn as_text(&self) -> String {
        match self {
            HashKey::ClientIp => "client_ip".into(),
            HashKey::Path => "path".into(),
            HashKey::Header(h) => format!("header:{h}"),
            HashKey::Cookie(c) => format!("cookie:{c}"),
        }
    }
}

/// `hash_key`: what a request is placed on the ring by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    ClientIp,
    Header(http::HeaderName),
    Cookie(String),
    Path,
}

/// `outlier = { ... }`: an endpoint that fails `consecutive_failures`
/// times in a row gets no requests for `base_ejection`, doubled on each
/// ejection that follows soon after the last, up to `max_ejection`; at most
/// `max_ejected_percent` of an upstream's endpoints (at least one) are out
/// at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutlierDetection {
    pub consecutive_failures: u32,
    pub base_ejection: Duration,
    pub max_ejection: Duration,
    pub max_ejected_percent: u8,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        OutlierDetection {
            consecutive_failures: 5,
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(300),
            max_ejected_percent: 50,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Endpoint {
    /// As written, for `/config` and logs: `HOST:PORT`, or under `srv`
    /// discovery an SRV name.
    pub addr: String,
    /// `static` discovery: every address it is, looked up at load. Under
    /// `dns` and `srv`, only an IP address written as such.
    pub sockets: Vec<SocketAddr>,
    pub weight: u32,
}

pub const DEFAULT_EGRESS_PORTS: &[u16] = &[443];
pub const DEFAULT_EGRESS_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_EGRESS_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_EGRESS_TUNNEL_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
pub const DEFAULT_EGRESS_PASSTHROUGH_PORT: u16 = 443;
/// Where a looked-up egress name may not lead: anything but the public
/// internet. This machine, "this network", private and shared (CGNAT)
/// ranges, link-local (cloud metadata at 169.254.169.254, fd00:ec2::254 is
/// in fc00::/7), multicast, broadcast, and the IPv6 forms that embed an IPv4
/// address (IPv4-compatible, NAT64, 6to4).
pub const DEFAULT_EGRESS_DENY_NETWORKS: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "224.0.0.0/4",
    "240.0.0.0/4",
    "::/96",
    "::1/128",
    "64:ff9b::/96",
    "2002::/16",
    "fc00::/7",
    "fe80::/10",
    "ff00::/8",
];

/// `[egress]`: the allowlist of `egress` listeners and how they reach it.
#[derive(Debug, Clone, PartialEq)]
pub struct Egress {
    /// `[egress.allow]`: one entry per host pattern, each with its ports.
    pub allow: Vec<EgressAllow>,
    /// Trust for TLS that meshgate originates; `None`: the system store.
    pub ca: Option<CaBundle>,
    /// Names pinned to addresses (lower case, no trailing dot).
    pub resolve: Vec<(String, Vec<EgressPin>)>,
    /// Looked-up addresses refused (pins are not checked).
    pub deny_networks: Vec<ipnet::IpNet>,
    pub connect_timeout: Duration,
    /// Whole-request deadline of a plain-HTTP egress request.
    pub timeout: Duration,
    /// A tunnel with no bytes either way for this long is closed.
    pub tunnel_idle_timeout: Duration,
    /// Port a bare TLS ClientHello (no CONNECT) is passed through to.
    pub passthrough_port: u16,
}

impl Default for Egress {
    fn default() -> Self {
        Egress {
            allow: Vec::new(),
            ca: None,
            resolve: Vec::new(),
            deny_networks: DEFAULT_EGRESS_DENY_NETWORKS
                .iter()
                .filter_map(|n| n.parse().ok())
                .collect(),
            connect_timeout: DEFAULT_EGRESS_CONNECT_TIMEOUT,
            timeout: DEFAULT_EGRESS_TIMEOUT,
            tunnel_idle_timeout: DEFAULT_EGRESS_TUNNEL_IDLE_TIMEOUT,
            passthrough_port: DEFAULT_EGRESS_PASSTHROUGH_PORT,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct EgressAllow {
    pub pattern: crate::types::host::HostPattern,
    pub ports: Vec<u16>,
}

/// One address of an `[egress] resolve` pin; its own port, if given,
/// replaces the requested one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EgressPin {
    pub ip: std::net::IpAddr,
    pub port: Option<u16>,
}
