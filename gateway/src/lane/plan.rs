//! Whether the lane serves a request, decided before anything is sent:
//! the request must pass every check of the admission stage as it stands
//! (a refusal is Pingora's to write), route to a forwarding
//! route whose upstreams are plain HTTP/1.1, and ask nothing the lane
//! leaves to Pingora. What it serves, it serves from this plan.

use std::net::IpAddr;

use bytes::{BufMut, Bytes, BytesMut};
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
    /// The client's lines, `Connection` removed as Pingora removes it.
    fields: FieldList,
    /// The client lets the connection carry another request.
    pub keep_alive: bool,
    /// The body's declared length, if any.
    pub declared: Option<u64>,
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

/// Plan the request in `buf` on `listener`; `Err` names why it is left to
/// Pingora.
pub fn plan(rt: &Runtime, listener: usize, buf: &Bytes, tls: bool) -> Result<Plan, &'static str> {
    if rt.config.telemetry.tracing.is_some() {
        return Err("tracing");
    }
    let l = rt.config.listeners.get(listener).ok_or("listener")?;
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
        return Err("body not whole, or pipelined");
    }
    let method = METHODS
        .iter()
        .find(|m| m.as_str() == head.method)
        .cloned()
        .ok_or("method")?;

    // The admission stage's limits, counted as it counts them.
    let limits = &l.limits;
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
    // A path the gateway would normalize, or refuse.
    if crate::types::path::normalize_path(path).is_some()
        || path
            .split('/')
            .any(|seg| seg.contains(';') && matches!(seg.split(';').next(), Some("." | "..")))
    {
        return Err("path");
    }

    let mut host = None;
    let mut user_agent = None;
    let mut request_id = None;
    let mut declared = None;
    let mut fields = FieldList::with_capacity(
        head.headers.len() + 8,
        rt.config.gateway.header_case == crate::config::model::HeaderCase::Preserve,
    );
    let at = |s: &[u8]| {
        let start = s.as_ptr() as usize - buf.as_ptr() as usize;
        buf.slice(start..start + s.len())
    };
    for h in head.headers.iter() {
        let name = h.name;
        if LEFT_TO_PINGORA.iter().any(|n| n.eq_ignore_ascii_case(name)) {
            return Err("field left to Pingora");
        }
        // Values as Pingora keeps them (visible ASCII reads as text).
        let value = pingora::http::header_value_from_raw(at(h.value));
        if name.eq_ignore_ascii_case("host") {
            if !crate::proxy::admission::is_host_and_port(h.value) || value.to_str().is_err() {
                return Err("Host");
            }
            host = Some(value.clone());
        } else if name.eq_ignore_ascii_case("user-agent") {
            user_agent.get_or_insert_with(|| value.clone());
        } else if name.eq_ignore_ascii_case("x-request-id") {
            request_id.get_or_insert_with(|| value.clone());
        } else if name.eq_ignore_ascii_case("content-length") {
            declared = Some(body_len as u64);
        }
        fields.append(at(name.as_bytes()), value);
    }
    let host = host.ok_or("no Host")?;
    // Pingora's upstream request policy strips it (the map's removal moves
    // the last name into its place: done the same way here).
    fields.remove(b"connection");

    let host_text = host.to_str().map_err(|_| "Host")?;
    let route = rt
        .find_route(
            listener,
            &RequestParts {
                host: Some(&normalize_host(host_text)),
                path,
                method: &method,
                headers: &ParsedFields(head.headers),
            },
        )
        .ok_or("no route")?;
    let r = rt.route(route);
    let Action::Forward(fwd) = &r.action else {
        return Err("not forwarded");
    };
    let runtime_route = rt.routes.get(route).ok_or("route")?;
    // The policy stage reads the head as Pingora's map holds it: made
    // only for a route with policies (their rules match on any field).
    let policy_head = if runtime_route.authz.is_empty() && runtime_route.limits.is_empty() {
        None
    } else {
        let mut req = pingora::http::RequestHeader::build(
            method.clone(),
            target.as_bytes(),
            Some(head.headers.len()),
        )
        .map_err(|_| "request head")?;
        for h in head.headers.iter() {
            req.append_header(
                at(h.name.as_bytes()),
                pingora::http::header_value_from_raw(at(h.value)),
            )
            .map_err(|_| "request head")?;
        }
        Some(Box::new(req))
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
    let upstream = rt.pick_upstream(route).ok_or("upstream")?;
    let upstream_target = match &fwd.strip_prefix {
        Some(prefix) => match headers::strip_prefix(target, prefix) {
            Some(new) => {
                // What Pingora's driver sends: the rewritten target as a URI.
                let uri = new.parse::<http::Uri>().map_err(|_| "rewritten target")?;
                Some(uri.path_and_query().map_or("/", |p| p.as_str()).to_string())
            }
            None => None,
        },
        None => None,
    };
    let target_range = at(target.as_bytes());
    let target_at = target_range.as_ptr() as usize - buf.as_ptr() as usize;
    Ok(Plan {
        method,
        target: (target_at, target.len()),
        path_len,
        body: (head.len, body_len),
        buf: buf.clone(),
        host,
        user_agent,
        request_id,
        fields,
        keep_alive: head.keep_alive,
        declared,
        route,
        upstream,
        upstream_target,
        policy_head,
    })
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
        &mut self,
        rt: &Runtime,
        ctx: &RequestCtx,
        client: Option<IpAddr>,
    ) -> Bytes {
        let mut fields = std::mem::take(&mut self.fields);
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
        let mut out = BytesMut::with_capacity(
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
