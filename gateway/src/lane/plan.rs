//! Whether the lane serves a request, decided before anything is sent:
//! the request must pass every check of the admission stage as it stands
//! (a refusal is Pingora's to write), route to a forwarding
//! route whose upstreams are plain HTTP/1.1, and ask nothing the lane
//! leaves to Pingora. What it serves, it serves from this plan.

use std::net::IpAddr;

use bytes::{BufMut, Bytes};
use http::{HeaderValue, Method};

use crate::config::model::{Action, UpstreamProtocol};
use crate::http1::fields::FieldList;
use crate::http1::request::{self, Framing, MAX_HEADERS};
use crate::proxy::ctx::RequestCtx;
use crate::proxy::headers;
use crate::router::{normalize_host, ParsedFields, RequestParts};
use crate::runtime::Runtime;

/// A request the lane serves.
pub struct Plan {
    pub method: Method,
    /// The request's bytes: head, then body.
    buf: Bytes,
    target: (usize, usize),
    /// Where the path ends in the target (the query starts).
    path_len: usize,
    body: (usize, usize),
    pub host: HeaderValue,
    pub user_agent: Option<HeaderValue>,
    pub request_id: Option<HeaderValue>,
    /// The client lets the connection carry another request.
    pub keep_alive: bool,
    /// The body's declared length, if any.
    declared: Option<u64>,
    pub route: usize,
    pub upstream: usize,
    /// The target sent upstream, when `strip_prefix` changed it.
    upstream_target: Option<String>,
    /// The head as Pingora's map holds it, for a route with policies.
    pub policy_head: Option<Box<pingora::http::RequestHeader>>,
}

/// Methods the lane serves (upper case, as admission requires).
const METHODS: [Method; 7] = [
    Method::GET,
    Method::HEAD,
    Method::POST,
    Method::PUT,
    Method::DELETE,
    Method::OPTIONS,
    Method::PATCH,
];

/// Fields whose handling the lane leaves to Pingora: hop-by-hop ones it
/// strips or acts on, and a gRPC deadline.
const LEFT_TO_PINGORA: [&str; 8] = [
    "te",
    "trailer",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "proxy-authenticate",
    "http2-settings",
    "grpc-timeout",
];

/// Why [`plan`] leaves a request whose body has not all arrived.
pub const BODY_NOT_WHOLE: &str = "body not whole, or pipelined";

/// The most bytes (head and body) the lane waits to have whole.
pub const MAX_WHOLE: usize = 64 * 1024;

/// The length of the request in `buf` (head and declared body) when its
/// head is whole but its body not yet, and the whole fits [`MAX_WHOLE`].
pub fn whole_len(buf: &[u8]) -> Option<usize> {
    let mut lines = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let request::Parse::Complete(head) = request::parse(buf, &mut lines) else {
        return None;
    };
    let Framing::Length(n) = head.framing else {
        return None;
    };
    let total = head.len.checked_add(usize::try_from(n).ok()?)?;
    (buf.len() < total && total <= MAX_WHOLE).then_some(total)
}

/// Whether `name` is one of [`LEFT_TO_PINGORA`]: their lengths differ
/// from most names', so most lines are told apart by length alone.
fn left_to_pingora(name: &str) -> bool {
    matches!(name.len(), 2 | 7 | 10 | 12 | 14 | 16 | 18 | 19)
        && LEFT_TO_PINGORA.iter().any(|n| n.eq_ignore_ascii_case(name))
}

