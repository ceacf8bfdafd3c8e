//! Raw file -> validated model. Every problem is collected (not just the first),
//! each with its byte span and a suggested fix.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method, StatusCode};
use serde::de::DeserializeOwned;
use toml::de::{DeTable, DeValue, ValueDeserializer};
use toml::Spanned;

use super::error::Diagnostic;
use super::material::Material;
use super::model::*;
use super::raw::*;

const SECTIONS: &[&str] = &[
    "gateway",
    "admin",
    "telemetry",
    "listeners",
    "routes",
    "upstreams",
    "rate_limits",
    "redis",
    "certs",
    "policies",
    "egress",
];
const MAX_WORKERS: i64 = 1024;
/// One head at the largest `max_request_header_bytes`, at least.
const MIN_PENDING_HEAD_BYTES: i64 = 1024 * 1024;
const MAX_PENDING_HEAD_BYTES: i64 = 64 * 1024 * 1024 * 1024;
/// Below this the gateway sheds load from its start: a typo, surely.
const MIN_OVERLOAD_MEMORY: u64 = 16 * 1024 * 1024;
const MAX_WEIGHT: i64 = 1_000_000;
const MAX_CONNECT_RETRIES: i64 = 10;
/// BoringSSL sends at most 16.
const MAX_SESSION_TICKETS: u8 = 16;
/// Finest refill interval of a global limit.
const MIN_GLOBAL_INTERVAL: Duration = Duration::from_micros(10);
const REDIRECT_STATUSES: &[u16] = &[301, 302, 303, 307, 308];
/// Longest duration any key accepts; longer values are typos, and would
/// overflow deadline arithmetic.
const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);
/// Header fields that describe a single hop or the message framing: a rewrite
/// setting them would desynchronize the connection or defeat hop-by-hop rules.
const FORBIDDEN_REWRITES: &[&str] = &[
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
];

/// What validating a document found: the model (valid only when there
/// are no errors), every error and warning, what its files held, and the
/// endpoint names left to look up.
pub struct Outcome {
    /// `None` when the document is not TOML at all.
    pub config: Option<Config>,
    pub errors: Vec<Diagnostic>,
    pub warnings: Vec<Diagnostic>,
    pub material: Material,
    pub lookups: Vec<Lookup>,
}

/// An endpoint as written: validation checks its form, the loader looks
/// up a host name and finds endpoints listed twice ([`super::resolve`]).
#[derive(Debug, Clone)]
pub struct Lookup {
    /// Where the endpoint is written.
    pub span: Range<usize>,
    pub upstream: String,
    /// Its place in the upstream's `endpoints` (as the model has them).
    pub index: usize,
    /// `HOST:PORT` as written.
    pub addr: String,
    /// The address it is, unless it is a name to look up.
    pub address: Option<SocketAddr>,
}

/// Validate a config document; relative file paths in it are resolved
/// against `base_dir`. Files it names are read (to report what is wrong
/// with them where they are named); no name is looked up.
pub fn validate(src: &str, base_dir: &Path) -> Outcome {
    let mut v = Validator {
        base_dir: base_dir.to_path_buf(),
        ..Validator::default()
    };
    let (root, syntax) = DeTable::parse_recoverable(src);
    if !syntax.is_empty() {
        let errors = syntax
            .into_iter()
            .map(|e| (e.span(), e.message().to_string()))
            .collect();
        v.diags = super::syntax::diagnostics(src, errors);
        return v.outcome(None);
    }
    let raw = v.read_sections(root.get_ref());
    let mut config = v.build(raw);
    config.source_hash = hash_text(src);
    v.outcome(Some(config))
}

/// The raw file, split into sections, each entry keeping its key's span.
#[derive(Default)]
struct RawFile {
    gateway: RawGateway,
    admin: RawAdmin,
    telemetry: RawTelemetry,
    listeners: Vec<(Spanned<String>, RawListener)>,
    routes: Vec<(Spanned<String>, RawRoute)>,
    upstreams: Vec<(Spanned<String>, RawUpstream)>,
    rate_limits: Vec<(Spanned<String>, RawRateLimit)>,
    redis: Option<RawRedis>,
    /// The file has a [redis] table, valid or not.
    redis_section: bool,
    certs: Vec<(Spanned<String>, RawCert)>,
    policies: Vec<(Spanned<String>, RawPolicy)>,
    /// `[egress]` and the span of its key.
    egress: Option<(Range<usize>, Option<RawEgress>)>,
}

#[derive(Default)]
struct Validator {
    diags: Vec<Diagnostic>,
    /// Valid, but almost certainly not what was meant.
    warnings: Vec<Diagnostic>,
    /// What the files named held.
    material: Material,
    /// Endpoint names to look up.
    lookups: Vec<Lookup>,
    /// Relative file paths are resolved against this (the config's directory).
    base_dir: PathBuf,
    /// Every `[section.NAME]` in the file, valid or not: a reference to an
    /// entry that has errors of its own is not also reported as unknown.
    entries: Vec<(String, String)>,
}

fn spanned_key(key: &Spanned<std::borrow::Cow<'_, str>>) -> Spanned<String> {
    Spanned::new(key.span(), key.get_ref().to_string())
}

impl Validator {
    fn outcome(self, config: Option<Config>) -> Outcome {
        Outcome {
            config,
            errors: self.diags,
            warnings: self.warnings,
            material: self.material,
            lookups: self.lookups,
        }
    }

    fn error(&mut self, span: Range<usize>, message: impl Into<String>, fix: impl Into<String>) {
        self.diags.push(Diagnostic::new(span, message).fix(fix));
    }

    fn warn(&mut self, span: Range<usize>, message: impl Into<String>, fix: impl Into<String>) {
        self.warnings.push(Diagnostic::new(span, message).fix(fix));
    }

    /// `[section.name]` is in the file (callers ask once it is not among the
    /// valid ones, so it was refused and its errors are reported already).
    fn broken(&self, section: &str, name: &str) -> bool {
        self.entries.iter().any(|(s, n)| s == section && n == name)
    }

    fn read_sections(&mut self, root: &DeTable<'_>) -> RawFile {
        let mut raw = RawFile::default();
        for (key, value) in root {
            match key.get_ref().as_ref() {
                "gateway" => raw.gateway = self.de(value).unwrap_or_default(),
                "admin" => raw.admin = self.de(value).unwrap_or_default(),
                "telemetry" => raw.telemetry = self.de(value).unwrap_or_default(),
                "listeners" => raw.listeners = self.de_named(key, value),
                "routes" => raw.routes = self.de_named(key, value),
                "upstreams" => raw.upstreams = self.de_named(key, value),
                "rate_limits" => raw.rate_limits = self.de_named(key, value),
                "redis" => {
                    raw.redis_section = true;
                    raw.redis = self.de(value);
                }
                "certs" => raw.certs = self.de_named(key, value),
                "policies" => raw.policies = self.de_named(key, value),
                "egress" => raw.egress = Some((key.span(), self.de(value))),
                other => {
                    let fix = match suggest(other, SECTIONS) {
                        Some(s) => format!(
                            "did you mean [{s}]? Known sections: {}",
                            SECTIONS.join(", ")
                        ),
                        None => format!("remove it; known sections: {}", SECTIONS.join(", ")),
                    };
                    self.error(key.span(), format!("unknown section `{other}`"), fix);
                }
            }
        }
        raw
    }

    /// Deserialize one value, turning serde errors into diagnostics. An unknown
    /// key, or a key whose value has the wrong type, is reported, dropped, and
    /// the value tried again, so one mistake does not hide the table's other
    /// problems (or make references to it dangle).
    fn de<T: DeserializeOwned>(&mut self, value: &Spanned<DeValue<'_>>) -> Option<T> {
        const MAX_DROPPED_KEYS: usize = 64;
        let mut owned = value.clone();
        owned.get_mut().make_owned();
        let mut dropped: Vec<String> = Vec::new();
        for _ in 0..MAX_DROPPED_KEYS {
            match T::deserialize(ValueDeserializer::from(owned.clone())) {
                Ok(t) => return Some(t),
                Err(e) => {
                    // A required key dropped for its type is reported already.
                    let missing = e
                        .message()
                        .strip_prefix("missing field `")
                        .map(|f| f.trim_end_matches('`'));
                    if missing.is_some_and(|f| dropped.iter().any(|d| d == f)) {
                        return None;
                    }
                    let span = e.span().unwrap_or(value.span());
                    let key = key_with_value_at(owned.get_ref(), &span);
                    let (message, fix) = explain_serde_error(e.message(), key.as_deref());
                    let unknown_key = message.starts_with("unknown key");
                    self.diags
                        .push(Diagnostic::new(span.clone(), message).fix(fix));
                    let retry = if unknown_key {
                        remove_key_at(owned.get_mut(), &span)
                    } else if missing.is_some() {
                        // Its span is the table missing the key: dropping
                        // that would check the rest as if it were absent.
                        false
                    } else {
                        match remove_key_with_value_at(owned.get_mut(), &span) {
                            Some(key) => {
                                dropped.push(key);
                                true
                            }
                            None => false,
                        }
                    };
                    if !retry {
                        return None;
                    }
                }
            }
        }
        None
    }

    /// A table of named entries (`[routes.NAME]`): each entry on its own, so one
    /// bad entry does not hide the problems of the others.
    fn de_named<T: DeserializeOwned>(
        &mut self,
        section_key: &Spanned<std::borrow::Cow<'_, str>>,
        value: &Spanned<DeValue<'_>>,
    ) -> Vec<(Spanned<String>, T)> {
        let section = section_key.get_ref();
        let Some(table) = value.get_ref().as_table() else {
            self.error(
                value.span(),
                format!("`{section}` must be a table of named entries"),
                format!("write entries as [{section}.NAME]"),
            );
            return Vec::new();
        };
        let mut out = Vec::new();
        for (name, entry) in table {
            let name = spanned_key(name);
            self.entries
                .push((section.to_string(), name.get_ref().clone()));
            if !valid_name(name.get_ref()) {
                self.error(
                    name.span(),
                    format!("invalid name `{}` in [{section}]", name.get_ref()),
                    "use letters, digits, `_` and `-` only (it becomes a metric label)",
                );
            }
            if !entry.get_ref().is_table() {
                self.error(
                    entry.span(),
                    format!("[{section}.{}] must be a table", name.get_ref()),
                    format!(
                        "write it as a [{section}.{}] table with its keys below",
                        name.get_ref()
                    ),
                );
                continue;
            }
            if let Some(t) = self.de(entry) {
                out.push((name, t));
            }
        }
        out
    }

