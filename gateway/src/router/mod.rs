//! Route selection: pure, no I/O. One [`RouteTable`] per listener picks the
//! route for a request's host, path, method and headers.
//!
//! Order (documented in docs/config.md, "How a route is chosen"):
//! 1. host: exact host > wildcard (longer suffix first) > any host;
//! 2. path: exact `path` > `path_prefix` (longer first) > `path_regex` > no path condition;
//! 3. more conditions (a `methods` list counts one, each header one) first;
//! 4. file order.
//!
//! The first route in that order whose every condition holds wins, so a request
//! falls through from a host's routes to wildcard and any-host routes.

use std::borrow::Cow;
use std::cmp::Reverse;
use std::collections::HashMap;

use http::{HeaderMap, HeaderName, Method};

use crate::config::model::{HostMatch, PathMatch, Route};

/// The parts of a request that routing looks at.
#[derive(Debug, Clone, Copy)]
pub struct RequestParts<'a> {
    /// Already normalized with [`normalize_host`].
    pub host: Option<&'a str>,
    /// Path without the query.
    pub path: &'a str,
    pub method: &'a Method,
    pub headers: &'a dyn FieldView,
}

/// A request's header fields as routing asks about them. Pingora's lane
/// has them in a `HeaderMap`; the HTTP/1.1 fast lane as slices of its read
/// buffer (`crate::http1`): both answer, so routes are chosen by one code.
pub trait FieldView: std::fmt::Debug + Sync {
    /// Whether a `name` field line has exactly `value`.
    fn has(&self, name: &HeaderName, value: &[u8]) -> bool;
}

impl FieldView for HeaderMap {
    fn has(&self, name: &HeaderName, value: &[u8]) -> bool {
        self.get_all(name).iter().any(|v| v.as_bytes() == value)
    }
}

/// Fields parsed by httparse, as the fast lane holds them.
#[derive(Debug, Clone, Copy)]
pub struct ParsedFields<'h, 'b>(pub &'h [httparse::Header<'b>]);

impl FieldView for ParsedFields<'_, '_> {
    fn has(&self, name: &HeaderName, value: &[u8]) -> bool {
        self.0
            .iter()
            .any(|h| h.name.eq_ignore_ascii_case(name.as_str()) && h.value == value)
    }
}

/// A listener's routes, indexed by host and sorted by specificity. Holds
/// indexes into the route list it was built from.
#[derive(Debug, Default)]
pub struct RouteTable {
    exact_hosts: HashMap<String, Vec<usize>>,
    /// (suffix like ".example.com", routes), longest suffix first.
    wildcard_hosts: Vec<(String, Vec<usize>)>,
    any_host: Vec<usize>,
    matchers: Vec<Option<Matcher>>,
}

/// What a route needs to match, copied out of the model.
#[derive(Debug)]
struct Matcher {
    path: Option<PathMatch>,
    methods: Vec<Method>,
    headers: Vec<(http::HeaderName, http::HeaderValue)>,
}

impl RouteTable {
    /// Build the table for the routes served on `listener`.
    pub fn build(routes: &[Route], listener: &str) -> Self {
        let mut table = RouteTable::default();
        let mut wildcards: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, r) in routes.iter().enumerate() {
            if !r.listeners.iter().any(|l| l == listener) {
                table.matchers.push(None);
                continue;
            }
            table.matchers.push(Some(Matcher {
                path: r.path.clone(),
                methods: r.methods.clone(),
                headers: r.headers.clone(),
            }));
            match &r.host {
                Some(HostMatch::Exact(h)) => {
                    table.exact_hosts.entry(h.clone()).or_default().push(i)
                }
                Some(HostMatch::Wildcard(s)) => wildcards.entry(s.clone()).or_default().push(i),
                None => table.any_host.push(i),
            }
        }
        let order = |list: &mut Vec<usize>| list.sort_by_key(|&i| specificity(&routes[i], i));
        table.exact_hosts.values_mut().for_each(order);
        order(&mut table.any_host);
        let mut wildcards: Vec<(String, Vec<usize>)> = wildcards.into_iter().collect();
        wildcards.iter_mut().for_each(|(_, l)| order(l));
        wildcards.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
        table.wildcard_hosts = wildcards;
        table
    }

    /// The index of the chosen route, or `None` when nothing matches.
    pub fn find(&self, req: &RequestParts<'_>) -> Option<usize> {
        if let Some(host) = req.host {
            if let Some(list) = self.exact_hosts.get(host) {
                if let Some(i) = self.first_match(list, req) {
                    return Some(i);
                }
            }
            for (suffix, list) in &self.wildcard_hosts {
                // `*.example.com` needs at least one label before the suffix.
                if host.len() > suffix.len() && host.ends_with(suffix.as_str()) {
                    if let Some(i) = self.first_match(list, req) {
                        return Some(i);
                    }
                }
            }
        }
        self.first_match(&self.any_host, req)
    }

    /// Number of routes served on this listener.
    pub fn len(&self) -> usize {
        self.matchers.iter().filter(|m| m.is_some()).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn first_match(&self, list: &[usize], req: &RequestParts<'_>) -> Option<usize> {
        list.iter()
            .copied()
            .find(|&i| self.matchers[i].as_ref().is_some_and(|m| m.matches(req)))
    }
}

impl Matcher {
    fn matches(&self, req: &RequestParts<'_>) -> bool {
        let path_ok = match &self.path {
            None => true,
            Some(PathMatch::Exact(p)) => req.path == p,
            Some(PathMatch::Prefix(p)) => req.path.starts_with(p.as_str()),
            Some(PathMatch::Regex(re)) => re.is_match(req.path),
        };
        path_ok
            && (self.methods.is_empty() || self.methods.contains(req.method))
            && self
                .headers
                .iter()
                .all(|(name, want)| req.headers.has(name, want.as_bytes()))
    }
}

/// Sort key: smaller sorts first.
fn specificity(r: &Route, index: usize) -> (u8, Reverse<usize>, Reverse<usize>, usize) {
    let (path_rank, path_len) = match &r.path {
        Some(PathMatch::Exact(p)) => (0, p.len()),
        Some(PathMatch::Prefix(p)) => (1, p.len()),
        Some(PathMatch::Regex(_)) => (2, 0),
        None => (3, 0),
    };
    let conditions = usize::from(!r.methods.is_empty()) + r.headers.len();
    (path_rank, Reverse(path_len), Reverse(conditions), index)
}

/// Host for matching: lower-case, without port or trailing dot. Bracketed IPv6
/// literals keep their brackets off.
pub fn normalize_host(raw: &str) -> Cow<'_, str> {
    let raw = raw.trim();
    let host = if let Some(rest) = raw.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else {
        match raw.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => raw,
        }
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    }
}

pub use crate::types::path::normalize_path;

#[cfg(test)]
mod tests;
