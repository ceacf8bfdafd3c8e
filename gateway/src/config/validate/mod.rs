//! Raw file -> validated model. Every problem is collected (not just the first),
//! each with its byte span and a suggested fix. Each section has its file;
//! this one walks the whole document ([`Validator::build`]) and holds what
//! the sections share.

mod certs;
mod document;
mod egress;
mod listeners;
mod policies;
mod rate_limits;
mod routes;
mod settings;
mod upstreams;

#[cfg(test)]
mod tests;

pub(super) use upstreams::{endpoint_error, ENDPOINT_FIX};

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

const MAX_WEIGHT: i64 = 1_000_000;
/// `retries.attempts`: more than this is a retry storm, not resilience.
const MAX_ATTEMPTS: i64 = 10;
/// Longest duration any key accepts; longer values are typos, and would
/// overflow deadline arithmetic.
const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

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
    let (mut root, syntax) = DeTable::parse_recoverable(src);
    if !syntax.is_empty() {
        let errors = syntax
            .into_iter()
            .map(|e| (e.span(), e.message().to_string()))
            .collect();
        v.diags = super::syntax::diagnostics(src, errors);
        return v.outcome(None);
    }
    // `${VAR}` and `${VAR:-default}` in strings, before anything reads them.
    v.substitute_env(root.get_mut());
    let raw = v.read_sections(root.get_ref());
    let mut config = v.build(raw);
    config.source_hash = hash_text(src);
    v.outcome(Some(config))
}

/// The document of `src` (known to be valid) with `${VAR}` replaced, for
/// showing the effective config.
pub fn substituted(src: &str) -> Option<DeTable<'_>> {
    let (mut root, syntax) = DeTable::parse_recoverable(src);
    if !syntax.is_empty() {
        return None;
    }
    Validator::default().substitute_env(root.get_mut());
    Some(root.into_inner())
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
    /// Where `[redis]` is named.
    redis_at: Range<usize>,
    certs: Vec<(Spanned<String>, RawCert)>,
    policies: Vec<(Spanned<String>, RawPolicy)>,
    /// `[egress]` and the span of its key.
    egress: Option<(Range<usize>, Option<RawEgress>)>,
    resolver: Option<RawResolver>,
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
        let redis_at = raw.redis_at.clone();
        let redis = raw.redis.and_then(|r| self.redis(r, redis_at));
        let resolver = raw.resolver.map(|r| self.resolver(r)).unwrap_or_default();
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
            h2_upstreams: upstreams
                .iter()
                .filter(|u| u.protocol != UpstreamProtocol::Http1)
                .map(|u| u.name.as_str())
                .collect(),
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
            resolver,
            source_hash: String::new(),
            warnings: Vec::new(),
        }
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

    /// A path as written, resolved against the config's directory.
    fn path(&self, p: &Spanned<String>) -> PathBuf {
        let path = Path::new(p.get_ref().trim());
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.base_dir.join(path)
        }
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
}

struct Names<'a> {
    listeners: Vec<&'a str>,
    upstreams: Vec<&'a str>,
    /// Upstreams that speak HTTP/2 (`h2`, `h2c`).
    h2_upstreams: Vec<&'a str>,
    rate_limits: Vec<&'a str>,
    policies: Vec<&'a str>,
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A short, stable fingerprint of the file's text (FNV-1a, 64 bits).
fn hash_text(src: &str) -> String {
    let hash = src.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{hash:016x}")
}

/// Closest candidate by edit distance, when it is close enough to be a typo.
fn suggest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (strsim::damerau_levenshtein(word, c), *c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

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