    fn build(&mut self, raw: RawFile) -> Config {
        let gateway = self.gateway(raw.gateway);
        let admin = self.admin(raw.admin);
        let telemetry = self.telemetry(raw.telemetry);
        // Every name defined, loadable or not: a cert whose files fail has its
        // own error, and references to it should not add "unknown cert".
        let defined: Vec<String> = raw.certs.iter().map(|(n, _)| n.get_ref().clone()).collect();
        let cert_names: Vec<&str> = defined.iter().map(String::as_str).collect();
        let certs: Vec<CertFiles> = raw
            .certs
            .into_iter()
            .filter_map(|(name, c)| self.cert(name, c))
            .collect();
        let listeners = self.listeners(&raw.listeners, &admin, &cert_names);
        let upstreams: Vec<Upstream> = raw
            .upstreams
            .into_iter()
            .filter_map(|(name, u)| self.upstream(name, u))
            .collect();
        let redis = raw.redis.and_then(|r| self.redis(r));
        let rate_limits: Vec<RateLimit> = raw
            .rate_limits
            .into_iter()
            // A [redis] table with errors of its own still counts as present.
            .filter_map(|(name, r)| self.rate_limit(name, r, raw.redis_section))
            .collect();
        let policies: Vec<AuthzPolicy> = raw
            .policies
            .into_iter()
            .filter_map(|(name, p)| self.policy(name, p))
            .collect();
        let egress = raw
            .egress
            .and_then(|(span, e)| Some((span, e?)))
            .and_then(|(span, e)| self.egress(span, e, &listeners));
        let upstream_names: Vec<&str> = upstreams.iter().map(|u| u.name.as_str()).collect();
        let names = Names {
            policies: policies.iter().map(|p| p.name.as_str()).collect(),
            listeners: listeners.iter().map(|l| l.name.as_str()).collect(),
            upstreams: upstream_names,
            rate_limits: rate_limits.iter().map(|r| r.name.as_str()).collect(),
        };
        let mut routes = Vec::new();
        let mut route_spans = Vec::new();
        for (name, r) in raw.routes {
            let span = name.span();
            if let Some(route) = self.route(name, r, &names) {
                routes.push(route);
                route_spans.push(span);
            }
        }
        self.check_indistinguishable(&routes, &route_spans);
        if listeners.is_empty() && !raw.listeners.is_empty() {
            // Each listener already has an error of its own.
        } else if listeners.is_empty() {
            self.diags.push(
                Diagnostic::new(
                    None,
                    "no listeners defined; the gateway would serve nothing",
                )
                .fix("add a listener, e.g. [listeners.public] with bind = \"0.0.0.0:8080\""),
            );
        }
        Config {
            gateway,
            admin,
            telemetry,
            listeners,
            routes,
            upstreams,
            rate_limits,
            redis,
            certs,
            policies,
            egress,
            source_hash: String::new(),
            warnings: Vec::new(),
        }
    }

    fn gateway(&mut self, raw: RawGateway) -> Gateway {
        let name = match raw.name {
            Some(n) if n.get_ref().trim().is_empty() => {
                self.error(
                    n.span(),
                    "gateway.name is empty",
                    "set a name such as \"edge-1\", or remove the key",
                );
                DEFAULT_GATEWAY_NAME.to_string()
            }
            Some(n) => n.into_inner(),
            None => DEFAULT_GATEWAY_NAME.to_string(),
        };
        let workers = raw.workers.and_then(|w| {
            let n = *w.get_ref();
            if (1..=MAX_WORKERS).contains(&n) {
                Some(n as usize)
            } else {
                self.error(
                    w.span(),
                    format!("gateway.workers = {n} is out of range"),
                    format!("use 1..={MAX_WORKERS}, or remove the key for one worker per core"),
                );
                None
            }
        });
        let shutdown_grace_period = self.duration_or(
            raw.shutdown_grace_period.as_ref(),
            "gateway.shutdown_grace_period",
            DEFAULT_SHUTDOWN_GRACE_PERIOD,
            true,
        );
        let shutdown_delay = self.duration_or(
            raw.shutdown_delay.as_ref(),
            "gateway.shutdown_delay",
            Duration::ZERO,
            true,
        );
        let header_case = match raw.header_case.as_ref() {
            None => HeaderCase::default(),
            Some(c) => match c.get_ref().as_str() {
                "preserve" => HeaderCase::Preserve,
                "lowercase" => HeaderCase::Lowercase,
                other => {
                    self.error(
                        c.span(),
                        format!("unknown gateway.header_case \"{other}\""),
                        "use \"preserve\" (the default) or \"lowercase\"",
                    );
                    HeaderCase::default()
                }
            },
        };
        let max_pending_head_bytes = match raw.max_pending_head_bytes {
            None => DEFAULT_MAX_PENDING_HEAD_BYTES,
            Some(b) if (MIN_PENDING_HEAD_BYTES..=MAX_PENDING_HEAD_BYTES).contains(b.get_ref()) => {
                *b.get_ref() as usize
            }
            Some(b) => {
                self.error(
                    b.span(),
                    format!("gateway.max_pending_head_bytes = {} is out of range", b.get_ref()),
                    format!("use {MIN_PENDING_HEAD_BYTES}..={MAX_PENDING_HEAD_BYTES} bytes, or remove the key for {DEFAULT_MAX_PENDING_HEAD_BYTES} (32 MiB)"),
                );
                DEFAULT_MAX_PENDING_HEAD_BYTES
            }
        };
        let overload_memory = raw
            .overload
            .as_ref()
            .and_then(|o| o.get_ref().memory.as_ref())
            .and_then(|m| match parse_size(m.get_ref()) {
                Some(n) if n >= MIN_OVERLOAD_MEMORY => Some(n),
                Some(_) => {
                    self.error(
                        m.span(),
                        format!("gateway.overload.memory = \"{}\" is below 16 MiB, less than meshgate needs to run", m.get_ref()),
                        "give the memory at which to shed load, e.g. \"1GiB\"; keep it under the container's or unit's memory limit",
                    );
                    None
                }
                None => {
                    self.error(
                        m.span(),
                        format!("gateway.overload.memory = \"{}\" is not a size", m.get_ref()),
                        "write a size such as \"768MiB\" or \"2GiB\"",
                    );
                    None
                }
            });
        Gateway {
            name,
            workers,
            work_stealing: raw.work_stealing.unwrap_or(DEFAULT_WORK_STEALING),
            shutdown_grace_period,
            shutdown_delay,
            header_case,
            max_pending_head_bytes,
            overload_memory,
        }
    }

    fn admin(&mut self, raw: RawAdmin) -> Admin {
        let default: SocketAddr = DEFAULT_ADMIN_LISTEN
            .parse()
            .expect("constant address parses");
        let listen = match raw.listen {
            Some(l) => self.socket_addr(&l, "admin.listen").unwrap_or(default),
            None => default,
        };
        Admin { listen }
    }

    fn telemetry(&mut self, raw: RawTelemetry) -> Telemetry {
        let access_log = match raw.access_log.as_ref() {
            None => AccessLogFormat::Off,
            Some(f) => match f.get_ref().as_str() {
                "json" => AccessLogFormat::Json,
                "text" => AccessLogFormat::Text,
                "off" => AccessLogFormat::Off,
                other => {
                    self.error(
                        f.span(),
                        format!("unknown access_log format \"{other}\""),
                        "use \"json\", \"text\" or \"off\"",
                    );
                    AccessLogFormat::Off
                }
            },
        };
        let access_log_file = raw.access_log_file.and_then(|f| {
            if f.get_ref().trim().is_empty() {
                self.error(
                    f.span(),
                    "telemetry.access_log_file is empty",
                    "write a file path, or remove the key to log to standard output",
                );
                None
            } else {
                // Relative to the config file, as every path in it is.
                let path = self.path(&f);
                // `run` opens (and may create) the file; its directory must be there.
                let dir = match path.parent() {
                    Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
                    _ => std::path::PathBuf::from("."),
                };
                if !dir.is_dir() {
                    self.error(
                        f.span(),
                        format!(
                            "telemetry.access_log_file: the directory {} does not exist",
                            dir.display()
                        ),
                        "create it (the systemd unit's LogsDirectory=meshgate makes /var/log/meshgate), or remove the key to log to standard output",
                    );
                }
                Some(path)
            }
        });
        let tracing = raw.tracing.and_then(|t| self.tracing(t));
        Telemetry {
            access_log,
            access_log_file,
            tracing,
        }
    }

    fn tracing(&mut self, raw: Spanned<RawTracing>) -> Option<Tracing> {
        let raw = raw.into_inner();
        let endpoint = match &raw.endpoint {
            None => DEFAULT_OTLP_ENDPOINT.to_string(),
            Some(e) => {
                let url = e.get_ref().trim();
                let parsed = url.parse::<http::Uri>().ok().filter(|u| {
                    matches!(u.scheme_str(), Some("http") | Some("https"))
                        && u.host().is_some_and(|h| !h.is_empty())
                });
                match parsed {
                    // A bare collector address gets the standard traces path.
                    Some(u) if u.path() == "/" || u.path().is_empty() => {
                        format!("{}/v1/traces", url.trim_end_matches('/'))
                    }
                    Some(_) => url.to_string(),
                    None => {
                        self.error(e.span(), format!("telemetry.tracing.endpoint \"{url}\" is not an http(s) URL"), "write the collector's OTLP/HTTP URL, e.g. \"http://127.0.0.1:4318/v1/traces\"");
                        return None;
                    }
                }
            }
        };
        let service_name = match &raw.service_name {
            Some(n) if n.get_ref().trim().is_empty() => {
                self.error(
                    n.span(),
                    "telemetry.tracing.service_name is empty",
                    "set a name such as \"edge-gateway\", or remove the key for \"meshgate\"",
                );
                return None;
            }
            Some(n) => n.get_ref().clone(),
            None => DEFAULT_SERVICE_NAME.to_string(),
        };
        let sample_ratio = match &raw.sample_ratio {
            None => DEFAULT_SAMPLE_RATIO,
            Some(r) if (0.0..=1.0).contains(r.get_ref()) => *r.get_ref(),
            Some(r) => {
                self.error(
                    r.span(),
                    format!(
                        "telemetry.tracing.sample_ratio = {} is outside 0.0..=1.0",
                        r.get_ref()
                    ),
                    "use a fraction: 1.0 traces every request, 0.01 one in a hundred",
                );
                return None;
            }
        };
        let queue_size = match &raw.queue_size {
            None => DEFAULT_TRACE_QUEUE,
            Some(q) if (1..=1_000_000).contains(q.get_ref()) => *q.get_ref() as usize,
            Some(q) => {
                self.error(
                    q.span(),
                    format!(
                        "telemetry.tracing.queue_size = {} is out of range",
                        q.get_ref()
                    ),
                    "use 1..=1000000 spans",
                );
                return None;
            }
        };
        let export_interval = self.duration_or(
            raw.export_interval.as_ref(),
            "telemetry.tracing.export_interval",
            DEFAULT_EXPORT_INTERVAL,
            false,
        );
        let export_timeout = self.duration_or(
            raw.export_timeout.as_ref(),
            "telemetry.tracing.export_timeout",
            DEFAULT_EXPORT_TIMEOUT,
            false,
        );
        if raw.enabled == Some(false) {
            return None;
        }
        Some(Tracing {
            endpoint,
            service_name,
            sample_ratio,
            resource: raw.resource.unwrap_or_default().into_iter().collect(),
            export_interval,
            export_timeout,
            queue_size,
        })
    }

    fn socket_addr(&mut self, s: &Spanned<String>, what: &str) -> Option<SocketAddr> {
        match s.get_ref().parse::<SocketAddr>() {
            Ok(a) if a.port() == 0 => {
                self.error(
                    s.span(),
                    format!("{what} = \"{}\" has port 0", s.get_ref()),
                    "name a fixed port: meshgate must know where it listens",
                );
                None
            }
            Ok(a) => Some(a),
            Err(_) => {
                self.error(
                    s.span(),
                    format!("{what} = \"{}\" is not an IP address and port", s.get_ref()),
                    "write IP:PORT, e.g. \"0.0.0.0:8080\", \"127.0.0.1:9901\" or \"[::]:8080\"",
                );
                None
            }
        }
    }

