//! `[routes.NAME]`: match conditions, header rewrites and the action.

use super::*;

const REDIRECT_STATUSES: &[u16] = &[301, 302, 303, 307, 308];
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

impl Validator {
    pub(super) fn route(
        &mut self,
        name: Spanned<String>,
        r: RawRoute,
        names: &Names<'_>,
    ) -> Option<Route> {
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
        let retries = self.retries(&n, r.retries.as_ref(), timeout)?;
        let hedge = match r.hedge.as_ref() {
            None => None,
            Some(h) => Some(self.hedge(&n, h, &r, timeout, retries.as_ref(), names)?),
        };
        Some(Route {
            retries,
            hedge,
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

    /// A route's list of `[section]` names, deduplicated; unknown ones are
    /// errors with a "did you mean".
    pub(super) fn references(
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

    pub(super) fn policy(&mut self, name: Spanned<String>, p: RawPolicy) -> Option<AuthzPolicy> {
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

    pub(super) fn host(&mut self, h: &Spanned<String>) -> Option<HostMatch> {
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

    pub(super) fn path_match(&mut self, n: &str, r: &RawRoute) -> Option<PathMatch> {
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

    pub(super) fn abs_path(&mut self, p: &Spanned<String>, key: &str) -> bool {
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

    /// `retries`: on with the defaults unless `false`. `None` (outer) when
    /// it has errors.
    fn retries(
        &mut self,
        route: &str,
        r: Option<&Spanned<RawToggle<RawRetries>>>,
        timeout: Duration,
    ) -> Option<Option<RetryPolicy>> {
        let defaults = RetryPolicy::default();
        let t = match r.map(Spanned::get_ref) {
            None | Some(RawToggle::Enabled(true)) => return Some(Some(defaults)),
            Some(RawToggle::Enabled(false)) => return Some(None),
            Some(RawToggle::Table(t)) => t,
        };
        let before = self.diags.len();
        let key = |k: &str| format!("routes.{route}.retries.{k}");
        let attempts = match &t.attempts {
            None => defaults.attempts,
            Some(a) if (1..=MAX_ATTEMPTS).contains(a.get_ref()) => *a.get_ref() as u32,
            Some(a) => {
                self.error(
                    a.span(),
                    format!("{} = {} is out of range", key("attempts"), a.get_ref()),
                    format!("use 1..={MAX_ATTEMPTS} (attempts in all, the first included), or retries = false"),
                );
                defaults.attempts
            }
        };
        let on = match &t.on {
            None => defaults.on.clone(),
            Some(list) => {
                let mut on = RetryOn::default();
                for c in list.get_ref() {
                    match c.get_ref().as_str() {
                        "connect-failure" => on.connect_failure = true,
                        "reset" => on.reset = true,
                        "timeout" => on.timeout = true,
                        "5xx" => on.statuses.extend(500..=599),
                        code => match code.parse::<u16>() {
                            Ok(status) if (500..=599).contains(&status) => on.statuses.push(status),
                            _ => self.error(
                                c.span(),
                                format!("{} has \"{code}\", which meshgate does not retry on", key("on")),
                                "use \"connect-failure\", \"reset\", \"timeout\", \"5xx\" or a status 500..599 such as \"503\"",
                            ),
                        },
                    }
                }
                on.statuses.sort_unstable();
                on.statuses.dedup();
                on
            }
        };
        let per_try_timeout = t.per_try_timeout.as_ref().map(|p| {
            let d = self.duration_or(Some(p), &key("per_try_timeout"), timeout, false);
            if d >= timeout {
                self.error(
                    p.span(),
                    format!(
                        "{} ({}) is not shorter than the route's timeout ({})",
                        key("per_try_timeout"),
                        humantime::format_duration(d),
                        humantime::format_duration(timeout)
                    ),
                    "make per_try_timeout shorter than timeout: the route's timeout is the deadline over all attempts",
                );
            }
            d
        });
        let backoff = self.duration_or(t.backoff.as_ref(), &key("backoff"), defaults.backoff, true);
        let max_backoff = self.duration_or(
            t.max_backoff.as_ref(),
            &key("max_backoff"),
            defaults.max_backoff.max(backoff),
            true,
        );
        if let Some(m) = t.max_backoff.as_ref().filter(|_| max_backoff < backoff) {
            self.error(
                m.span(),
                format!("{} is shorter than backoff", key("max_backoff")),
                "make max_backoff at least backoff: waits grow from backoff up to max_backoff",
            );
        }
        let methods = match &t.methods {
            None => defaults.methods.clone(),
            Some(ms) => self.method_list(ms),
        };
        let body_limit = match &t.body_limit {
            None => defaults.body_limit,
            Some(b) => match parse_size(b.get_ref()) {
                Some(n) if n <= RetryPolicy::MAX_BODY_LIMIT => n,
                Some(_) => {
                    self.error(
                        b.span(),
                        format!("{} = \"{}\" is over 64 KiB", key("body_limit"), b.get_ref()),
                        "use at most \"64KiB\": Pingora keeps that much of a body to replay it",
                    );
                    defaults.body_limit
                }
                None => {
                    self.error(
                        b.span(),
                        format!("{} = \"{}\" is not a size", key("body_limit"), b.get_ref()),
                        "write a size such as \"16KiB\" or \"64KiB\"",
                    );
                    defaults.body_limit
                }
            },
        };
        if self.diags.len() > before {
            return None;
        }
        Some(Some(RetryPolicy {
            attempts,
            on,
            per_try_timeout,
            backoff,
            max_backoff,
            methods,
            body_limit,
        }))
    }

    /// `hedge = { after, max }`; `None` when it has errors.
    fn hedge(
        &mut self,
        route: &str,
        h: &Spanned<RawHedge>,
        r: &RawRoute,
        timeout: Duration,
        retries: Option<&RetryPolicy>,
        names: &Names<'_>,
    ) -> Option<HedgePolicy> {
        let before = self.diags.len();
        let key = |k: &str| format!("routes.{route}.hedge.{k}");
        let t = h.get_ref();
        let after = match &t.after {
            None => {
                self.error(
                    h.span(),
                    format!("routes.{route}.hedge has no `after`"),
                    "say how long the first attempt may go without a response head before a hedge is sent, e.g. hedge = { after = \"150ms\" }",
                );
                Duration::ZERO
            }
            Some(a) => {
                let d = self.duration_or(Some(a), &key("after"), timeout, false);
                if d >= timeout {
                    self.error(
                        a.span(),
                        format!(
                            "{} ({}) is not shorter than the route's timeout ({})",
                            key("after"),
                            humantime::format_duration(d),
                            humantime::format_duration(timeout)
                        ),
                        "make hedge.after shorter than timeout, e.g. the upstream's p95 latency",
                    );
                }
                if let Some(p) = retries.and_then(|p| p.per_try_timeout).filter(|p| d >= *p) {
                    self.error(
                        a.span(),
                        format!(
                            "{} ({}) is not shorter than retries.per_try_timeout ({})",
                            key("after"),
                            humantime::format_duration(d),
                            humantime::format_duration(p)
                        ),
                        "make hedge.after shorter than per_try_timeout: an attempt times out before a hedge would be sent",
                    );
                }
                d
            }
        };
        let max = match &t.max {
            None => 1,
            Some(m) if (1..MAX_ATTEMPTS).contains(m.get_ref()) => *m.get_ref() as u32,
            Some(m) => {
                self.error(
                    m.span(),
                    format!("{} = {} is out of range", key("max"), m.get_ref()),
                    format!(
                        "use 1..={} (hedges sent besides the first attempt)",
                        MAX_ATTEMPTS - 1
                    ),
                );
                1
            }
        };
        // A hedge sends the request twice: only methods safe to repeat.
        let unsafe_methods: Vec<&str> = r
            .methods
            .iter()
            .flat_map(|ms| ms.get_ref())
            .map(|m| m.get_ref().as_str())
            .filter(|m| {
                Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                    .is_ok_and(|m| !m.is_idempotent())
            })
            .collect();
        if !unsafe_methods.is_empty() {
            self.error(
                h.span(),
                format!(
                    "routes.{route}.hedge on a route whose methods include {}",
                    unsafe_methods.join(", ")
                ),
                "hedging sends a request twice: give non-idempotent methods (POST, PATCH) a route of their own without hedge",
            );
        }
        if r.respond.is_some() || r.redirect.is_some() {
            self.error(
                h.span(),
                format!("routes.{route}.hedge on a route that answers by itself"),
                "remove hedge: only a route with an upstream sends attempts",
            );
        }
        let targets = r.upstream.iter().map(|u| u.get_ref().as_str()).chain(
            r.split
                .iter()
                .flat_map(|s| s.get_ref().keys().map(|k| k.get_ref().as_str())),
        );
        for u in targets.filter(|u| names.h2_upstreams.contains(u)) {
            self.error(
                h.span(),
                format!("routes.{route}.hedge: upstream `{u}` speaks HTTP/2, and hedging is for HTTP/1.1 upstreams"),
                "remove hedge from this route (an HTTP/2 upstream's per-try timeout and retries still apply)",
            );
        }
        (self.diags.len() == before).then_some(HedgePolicy { after, max })
    }

    pub(super) fn methods(&mut self, r: &RawRoute) -> Vec<Method> {
        match &r.methods {
            Some(ms) => self.method_list(ms),
            None => Vec::new(),
        }
    }

    pub(super) fn method_list(&mut self, ms: &Spanned<Vec<Spanned<String>>>) -> Vec<Method> {
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

    pub(super) fn match_headers(&mut self, r: &RawRoute) -> Vec<(HeaderName, HeaderValue)> {
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

    pub(super) fn header_pair(
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

    pub(super) fn rewrite(&mut self, h: &Spanned<RawHeaderRewrite>) -> HeaderRewrite {
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

    pub(super) fn action(
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

    pub(super) fn status(
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

    pub(super) fn upstream_ref(
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

    pub(super) fn forward(&mut self, r: &RawRoute, targets: Vec<(String, u32)>) -> Forward {
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

    /// Two routes that share a listener and have identical match conditions can
    /// never be told apart: the later one would never be chosen.
    pub(super) fn check_indistinguishable(&mut self, routes: &[Route], spans: &[Range<usize>]) {
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

#[derive(PartialEq, Eq, Hash)]
pub(super) struct MatchKey {
    host: Option<HostMatch>,
    path: Option<(&'static str, String)>,
    methods: Vec<String>,
    headers: Vec<(String, Vec<u8>)>,
}

impl MatchKey {
    pub(super) fn of(r: &Route) -> Self {
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