/// Plan the request in `buf` on `listener`, with the client's lines to
/// forward (`Connection` removed, as Pingora removes it; apart from the
/// plan, which the answer's stages borrow across their waits); `Err` names
/// why it is left to Pingora.
pub fn plan(
    rt: &Runtime,
    listener: usize,
    buf: &Bytes,
    tls: bool,
) -> Result<(Plan, FieldList), &'static str> {
    let l = rt.config.listeners.get(listener).ok_or("listener")?;
    if rt.config.telemetry.tracing.is_some() {
        return Err("tracing");
    }
    if crate::lifecycle::overloaded() {
        return Err("overloaded");
    }
    if tls && l.tls.as_ref().is_some_and(|t| t.client_ca.is_some()) {
        return Err("client certificates");
    }
    let mut lines = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let head = match request::parse(buf, &mut lines) {
        request::Parse::Complete(head) => head,
        request::Parse::Partial => return Err("partial"),
        request::Parse::Fallback(why) => return Err(why),
    };
    if head.minor != 1 {
        return Err("HTTP/1.0");
    }
    let body_len = match head.framing {
        Framing::Empty => 0,
        Framing::Length(n) => usize::try_from(n).map_err(|_| "body")?,
        Framing::Chunked => return Err("chunked body"),
    };
    // The body whole, and nothing after it (a pipelined request).
    if buf.len() != head.len + body_len {
        return Err(BODY_NOT_WHOLE);
    }
    let method = METHODS
        .iter()
        .find(|m| m.as_str() == head.method)
        .cloned()
        .ok_or("method")?;
    let path_len = admitted(&head, &method, &l.limits)?;
    let keep_case = rt.config.gateway.header_case == crate::config::model::HeaderCase::Preserve;
    let read = Read::of(&head, buf, keep_case, body_len)?;

    let target = head.target;
    let route = rt
        .find_route(
            listener,
            &RequestParts {
                host: Some(&normalize_host(read.host.to_str().map_err(|_| "Host")?)),
                path: &target[..path_len],
                method: &method,
                headers: &ParsedFields(head.headers),
            },
        )
        .ok_or("no route")?;
    let r = rt.route(route);
    let Action::Forward(fwd) = &r.action else {
        return Err("not forwarded");
    };
    if r.hedge.is_some() || body_len as u64 > r.max_body_bytes {
        return Err("hedge or body size");
    }
    // Every upstream the route may pick: a split keeps its shares only if
    // all of them are the lane's.
    if rt.route_upstreams(route).next().is_none()
        || !rt.route_upstreams(route).all(|u| upstream_is_lanes(rt, u))
    {
        return Err("upstream");
    }
    let runtime_route = rt.routes.get(route).ok_or("route")?;
    let policy_head = if runtime_route.authz.is_empty() && runtime_route.limits.is_empty() {
        None
    } else {
        Some(pingora_head(&head, &method, buf)?)
    };
    let upstream_target = match &fwd.strip_prefix {
        Some(prefix) => stripped(target, prefix)?,
        None => None,
    };
    let upstream = rt.pick_upstream(route).ok_or("upstream")?;
    let plan = Plan {
        method,
        target: (offset(buf, target.as_bytes()), target.len()),
        path_len,
        body: (head.len, body_len),
        buf: buf.clone(),
        host: read.host,
        user_agent: read.user_agent,
        request_id: read.request_id,
        keep_alive: head.keep_alive,
        declared: read.declared,
        route,
        upstream,
        upstream_target,
        policy_head,
    };
    Ok((plan, read.fields))
}

/// Where `part` (a slice of `buf`) starts in it.
fn offset(buf: &Bytes, part: &[u8]) -> usize {
    part.as_ptr() as usize - buf.as_ptr() as usize
}

/// Where `part` (a slice of `buf`) lies in it.
fn span(buf: &Bytes, part: &[u8]) -> std::ops::Range<usize> {
    let start = offset(buf, part);
    start..start + part.len()
}

/// `part` of `buf` as a shared slice of it.
fn share(buf: &Bytes, part: &[u8]) -> Bytes {
    buf.slice(span(buf, part))
}

/// The admission stage's checks as they stand, counted as it counts them:
/// the head within the listener's limits, and a path the gateway neither
/// normalizes nor refuses. The path's length in the target.
fn admitted(
    head: &request::Head<'_, '_>,
    method: &Method,
    limits: &crate::config::model::ListenerLimits,
) -> Result<usize, &'static str> {
    let target = head.target;
    if target.len() > limits.max_uri_bytes || head.headers.len() > limits.max_request_headers {
        return Err("limits");
    }
    let bytes = method.as_str().len()
        + target.len()
        + 12
        + head
            .headers
            .iter()
            .map(|h| h.name.len() + h.value.len() + 4)
            .sum::<usize>();
    if bytes > limits.max_request_header_bytes {
        return Err("limits");
    }
    let path_len = target.find('?').unwrap_or(target.len());
    let path = &target[..path_len];
    if crate::types::path::normalize_path(path).is_some()
        || crate::proxy::admission::has_dot_segment_with_params(path)
    {
        return Err("path");
    }
    Ok(path_len)
}

/// What the lane reads of a head's fields: the lines to forward, and the
/// few the stages ask for.
struct Read {
    fields: FieldList,
    host: HeaderValue,
    user_agent: Option<HeaderValue>,
    request_id: Option<HeaderValue>,
    declared: Option<u64>,
}

impl Read {
    fn of(
        head: &request::Head<'_, '_>,
        buf: &Bytes,
        keep_case: bool,
        body_len: usize,
    ) -> Result<Read, &'static str> {
        let mut host = None;
        let mut user_agent = None;
        let mut request_id = None;
        let mut declared = None;
        let mut fields = FieldList::over(buf.clone(), head.headers.len() + 8, keep_case);
        // Values as Pingora keeps them (visible ASCII reads as text).
        let value =
            |h: &httparse::Header<'_>| pingora::http::header_value_from_raw(share(buf, h.value));
        for h in head.headers.iter() {
            let name = h.name;
            if left_to_pingora(name) {
                return Err("field left to Pingora");
            }
            if name.eq_ignore_ascii_case("host") {
                let v = value(h);
                if !crate::proxy::admission::is_host_and_port(h.value) || v.to_str().is_err() {
                    return Err("Host");
                }
                host = Some(v);
            } else if name.eq_ignore_ascii_case("user-agent") {
                user_agent.get_or_insert_with(|| value(h));
            } else if name.eq_ignore_ascii_case("x-request-id") {
                request_id.get_or_insert_with(|| value(h));
            } else if name.eq_ignore_ascii_case("content-length") {
                declared = Some(body_len as u64);
            }
            fields.append_read(span(buf, name.as_bytes()), span(buf, h.value));
        }
        // Pingora's upstream request policy strips it (the map's removal
        // moves the last name into its place: done the same way here).
        fields.remove(b"connection");
        Ok(Read {
            fields,
            host: host.ok_or("no Host")?,
            user_agent,
            request_id,
            declared,
        })
    }
}