    fn listeners(
        &mut self,
        raw: &[(Spanned<String>, RawListener)],
        admin: &Admin,
        cert_names: &[&str],
    ) -> Vec<Listener> {
        let mut out: Vec<Listener> = Vec::new();
        for (name, l) in raw {
            let what = format!("listeners.{}.bind", name.get_ref());
            let Some(bind) = self.socket_addr(&l.bind, &what) else {
                continue;
            };
            let direction = match l.direction.as_ref() {
                None => Direction::Ingress,
                Some(d) => match d.get_ref().as_str() {
                    "ingress" => Direction::Ingress,
                    "egress" => Direction::Egress,
                    "mesh" => Direction::Mesh,
                    other => {
                        self.error(
                            d.span(),
                            format!("unknown direction \"{other}\""),
                            "use \"ingress\" (north-south in), \"egress\" (north-south out) or \"mesh\" (east-west)",
                        );
                        Direction::Ingress
                    }
                },
            };
            if binds_conflict(bind, admin.listen) {
                self.error(
                    l.bind.span(),
                    format!(
                        "listener `{}` binds {bind}, which overlaps admin.listen = {}",
                        name.get_ref(),
                        admin.listen
                    ),
                    "give the listener or the admin endpoint another port",
                );
            }
            if let Some(other) = out.iter().find(|o| binds_conflict(o.bind, bind)) {
                self.error(
                    l.bind.span(),
                    format!(
                        "listener `{}` binds {bind}, which overlaps listener `{}` ({})",
                        name.get_ref(),
                        other.name,
                        other.bind
                    ),
                    "give each listener its own port (or distinct specific IPs on the same port)",
                );
                continue;
            }
            let trusted_proxies = l
                .trusted_proxies
                .iter()
                .flatten()
                .filter_map(|c| self.cidr(c))
                .collect();
            let tls = l
                .tls
                .as_ref()
                .and_then(|t| self.listener_tls(name.get_ref(), t, cert_names));
            let limits = l
                .limits
                .as_ref()
                .map(|lim| self.listener_limits(name.get_ref(), lim.get_ref()))
                .unwrap_or_default();
            out.push(Listener {
                name: name.get_ref().clone(),
                bind,
                direction,
                tls,
                limits,
                trusted_proxies,
            });
        }
        out
    }

    fn upstream(&mut self, name: Spanned<String>, u: RawUpstream) -> Option<Upstream> {
        let n = name.get_ref().clone();
        let mut endpoints = Vec::new();
        if u.endpoints.get_ref().is_empty() {
            self.error(
                u.endpoints.span(),
                format!("upstream `{n}` has no endpoints"),
                "list at least one, e.g. endpoints = [\"127.0.0.1:9001\"]",
            );
        }
        for e in u.endpoints.get_ref() {
            if let Some(ep) = self.endpoint(e, &n, endpoints.len()) {
                endpoints.push(ep);
            }
        }
        let protocol = match u.protocol.as_ref() {
            None => UpstreamProtocol::Http1,
            Some(p) => match p.get_ref().as_str() {
                "http1" => UpstreamProtocol::Http1,
                "h2c" if u.tls.is_some() => {
                    self.error(
                        p.span(),
                        "protocol = \"h2c\" is HTTP/2 without TLS, but this upstream has `tls`",
                        "use protocol = \"h2\" for HTTP/2 over TLS",
                    );
                    UpstreamProtocol::H2
                }
                "h2c" => UpstreamProtocol::H2c,
                "h2" if u.tls.is_none() => {
                    self.error(
                        p.span(),
                        "protocol = \"h2\" is HTTP/2 over TLS, but this upstream has no `tls`",
                        "add tls = { ... }, or use protocol = \"h2c\" for HTTP/2 without TLS",
                    );
                    UpstreamProtocol::H2c
                }
                "h2" => UpstreamProtocol::H2,
                other => {
                    self.error(
                        p.span(),
                        format!("unknown upstream protocol \"{other}\""),
                        "use \"http1\" (default), \"h2c\" (HTTP/2 with prior knowledge, e.g. gRPC) or \"h2\" (HTTP/2 over TLS)",
                    );
                    UpstreamProtocol::Http1
                }
            },
        };
        let tls = u
            .tls
            .as_ref()
            .and_then(|t| self.upstream_tls(&n, t, &endpoints));
        let key = |k: &str| format!("upstreams.{n}.{k}");
        let connect_timeout = self.duration_or(
            u.connect_timeout.as_ref(),
            &key("connect_timeout"),
            DEFAULT_CONNECT_TIMEOUT,
            false,
        );
        let read_timeout = self.duration_or(
            u.read_timeout.as_ref(),
            &key("read_timeout"),
            DEFAULT_READ_TIMEOUT,
            false,
        );
        let write_timeout = self.duration_or(
            u.write_timeout.as_ref(),
            &key("write_timeout"),
            DEFAULT_WRITE_TIMEOUT,
            false,
        );
        let idle_timeout = self.duration_or(
            u.idle_timeout.as_ref(),
            &key("idle_timeout"),
            DEFAULT_IDLE_TIMEOUT,
            true,
        );
        let connect_retries = match u.connect_retries {
            None => DEFAULT_CONNECT_RETRIES,
            Some(r) if (0..=MAX_CONNECT_RETRIES).contains(r.get_ref()) => *r.get_ref() as u32,
            Some(r) => {
                self.error(
                    r.span(),
                    format!("connect_retries = {} is out of range", r.get_ref()),
                    format!("use 0..={MAX_CONNECT_RETRIES}"),
                );
                DEFAULT_CONNECT_RETRIES
            }
        };
        Some(Upstream {
            name: n,
            endpoints,
            protocol,
            connect_timeout,
            read_timeout,
            write_timeout,
            idle_timeout,
            connect_retries,
            tls,
        })
    }

