//! `[rate_limits.NAME]` and `[redis]`.

use super::*;

/// Finest refill interval of a global limit.
const MIN_GLOBAL_INTERVAL: Duration = Duration::from_micros(10);

impl Validator {
    /// `mode` of a rate limit or a policy: enforce (default) or shadow.
    pub(super) fn mode(&mut self, m: Option<&Spanned<String>>) -> LimitMode {
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

    /// A Redis URL meshgate can use (`what` names the key in messages).
    fn redis_url(&mut self, span: Range<usize>, url: &str, what: &str) {
        if let Err(e) = redis::Client::open(url) {
            self.error(
                span,
                format!(
                    "{what} = \"{}\" is not usable: {}",
                    redact_secrets(url),
                    redact_secrets(&e.to_string())
                ),
                "write url = \"redis://127.0.0.1:6379/0\" (or redis://:PASSWORD@host:port/db, rediss:// for TLS, unix:///path/redis.sock)",
            );
        }
    }

    /// `[redis] ca`: a PEM file of CA certificates, read now.
    fn redis_ca(&mut self, ca: &Spanned<String>, tls: bool) -> Option<(PathBuf, Arc<Vec<u8>>)> {
        if !tls {
            self.error(
                ca.span(),
                "redis.ca is set, but Redis is not reached over TLS",
                "use rediss://host:port (TLS) in url or cluster, or remove ca",
            );
            return None;
        }
        let path = self.path(ca);
        let pem = match std::fs::read(&path) {
            Ok(pem) => pem,
            Err(e) => {
                self.error(
                    ca.span(),
                    format!("redis.ca: cannot read {}: {e}", path.display()),
                    "name a PEM file of the CA certificates that sign the Redis server's certificate",
                );
                return None;
            }
        };
        if boring::x509::X509::stack_from_pem(&pem).map_or(true, |certs| certs.is_empty()) {
            self.error(
                ca.span(),
                format!("redis.ca: {} holds no PEM certificate", path.display()),
                "name a PEM file (-----BEGIN CERTIFICATE-----) of the CA certificates",
            );
            return None;
        }
        Some((path, Arc::new(pem)))
    }

    pub(super) fn redis(&mut self, r: RawRedis, at: Range<usize>) -> Option<Redis> {
        let before = self.diags.len();
        let mut url = String::new();
        let mut cluster = Vec::new();
        match (&r.url, &r.cluster) {
            (Some(u), None) => {
                url = u.get_ref().trim().to_string();
                self.redis_url(u.span(), &url, "redis.url");
            }
            (None, Some(nodes)) => {
                if nodes.get_ref().is_empty() {
                    self.error(
                        nodes.span(),
                        "redis.cluster = [] names no node",
                        "list the cluster's nodes (any one will do; more survive one being down), e.g. cluster = [\"redis://10.0.0.1:7000\", \"redis://10.0.0.2:7000\"]",
                    );
                }
                for n in nodes.get_ref() {
                    let node = n.get_ref().trim().to_string();
                    if node.starts_with("unix:") {
                        self.error(
                            n.span(),
                            "redis.cluster has a unix:// socket",
                            "name each node as redis://host:port: cluster nodes tell each other apart by address",
                        );
                    } else {
                        self.redis_url(n.span(), &node, "redis.cluster");
                    }
                    cluster.push(node);
                }
            }
            (Some(u), Some(_)) => self.error(
                u.span(),
                "[redis] has both url and cluster",
                "keep url for one Redis server, or cluster for the nodes of a Redis Cluster",
            ),
            (None, None) => self.error(
                at,
                "[redis] is missing url (or cluster)",
                "add url = \"redis://127.0.0.1:6379/0\" for one Redis server, or cluster = [\"redis://host:7000\", ...] for a Redis Cluster",
            ),
        }
        let tls = [&url]
            .into_iter()
            .chain(&cluster)
            .any(|u| u.starts_with("rediss://") || u.starts_with("valkeys://"));
        let ca = r.ca.as_ref().and_then(|c| self.redis_ca(c, tls));
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
            cluster,
            ca,
            on_error,
            timeout,
            key_prefix,
        })
    }

    pub(super) fn rate_limit(
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
}