/// The head as Pingora's map holds it, for the policy stage of a route
/// with policies (their rules match on any field): made only for those.
fn pingora_head(
    head: &request::Head<'_, '_>,
    method: &Method,
    buf: &Bytes,
) -> Result<Box<pingora::http::RequestHeader>, &'static str> {
    let mut req = pingora::http::RequestHeader::build(
        method.clone(),
        head.target.as_bytes(),
        Some(head.headers.len()),
    )
    .map_err(|_| "request head")?;
    for h in head.headers.iter() {
        req.append_header(
            share(buf, h.name.as_bytes()),
            pingora::http::header_value_from_raw(share(buf, h.value)),
        )
        .map_err(|_| "request head")?;
    }
    Ok(Box::new(req))
}

/// The target after `strip_prefix`, as Pingora's driver sends it (the
/// rewritten target read as a URI); `None` when the prefix is not there.
fn stripped(target: &str, prefix: &str) -> Result<Option<String>, &'static str> {
    let Some(new) = headers::strip_prefix(target, prefix) else {
        return Ok(None);
    };
    let uri = new.parse::<http::Uri>().map_err(|_| "rewritten target")?;
    Ok(Some(
        uri.path_and_query().map_or("/", |p| p.as_str()).to_string(),
    ))
}

/// An HTTP/1.1 upstream (plain or TLS) without the features the lane
/// leaves to Pingora's driver.
fn upstream_is_lanes(rt: &Runtime, u: usize) -> bool {
    let (Some(config), Some(pool)) = (rt.config.upstreams.get(u), rt.upstreams.get(u)) else {
        return false;
    };
    config.protocol == UpstreamProtocol::Http1
        && pool.hash_key.is_none()
        && pool.adaptive.is_none()
        && pool.gate.connections.is_none()
}

impl Plan {
    /// The request's bytes, once nothing else needs them.
    pub fn into_buf(self) -> Bytes {
        self.buf
    }

    /// The request's target as sent.
    pub fn target(&self) -> &str {
        let (at, len) = self.target;
        std::str::from_utf8(&self.buf[at..at + len]).unwrap_or("/")
    }

    /// The path, without the query.
    pub fn path(&self) -> &str {
        &self.target()[..self.path_len]
    }

    /// The body's length.
    pub fn body_len(&self) -> u64 {
        self.body.1 as u64
    }

    /// What the retry policy is told of the request.
    pub fn sent(&self) -> crate::proxy::retry::Sent<'_> {
        crate::proxy::retry::Sent {
            method: &self.method,
            declared: self.declared,
            body_truncated: false,
            response_started: false,
        }
    }

    /// The request the upstream is sent: the forward stage's edits on the
    /// client's lines, written as Pingora's client writes them, with the
    /// body. Taken once (the lines are moved out).
    pub fn upstream_request(
        &self,
        mut fields: FieldList,
        rt: &Runtime,
        ctx: &RequestCtx,
        client: Option<IpAddr>,
    ) -> Bytes {
        if let Action::Forward(fwd) = &rt.route(self.route).action {
            headers::Forwarding {
                client,
                scheme: if ctx.tls { "https" } else { "http" },
                host: Some(self.host.clone()),
                identity: None,
                request_id: ctx.request_id.header_value(),
                rewrite: &fwd.request_headers,
                upstream_host: None,
            }
            .apply(&mut fields);
        }
        let (at, len) = self.body;
        let target = match &self.upstream_target {
            Some(t) => t.as_str(),
            None => self.target(),
        };
        let mut out = crate::http1::spare::take(
            crate::http1::spare::Use::Request,
            self.method.as_str().len() + target.len() + fields.wire_len() + len + 16,
        );
        out.put_slice(self.method.as_str().as_bytes());
        out.put_u8(b' ');
        out.put_slice(target.as_bytes());
        out.put_slice(b" HTTP/1.1\r\n");
        fields.write(&mut out);
        out.put_slice(b"\r\n");
        out.put_slice(&self.buf[at..at + len]);
        out.freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_names_left_to_pingora_are_told_by_length_first() {
        for name in LEFT_TO_PINGORA {
            assert!(left_to_pingora(name), "{name}");
            assert!(left_to_pingora(&name.to_ascii_uppercase()), "{name}");
        }
        for name in ["host", "content-length", "x-keep-alive", "tee", "trailers"] {
            assert!(!left_to_pingora(name), "{name}");
        }
    }
}