    /// A path as written, resolved against the config's directory.
    fn path(&self, p: &Spanned<String>) -> PathBuf {
        let path = Path::new(p.get_ref().trim());
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.base_dir.join(path)
        }
    }

    fn cert(&mut self, name: Spanned<String>, c: RawCert) -> Option<CertFiles> {
        let (cert_path, key_path) = (self.path(&c.cert), self.path(&c.key));
        let pair = self.cert_pair(&c.cert, &c.key, &cert_path, &key_path)?;
        self.material.add_cert(name.get_ref(), pair);
        Some(CertFiles {
            name: name.into_inner(),
            cert_path,
            key_path,
        })
    }

    /// Load a cert/key pair, pointing any problem at the key that names the
    /// file at fault.
    fn cert_pair(
        &mut self,
        cert: &Spanned<String>,
        key: &Spanned<String>,
        cert_path: &Path,
        key_path: &Path,
    ) -> Option<Arc<crate::tls::CertKeyPair>> {
        use crate::tls::TlsError;
        match crate::tls::CertKeyPair::load(cert_path, key_path) {
            Ok(pair) => Some(Arc::new(pair)),
            Err(e) => {
                let (span, fix) = match &e {
                    TlsError::Read { path, .. } if path == key_path => {
                        (key.span(), "check the path (relative paths start at the config file's directory) and that meshgate may read it")
                    }
                    TlsError::Read { .. } => (cert.span(), "check the path (relative paths start at the config file's directory) and that meshgate may read it"),
                    TlsError::BadKey { .. } => (key.span(), "give a PEM private key (-----BEGIN PRIVATE KEY----- or EC/RSA PRIVATE KEY), unencrypted"),
                    TlsError::Mismatch { .. } => (key.span(), "give the key the certificate was issued for"),
                    TlsError::NoCertificate { .. } | TlsError::BadCertificate { .. } => (cert.span(), "give a PEM chain: the leaf certificate first, then intermediates"),
                };
                self.error(span, e.to_string(), fix);
                None
            }
        }
    }

    fn ca_bundle(&mut self, p: &Spanned<String>) -> Option<CaBundle> {
        let path = self.path(p);
        match crate::tls::load_certs(&path) {
            Ok(certs) => {
                let der: Vec<u8> = certs
                    .iter()
                    .flat_map(|c| c.to_der().unwrap_or_default())
                    .collect();
                let fingerprint = boring::hash::hash(boring::hash::MessageDigest::sha256(), &der)
                    .map(|d| d.to_vec())
                    .unwrap_or(der);
                self.material.add_ca(&path, certs);
                Some(CaBundle { path, fingerprint })
            }
            Err(e) => {
                self.error(
                    p.span(),
                    e.to_string(),
                    "give a PEM file of one or more CA certificates",
                );
                None
            }
        }
    }

    fn listener_limits(&mut self, listener: &str, r: &RawListenerLimits) -> ListenerLimits {
        let d = ListenerLimits::default();
        let mut count = |v: &Option<Spanned<i64>>, key: &str, max: i64, default: usize| match v {
            None => default,
            Some(n) if (1..=max).contains(n.get_ref()) => *n.get_ref() as usize,
            Some(n) => {
                self.error(
                    n.span(),
                    format!(
                        "listeners.{listener}.limits.{key} = {} is out of range",
                        n.get_ref()
                    ),
                    format!("use 1..={max}"),
                );
                default
            }
        };
        let max_connections = r.max_connections.as_ref().map(|_| {
            count(
                &r.max_connections,
                "max_connections",
                10_000_000,
                usize::MAX,
            )
        });
        // Pingora itself refuses heads over 1 MiB and more than 256 fields.
        let max_request_header_bytes = count(
            &r.max_request_header_bytes,
            "max_request_header_bytes",
            1024 * 1024,
            d.max_request_header_bytes,
        );
        let max_request_headers = count(
            &r.max_request_headers,
            "max_request_headers",
            256,
            d.max_request_headers,
        );
        let max_uri_bytes = count(
            &r.max_uri_bytes,
            "max_uri_bytes",
            1024 * 1024,
            d.max_uri_bytes,
        );
        let max_requests_per_connection = count(
            &r.max_requests_per_connection,
            "max_requests_per_connection",
            10_000_000,
            d.max_requests_per_connection,
        );
        let idle_timeout = self.duration_or(
            r.idle_timeout.as_ref(),
            &format!("listeners.{listener}.limits.idle_timeout"),
            d.idle_timeout,
            false,
        );
        // "0s" turns the total deadline off.
        let header_read_timeout = Some(self.duration_or(
            r.header_read_timeout.as_ref(),
            &format!("listeners.{listener}.limits.header_read_timeout"),
            DEFAULT_HEADER_READ_TIMEOUT,
            true,
        ))
        .filter(|t| !t.is_zero());
        let body_read_timeout = self.duration_or(
            r.body_read_timeout.as_ref(),
            &format!("listeners.{listener}.limits.body_read_timeout"),
            d.body_read_timeout,
            false,
        );
        let handshake_timeout = self.duration_or(
            r.handshake_timeout.as_ref(),
            &format!("listeners.{listener}.limits.handshake_timeout"),
            d.handshake_timeout,
            false,
        );
        ListenerLimits {
            max_connections,
            max_request_header_bytes,
            max_request_headers,
            max_uri_bytes,
            idle_timeout,
            header_read_timeout,
            handshake_timeout,
            max_requests_per_connection,
            body_read_timeout,
        }
    }

    fn listener_tls(
        &mut self,
        listener: &str,
        t: &Spanned<RawListenerTls>,
        cert_names: &[&str],
    ) -> Option<ListenerTls> {
        let before = self.diags.len();
        let r = t.get_ref();
        let mut certs = Vec::new();
        if r.certs.get_ref().is_empty() {
            self.error(
                r.certs.span(),
                format!("listener `{listener}` has tls but no certs"),
                "name at least one [certs] entry: tls = { certs = [\"edge\"] }",
            );
        }
        for c in r.certs.get_ref() {
            if cert_names.contains(&c.get_ref().as_str()) {
                certs.push(c.get_ref().clone());
            } else {
                let fix = match suggest(c.get_ref(), cert_names) {
                    Some(s) => format!(
                        "did you mean `{s}`? Otherwise define [certs.{}]",
                        c.get_ref()
                    ),
                    None => format!("define [certs.{}] with cert and key paths", c.get_ref()),
                };
                self.error(c.span(), format!("unknown cert `{}`", c.get_ref()), fix);
            }
        }
        let min_version = match r.min_version.as_ref().map(|v| v.get_ref().as_str()) {
            None | Some("1.2") => TlsVersion::V1_2,
            Some("1.3") => TlsVersion::V1_3,
            Some(other) => {
                if let Some(v) = &r.min_version {
                    self.error(
                        v.span(),
                        format!("min_version = \"{other}\" is not offered"),
                        "use \"1.2\" (default) or \"1.3\"; older versions are insecure",
                    );
                }
                TlsVersion::V1_2
            }
        };
        let alpn = match &r.alpn {
            None => Alpn::H2H1,
            Some(list) => {
                let names: Vec<&str> = list
                    .get_ref()
                    .iter()
                    .map(|a| a.get_ref().as_str())
                    .collect();
                match names.as_slice() {
                    ["h2", "http/1.1"] => Alpn::H2H1,
                    ["http/1.1"] => Alpn::H1,
                    ["h2"] => Alpn::H2,
                    _ => {
                        self.error(
                            list.span(),
                            format!("alpn = {names:?} is not supported"),
                            "use [\"h2\", \"http/1.1\"] (default), [\"http/1.1\"] or [\"h2\"]",
                        );
                        Alpn::H2H1
                    }
                }
            }
        };
        let client_ca = r.client_ca.as_ref().and_then(|p| self.ca_bundle(p));
        let client_auth = match (r.client_auth.as_ref(), &r.client_ca) {
            (None, _) => ClientAuth::Require,
            (Some(a), None) => {
                self.error(
                    a.span(),
                    "client_auth needs client_ca (the CAs that sign client certificates)",
                    "add client_ca = \"/etc/meshgate/tls/clients-ca.pem\", or remove client_auth",
                );
                ClientAuth::Require
            }
            (Some(a), Some(_)) => match a.get_ref().as_str() {
                "require" => ClientAuth::Require,
                "optional" => ClientAuth::Optional,
                other => {
                    self.error(
                        a.span(),
                        format!("unknown client_auth \"{other}\""),
                        "use \"require\" (default) or \"optional\"",
                    );
                    ClientAuth::Require
                }
            },
        };
        if r.forward_identity == Some(true) && r.client_ca.is_none() {
            self.error(
                t.span(),
                "forward_identity needs client certificates: there is no identity without client_ca",
                "add client_ca, or remove forward_identity",
            );
        }
        let session_tickets = match &r.session_tickets {
            None => DEFAULT_SESSION_TICKETS,
            Some(n) if r.client_ca.is_some() && *n.get_ref() != 0 => {
                self.error(
                    n.span(),
                    "session_tickets with client_ca: listeners checking client certificates send no tickets",
                    "remove session_tickets, or set it to 0 (every connection's certificate is checked in full)",
                );
                DEFAULT_SESSION_TICKETS
            }
            Some(n) => match u8::try_from(*n.get_ref()) {
                Ok(v) if v <= MAX_SESSION_TICKETS => v,
                _ => {
                    self.error(
                        n.span(),
                        format!("session_tickets = {} is out of range", n.get_ref()),
                        format!(
                            "use 0..={MAX_SESSION_TICKETS} (default {DEFAULT_SESSION_TICKETS}; 0 turns TLS 1.3 resumption off)"
                        ),
                    );
                    DEFAULT_SESSION_TICKETS
                }
            },
        };
        if self.diags.len() > before {
            return None;
        }
        Some(ListenerTls {
            certs,
            min_version,
            alpn,
            client_ca,
            client_auth,
            forward_identity: r.forward_identity.unwrap_or(false),
            session_tickets,
        })
    }

    fn upstream_tls(
        &mut self,
        upstream: &str,
        t: &Spanned<RawUpstreamTls>,
        endpoints: &[Endpoint],
    ) -> Option<UpstreamTls> {
        let before = self.diags.len();
        let r = t.get_ref();
        let ca = r.ca.as_ref().and_then(|p| self.ca_bundle(p));
        let client = match (&r.cert, &r.key) {
            (Some(c), Some(k)) => {
                let (cert_path, key_path) = (self.path(c), self.path(k));
                self.cert_pair(c, k, &cert_path, &key_path).map(|pair| {
                    self.material.add_upstream_client(upstream, pair);
                    CertFilesRef {
                        cert_path,
                        key_path,
                    }
                })
            }
            (Some(x), None) | (None, Some(x)) => {
                self.error(
                    x.span(),
                    "a client certificate needs both `cert` and `key`",
                    "give both paths, or neither (no client certificate)",
                );
                None
            }
            (None, None) => None,
        };
        let verify = r.verify.as_ref().and_then(|v| {
            let p = crate::types::identity::IdentityPattern::parse(v.get_ref());
            if p.is_none() {
                self.error(
                    v.span(),
                    format!("verify = \"{}\" is not an identity pattern", v.get_ref()),
                    "write a SPIFFE ID or DNS name, exact or with a trailing `*` (\"spiffe://prod.example/ns/orders/*\") or a leading `*.` (\"*.mesh.example\")",
                );
            }
            p
        });
        // Without a name pingora would skip certificate checks altogether.
        let host_names: Vec<&str> = endpoints
            .iter()
            .filter_map(|e| {
                let host = e.addr.rsplit_once(':').map_or(e.addr.as_str(), |(h, _)| h);
                let host = host.trim_start_matches('[').trim_end_matches(']');
                host.parse::<std::net::IpAddr>().is_err().then_some(host)
            })
            .collect();
        let sni = match &r.sni {
            Some(s) if s.get_ref().trim().is_empty() => {
                self.error(
                    s.span(),
                    "tls.sni is empty",
                    "give the name the upstream's certificate carries",
                );
                String::new()
            }
            Some(s) => s.get_ref().trim().to_string(),
            None if host_names.len() == endpoints.len()
                && !endpoints.is_empty()
                && host_names.iter().all(|h| *h == host_names[0]) =>
            {
                host_names[0].to_string()
            }
            None => {
                self.error(
                    t.span(),
                    format!("upstream `{upstream}` uses TLS but has no tls.sni, and its endpoints are not all the same host name"),
                    "set tls.sni to the name the upstream's certificate carries, e.g. sni = \"orders.mesh\"",
                );
                String::new()
            }
        };
        if self.diags.len() > before {
            return None;
        }
        Some(UpstreamTls {
            ca,
            client,
            sni,
            verify,
        })
    }

    /// An endpoint's form; a host name is looked up later, by the loader.
    fn endpoint(
        &mut self,
        e: &Spanned<toml::Value>,
        upstream: &str,
        index: usize,
    ) -> Option<Endpoint> {
        let (addr, weight) = match e.get_ref() {
            toml::Value::String(s) => (s.clone(), 1),
            toml::Value::Table(t) => {
                if let Some(k) = t.keys().find(|k| *k != "addr" && *k != "weight") {
                    self.error(
                        e.span(),
                        format!("unknown key `{k}` in endpoint"),
                        "an endpoint table has only `addr` and `weight`",
                    );
                    return None;
                }
                let Some(addr) = t.get("addr").and_then(|a| a.as_str()) else {
                    self.error(
                        e.span(),
                        "endpoint table has no `addr` string",
                        "write { addr = \"127.0.0.1:9001\", weight = 3 }",
                    );
                    return None;
                };
                let weight = match t.get("weight") {
                    None => 1,
                    Some(toml::Value::Integer(w)) if (1..=MAX_WEIGHT).contains(w) => *w as u32,
                    Some(w) => {
                        self.error(
                            e.span(),
                            format!("endpoint weight {w} is not an integer in 1..={MAX_WEIGHT}"),
                            "use a positive integer weight; remove the endpoint to stop sending it traffic",
                        );
                        return None;
                    }
                };
                (addr.to_string(), weight)
            }
            other => {
                self.error(
                    e.span(),
                    format!(
                        "endpoint must be a string or a table, found {}",
                        other.type_str()
                    ),
                    "write \"127.0.0.1:9001\" or { addr = \"127.0.0.1:9001\", weight = 3 }",
                );
                return None;
            }
        };
        let (socket, address) = match target(&addr) {
            Ok(Target::Address(socket)) => (socket, Some(socket)),
            // Until the loader has looked it up.
            Ok(Target::Name(port)) => (SocketAddr::from(([0, 0, 0, 0], port)), None),
            Err(why) => {
                self.error(e.span(), endpoint_error(&addr, &why), ENDPOINT_FIX);
                return None;
            }
        };
        self.lookups.push(Lookup {
            span: e.span(),
            upstream: upstream.to_string(),
            index,
            addr: addr.clone(),
            address,
        });
        Some(Endpoint {
            addr,
            socket,
            weight,
        })
    }

    fn route(&mut self, name: Spanned<String>, r: RawRoute, names: &Names<'_>) -> Option<Route> {
        let n = name.get_ref().clone();
        let before = self.diags.len();

        let listeners = match &r.listeners {
            None => names.listeners.iter().map(|s| s.to_string()).collect(),
            Some(ls) => {
                if ls.get_ref().is_empty() {
                    self.error(
                        ls.span(),
                        format!("route `{n}` lists no listeners"),
                        "name at least one listener, or remove the key to serve it on all",
                    );
                }
                let mut out = Vec::new();
                for l in ls.get_ref() {
                    if names.listeners.contains(&l.get_ref().as_str()) {
                        if !out.contains(l.get_ref()) {
                            out.push(l.get_ref().clone());
                        }
                    } else if !self.broken("listeners", l.get_ref()) {
                        let fix = unknown_name_fix("listener", l.get_ref(), &names.listeners);
                        self.error(
                            l.span(),
                            format!("route `{n}` names unknown listener `{}`", l.get_ref()),
                            fix,
                        );
                    }
                }
                out
            }
        };

        let host = r.host.as_ref().and_then(|h| self.host(h));
        let path = self.path_match(&n, &r);
        let methods = self.methods(&r);
        let headers = self.match_headers(&r);
        let timeout = self.duration_or(
            r.timeout.as_ref(),
            &format!("routes.{n}.timeout"),
            DEFAULT_ROUTE_TIMEOUT,
            false,
        );
        let response_headers = r
            .response_headers
            .as_ref()
            .map(|h| self.rewrite(h))
            .unwrap_or_default();
        let action = self.action(&name, &r, names);
        let rate_limits = self.references(
            &r.rate_limits,
            &names.rate_limits,
            &n,
            "rate_limits",
            "rate limit",
        );
        let policies = self.references(&r.policies, &names.policies, &n, "policies", "policy");

        if self.diags.len() > before {
            return None;
        }
        let max_body_bytes = match r.max_body_bytes.as_ref() {
            None => DEFAULT_MAX_BODY_BYTES,
            Some(b) if *b.get_ref() < 0 => {
                self.error(
                    b.span(),
                    format!("max_body_bytes = {} is negative", b.get_ref()),
                    "use a size in bytes, e.g. 104857600 for 100 MiB, or remove the key for the default (10 MiB)",
                );
                return None;
            }
            Some(b) => *b.get_ref() as u64,
        };
        let buffer_request_body = match r.buffer_request_body.as_ref() {
            None => 0,
            Some(b) => match parse_size(b.get_ref()) {
                Some(n) if n <= MAX_BUFFER_REQUEST_BODY => n,
                Some(n) => {
                    self.error(
                        b.span(),
                        format!("routes.{n_}.buffer_request_body = \"{}\" ({n} bytes) is over 64 KiB", b.get_ref(), n_ = name.get_ref()),
                        "use at most \"64KiB\" (larger bodies are streamed; Pingora replays no more than that)",
                    );
                    return None;
                }
                None => {
                    self.error(
                        b.span(),
                        format!("routes.{}.buffer_request_body = \"{}\" is not a size", name.get_ref(), b.get_ref()),
                        "write a size such as \"16KiB\" or \"64KiB\" (units: B, KiB, MiB), or \"0\" to stream every body",
                    );
                    return None;
                }
            },
        };
        Some(Route {
            policies,
            max_body_bytes,
            buffer_request_body,
            name: n,
            listeners,
            host,
            path,
            methods,
            headers,
            action: action?,
            timeout,
            response_headers,
            rate_limits,
        })
    }

    /// `"10.0.0.0/8"`, or a bare address meaning just that host.
    fn cidr(&mut self, c: &Spanned<String>) -> Option<ipnet::IpNet> {
        let s = c.get_ref().trim();
        match s
            .parse::<ipnet::IpNet>()
            .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        {
            Ok(net) => Some(net),
            Err(_) => {
                self.error(
                    c.span(),
                    format!("\"{s}\" is not an IP network"),
                    "write a CIDR such as \"10.0.0.0/8\" or \"2001:db8::/32\", or a single address",
                );
                None
            }
        }
    }

    /// A route's list of `[section]` names, deduplicated; unknown ones are
    /// errors with a "did you mean".
    fn references(
        &mut self,
        list: &Option<Spanned<Vec<Spanned<String>>>>,
        known: &[&str],
        route: &str,
        section: &str,
        what: &str,
    ) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for p in list.iter().flat_map(|l| l.get_ref()) {
            let name = p.get_ref();
            if known.contains(&name.as_str()) {
                if !out.contains(name) {
                    out.push(name.clone());
                }
                continue;
            }
            if self.broken(section, name) {
                continue;
            }
            let fix = match suggest(name, known) {
                Some(s) => format!("did you mean `{s}`? Otherwise define [{section}.{name}]"),
                None => format!("define [{section}.{name}]"),
            };
            self.error(
                p.span(),
                format!("route `{route}` names unknown {what} `{name}`"),
                fix,
            );
        }
        out
    }

    /// `mode` of a rate limit or a policy: enforce (default) or shadow.
    fn mode(&mut self, m: Option<&Spanned<String>>) -> LimitMode {
        match m.map(|m| (m, m.get_ref().as_str())) {
            None | Some((_, "enforce")) => LimitMode::Enforce,
            Some((_, "shadow")) => LimitMode::Shadow,
            Some((m, other)) => {
                self.error(
                    m.span(),
                    format!("unknown mode \"{other}\""),
                    "use \"enforce\" or \"shadow\" (count and log, never block)",
                );
                LimitMode::Enforce
            }
        }
    }

    fn policy(&mut self, name: Spanned<String>, p: RawPolicy) -> Option<AuthzPolicy> {
        let before = self.diags.len();
        let span = name.span();
        let n = name.into_inner();
        let default_allow = match p.default.as_ref().map(|d| d.get_ref().as_str()) {
            None | Some("deny") => false,
            Some("allow") => true,
            Some(other) => {
                if let Some(d) = &p.default {
                    self.error(
                        d.span(),
                        format!("unknown default \"{other}\""),
                        "use \"deny\" (default: what no rule allows is refused) or \"allow\"",
                    );
                }
                false
            }
        };
        let mode = self.mode(p.mode.as_ref());
        let allow: Vec<AuthzRule> = p
            .allow
            .iter()
            .flatten()
            .filter_map(|r| self.rule(r))
            .collect();
        let deny: Vec<AuthzRule> = p
            .deny
            .iter()
            .flatten()
            .filter_map(|r| self.rule(r))
            .collect();
        if self.diags.len() > before {
            return None;
        }
        if p.allow.is_none() && p.deny.is_none() {
            let outcome = if default_allow { "allows" } else { "refuses" };
            self.warn(
                span,
                format!("policy `{n}` has neither `allow` nor `deny` rules: it {outcome} every request of the routes that list it"),
                "add allow = [{ ... }] or deny = [{ ... }] rules (docs/security.md), or remove the policy",
            );
        }
        Some(AuthzPolicy {
            name: n,
            allow,
            deny,
            default_allow,
            mode,
        })
    }

    /// A string or a list of strings, each with its span.
    fn string_or_list(&mut self, v: &Spanned<toml::Value>, what: &str) -> Vec<Spanned<String>> {
        match v.get_ref() {
            toml::Value::String(s) => vec![Spanned::new(v.span(), s.clone())],
            toml::Value::Array(items) if !items.is_empty() && items.iter().all(|i| i.is_str()) => {
                items
                    .iter()
                    .filter_map(|i| i.as_str())
                    .map(|s| Spanned::new(v.span(), s.to_string()))
                    .collect()
            }
            _ => {
                self.error(
                    v.span(),
                    format!("`{what}` must be a string or a non-empty list of strings"),
                    format!("write {what} = \"...\" or {what} = [\"...\", \"...\"]"),
                );
                Vec::new()
            }
        }
    }

    fn rule(&mut self, r: &Spanned<RawRule>) -> Option<AuthzRule> {
        let before = self.diags.len();
        let raw = r.get_ref();
        let mut rule = AuthzRule::default();
        if let Some(v) = &raw.identity {
            for s in self.string_or_list(v, "identity") {
                match crate::types::identity::IdentityPattern::parse(s.get_ref()) {
                    Some(p) => rule.identity.push(p),
                    None => self.error(
                        s.span(),
                        format!("identity \"{}\" is not an identity pattern", s.get_ref()),
                        "write a SPIFFE ID or DNS name, exact or with a trailing `*` (\"spiffe://prod.example/ns/web/*\") or a leading `*.`",
                    ),
                }
            }
        }
        if let Some(v) = &raw.source {
            for s in self.string_or_list(v, "source") {
                if let Some(net) = self.cidr(&s) {
                    rule.source.push(net);
                }
            }
        }
        if let Some(ms) = &raw.methods {
            rule.methods = self.method_list(ms);
        }
        if let Some(p) = &raw.path_prefix {
            if self.abs_path(p, "path_prefix") {
                rule.path_prefix = Some(p.get_ref().clone());
            }
        }
        if let Some(hs) = &raw.headers {
            for (k, v) in hs.get_ref() {
                if k.get_ref().eq_ignore_ascii_case("x-meshgate-peer-identity") {
                    self.error(
                        k.span(),
                        "a rule cannot test x-meshgate-peer-identity: in a request it is whatever the client sent",
                        "use identity = \"...\" to match the verified client certificate",
                    );
                    continue;
                }
                if let Some(pair) = self.header_pair(k, v) {
                    rule.headers.push(pair);
                }
            }
        }
        if raw.identity.is_none()
            && raw.source.is_none()
            && raw.methods.is_none()
            && raw.path_prefix.is_none()
            && raw.headers.as_ref().is_none_or(|h| h.get_ref().is_empty())
        {
            self.error(
                r.span(),
                "a rule without conditions matches every request",
                "give it identity, source, methods, path_prefix or headers; to allow everything use default = \"allow\"",
            );
        }
        (self.diags.len() == before).then_some(rule)
    }

    fn redis(&mut self, r: RawRedis) -> Option<Redis> {
        let before = self.diags.len();
        let url = r.url.get_ref().trim().to_string();
        if url.starts_with("rediss://") || url.starts_with("valkeys://") {
            self.error(
                r.url.span(),
                "redis.url: Redis over TLS (rediss://) is not supported in this version",
                "use redis:// to a Redis reachable over a trusted network (or through a local TLS tunnel such as stunnel), or a unix:// socket",
            );
        } else if let Err(e) = redis::Client::open(url.as_str()) {
            self.error(
                r.url.span(),
                format!(
                    "redis.url = \"{}\" is not usable: {}",
                    redact_secrets(&url),
                    redact_secrets(&e.to_string())
                ),
                "write url = \"redis://127.0.0.1:6379/0\" (or redis://:PASSWORD@host:port/db, unix:///path/redis.sock)",
            );
        }
        let on_error = match r.on_error.as_ref().map(|o| o.get_ref().as_str()) {
            None | Some("allow") => OnError::Allow,
            Some("deny") => OnError::Deny,
            Some(other) => {
                if let Some(o) = &r.on_error {
                    self.error(
                        o.span(),
                        format!("unknown on_error \"{other}\""),
                        "use \"allow\" (fail open) or \"deny\" (fail closed with 503)",
                    );
                }
                OnError::Allow
            }
        };
        let timeout = self.duration_or(
            r.timeout.as_ref(),
            "redis.timeout",
            DEFAULT_REDIS_TIMEOUT,
            false,
        );
        let key_prefix = match r.key_prefix {
            None => DEFAULT_REDIS_KEY_PREFIX.to_string(),
            Some(p) => p.into_inner(),
        };
        if self.diags.len() > before {
            return None;
        }
        Some(Redis {
            url,
            on_error,
            timeout,
            key_prefix,
        })
    }

    fn rate_limit(
        &mut self,
        name: Spanned<String>,
        r: RawRateLimit,
        have_redis: bool,
    ) -> Option<RateLimit> {
        let n = name.get_ref().clone();
        let before = self.diags.len();
        let key_text = r.key.get_ref().trim();
        let key = match key_text {
            "client_ip" => Some(RateLimitKey::ClientIp),
            "route" => Some(RateLimitKey::Route),
            "identity" => Some(RateLimitKey::Identity),
            other => match other.strip_prefix("header:") {
                Some(h) => match HeaderName::from_bytes(h.trim().as_bytes()) {
                    Ok(h) => Some(RateLimitKey::Header(h)),
                    Err(_) => {
                        self.error(
                            r.key.span(),
                            format!("\"{h}\" is not a header name"),
                            "write key = \"header:x-api-key\"",
                        );
                        None
                    }
                },
                None => {
                    self.error(
                        r.key.span(),
                        format!("unknown rate-limit key \"{other}\""),
                        "use \"client_ip\", \"header:NAME\", \"route\" or \"identity\"",
                    );
                    None
                }
            },
        };
        let rate = match *r.rate.get_ref() {
            v if (1..=1_000_000_000).contains(&v) => v as u32,
            v => {
                self.error(
                    r.rate.span(),
                    format!("rate = {v} is out of range"),
                    "use a positive number of requests per `per`",
                );
                1
            }
        };
        let per = self.duration_or(
            r.per.as_ref(),
            &format!("rate_limits.{n}.per"),
            DEFAULT_RATE_LIMIT_PER,
            false,
        );
        if per.checked_div(rate).is_none_or(|d| d.is_zero()) {
            self.error(
                r.rate.span(),
                format!("rate = {rate} per {per:?} is finer than a nanosecond"),
                "lower `rate` or lengthen `per`",
            );
        }
        let burst = match &r.burst {
            None => rate,
            Some(b) if (1..=1_000_000_000).contains(b.get_ref()) => *b.get_ref() as u32,
            Some(b) => {
                self.error(
                    b.span(),
                    format!("burst = {} is out of range", b.get_ref()),
                    "use a positive number, or remove the key (default: `rate`)",
                );
                rate
            }
        };
        let mode = self.mode(r.mode.as_ref());
        let global = match r.scope.as_ref().map(|s| s.get_ref().as_str()) {
            None | Some("local") => false,
            Some("global") => {
                if let Some(s) = r.scope.as_ref().filter(|_| !have_redis) {
                    self.error(
                        s.span(),
                        format!("rate limit `{n}` has scope = \"global\" but there is no [redis] table"),
                        "add [redis] with url = \"redis://127.0.0.1:6379/0\", or use scope = \"local\"",
                    );
                }
                // Redis keeps time in microseconds, as doubles (a quarter of a
                // microsecond apart at today's timestamps).
                if per
                    .checked_div(rate)
                    .is_some_and(|d| d < MIN_GLOBAL_INTERVAL)
                {
                    self.error(
                        r.rate.span(),
                        format!("rate = {rate} per {per:?} is more than one request per 10µs per key, finer than a global limit counts"),
                        "lower `rate` or lengthen `per` (a global limit allows up to 100000 per second per key), or use scope = \"local\"",
                    );
                }
                true
            }
            Some(other) => {
                if let Some(s) = &r.scope {
                    self.error(
                        s.span(),
                        format!("unknown scope \"{other}\""),
                        "use \"local\" (a budget per process) or \"global\" (one budget shared through Redis)",
                    );
                }
                false
            }
        };
        let batch = match &r.batch {
            None => 1,
            Some(b) if !global => {
                self.error(
                    b.span(),
                    "`batch` applies only to scope = \"global\"",
                    "remove `batch`, or set scope = \"global\"",
                );
                1
            }
            Some(b) if (1..=i64::from(burst)).contains(b.get_ref()) => *b.get_ref() as u32,
            Some(b) => {
                self.error(
                    b.span(),
                    format!("batch = {} is out of range", b.get_ref()),
                    format!("use 1..={burst} (at most `burst`); 1 asks Redis for every request"),
                );
                1
            }
        };
        let scope = if global {
            LimitScope::Global { batch }
        } else {
            LimitScope::Local
        };
        let max_keys = match &r.max_keys {
            None => DEFAULT_MAX_KEYS,
            Some(m) if (1..=100_000_000).contains(m.get_ref()) => *m.get_ref() as usize,
            Some(m) => {
                self.error(
                    m.span(),
                    format!("max_keys = {} is out of range", m.get_ref()),
                    "use 1..=100000000",
                );
                DEFAULT_MAX_KEYS
            }
        };
        if self.diags.len() > before {
            return None;
        }
        Some(RateLimit {
            name: n,
            key: key?,
            rate,
            per,
            burst,
            mode,
            headers_on_allowed: r.headers_on_allowed.unwrap_or(false),
            max_keys,
            scope,
        })
    }

    fn host(&mut self, h: &Spanned<String>) -> Option<HostMatch> {
        let s = h.get_ref().trim_end_matches('.').to_ascii_lowercase();
        let (wild, rest) = match s.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, s.as_str()),
        };
        let ok = !rest.is_empty()
            && rest.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            });
        if !ok || rest.contains(':') {
            self.error(
                h.span(),
                format!("host \"{}\" is not a host name or a `*.` wildcard", h.get_ref()),
                "write an exact name such as \"api.example.com\" or a wildcard such as \"*.example.com\" (no port, no scheme)",
            );
            return None;
        }
        Some(if wild {
            HostMatch::Wildcard(format!(".{rest}"))
        } else {
            HostMatch::Exact(rest.to_string())
        })
    }

    fn path_match(&mut self, n: &str, r: &RawRoute) -> Option<PathMatch> {
        let given: Vec<&Spanned<String>> = [&r.path, &r.path_prefix, &r.path_regex]
            .into_iter()
            .flatten()
            .collect();
        if given.len() > 1 {
            self.error(
                given[1].span(),
                format!("route `{n}` sets more than one of path, path_prefix, path_regex"),
                "keep exactly one path matcher per route; make two routes for two paths",
            );
            return None;
        }
        if let Some(p) = &r.path {
            self.abs_path(p, "path")
                .then(|| PathMatch::Exact(p.get_ref().clone()))
        } else if let Some(p) = &r.path_prefix {
            self.abs_path(p, "path_prefix")
                .then(|| PathMatch::Prefix(p.get_ref().clone()))
        } else if let Some(p) = &r.path_regex {
            match regex::Regex::new(p.get_ref()) {
                Ok(re) => Some(PathMatch::Regex(re)),
                Err(e) => {
                    let detail = e
                        .to_string()
                        .lines()
                        .last()
                        .unwrap_or_default()
                        .trim()
                        .trim_start_matches("error: ")
                        .to_string();
                    self.error(p.span(), format!("invalid path_regex: {detail}"), "fix the regular expression (Rust `regex` syntax; anchor with ^ and $ to match the whole path)");
                    None
                }
            }
        } else {
            None
        }
    }

    fn abs_path(&mut self, p: &Spanned<String>, key: &str) -> bool {
        let s = p.get_ref();
        if !s.starts_with('/')
            || s.bytes()
                .any(|b| b.is_ascii_control() || b == b' ' || b == b'?' || b == b'#')
        {
            self.error(
                p.span(),
                format!("{key} \"{s}\" must start with `/` and hold no spaces, `?` or `#`"),
                format!("write e.g. {key} = \"/v1/\"; queries are not matched"),
            );
            return false;
        }
        // Requests are matched after normalization, so a non-normal pattern
        // could never match.
        if let Some(normal) = crate::types::path::normalize_path(s) {
            self.error(
                p.span(),
                format!("{key} \"{s}\" is not in normal form, and request paths are normalized before matching"),
                format!("write {key} = \"{normal}\""),
            );
            return false;
        }
        true
    }

    fn methods(&mut self, r: &RawRoute) -> Vec<Method> {
        match &r.methods {
            Some(ms) => self.method_list(ms),
            None => Vec::new(),
        }
    }

    fn method_list(&mut self, ms: &Spanned<Vec<Spanned<String>>>) -> Vec<Method> {
        if ms.get_ref().is_empty() {
            self.error(
                ms.span(),
                "methods = [] matches nothing",
                "list methods, e.g. [\"GET\", \"POST\"], or remove the key to match any",
            );
        }
        let mut out = Vec::new();
        for m in ms.get_ref() {
            let up = m.get_ref().to_ascii_uppercase();
            match Method::from_bytes(up.as_bytes()) {
                Ok(method) => out.push(method),
                Err(_) => self.error(
                    m.span(),
                    format!("\"{}\" is not an HTTP method", m.get_ref()),
                    "use a method token such as \"GET\", \"POST\", \"PUT\", \"DELETE\"",
                ),
            }
        }
        out.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        out.dedup();
        out
    }

    fn match_headers(&mut self, r: &RawRoute) -> Vec<(HeaderName, HeaderValue)> {
        let Some(hs) = &r.headers else {
            return Vec::new();
        };
        let mut out: Vec<(HeaderName, HeaderValue)> = hs
            .get_ref()
            .iter()
            .filter_map(|(k, v)| self.header_pair(k, v))
            .collect();
        out.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
        out
    }

    fn header_pair(
        &mut self,
        k: &Spanned<String>,
        v: &Spanned<String>,
    ) -> Option<(HeaderName, HeaderValue)> {
        let name = match HeaderName::from_bytes(k.get_ref().as_bytes()) {
            Ok(n) => n,
            Err(_) => {
                self.error(
                    k.span(),
                    format!("\"{}\" is not a valid header name", k.get_ref()),
                    "use a token such as \"x-canary\" (letters, digits, `-`)",
                );
                return None;
            }
        };
        match HeaderValue::from_str(v.get_ref()) {
            Ok(val) => Some((name, val)),
            Err(_) => {
                self.error(
                    v.span(),
                    format!("value of header `{name}` is not a valid header value"),
                    "use visible ASCII characters and spaces only, no newlines",
                );
                None
            }
        }
    }

    fn rewrite(&mut self, h: &Spanned<RawHeaderRewrite>) -> HeaderRewrite {
        let raw = h.get_ref();
        let named = raw
            .set
            .iter()
            .flatten()
            .map(|(k, _)| k)
            .chain(raw.add.iter().flatten().map(|(k, _)| k))
            .chain(raw.remove.iter().flatten());
        let forbidden: Vec<&Spanned<String>> = named
            .filter(|k| FORBIDDEN_REWRITES.contains(&k.get_ref().to_ascii_lowercase().as_str()))
            .collect();
        for k in forbidden {
            self.error(
                k.span(),
                format!("header `{}` cannot be rewritten: it describes the connection or the message framing", k.get_ref()),
                "remove it; meshgate sets framing and hop-by-hop fields itself for each hop",
            );
        }
        let identity = raw
            .set
            .iter()
            .flatten()
            .map(|(k, _)| k)
            .chain(raw.add.iter().flatten().map(|(k, _)| k))
            .chain(raw.remove.iter().flatten())
            .find(|k| k.get_ref().eq_ignore_ascii_case("x-meshgate-peer-identity"));
        if let Some(k) = identity {
            self.error(
                k.span(),
                "x-meshgate-peer-identity cannot be rewritten: only a verified client certificate sets it",
                "remove it; use tls.forward_identity on the listener",
            );
        }
        let mut out = HeaderRewrite::default();
        let field = |(name, value): (HeaderName, HeaderValue), k: &Spanned<String>| FieldValue {
            name,
            spelled: bytes::Bytes::from(k.get_ref().clone()),
            value,
        };
        for (k, v) in raw.set.iter().flatten() {
            if let Some(p) = self.header_pair(k, v) {
                out.set.push(field(p, k));
            }
        }
        for (k, v) in raw.add.iter().flatten() {
            if let Some(p) = self.header_pair(k, v) {
                out.add.push(field(p, k));
            }
        }
        for k in raw.remove.iter().flatten() {
            match HeaderName::from_bytes(k.get_ref().as_bytes()) {
                Ok(n) => out.remove.push(n),
                Err(_) => self.error(
                    k.span(),
                    format!("\"{}\" is not a valid header name", k.get_ref()),
                    "use a token such as \"x-debug\"",
                ),
            }
        }
        out
    }

    fn action(
        &mut self,
        name: &Spanned<String>,
        r: &RawRoute,
        names: &Names<'_>,
    ) -> Option<Action> {
        let n = name.get_ref();
        let set: Vec<(&str, Range<usize>)> = [
            r.upstream.as_ref().map(|s| ("upstream", s.span())),
            r.split.as_ref().map(|s| ("split", s.span())),
            r.respond.as_ref().map(|s| ("respond", s.span())),
            r.redirect.as_ref().map(|s| ("redirect", s.span())),
        ]
        .into_iter()
        .flatten()
        .collect();
        if set.is_empty() {
            self.error(
                name.span(),
                format!("route `{n}` has no action"),
                "add one of: upstream = \"NAME\", split = { a = 90, b = 10 }, respond = { status = 200 }, redirect = { location = \"...\" }",
            );
            return None;
        }
        if set.len() > 1 {
            let keys: Vec<&str> = set.iter().map(|(k, _)| *k).collect();
            self.error(
                set[1].1.clone(),
                format!("route `{n}` has more than one action: {}", keys.join(", ")),
                "keep exactly one of upstream, split, respond, redirect",
            );
            return None;
        }
        let forwarding = r.upstream.is_some() || r.split.is_some();
        if !forwarding {
            for (key, span) in [
                ("strip_prefix", r.strip_prefix.as_ref().map(|s| s.span())),
                (
                    "request_headers",
                    r.request_headers.as_ref().map(|s| s.span()),
                ),
            ] {
                if let Some(span) = span {
                    self.error(
                        span,
                        format!("`{key}` only applies to routes that forward to an upstream"),
                        format!("remove `{key}` from route `{n}`"),
                    );
                }
            }
        }
        if let Some(u) = &r.upstream {
            let target = self.upstream_ref(n, u, names)?;
            return Some(Action::Forward(self.forward(r, vec![(target, 1)])));
        }
        if let Some(split) = &r.split {
            if split.get_ref().is_empty() {
                self.error(split.span(), format!("route `{n}` has an empty split"), "name at least one upstream with a weight, e.g. split = { api = 90, api_canary = 10 }");
                return None;
            }
            let mut targets = Vec::new();
            let mut ok = true;
            for (u, w) in split.get_ref() {
                let target = self.upstream_ref(n, u, names);
                let weight = *w.get_ref();
                if !(1..=MAX_WEIGHT).contains(&weight) {
                    self.error(
                        w.span(),
                        format!(
                            "split weight {weight} for `{}` must be in 1..={MAX_WEIGHT}",
                            u.get_ref()
                        ),
                        "use a positive weight; remove the entry to send it no traffic",
                    );
                    ok = false;
                }
                match target {
                    Some(t) if ok => targets.push((t, weight as u32)),
                    _ => ok = false,
                }
            }
            return ok.then(|| Action::Forward(self.forward(r, targets)));
        }
        if let Some(resp) = &r.respond {
            let resp = resp.get_ref();
            let status = match &resp.status {
                None => StatusCode::OK,
                Some(s) => self.status(s, 200..=599, "respond.status")?,
            };
            let content_type = match &resp.content_type {
                None => HeaderValue::from_static("text/plain; charset=utf-8"),
                Some(ct) => match HeaderValue::from_str(ct.get_ref()) {
                    Ok(v) => v,
                    Err(_) => {
                        self.error(
                            ct.span(),
                            "respond.content_type is not a valid header value",
                            "write e.g. \"application/json\"",
                        );
                        return None;
                    }
                },
            };
            if matches!(status.as_u16(), 204 | 304)
                && resp.body.as_ref().is_some_and(|b| !b.is_empty())
            {
                if let Some(st) = &resp.status {
                    self.error(
                        st.span(),
                        format!(
                            "a {} response has no body, but `body` is set",
                            status.as_u16()
                        ),
                        "remove `body`, or use another status such as 200",
                    );
                }
                return None;
            }
            return Some(Action::Respond {
                status,
                body: bytes::Bytes::from(resp.body.clone().unwrap_or_default()),
                content_type,
            });
        }
        if let Some(red) = &r.redirect {
            let red = red.get_ref();
            let status = match &red.status {
                None => StatusCode::from_u16(DEFAULT_REDIRECT_STATUS).ok()?,
                Some(s)
                    if REDIRECT_STATUSES
                        .iter()
                        .any(|&c| i64::from(c) == *s.get_ref()) =>
                {
                    self.status(s, 300..=399, "redirect.status")?
                }
                Some(s) => {
                    self.error(
                        s.span(),
                        format!("redirect.status {} is not a redirect status", s.get_ref()),
                        "use 301, 302, 303, 307 or 308",
                    );
                    return None;
                }
            };
            let loc = red.location.get_ref();
            return match HeaderValue::from_str(loc) {
                Ok(location) if !loc.is_empty() => Some(Action::Redirect { location, status }),
                _ => {
                    self.error(red.location.span(), "redirect.location is empty or not a valid header value", "write an absolute URL such as \"https://docs.example.com/\" or a path such as \"/new/\"");
                    None
                }
            };
        }
        None
    }

    fn status(
        &mut self,
        s: &Spanned<i64>,
        range: std::ops::RangeInclusive<i64>,
        key: &str,
    ) -> Option<StatusCode> {
        let v = *s.get_ref();
        if range.contains(&v) {
            StatusCode::from_u16(v as u16).ok()
        } else {
            self.error(
                s.span(),
                format!("{key} {v} is out of range"),
                format!("use a status in {}..={}", range.start(), range.end()),
            );
            None
        }
    }

    fn upstream_ref(
        &mut self,
        route: &str,
        u: &Spanned<String>,
        names: &Names<'_>,
    ) -> Option<String> {
        if names.upstreams.contains(&u.get_ref().as_str()) {
            Some(u.get_ref().clone())
        } else if self.broken("upstreams", u.get_ref()) {
            None
        } else {
            let fix = unknown_name_fix("upstream", u.get_ref(), &names.upstreams);
            self.error(
                u.span(),
                format!("route `{route}` names unknown upstream `{}`", u.get_ref()),
                fix,
            );
            None
        }
    }

    fn forward(&mut self, r: &RawRoute, targets: Vec<(String, u32)>) -> Forward {
        let strip_prefix = r.strip_prefix.as_ref().and_then(|p| {
            self.abs_path(p, "strip_prefix")
                .then(|| p.get_ref().clone())
        });
        let request_headers = r
            .request_headers
            .as_ref()
            .map(|h| self.rewrite(h))
            .unwrap_or_default();
        Forward {
            targets,
            strip_prefix,
            request_headers,
        }
    }

    fn egress(
        &mut self,
        section: Range<usize>,
        r: RawEgress,
        listeners: &[Listener],
    ) -> Option<Egress> {
        let before = self.diags.len();
        let egress_listeners: Vec<&Listener> = listeners
            .iter()
            .filter(|l| l.direction == Direction::Egress)
            .collect();
        if egress_listeners.is_empty() && !listeners.is_empty() {
            self.error(
                section.clone(),
                "[egress] is set, but no listener has direction = \"egress\"",
                "add a listener for applications on this machine, e.g. [listeners.outbound] with bind = \"127.0.0.1:15001\" and direction = \"egress\"",
            );
        }
        for l in egress_listeners.iter().filter(|l| l.tls.is_some()) {
            self.error(
                section.clone(),
                format!(
                    "listener `{}` is an egress listener with tls; the egress allowlist serves plain HTTP, CONNECT and bare TLS ClientHellos, which need a plain listener",
                    l.name
                ),
                format!("remove tls from listener `{}` (bind it to 127.0.0.1: applications on this machine talk to it, meshgate originates the TLS)", l.name),
            );
        }
        let default = Egress::default();
        let ports = match &r.allow.as_ref().and_then(|a| a.get_ref().ports.as_ref()) {
            None => DEFAULT_EGRESS_PORTS.to_vec(),
            Some(list) if list.get_ref().is_empty() => {
                self.error(
                    list.span(),
                    "egress.allow.ports is empty, so nothing could leave",
                    "list the ports, e.g. ports = [443], or remove the key (default [443])",
                );
                Vec::new()
            }
            Some(list) => list
                .get_ref()
                .iter()
                .filter_map(|p| self.port(p, "egress.allow.ports"))
                .collect(),
        };
        let mut allow = Vec::new();
        for h in r.allow.iter().flat_map(|a| a.get_ref().hosts.get_ref()) {
            let text = h.get_ref().trim();
            // `host:port` limits one entry to its own port.
            let (pattern, port) = match text.rsplit_once(':') {
                Some((host, p)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
                    (host, Some(p))
                }
                _ => (text, None),
            };
            let entry_ports = match port {
                None => ports.clone(),
                Some(p) => match p.parse::<u16>() {
                    Ok(p) if p != 0 => vec![p],
                    _ => {
                        self.error(
                            h.span(),
                            format!("\"{text}\" has port {p}, which is not 1-65535"),
                            "write host:port with a port from 1 to 65535, or the host alone for `ports`",
                        );
                        continue;
                    }
                },
            };
            match crate::types::host::HostPattern::parse(pattern) {
                Ok(pattern) => allow.push(EgressAllow {
                    pattern,
                    ports: entry_ports,
                }),
                Err(why) => self.error(
                    h.span(),
                    format!("egress.allow.hosts: \"{text}\" is not a host pattern: {why}"),
                    "write a host name (\"api.example.com\"), `*.` for one more label (\"*.example.com\") or `**.` for any depth, optionally with :port",
                ),
            }
        }
        let ca = r.ca.as_ref().and_then(|p| self.ca_bundle(p));
        let mut resolve = Vec::new();
        for (host, value) in r.resolve.iter().flatten() {
            let name = match crate::types::host::normalize_dns_host(host.get_ref()) {
                Ok(n) => n,
                Err(_) => {
                    self.error(
                        host.span(),
                        format!("egress.resolve: \"{}\" is not a host name", host.get_ref()),
                        "pin an exact host name (no wildcards, no IP address), e.g. \"api.example.com\" = \"203.0.113.7\"",
                    );
                    continue;
                }
            };
            let mut pins = Vec::new();
            for a in self.string_or_list(value, "resolve") {
                let text = a.get_ref().trim();
                if let Ok(ip) = text.parse::<std::net::IpAddr>() {
                    pins.push(EgressPin { ip, port: None });
                } else if let Ok(sa) = text.parse::<SocketAddr>().map_err(|_| ()).and_then(|sa| {
                    if sa.port() == 0 {
                        Err(())
                    } else {
                        Ok(sa)
                    }
                }) {
                    pins.push(EgressPin {
                        ip: sa.ip(),
                        port: Some(sa.port()),
                    });
                } else {
                    self.error(
                        a.span(),
                        format!("egress.resolve.\"{name}\": \"{text}\" is not an IP address"),
                        "write an address (\"203.0.113.7\", \"2001:db8::7\") or address:port (\"203.0.113.7:8443\", \"[2001:db8::7]:8443\")",
                    );
                }
            }
            if resolve.iter().any(|(n, _): &(String, _)| *n == name) {
                self.error(
                    host.span(),
                    format!("egress.resolve pins \"{name}\" twice"),
                    "keep one entry per host; give a list for several addresses",
                );
            }
            resolve.push((name, pins));
        }
        let deny_networks = match &r.deny_networks {
            None => default.deny_networks,
            Some(list) => list.iter().filter_map(|c| self.cidr(c)).collect(),
        };
        let passthrough_port = match &r.passthrough_port {
            None => DEFAULT_EGRESS_PASSTHROUGH_PORT,
            Some(p) => self
                .port(p, "egress.passthrough_port")
                .unwrap_or(DEFAULT_EGRESS_PASSTHROUGH_PORT),
        };
        let connect_timeout = self.duration_or(
            r.connect_timeout.as_ref(),
            "egress.connect_timeout",
            DEFAULT_EGRESS_CONNECT_TIMEOUT,
            false,
        );
        let timeout = self.duration_or(
            r.timeout.as_ref(),
            "egress.timeout",
            DEFAULT_EGRESS_TIMEOUT,
            false,
        );
        let tunnel_idle_timeout = self.duration_or(
            r.tunnel_idle_timeout.as_ref(),
            "egress.tunnel_idle_timeout",
            DEFAULT_EGRESS_TUNNEL_IDLE_TIMEOUT,
            false,
        );
        if self.diags.len() > before {
            return None;
        }
        Some(Egress {
            allow,
            ca,
            resolve,
            deny_networks,
            connect_timeout,
            timeout,
            tunnel_idle_timeout,
            passthrough_port,
        })
    }

    fn port(&mut self, p: &Spanned<i64>, key: &str) -> Option<u16> {
        match u16::try_from(*p.get_ref()) {
            Ok(port) if port != 0 => Some(port),
            _ => {
                self.error(
                    p.span(),
                    format!("{key}: {} is not a port", p.get_ref()),
                    "use a port from 1 to 65535",
                );
                None
            }
        }
    }

    fn duration_or(
        &mut self,
        d: Option<&Spanned<RawDuration>>,
        key: &str,
        default: Duration,
        zero_ok: bool,
    ) -> Duration {
        let Some(d) = d else { return default };
        match humantime::parse_duration(d.get_ref().trim()) {
            Ok(v) if v > MAX_DURATION => {
                self.error(
                    d.span(),
                    format!("{key} = \"{}\" is longer than 24h", d.get_ref()),
                    "use a duration of at most \"24h\"",
                );
                default
            }
            Ok(v) if zero_ok || !v.is_zero() => v,
            Ok(_) => {
                self.error(
                    d.span(),
                    format!("{key} must be greater than zero"),
                    "write a positive duration such as \"500ms\" or \"15s\"",
                );
                default
            }
            Err(_) => {
                self.error(
                    d.span(),
                    format!("{key} = \"{}\" is not a duration", d.get_ref()),
                    "write a number and a unit, e.g. \"250ms\", \"15s\", \"2m\"",
                );
                default
            }
        }
    }

    /// Two routes that share a listener and have identical match conditions can
    /// never be told apart: the later one would never be chosen.
    fn check_indistinguishable(&mut self, routes: &[Route], spans: &[Range<usize>]) {
        let mut seen: HashMap<MatchKey, Vec<usize>> = HashMap::new();
        for (i, r) in routes.iter().enumerate() {
            let key = MatchKey::of(r);
            let earlier = seen.entry(key).or_default();
            for &j in earlier.iter() {
                let other = &routes[j];
                if r.listeners.iter().any(|l| other.listeners.contains(l)) {
                    self.error(
                        spans[i].clone(),
                        format!("route `{}` can never match: route `{}` has the same host, path, methods and headers on the same listener", r.name, other.name),
                        "make the conditions differ (host, path, methods or headers), put them on different listeners, or remove one",
                    );
                    break;
                }
            }
            earlier.push(i);
        }
    }
}

