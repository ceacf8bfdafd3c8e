//! `[upstreams.NAME]`: endpoints (checked in form, looked up later by the
//! loader) and client TLS.

use super::*;

const MAX_CONNECT_RETRIES: i64 = 10;
const MAX_CONSECUTIVE_FAILURES: i64 = 1000;

impl Validator {
    pub(super) fn upstream(&mut self, name: Spanned<String>, u: RawUpstream) -> Option<Upstream> {
        let n = name.get_ref().clone();
        let discovery = match u.discovery.as_ref().map(|d| (d, d.get_ref().as_str())) {
            None | Some((_, "static")) => Discovery::Static,
            Some((_, "dns")) => Discovery::Dns,
            Some((_, "srv")) => Discovery::Srv,
            Some((d, other)) => {
                self.error(
                    d.span(),
                    format!("unknown upstreams.{n}.discovery \"{other}\""),
                    "use \"static\" (looked up once, at load), \"dns\" (A/AAAA looked up again at their TTL) or \"srv\" (SRV records)",
                );
                Discovery::Static
            }
        };
        let mut endpoints = Vec::new();
        if u.endpoints.get_ref().is_empty() {
            self.error(
                u.endpoints.span(),
                format!("upstream `{n}` has no endpoints"),
                "list at least one, e.g. endpoints = [\"127.0.0.1:9001\"]",
            );
        }
        for e in u.endpoints.get_ref() {
            if let Some(ep) = self.endpoint(e, &n, endpoints.len(), discovery) {
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
        let connect_retries = match &u.connect_retries {
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
        let outlier = self.outlier(&n, u.outlier.as_ref());
        let load_balancing = self.load_balancing(&n, &u);
        let slow_start = u
            .slow_start
            .as_ref()
            .map(|d| self.duration_or(Some(d), &key("slow_start"), Duration::ZERO, true))
            .filter(|d| !d.is_zero());
        if let (Some(d), LoadBalancing::ConsistentHash(_)) = (&u.slow_start, &load_balancing) {
            self.error(
                d.span(),
                format!("{} is set, but load_balancing = \"consistent_hash\" sends each key to its own endpoint", key("slow_start")),
                "remove slow_start, or use another load_balancing (round_robin, least_request, ewma, random)",
            );
        }
        let panic_threshold = match &u.panic_threshold {
            None => 0,
            Some(p) if (0..=100).contains(p.get_ref()) => *p.get_ref() as u8,
            Some(p) => {
                self.error(
                    p.span(),
                    format!("{} = {} is out of range", key("panic_threshold"), p.get_ref()),
                    "use a percentage, 0..=100: below this share of usable endpoints, all of them get requests",
                );
                0
            }
        };
        let health_check = u
            .health_check
            .as_ref()
            .and_then(|h| self.health_check(&n, h, protocol));
        let retry_budget = self.retry_budget(&n, u.retry_budget.as_ref());
        let limits = self.upstream_limits(&n, u.limits.as_ref(), protocol);
        let adaptive_concurrency = match u.concurrency.as_ref().map(|c| (c, c.get_ref().as_str())) {
            None | Some((_, "off")) => false,
            Some((_, "adaptive")) => true,
            Some((c, other)) => {
                self.error(
                    c.span(),
                    format!("unknown upstreams.{n}.concurrency \"{other}\""),
                    "use \"adaptive\" (the in-flight limit follows latency) or \"off\" (the default; limits.max_requests still holds)",
                );
                false
            }
        };
        Some(Upstream {
            adaptive_concurrency,
            limits,
            retry_budget,
            name: n,
            endpoints,
            protocol,
            connect_timeout,
            read_timeout,
            write_timeout,
            idle_timeout,
            connect_retries,
            tls,
            outlier,
            load_balancing,
            slow_start,
            panic_threshold,
            health_check,
            discovery,
        })
    }

    /// `limits = { ... }`.
    fn upstream_limits(
        &mut self,
        upstream: &str,
        l: Option<&Spanned<RawUpstreamLimits>>,
        protocol: UpstreamProtocol,
    ) -> UpstreamLimits {
        let defaults = UpstreamLimits::default();
        let Some(l) = l.map(Spanned::get_ref) else {
            return defaults;
        };
        let key = |k: &str| format!("upstreams.{upstream}.limits.{k}");
        let count =
            |this: &mut Self, v: Option<&Spanned<i64>>, name: &str, min: i64, default: u32| match v
            {
                None => default,
                Some(v) if (min..=1_000_000).contains(v.get_ref()) => *v.get_ref() as u32,
                Some(v) => {
                    this.error(
                        v.span(),
                        format!("{} = {} is out of range", key(name), v.get_ref()),
                        format!("use {min}..=1000000"),
                    );
                    default
                }
            };
        let max_requests = count(
            self,
            l.max_requests.as_ref(),
            "max_requests",
            1,
            defaults.max_requests,
        );
        let max_pending = count(
            self,
            l.max_pending.as_ref(),
            "max_pending",
            0,
            defaults.max_pending,
        );
        let max_connections = l
            .max_connections
            .as_ref()
            .map(|c| count(self, Some(c), "max_connections", 1, 1));
        if let (Some(c), true) = (&l.max_connections, protocol != UpstreamProtocol::Http1) {
            self.error(
                c.span(),
                format!("{} is for HTTP/1.1 upstreams, and this one speaks HTTP/2", key("max_connections")),
                "remove it: an HTTP/2 upstream carries up to 128 requests on each connection; bound them with max_requests",
            );
        }
        if let (Some(p), None, None) = (&l.max_pending, &l.max_requests, &l.max_connections) {
            self.error(
                p.span(),
                format!("{} is set without max_requests or max_connections", key("max_pending")),
                "set max_requests (or max_connections) too: requests wait only once one of them is reached",
            );
        }
        let queue_timeout = self.duration_or(
            l.queue_timeout.as_ref(),
            &key("queue_timeout"),
            defaults.queue_timeout,
            true,
        );
        UpstreamLimits {
            max_connections,
            max_requests,
            max_pending,
            queue_timeout,
        }
    }

    /// `retry_budget`: on with its defaults unless `false`.
    fn retry_budget(
        &mut self,
        upstream: &str,
        b: Option<&Spanned<RawToggle<RawRetryBudget>>>,
    ) -> Option<RetryBudget> {
        let defaults = RetryBudget::default();
        let t = match b.map(Spanned::get_ref) {
            None | Some(RawToggle::Enabled(true)) => return Some(defaults),
            Some(RawToggle::Enabled(false)) => return None,
            Some(RawToggle::Table(t)) => t,
        };
        let key = |k: &str| format!("upstreams.{upstream}.retry_budget.{k}");
        let ratio = match &t.ratio {
            None => defaults.ratio,
            Some(r) if (0.0..=10.0).contains(r.get_ref()) => *r.get_ref(),
            Some(r) => {
                self.error(
                    r.span(),
                    format!("{} = {} is out of range", key("ratio"), r.get_ref()),
                    "use 0.0..=10.0: retries may add this share of the upstream's requests (0.2: 20%)",
                );
                defaults.ratio
            }
        };
        let min_per_second = match &t.min_per_second {
            None => defaults.min_per_second,
            Some(m) if (0..=100_000).contains(m.get_ref()) => *m.get_ref() as u32,
            Some(m) => {
                self.error(
                    m.span(),
                    format!(
                        "{} = {} is out of range",
                        key("min_per_second"),
                        m.get_ref()
                    ),
                    "use 0..=100000: retries allowed per second whatever the traffic",
                );
                defaults.min_per_second
            }
        };
        Some(RetryBudget {
            ratio,
            min_per_second,
        })
    }

    /// `health_check = { ... }`.
    fn health_check(
        &mut self,
        upstream: &str,
        h: &Spanned<RawHealthCheck>,
        protocol: UpstreamProtocol,
    ) -> Option<HealthCheck> {
        let raw = h.get_ref();
        let key = |k: &str| format!("upstreams.{upstream}.health_check.{k}");
        let mut ok = true;
        let kind = match raw.kind.as_ref().map(|k| (k, k.get_ref().as_str())) {
            None | Some((_, "http")) => HealthCheckKind::Http,
            Some((_, "tcp")) => HealthCheckKind::Tcp,
            Some((k, "grpc")) => {
                if protocol == UpstreamProtocol::Http1 {
                    self.error(
                        k.span(),
                        format!("{} = \"grpc\" needs HTTP/2, but upstream `{upstream}` speaks protocol = \"http1\"", key("kind")),
                        "set protocol = \"h2c\" (or \"h2\" with tls) on the upstream, as gRPC servers need, or use kind = \"http\"",
                    );
                    ok = false;
                }
                HealthCheckKind::Grpc
            }
            Some((k, other)) => {
                self.error(
                    k.span(),
                    format!("unknown {} \"{other}\"", key("kind")),
                    "use \"http\" (default), \"tcp\" (connect only) or \"grpc\" (grpc.health.v1)",
                );
                return None;
            }
        };
        let only_http = |this: &mut Self, span: Option<std::ops::Range<usize>>, name: &str| {
            if let Some(span) = span {
                this.error(
                    span,
                    format!(
                        "{} is set, but kind = \"{}\" does not use it",
                        key(name),
                        kind.as_str()
                    ),
                    format!("remove {name}, or use kind = \"http\""),
                );
                false
            } else {
                true
            }
        };
        if kind != HealthCheckKind::Http {
            ok &= only_http(self, raw.path.as_ref().map(Spanned::span), "path");
            ok &= only_http(
                self,
                raw.expect_status.as_ref().map(Spanned::span),
                "expect_status",
            );
        }
        if kind == HealthCheckKind::Tcp {
            ok &= only_http(self, raw.host.as_ref().map(Spanned::span), "host");
        }
        let path = match &raw.path {
            None => "/".to_string(),
            Some(p)
                if p.get_ref().starts_with('/')
                    && http::uri::PathAndQuery::try_from(p.get_ref().as_str()).is_ok() =>
            {
                p.get_ref().clone()
            }
            Some(p) => {
                self.error(
                    p.span(),
                    format!("{} = \"{}\" is not a path", key("path"), p.get_ref()),
                    "write a path starting with /, e.g. path = \"/healthz\"",
                );
                ok = false;
                String::new()
            }
        };
        let host = match &raw.host {
            None => None,
            Some(h)
                if !h.get_ref().is_empty()
                    && HeaderValue::from_str(h.get_ref()).is_ok()
                    && !h.get_ref().contains(char::is_whitespace) =>
            {
                Some(h.get_ref().clone())
            }
            Some(h) => {
                self.error(
                    h.span(),
                    format!("{} = \"{}\" is not a host name", key("host"), h.get_ref()),
                    "write the Host the endpoints expect, e.g. host = \"api.internal\"",
                );
                ok = false;
                None
            }
        };
        let mut expect_status = Vec::new();
        for s in raw.expect_status.iter().flat_map(|l| l.get_ref()) {
            match u16::try_from(*s.get_ref()) {
                Ok(code) if (100..=599).contains(&code) => expect_status.push(code),
                _ => {
                    self.error(
                        s.span(),
                        format!("{} has {}, which is not an HTTP status", key("expect_status"), s.get_ref()),
                        "list statuses 100..=599, e.g. expect_status = [200, 204]; leave it out for any 2xx or 3xx",
                    );
                    ok = false;
                }
            }
        }
        if let Some(l) = raw
            .expect_status
            .as_ref()
            .filter(|l| l.get_ref().is_empty())
        {
            self.error(
                l.span(),
                format!("{} is empty: no answer would pass", key("expect_status")),
                "list the passing statuses, or leave it out for any 2xx or 3xx",
            );
            ok = false;
        }
        let interval = self.duration_or(
            raw.interval.as_ref(),
            &key("interval"),
            HealthCheck::DEFAULT_INTERVAL,
            false,
        );
        let timeout = self.duration_or(
            raw.timeout.as_ref(),
            &key("timeout"),
            HealthCheck::DEFAULT_TIMEOUT.min(interval),
            false,
        );
        if timeout >= interval {
            let span = raw
                .timeout
                .as_ref()
                .map(Spanned::span)
                .or(raw.interval.as_ref().map(Spanned::span))
                .unwrap_or_else(|| h.span());
            self.error(
                span,
                format!(
                    "{} ({}) is not shorter than interval ({})",
                    key("timeout"),
                    humantime::format_duration(timeout),
                    humantime::format_duration(interval)
                ),
                "make timeout shorter than interval: a check must end before the next one starts",
            );
            ok = false;
        }
        let mut threshold =
            |this: &mut Self, v: Option<&Spanned<i64>>, name: &str, default: u32| match v {
                None => default,
                Some(v) if (1..=100).contains(v.get_ref()) => *v.get_ref() as u32,
                Some(v) => {
                    this.error(
                        v.span(),
                        format!("{} = {} is out of range", key(name), v.get_ref()),
                        format!(
                        "use 1..=100: how many checks in a row decide that an endpoint is {name}"
                    ),
                    );
                    ok = false;
                    default
                }
            };
        let healthy = threshold(
            self,
            raw.healthy.as_ref(),
            "healthy",
            HealthCheck::DEFAULT_HEALTHY,
        );
        let unhealthy = threshold(
            self,
            raw.unhealthy.as_ref(),
            "unhealthy",
            HealthCheck::DEFAULT_UNHEALTHY,
        );
        ok.then_some(HealthCheck {
            kind,
            path,
            host,
            expect_status,
            interval,
            timeout,
            healthy,
            unhealthy,
        })
    }

    /// `load_balancing` and, for `consistent_hash`, its `hash_key`.
    fn load_balancing(&mut self, upstream: &str, u: &RawUpstream) -> LoadBalancing {
        const NAMES: [&str; 5] = [
            "round_robin",
            "least_request",
            "ewma",
            "random",
            "consistent_hash",
        ];
        let key = format!("upstreams.{upstream}.load_balancing");
        let algorithm = u
            .load_balancing
            .as_ref()
            .map_or("round_robin", |l| l.get_ref());
        let hash_key = match (&u.hash_key, algorithm) {
            (Some(h), "consistent_hash") => self.hash_key(upstream, h),
            (Some(h), _) => {
                self.error(
                    h.span(),
                    format!("upstreams.{upstream}.hash_key is set, but {key} = \"{algorithm}\" uses no key"),
                    "set load_balancing = \"consistent_hash\", or remove hash_key",
                );
                None
            }
            (None, "consistent_hash") => {
                self.error(
                    u.load_balancing.as_ref().map_or(0..0, |l| l.span()),
                    format!("{key} = \"consistent_hash\" needs a hash_key"),
                    "add hash_key = \"client_ip\", \"header:NAME\", \"cookie:NAME\" or \"path\"",
                );
                None
            }
            (None, _) => None,
        };
        match algorithm {
            "round_robin" => LoadBalancing::RoundRobin,
            "least_request" => LoadBalancing::LeastRequest,
            "ewma" => LoadBalancing::Ewma,
            "random" => LoadBalancing::Random,
            "consistent_hash" => {
                LoadBalancing::ConsistentHash(hash_key.unwrap_or(HashKey::ClientIp))
            }
            other => {
                let hint = suggest(other, &NAMES)
                    .map(|s| format!("did you mean \"{s}\"? "))
                    .unwrap_or_default();
                self.error(
                    u.load_balancing.as_ref().map_or(0..0, |l| l.span()),
                    format!("unknown {key} \"{other}\""),
                    format!(
                        "{hint}use one of {}",
                        NAMES.map(|n| format!("\"{n}\"")).join(", ")
                    ),
                );
                LoadBalancing::RoundRobin
            }
        }
    }

    fn hash_key(&mut self, upstream: &str, h: &Spanned<String>) -> Option<HashKey> {
        let text = h.get_ref().as_str();
        let named = |prefix: &str| text.strip_prefix(prefix).filter(|n| !n.is_empty());
        let key = match text {
            "client_ip" => Some(HashKey::ClientIp),
            "path" => Some(HashKey::Path),
            _ => {
                if let Some(name) = named("header:") {
                    http::HeaderName::from_bytes(name.as_bytes())
                        .ok()
                        .map(HashKey::Header)
                } else {
                    named("cookie:")
                        .filter(|n| {
                            n.bytes()
                                .all(|b| b.is_ascii_graphic() && !b"=;,".contains(&b))
                        })
                        .map(|n| HashKey::Cookie(n.to_string()))
                }
            }
        };
        if key.is_none() {
            self.error(
                h.span(),
                format!("upstreams.{upstream}.hash_key = \"{text}\" is not a key meshgate knows"),
                "use \"client_ip\", \"path\", \"header:NAME\" (e.g. \"header:x-user\") or \"cookie:NAME\"",
            );
        }
        key
    }

    /// `outlier`: on with its defaults unless `false`.
    fn outlier(
        &mut self,
        upstream: &str,
        o: Option<&Spanned<RawOutlier>>,
    ) -> Option<OutlierDetection> {
        let defaults = OutlierDetection::default();
        let t = match o.map(Spanned::get_ref) {
            None | Some(RawOutlier::Enabled(true)) => return Some(defaults),
            Some(RawOutlier::Enabled(false)) => return None,
            Some(RawOutlier::Table(t)) => t,
        };
        let key = |k: &str| format!("upstreams.{upstream}.outlier.{k}");
        let consecutive_failures = match &t.consecutive_failures {
            None => defaults.consecutive_failures,
            Some(c) if (1..=MAX_CONSECUTIVE_FAILURES).contains(c.get_ref()) => *c.get_ref() as u32,
            Some(c) => {
                self.error(
                    c.span(),
                    format!(
                        "{} = {} is out of range",
                        key("consecutive_failures"),
                        c.get_ref()
                    ),
                    format!(
                        "use 1..={MAX_CONSECUTIVE_FAILURES}, or outlier = false to never eject"
                    ),
                );
                defaults.consecutive_failures
            }
        };
        let base_ejection = self.duration_or(
            t.base_ejection.as_ref(),
            &key("base_ejection"),
            defaults.base_ejection,
            false,
        );
        let max_ejection = self.duration_or(
            t.max_ejection.as_ref(),
            &key("max_ejection"),
            defaults.max_ejection.max(base_ejection),
            false,
        );
        if let Some(m) = t
            .max_ejection
            .as_ref()
            .filter(|_| max_ejection < base_ejection)
        {
            self.error(
                m.span(),
                format!(
                    "{} = \"{}\" is shorter than base_ejection ({})",
                    key("max_ejection"),
                    m.get_ref(),
                    humantime::format_duration(base_ejection)
                ),
                "make max_ejection at least base_ejection: ejections double from base_ejection up to it",
            );
        }
        let max_ejected_percent = match &t.max_ejected_percent {
            None => defaults.max_ejected_percent,
            Some(p) if (0..=100).contains(p.get_ref()) => *p.get_ref() as u8,
            Some(p) => {
                self.error(
                    p.span(),
                    format!(
                        "{} = {} is out of range",
                        key("max_ejected_percent"),
                        p.get_ref()
                    ),
                    "use a percentage, 0..=100 (one endpoint may always be ejected)",
                );
                defaults.max_ejected_percent
            }
        };
        Some(OutlierDetection {
            consecutive_failures,
            base_ejection,
            max_ejection,
            max_ejected_percent,
        })
    }

    pub(super) fn upstream_tls(
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
    pub(super) fn endpoint(
        &mut self,
        e: &Spanned<toml::Value>,
        upstream: &str,
        index: usize,
        discovery: Discovery,
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
        if discovery == Discovery::Srv {
            if let Err(why) = srv_name(&addr) {
                self.error(
                    e.span(),
                    format!("endpoint \"{addr}\" is not an SRV name: {why}"),
                    "under discovery = \"srv\" each endpoint is an SRV name such as \"_http._tcp.api.service.consul\" (no port: the records give it)",
                );
                return None;
            }
            return Some(Endpoint {
                addr,
                sockets: Vec::new(),
                weight,
            });
        }
        let address = match target(&addr) {
            Ok(Target::Address(socket)) => Some(socket),
            // Until the loader (static) or discovery (dns) has looked it up.
            Ok(Target::Name) => None,
            Err(why) => {
                self.error(e.span(), endpoint_error(&addr, &why), ENDPOINT_FIX);
                return None;
            }
        };
        // `dns` names are looked up while running, never by `check`.
        if discovery == Discovery::Static || address.is_some() {
            self.lookups.push(Lookup {
                span: e.span(),
                upstream: upstream.to_string(),
                index,
                addr: addr.clone(),
                address,
            });
        }
        Some(Endpoint {
            addr,
            sockets: address.into_iter().collect(),
            weight,
        })
    }
}

impl Validator {
    /// `[resolver]`.
    pub(super) fn resolver(&mut self, r: RawResolver) -> Resolver {
        let defaults = Resolver::default();
        let mut nameservers = Vec::new();
        for ns in r.nameservers.iter().flat_map(|l| l.get_ref()) {
            let text = ns.get_ref();
            let parsed = text.parse::<SocketAddr>().ok().or_else(|| {
                text.parse::<std::net::IpAddr>()
                    .ok()
                    .map(|ip| SocketAddr::new(ip, 53))
            });
            match parsed {
                Some(a) if a.port() != 0 => nameservers.push(a),
                _ => self.error(
                    ns.span(),
                    format!("resolver.nameservers has \"{text}\", which is not an IP address (with an optional port)"),
                    "write \"10.0.0.2\" (port 53) or \"127.0.0.1:5353\"; names cannot be looked up before there is a resolver",
                ),
            }
        }
        if let Some(l) = r.nameservers.as_ref().filter(|l| l.get_ref().is_empty()) {
            self.error(
                l.span(),
                "resolver.nameservers is empty",
                "list at least one, or remove the key to use the system's (/etc/resolv.conf)",
            );
        }
        let timeout = self.duration_or(
            r.timeout.as_ref(),
            "resolver.timeout",
            defaults.timeout,
            false,
        );
        let min_ttl = self.duration_or(
            r.min_ttl.as_ref(),
            "resolver.min_ttl",
            defaults.min_ttl,
            false,
        );
        let max_ttl = self.duration_or(
            r.max_ttl.as_ref(),
            "resolver.max_ttl",
            defaults.max_ttl.max(min_ttl),
            false,
        );
        if let Some(m) = r.max_ttl.as_ref().filter(|_| max_ttl < min_ttl) {
            self.error(
                m.span(),
                format!(
                    "resolver.max_ttl ({}) is shorter than min_ttl ({})",
                    humantime::format_duration(max_ttl),
                    humantime::format_duration(min_ttl)
                ),
                "answers are refreshed at their TTL clamped to [min_ttl, max_ttl]: make max_ttl at least min_ttl",
            );
        }
        Resolver {
            nameservers,
            timeout,
            min_ttl,
            max_ttl,
        }
    }
}

/// Why `name` is not an SRV name (`_service._proto.domain`), if it is not.
fn srv_name(name: &str) -> Result<(), String> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.contains(':') {
        return Err("it has a port".into());
    }
    let labels: Vec<&str> = name.split('.').collect();
    if labels.len() < 3 {
        return Err("it needs at least three labels, `_service._proto.domain`".into());
    }
    let ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if let Some(bad) = labels.iter().find(|l| !ok(l)) {
        return Err(format!("`{bad}` is not a DNS label"));
    }
    Ok(())
}

/// What an endpoint's `HOST:PORT` is: an address, or a name to look up
/// (with its port).
pub(super) enum Target {
    Address(SocketAddr),
    Name,
}

pub(super) fn target(addr: &str) -> Result<Target, String> {
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
    if !matches!(port.parse::<u16>(), Ok(p) if p != 0) {
        return Err(format!("`{port}` is not a port (1-65535)"));
    }
    if host.contains('/') || host.contains(' ') {
        return Err("not a host name (no scheme or path allowed)".to_string());
    }
    Ok(Target::Name)
}

/// An endpoint that cannot be used, in the message every such error has.
pub(in crate::config) fn endpoint_error(addr: &str, why: &str) -> String {
    format!("endpoint \"{addr}\": {why}")
}

pub(in crate::config) const ENDPOINT_FIX: &str =
    "write HOST:PORT with a resolvable host, e.g. \"127.0.0.1:9001\" or \"app.internal:8080\"";