struct Names<'a> {
    listeners: Vec<&'a str>,
    upstreams: Vec<&'a str>,
    rate_limits: Vec<&'a str>,
    policies: Vec<&'a str>,
}

#[derive(PartialEq, Eq, Hash)]
struct MatchKey {
    host: Option<HostMatch>,
    path: Option<(&'static str, String)>,
    methods: Vec<String>,
    headers: Vec<(String, Vec<u8>)>,
}

impl MatchKey {
    fn of(r: &Route) -> Self {
        MatchKey {
            host: r.host.clone(),
            path: r.path.as_ref().map(|p| {
                let (k, v) = p.describe();
                (k, v.to_string())
            }),
            methods: r.methods.iter().map(|m| m.to_string()).collect(),
            headers: r
                .headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
                .collect(),
        }
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Two binds conflict when they share a port and either is the wildcard address
/// of the same family, or both are the same address.
fn binds_conflict(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// What an endpoint's `HOST:PORT` is: an address, or a name to look up
/// (with its port).
enum Target {
    Address(SocketAddr),
    Name(u16),
}

fn target(addr: &str) -> Result<Target, String> {
    if let Ok(a) = addr.parse::<SocketAddr>() {
        return if a.port() == 0 {
            Err("port 0 is not a port to connect to".to_string())
        } else {
            Ok(Target::Address(a))
        };
    }
    let Some((host, port)) = addr.rsplit_once(':') else {
        return Err("missing `:PORT`".to_string());
    };
    if host.is_empty() {
        return Err("missing host".to_string());
    }
    let port = match port.parse::<u16>() {
        Ok(p) if p != 0 => p,
        _ => return Err(format!("`{port}` is not a port (1-65535)")),
    };
    if host.contains('/') || host.contains(' ') {
        return Err("not a host name (no scheme or path allowed)".to_string());
    }
    Ok(Target::Name(port))
}

/// An endpoint that cannot be used, in the message every such error has.
pub(super) fn endpoint_error(addr: &str, why: &str) -> String {
    format!("endpoint \"{addr}\": {why}")
}

pub(super) const ENDPOINT_FIX: &str =
    "write HOST:PORT with a resolvable host, e.g. \"127.0.0.1:9001\" or \"app.internal:8080\"";

/// A size as written: bytes, or a number with a binary unit (`"64KiB"`,
/// `"1 MiB"`, `"512B"`).
pub(crate) fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().ok()?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        _ => return None,
    };
    number.checked_mul(scale)
}

/// A short, stable fingerprint of the file's text (FNV-1a, 64 bits).
fn hash_text(src: &str) -> String {
    let hash = src.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{hash:016x}")
}

/// Remove the key whose span is `span`, searching nested tables.
fn remove_key_at(value: &mut DeValue<'_>, span: &Range<usize>) -> bool {
    match value {
        DeValue::Table(t) => {
            if t.keys().any(|k| k.span() == *span) {
                *t = std::mem::take(t)
                    .into_iter()
                    .filter(|(k, _)| k.span() != *span)
                    .collect();
                return true;
            }
            t.iter_mut().any(|(_, v)| remove_key_at(v.get_mut(), span))
        }
        DeValue::Array(a) => a.iter_mut().any(|v| remove_key_at(v.get_mut(), span)),
        _ => false,
    }
}

/// The name of the key (at any depth of tables) whose value is at `span`.
fn key_with_value_at(value: &DeValue<'_>, span: &Range<usize>) -> Option<String> {
    let DeValue::Table(t) = value else {
        return None;
    };
    t.iter().find_map(|(k, v)| {
        if v.span() == *span {
            Some(k.get_ref().to_string())
        } else {
            key_with_value_at(v.get_ref(), span)
        }
    })
}

/// Remove the key (at any depth of tables) whose value is at `span`; its
/// name. Values in arrays are left: without them the array could be wrong
/// in a new way.
fn remove_key_with_value_at(value: &mut DeValue<'_>, span: &Range<usize>) -> Option<String> {
    let DeValue::Table(t) = value else {
        return None;
    };
    if let Some(key) = t
        .iter()
        .find(|(_, v)| v.span() == *span)
        .map(|(k, _)| k.get_ref().to_string())
    {
        *t = std::mem::take(t)
            .into_iter()
            .filter(|(_, v)| v.span() != *span)
            .collect();
        return Some(key);
    }
    t.iter_mut()
        .find_map(|(_, v)| remove_key_with_value_at(v.get_mut(), span))
}

/// Closest candidate by edit distance, when it is close enough to be a typo.
pub(crate) fn suggest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (strsim::damerau_levenshtein(word, c), *c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn unknown_name_fix(kind: &str, name: &str, known: &[&str]) -> String {
    match suggest(name, known) {
        Some(s) => format!("did you mean `{s}`? Otherwise define [{kind}s.{name}]"),
        None if known.is_empty() => format!("define [{kind}s.{name}]"),
        None => format!(
            "define [{kind}s.{name}] or use one of: {}",
            known.join(", ")
        ),
    }
}

/// Reword serde's messages for people editing a file, and suggest a fix.
fn explain_serde_error(msg: &str, key: Option<&str>) -> (String, String) {
    let msg = msg.trim();
    if let Some(rest) = msg.strip_prefix("unknown field `") {
        if let Some((field, expected)) = rest.split_once("`, expected ") {
            let known: Vec<&str> = expected
                .trim_start_matches("one of ")
                .split(", ")
                .map(|s| s.trim_matches('`'))
                .collect();
            let fix = match suggest(field, &known) {
                Some(s) => format!("did you mean `{s}`?"),
                None => format!("remove it; allowed keys: {}", known.join(", ")),
            };
            return (format!("unknown key `{field}`"), fix);
        }
        if let Some((field, _)) = rest.split_once('`') {
            return (
                format!("unknown key `{field}`"),
                "remove it; this table takes no keys".to_string(),
            );
        }
    }
    if let Some(rest) = msg.strip_prefix("missing field `") {
        let field = rest.trim_end_matches('`');
        return (
            format!("missing required key `{field}`"),
            format!("add `{field} = ...`; see docs/config.md"),
        );
    }
    if let Some((found, expected)) = msg
        .strip_prefix("invalid type: ")
        .and_then(|rest| rest.split_once(", expected "))
    {
        return explain_type(key, found, expected);
    }
    (
        msg.to_string(),
        "see docs/config.md for this key".to_string(),
    )
}

/// "invalid type: integer `30`, expected a string" in the config's words:
/// what the key takes, what it got, and the line rewritten as it should be.
fn explain_type(key: Option<&str>, found: &str, expected: &str) -> (String, String) {
    // serde writes the value it found as `integer `30``, `string "4"`,
    // `boolean `true``, or only the kind (`sequence`, `map`).
    let (kind, literal) = match found.split_once(' ') {
        Some((kind, lit)) => (kind, lit.trim_matches(|c| c == '`' || c == '"')),
        None => (found, ""),
    };
    let got = match kind {
        "integer" | "floating" => format!("the number {literal}"),
        "string" => format!("the string \"{literal}\""),
        "boolean" => format!("`{literal}`"),
        "sequence" => "a list".to_string(),
        "map" => "a table".to_string(),
        _ => found.to_string(),
    };
    let k = key.unwrap_or("this key");
    let (wanted, fix) = match expected {
        e if e.starts_with(super::raw::EXPECTED_DURATION) => (
            "a duration with a unit, in quotes".to_string(),
            match kind {
                "integer" | "floating" => {
                    format!("write {k} = \"{literal}s\" (a duration needs a unit: ms, s, m or h)")
                }
                _ => format!("write a duration such as {k} = \"30s\" or \"500ms\""),
            },
        ),
        "a string" => (
            "a string, in quotes".to_string(),
            if literal.is_empty() {
                format!("write {k} = \"...\"")
            } else {
                format!("put the value in quotes: {k} = \"{literal}\"")
            },
        ),
        "i64" | "i32" | "u64" | "u32" | "u16" | "u8" | "usize" => (
            "a whole number".to_string(),
            match literal.trim().parse::<i64>() {
                Ok(n) if kind == "string" => format!("write {k} = {n}, without quotes"),
                _ => format!("write a whole number without quotes, e.g. {k} = 4"),
            },
        ),
        "f64" | "f32" => (
            "a number".to_string(),
            format!("write a number without quotes, e.g. {k} = 0.5"),
        ),
        "a boolean" => (
            "true or false".to_string(),
            format!("write {k} = true or {k} = false, without quotes"),
        ),
        "a sequence" => (
            "a list".to_string(),
            if kind == "string" {
                format!("write it in brackets: {k} = [\"{literal}\"]")
            } else {
                format!("write a list in brackets, e.g. {k} = [\"a\", \"b\"]")
            },
        ),
        e if e.starts_with("struct ") || e == "a map" => (
            "a table".to_string(),
            format!("write {k} = {{ ... }} with the keys docs/config.md lists"),
        ),
        other => (
            other.to_string(),
            "see docs/config.md for this key".to_string(),
        ),
    };
    (format!("`{k}` must be {wanted}, not {got}"), fix)
}
