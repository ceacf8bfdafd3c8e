//! The `ProxyHttp` implementation: a thin dispatcher. Each phase takes what it
//! needs from the request snapshot and calls the router, upstream pools,
//! header policy or responder.

pub mod conn;
pub mod ctx;
pub mod egress;
mod framing;
pub mod headers;
pub(crate) mod observe;
pub mod respond;
mod trace;

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::Bytes;
use http::header::{self, HeaderValue};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorType, Result};

use crate::config::model::{Action, HeaderCase};
use crate::ratelimit;
use crate::router::{normalize_host, RequestParts};
use crate::runtime::Runtime;
use crate::telemetry::tracing::Tracing;
use ctx::{Failure, RequestCtx};

/// The proxy service shared by every data-plane listener.
pub struct Gateway {
    runtime: Arc<ArcSwap<Runtime>>,
    /// `None` when tracing is off: then no span work happens at all.
    tracing: Option<Arc<Tracing>>,
}

impl Gateway {
    pub fn new(runtime: Arc<ArcSwap<Runtime>>, tracing: Option<Arc<Tracing>>) -> Self {
        Gateway { runtime, tracing }
    }
}

/// The client IP that rules and `client_ip` limits see: the peer, or the
/// forwarded client when the peer is a trusted proxy.
fn effective_client_ip(
    rt: &Runtime,
    listener: usize,
    session: &Session,
) -> Option<std::net::IpAddr> {
    let trusted = trusted_proxies(rt, listener);
    client_ip(session)
        .map(|ip| ratelimit::client_ip::client_ip(ip, &session.req_header().headers, trusted))
}

/// The peers whose `x-forwarded-for` the listener believes.
fn trusted_proxies(rt: &Runtime, listener: usize) -> &[ipnet::IpNet] {
    rt.config
        .listeners
        .get(listener)
        .map_or(&[][..], |l| &l.trusted_proxies[..])
}

/// Run the route's authorization policies; `Some(policy)` when one denies.
fn authorize(
    rt: &Runtime,
    listener: usize,
    route: usize,
    session: &Session,
    ctx: &mut RequestCtx,
) -> Option<String> {
    let indexes = &rt.routes.get(route)?.authz;
    if indexes.is_empty() {
        return None;
    }
    let req = session.req_header();
    let trusted = trusted_proxies(rt, listener);
    let subject = crate::authz::Subject {
        identity: ctx.peer_identity.as_deref(),
        source: client_ip(session).and_then(|ip| {
            ratelimit::client_ip::client_ip_known(ip, &session.req_header().headers, trusted)
        }),
        method: &req.method,
        path: req.uri.path(),
        headers: &req.headers,
    };
    let verdict = crate::authz::check(
        indexes.iter().filter_map(|i| rt.config.policies.get(*i)),
        &subject,
    );
    if let Some(policy) = verdict.denied {
        ctx.authz_note = format!("denied:{policy}");
        return Some(policy);
    }
    if !verdict.shadow_denied.is_empty() {
        ctx.authz_note = format!("shadow_denied:{}", verdict.shadow_denied.join(","));
        log::debug!(
            "request_id={} would be denied by {}",
            ctx.request_id,
            verdict.shadow_denied.join(",")
        );
    }
    None
}

/// Whether meshgate may route this request target: what it decides on
/// (`uri`) must be exactly what the upstream would be sent (the raw target).
/// Origin-form (`/path`), the absolute form of http/https and `*` for
/// OPTIONS qualify; other forms (`x:/admin`, `admin/x`) or targets the URI
/// parser could only read lossily would reach the upstream as sent while
/// meshgate saw `/`. Paths with `\` or `..;`/`.;` segments (read as `/` or
/// `..` by some servers) are refused too.
fn target_is_usable(req: &RequestHeader) -> bool {
    let raw = req.raw_path();
    let consistent = if req.version == http::Version::HTTP_2 {
        // :path is checked by the HTTP/2 layer and has no other form.
        true
    } else if !req.raw_path_is_utf8() {
        false
    } else if raw.starts_with(b"/") {
        req.uri.path_and_query().map(|p| p.as_str().as_bytes()) == Some(raw)
    } else if raw == b"*" {
        req.method == http::Method::OPTIONS
    } else if raw.starts_with(b"http://") || raw.starts_with(b"https://") {
        http::Uri::try_from(raw).is_ok_and(|u| u.path_and_query() == req.uri.path_and_query())
    } else {
        false
    };
    let path = req.uri.path();
    consistent
        && !path.contains('\\')
        && !path
            .split('/')
            .any(|seg| seg.contains(';') && matches!(seg.split(';').next(), Some("." | "..")))
}

/// Methods are case-sensitive (RFC 9110 §9.1), but common frameworks
/// (Flask, Django) upper-case what they get, so `delete` would pass a policy
/// on `DELETE` and still delete: a method with lower-case letters is refused,
/// as NGINX does. The authority must be one host and port (RFC 3986 §3.2.2)
/// in one `Host` line (RFC 9112 §3.2): quotes, spaces, slashes, user info or
/// a second line would reach the upstream's `Host`-based logic and
/// `X-Forwarded-Host` differently from what meshgate routed on.
fn method_and_host_are_plain(req: &RequestHeader) -> bool {
    if req.method.as_str().bytes().any(|b| b.is_ascii_lowercase()) {
        return false;
    }
    let mut hosts = req.headers.get_all(header::HOST).iter();
    let (first, second) = (hosts.next(), hosts.next());
    if second.is_some() || first.is_some_and(|h| !is_host_and_port(h.as_bytes())) {
        return false;
    }
    req.uri
        .authority()
        .is_none_or(|a| is_host_and_port(a.as_str().as_bytes()))
}

/// A `close` in a second or later `Connection` line: Pingora reads the
/// first line only, but the lines are one list (RFC 9110 §5.3), and a
/// client that sent `close` must not have a later pipelined request served.
fn asks_to_close(req: &RequestHeader) -> bool {
    let mut lines = req.headers.get_all(header::CONNECTION).iter();
    lines.next();
    lines.any(|line| {
        line.as_bytes()
            .split(|&b| b == b',')
            .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"close"))
    })
}

/// `host [ ":" port ]`: an IP literal in brackets, or a reg-name (an IPv4
/// address is one) without `,` (no DNS name has one, and `X-Forwarded-Host`
/// readers split on it); the port all digits.
fn is_host_and_port(b: &[u8]) -> bool {
    let (host, port) = if b.first() == Some(&b'[') {
        match b.iter().position(|&c| c == b']') {
            Some(end) => b.split_at(end + 1),
            None => return false,
        }
    } else {
        match b.iter().rposition(|&c| c == b':') {
            Some(colon) => b.split_at(colon),
            None => (b, &b[b.len()..]),
        }
    };
    let port_ok = match port.split_first() {
        None => true,
        Some((b':', digits)) => digits.iter().all(u8::is_ascii_digit),
        Some(_) => false,
    };
    let host_ok = match host {
        [b'[', inner @ .., b']'] => {
            !inner.is_empty()
                && inner.iter().all(|&c| {
                    c.is_ascii_alphanumeric()
                        || matches!(c, b':' | b'.' | b'%' | b'-' | b'_' | b'~')
                })
        }
        reg_name => reg_name.iter().all(|&c| {
            c.is_ascii_alphanumeric()
                || matches!(
                    c,
                    // unreserved, sub-delims but `,`, pct-encoded
                    b'-' | b'.'
                        | b'_'
                        | b'~'
                        | b'!'
                        | b'$'
                        | b'&'
                        | b'\''
                        | b'('
                        | b')'
                        | b'*'
                        | b'+'
                        | b';'
                        | b'='
                        | b'%'
                )
        }),
    };
    port_ok && host_ok
}

/// Route, authorize and forward the normalized path (see
/// [`crate::types::path::normalize_path`]), so all three see the same thing.
fn normalize_request_path(req: &mut RequestHeader) {
    let Some(path) = crate::types::path::normalize_path(req.uri.path()) else {
        return;
    };
    let pq = match req.uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    let mut parts = req.uri.clone().into_parts();
    let Ok(pq) = pq.parse::<http::uri::PathAndQuery>() else {
        return;
    };
    parts.path_and_query = Some(pq);
    if let Ok(uri) = http::Uri::from_parts(parts) {
        req.set_uri(uri);
    }
}

/// The first listener limit the request head breaks, with its metric reason.
fn over_limits(
    req: &RequestHeader,
    limits: &crate::config::model::ListenerLimits,
) -> Option<(Failure, &'static str)> {
    // As sent: the parsed URI can be shorter (absolute forms).
    let uri_len = req
        .raw_path()
        .len()
        .max(req.uri.path_and_query().map_or(0, |p| p.as_str().len()));
    if uri_len > limits.max_uri_bytes {
        return Some((Failure::UriTooLong, "uri_length"));
    }
    if req.headers.len() > limits.max_request_headers {
        return Some((Failure::HeadersTooLarge, "header_count"));
    }
    // As on the wire: "name: value\r\n" per field, plus the request line.
    let bytes = req.method.as_str().len()
        + uri_len
        + 12
        + req
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 4)
            .sum::<usize>();
    if bytes > limits.max_request_header_bytes {
        return Some((Failure::HeadersTooLarge, "header_bytes"));
    }
    None
}

/// Whether a request body of `len` bytes (so far, or declared) is over the
/// route's `max_body_bytes`.
fn body_over_limit(rt: &Runtime, route: Option<usize>, len: u64) -> bool {
    route
        .map(|r| rt.route(r))
        .is_some_and(|r| len > r.max_body_bytes)
}

/// How long the next read of the request body may wait: the listener's
/// `body_read_timeout`, or what is left of the route's deadline if less.
fn body_deadline(session: &mut Session, ctx: &RequestCtx) {
    let wait = ctx
        .body_read_timeout
        .min(ctx.remaining())
        .max(Duration::from_millis(1));
    session.set_read_timeout(Some(wait));
}

/// Read a small body of declared length whole, before an upstream is
/// chosen (the route's `buffer_request_body`): a slow client then holds no
/// upstream connection while it sends. Pingora replays it to the upstream.
async fn buffer_body(session: &mut Session, ctx: &mut RequestCtx) -> Result<()> {
    // A client waiting for 100 Continue would wait for us; its body is
    // streamed as it comes.
    if session.req_header().headers.contains_key(header::EXPECT) {
        return Ok(());
    }
    session.enable_retry_buffering();
    loop {
        body_deadline(session, ctx);
        match session.read_request_body().await {
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(e) => {
                if *e.etype() == ErrorType::ReadTimedout {
                    ctx.failure = Some(Failure::BodyTimeout);
                }
                return Err(e);
            }
        }
    }
    ctx.body_buffered = true;
    Ok(())
}

/// Count a request refused by a listener or route limit.
fn count_rejection(ctx: &RequestCtx, reason: &str) {
    crate::telemetry::metrics::metrics()
        .rejected
        .with_label_values(&[ctx.listener_name().unwrap_or(""), reason])
        .inc();
}

/// Why the rate limits refused a request.
enum Refusal {
    /// `(policy, retry_after_secs)`
    Limited(String, u64),
    /// A global policy could not reach Redis and `on_error = "deny"`.
    Unavailable(String),
}

/// Run the route's rate-limit policies; `Some` when one refuses the request.
async fn limit(
    rt: &Runtime,
    listener: usize,
    route: usize,
    session: &Session,
    ctx: &mut RequestCtx,
) -> Option<Refusal> {
    let limits = &rt.routes.get(route)?.limits;
    if limits.is_empty() {
        return None;
    }
    let req = session.req_header();
    let inputs = ratelimit::KeyInputs {
        client_ip: effective_client_ip(rt, listener, session),
        headers: &req.headers,
        route: &rt.route(route).name,
        identity: ctx.peer_identity.as_deref(),
    };
    let verdict = ratelimit::check(limits, &inputs, rt.redis.as_deref()).await;
    ctx.rate_limit_headers = verdict.headers;
    if let Some(policy) = verdict.unavailable {
        ctx.rate_limit_note = format!("unavailable:{policy}");
        return Some(Refusal::Unavailable(policy));
    }
    match verdict.limited {
        Some((policy, retry_after)) => {
            ctx.rate_limit_note = policy.clone();
            Some(Refusal::Limited(
                policy,
                ratelimit::ceil_secs(retry_after).max(1),
            ))
        }
        None => {
            let mut notes = Vec::new();
            if !verdict.shadow_limited.is_empty() {
                notes.push(format!("shadow:{}", verdict.shadow_limited.join(",")));
                log::debug!(
                    "request_id={} would be limited by {}",
                    ctx.request_id,
                    verdict.shadow_limited.join(",")
                );
            }
            if !verdict.backend_errors.is_empty() {
                notes.push(format!(
                    "backend_error:{}",
                    verdict.backend_errors.join(",")
                ));
            }
            // No spaces: the text log keeps `key=value` fields.
            ctx.rate_limit_note = notes.join(";");
            None
        }
    }
}

/// The request's authority as sent: `:authority` (HTTP/2, absolute-form) or
/// `Host`, port included.
pub(crate) fn request_host(req: &RequestHeader) -> Option<&str> {
    req.uri
        .authority()
        .map(|a| a.as_str())
        .or_else(|| req.headers.get(header::HOST).and_then(|h| h.to_str().ok()))
}

/// [`request_host`] as a header value; the client's `Host` is shared, not copied.
fn request_host_value(req: &RequestHeader) -> Option<HeaderValue> {
    match req.uri.authority() {
        Some(a) => HeaderValue::from_str(a.as_str()).ok(),
        None => req
            .headers
            .get(header::HOST)
            .filter(|h| h.to_str().is_ok())
            .cloned(),
    }
}

/// The upstream's TLS server name, else the endpoint's address: the `Host`
/// of a request whose client sent none (NGINX sends its upstream's name).
fn upstream_authority(rt: &Runtime, ctx: &RequestCtx) -> Option<HeaderValue> {
    let sni = ctx
        .upstream
        .and_then(|u| rt.config.upstreams.get(u))
        .and_then(|u| u.tls.as_ref())
        .map(|t| t.sni.as_str())
        .filter(|s| !s.is_empty());
    match sni {
        Some(name) => HeaderValue::from_str(name).ok(),
        None => HeaderValue::from_str(&ctx.endpoint?.to_string()).ok(),
    }
}

/// An HTTP/2 stream the client has already cancelled is not served further:
/// an error from the client's side (nothing is written, the access log says
/// status 0), and the cancel counted against its connection.
fn client_still_there(session: &mut Session, ctx: &mut RequestCtx) -> Result<()> {
    if conn::client_cancelled(session.as_downstream_mut()) {
        ctx.client_cancelled = true;
        let mut e = Error::explain(
            ErrorType::ConnectionClosed,
            "the client cancelled the stream before it was forwarded",
        );
        e.as_down();
        return Err(e);
    }
    Ok(())
}

/// The client's IP; an IPv4 client on a dual-stack `[::]` listener shows as
/// its IPv4 address, not `::ffff:a.b.c.d`.
fn client_ip(session: &Session) -> Option<std::net::IpAddr> {
    session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip().to_canonical())
}

impl Gateway {
    /// Bookkeeping for each connection attempt to `peer` (endpoint index
    /// `endpoint`): timers, the retry count, the attempt's span.
    fn attempt_started(
        &self,
        session: &Session,
        ctx: &mut RequestCtx,
        endpoint: usize,
        peer: &HttpPeer,
    ) {
        let now = Instant::now();
        if ctx.tried.is_empty() {
            ctx.upstream_started = Some(now);
        } else if let Some(name) = ctx.upstream_name() {
            crate::telemetry::metrics::metrics()
                .upstream_retries
                .with_label_values(&[name])
                .inc();
        }
        ctx.tried.push(endpoint);
        ctx.connect_started = Some(now);
        ctx.connected = false;
        ctx.upstream_status = None;
        ctx.endpoint = peer._address.as_inet().copied();
        if let Some(t) = &self.tracing {
            trace::start_attempt(t, session.req_header(), ctx);
        }
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        // Pingora parsed the head: the request is logged by `logging`.
        conn::request_taken();
        RequestCtx::new()
    }

    fn init_downstream_modules(&self, modules: &mut pingora::modules::http::HttpModules) {
        modules.add_module(Box::new(framing::Http10FramingBuilder));
    }

    /// Route the request; answer it here when the route needs no upstream.
    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        client_still_there(session, ctx)?;
        let rt = self.runtime.load_full();
        ctx.request_id = headers::RequestId::from_request(
            session.req_header().headers.get(headers::X_REQUEST_ID),
        );
        let local = session.server_addr().and_then(|a| a.as_inet()).copied();
        ctx.listener = rt.listener_for(local);
        ctx.runtime = Some(rt.clone());
        let mut peer_cert = None;
        if let Some(tls) = session.digest().and_then(|d| d.ssl_digest.as_ref()) {
            ctx.tls = true;
            peer_cert = tls
                .extension
                .get::<crate::tls::TlsConnection>()
                .and_then(|c| c.peer.as_ref());
            ctx.peer_identity = peer_cert.and_then(|p| p.identity.clone());
        }
        ctx.in_flight = Some(crate::telemetry::metrics::GaugeGuard::new(
            rt.in_flight(ctx.listener),
        ));
        if let Some(t) = &self.tracing {
            trace::start_server(t, session, ctx);
        }
        let Some(listener) = ctx.listener else {
            ctx.failure = Some(Failure::NoListener);
            respond::send_error(session, Failure::NoListener, ctx).await?;
            return Ok(true);
        };
        if crate::lifecycle::overloaded() {
            crate::lifecycle::shed("request");
            ctx.failure = Some(Failure::Overloaded);
            session.set_keepalive(None);
            respond::send_error(session, Failure::Overloaded, ctx).await?;
            return Ok(true);
        }

        let config = &rt.config.listeners[listener];
        // A reload may have changed the client CAs or client_auth since this
        // connection's handshake: it must still pass them (a certificate is
        // checked once per connection and CA bundle). On HTTP/2 the
        // connection stays open, and each of its requests is refused.
        if let Some(tls) = config.tls.as_ref().filter(|t| t.client_ca.is_some()) {
            let trusted = match (peer_cert, &tls.client_ca) {
                (Some(peer), Some(ca)) => peer.trusted_by(&ca.fingerprint, &rt.material.ca(ca)),
                // Opened without a certificate under `optional`; `require` since.
                _ => tls.client_auth != crate::config::model::ClientAuth::Require,
            };
            if !trusted {
                ctx.peer_identity = None;
                ctx.failure = Some(Failure::ClientCertUntrusted);
                // The client reconnects, and its new handshake decides.
                session.set_keepalive(None);
                respond::send_error(session, Failure::ClientCertUntrusted, ctx).await?;
                return Ok(true);
            }
        }
        let limits = config.limits;
        // Wait this long for the next request on a kept-alive connection
        // (only where the client keeps the connection: never for a bare HTTP/1.0).
        // During SIGTERM's delay, each connection closes after its next
        // response, so clients reconnect to where the load balancer sends them.
        if session.get_keepalive().is_some() {
            session.set_keepalive(if crate::lifecycle::draining() {
                None
            } else {
                Some(limits.idle_timeout.as_secs().max(1))
            });
        }
        if let Some((failure, reason)) = over_limits(session.req_header(), &limits) {
            count_rejection(ctx, reason);
            ctx.failure = Some(failure);
            respond::send_error(session, failure, ctx).await?;
            return Ok(true);
        }
        if !target_is_usable(session.req_header())
            || !method_and_host_are_plain(session.req_header())
        {
            ctx.failure = Some(Failure::BadRequest);
            respond::send_error(session, Failure::BadRequest, ctx).await?;
            return Ok(true);
        }
        normalize_request_path(session.req_header_mut());
        if asks_to_close(session.req_header()) {
            session.set_keepalive(None);
        }
        if session.req_header().version == http::Version::HTTP_10 {
            // HTTP/1.0 has no 1xx responses (RFC 9110 §15.2), and a server
            // ignores its 100-continue expectation (§10.1.1): no upstream
            // is asked for one, and none it sends reaches the client.
            session.req_header_mut().remove_header(&header::EXPECT);
            session.as_downstream_mut().set_ignore_info_resp(true);
        }
        let req = session.req_header();
        // RFC 9112 §3.2: an HTTP/1.1 request without Host is refused.
        if req.version == http::Version::HTTP_11 && request_host(req).is_none() {
            ctx.failure = Some(Failure::BadRequest);
            respond::send_error(session, Failure::BadRequest, ctx).await?;
            return Ok(true);
        }
        let host = request_host(req).map(normalize_host);
        let parts = RequestParts {
            host: host.as_deref(),
            path: req.uri.path(),
            method: &req.method,
            headers: &req.headers,
        };
        ctx.route = rt.find_route(listener, &parts);
        trace::routed(ctx, &req.method);
        let Some(route_idx) = ctx.route else {
            if let Some(eg) = rt.egress_for(listener) {
                return egress::route(&rt, eg, session, ctx).await;
            }
            ctx.failure = Some(Failure::NoRoute);
            respond::send_error(session, Failure::NoRoute, ctx).await?;
            return Ok(true);
        };
        let route = rt.route(route_idx);
        ctx.deadline = ctx.started.checked_add(route.timeout);
        ctx.websocket = headers::is_websocket_upgrade(session.req_header());
        let declared = headers::declared_length(session.req_header());
        if declared.is_some_and(|len| body_over_limit(&rt, Some(route_idx), len)) {
            count_rejection(ctx, "body_size");
            ctx.failure = Some(Failure::BodyTooLarge);
            respond::send_error(session, Failure::BodyTooLarge, ctx).await?;
            return Ok(true);
        }
        if let Some(policy) = authorize(&rt, listener, route_idx, session, ctx) {
            ctx.failure = Some(Failure::Forbidden);
            respond::send_forbidden(session, ctx, &policy).await?;
            return Ok(true);
        }
        match limit(&rt, listener, route_idx, session, ctx).await {
            Some(Refusal::Limited(policy, retry_after)) => {
                ctx.failure = Some(Failure::RateLimited);
                respond::send_rate_limited(session, ctx, &policy, retry_after).await?;
                return Ok(true);
            }
            Some(Refusal::Unavailable(policy)) => {
                ctx.failure = Some(Failure::RateLimitUnavailable);
                respond::send_rate_limit_unavailable(session, ctx, &policy).await?;
                return Ok(true);
            }
            None => {}
        }
        match &route.action {
            Action::Forward(_) => {
                ctx.upstream = rt.pick_upstream(route_idx);
                if ctx.upstream.is_none() {
                    ctx.failure = Some(Failure::Internal);
                    respond::send_error(session, Failure::Internal, ctx).await?;
                    return Ok(true);
                }
                if !ctx.websocket {
                    ctx.body_read_timeout = limits.body_read_timeout;
                    body_deadline(session, ctx);
                    if declared.is_some_and(|len| len > 0 && len <= route.buffer_request_body) {
                        buffer_body(session, ctx).await?;
                    }
                }
                Ok(false)
            }
            Action::Respond {
                status,
                body,
                content_type,
            } => {
                let mut hdrs = vec![(header::CONTENT_TYPE, content_type.clone())];
                hdrs.extend(respond::rate_limit_headers(ctx));
                respond::send(
                    session,
                    *status,
                    &hdrs,
                    body.clone(),
                    &ctx.request_id,
                    Some(&route.response_headers),
                )
                .await?;
                Ok(true)
            }
            Action::Redirect { location, status } => {
                let mut hdrs = vec![(header::LOCATION, location.clone())];
                hdrs.extend(respond::rate_limit_headers(ctx));
                respond::send(
                    session,
                    *status,
                    &hdrs,
                    Bytes::new(),
                    &ctx.request_id,
                    Some(&route.response_headers),
                )
                .await?;
                Ok(true)
            }
        }
    }

    async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        if !ctx.tried.is_empty() {
            // A retry sends the buffered body through the filter again.
            ctx.body_seen = 0;
        }
        // Cancelled while it was routed (or rate limited): never forwarded.
        client_still_there(session, ctx)?;
        let remaining = ctx.remaining();
        if remaining.is_zero() {
            ctx.failure = Some(Failure::Timeout);
            return Err(Error::explain(
                ErrorType::HTTPStatus(504),
                "route timeout passed before connecting",
            ));
        }
        let rt = ctx
            .runtime
            .as_ref()
            .ok_or_else(|| Error::new_in(ErrorType::InternalError))?;
        if let Some(target) = ctx.egress.clone() {
            let eg = rt
                .config
                .egress
                .as_ref()
                .ok_or_else(|| Error::explain(ErrorType::InternalError, "no [egress]"))?;
            let peer = egress::peer(&target, eg, &rt.material, ctx.tried.len(), remaining)
                .ok_or_else(|| Error::explain(ErrorType::ConnectNoRoute, "no address"))?;
            self.attempt_started(session, ctx, ctx.tried.len(), &peer);
            return Ok(Box::new(peer));
        }
        let pool = ctx
            .upstream
            .and_then(|u| rt.upstreams.get(u))
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "no upstream chosen"))?;
        // A WebSocket connection lives past the route deadline once upgraded.
        let remaining = if ctx.websocket {
            std::time::Duration::MAX
        } else {
            remaining
        };
        let (endpoint, mut peer) = pool.select(&ctx.tried, remaining).ok_or_else(|| {
            Error::explain(ErrorType::ConnectNoRoute, "upstream has no endpoints")
        })?;
        // The client certificate as its files hold it now (rotated
        // certificates are picked up by the watcher); a new pair also means
        // new pooled connections.
        if let Some(current) = pool.client_cert_slot.as_ref().and_then(|s| rt.certs.get(s)) {
            peer.client_cert_key = Some(current.get().cert_key());
        }
        self.attempt_started(session, ctx, endpoint, &peer);
        Ok(Box::new(peer))
    }

    /// An attempt failed after connecting. Retry policy is pingora's default
    /// (only idempotent requests, only on a reused connection); meshgate adds
    /// the accounting, once per failed attempt.
    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut RequestCtx,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        if !session.req_header().method.is_idempotent() || session.as_ref().retry_buffer_truncated()
        {
            e.set_retry(false);
        } else {
            e.retry.decide_reuse(client_reused);
        }
        if *e.esource() == pingora::ErrorSource::Upstream {
            observe::attempt_failed(ctx, &e);
            trace::attempt_failed(ctx, &e);
        }
        e
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        observe::attempt_failed(ctx, &e);
        trace::attempt_failed(ctx, &e);
        // Nothing reached the upstream yet, so any method may go to another endpoint.
        let retries = match &ctx.egress {
            Some(target) => egress::attempts(target) - 1,
            None => ctx
                .runtime
                .as_ref()
                .zip(ctx.upstream)
                .and_then(|(rt, u)| rt.upstreams.get(u))
                .map_or(0, |p| p.connect_retries as usize),
        };
        if ctx.tried.len() <= retries && !ctx.remaining().is_zero() {
            e.set_retry(true);
        }
        e
    }

    /// Bodies without a declared length are counted as they stream.
    async fn request_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if ctx.upgraded {
            // A WebSocket's bytes are not a request body.
            return Ok(());
        }
        ctx.body_seen += body.as_ref().map_or(0, |b| b.len() as u64);
        // The route's deadline covers the upload too: the next read waits
        // no longer than what is left of it. Not a WebSocket's: its
        // connection outlives the deadline once upgraded.
        if !ctx.body_buffered && !ctx.websocket {
            if ctx.remaining().is_zero() && !end_of_stream {
                ctx.failure = Some(Failure::BodyTimeout);
                session.set_keepalive(None);
                return Error::e_explain(
                    ErrorType::ReadTimedout,
                    "the route's timeout passed while the request body was arriving",
                );
            }
            body_deadline(session, ctx);
        }
        let over = ctx
            .runtime
            .as_ref()
            .is_some_and(|rt| body_over_limit(rt, ctx.route, ctx.body_seen));
        if over {
            count_rejection(ctx, "body_size");
            ctx.failure = Some(Failure::BodyTooLarge);
            session.set_keepalive(None);
            return Error::e_explain(
                ErrorType::HTTPStatus(413),
                "request body over the route's max_body_bytes",
            );
        }
        Ok(())
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(target) = &ctx.egress {
            return egress::upstream_request(upstream, target);
        }
        let Some(rt) = ctx.runtime.as_ref() else {
            return Ok(());
        };
        let Some(route) = ctx.route.map(|r| rt.route(r)) else {
            return Ok(());
        };
        let Action::Forward(fwd) = &route.action else {
            return Ok(());
        };
        if let Some(prefix) = &fwd.strip_prefix {
            let pq = upstream.uri.path_and_query().map_or("/", |p| p.as_str());
            if let Some(new) = headers::strip_prefix(pq, prefix) {
                let uri = new.parse::<http::Uri>().map_err(|e| {
                    Error::because(ErrorType::InternalError, "rewritten path is not a URI", e)
                })?;
                upstream.set_uri(uri);
            }
        }
        let forward_identity = ctx
            .listener
            .and_then(|l| rt.config.listeners.get(l))
            .and_then(|l| l.tls.as_ref())
            .is_some_and(|t| t.forward_identity);
        let identity = match (forward_identity, &ctx.peer_identity) {
            (true, Some(id)) => Some(HeaderValue::from_str(id).map_err(|e| {
                Error::because(
                    ErrorType::InternalError,
                    "peer identity is not a header value",
                    e,
                )
            })?),
            _ => None,
        };
        let host = request_host_value(session.req_header());
        let upstream_host = if host.is_none() {
            upstream_authority(rt, ctx)
        } else {
            None
        };
        let edits = headers::Forwarding {
            client: client_ip(session),
            scheme: if ctx.tls { "https" } else { "http" },
            host,
            identity,
            request_id: ctx.request_id.header_value(),
            rewrite: &fwd.request_headers,
            upstream_host,
        };
        match rt.config.gateway.header_case {
            HeaderCase::Preserve => {
                edits.apply(upstream);
                trace::inject(ctx, upstream);
            }
            HeaderCase::Lowercase => {
                headers::edit_plain_request(upstream, edits.room(), |fields| {
                    edits.apply(fields);
                    trace::inject(ctx, fields);
                })
            }
        }
        Ok(())
    }

    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        reused: bool,
        _peer: &HttpPeer,
        _fd: std::os::unix::io::RawFd,
        digest: Option<&pingora::protocols::Digest>,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        observe::connected(ctx, reused);
        let pool = ctx
            .runtime
            .as_ref()
            .zip(ctx.upstream)
            .and_then(|(rt, u)| rt.upstreams.get(u));
        if let Some(Err(why)) = pool.map(|p| p.check_identity(digest)) {
            log::warn!("request_id={} {why}", ctx.request_id);
            return Err(Error::create(
                ErrorType::InvalidCert,
                pingora::ErrorSource::Upstream,
                Some(why.into()),
                None,
            ));
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        ctx.upstream_status = Some(resp.status.as_u16());
        // RFC 9110 §7.8: a server switches only to a protocol the client
        // asked for, and only WebSocket upgrades are forwarded; a 101 to
        // anything else would turn the connection into a raw tunnel.
        if resp.status == http::StatusCode::SWITCHING_PROTOCOLS && !ctx.websocket {
            let mut e = Error::explain(
                ErrorType::InvalidHTTPHeader,
                "101 Switching Protocols to a request that asked for no upgrade",
            );
            e.as_up();
            return Err(e);
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        ctx.upgraded = ctx.websocket && resp.status == http::StatusCode::SWITCHING_PROTOCOLS;
        // A response written after SIGTERM closes its connection, even for a
        // request that came before it.
        if crate::lifecycle::draining() {
            session.set_keepalive(None);
        }
        // A body of unknown length reaches an HTTP/1.0 client delimited by
        // the connection's close (`framing`), so the connection ends with it.
        if session.req_header().version == http::Version::HTTP_10
            && !resp.status.is_informational()
            && !matches!(resp.status.as_u16(), 204 | 304)
            && session.req_header().method != http::Method::HEAD
            && !resp.headers.contains_key(header::CONTENT_LENGTH)
        {
            session.set_keepalive(None);
        }
        let edits = headers::Answer {
            status: resp.status,
            rate_limit: respond::rate_limit_headers(ctx),
            request_id: ctx.request_id.header_value(),
            rewrite: ctx.response_rewrite(),
        };
        // Egress goes to the outside, where names are left as they are.
        let case = ctx.runtime.as_ref().map(|rt| rt.config.gateway.header_case);
        match case.filter(|_| ctx.egress.is_none()) {
            Some(HeaderCase::Lowercase) => {
                headers::edit_plain_response(resp, edits.room(), |fields| edits.apply(fields))
            }
            _ => edits.apply(resp),
        }
        Ok(())
    }

    fn upstream_response_body_filter(
        &self,
        _session: &mut Session,
        _body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<std::time::Duration>> {
        if ctx.deadline.is_some_and(|d| Instant::now() > d) && !ctx.upgraded {
            ctx.failure = Some(Failure::Timeout);
            return Err(Error::explain(
                ErrorType::ReadTimedout,
                "route timeout passed while reading the response body",
            )
            .into_up());
        }
        Ok(None)
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let failure = respond::classify(e, ctx);
        ctx.failure = failure;
        if failure == Some(Failure::BodyTimeout) {
            count_rejection(ctx, "body_timeout");
        }
        let Some(failure) = failure else {
            return FailToProxy {
                error_code: 0,
                can_reuse_downstream: false,
            };
        };
        // Headers already sent: the response can only be cut short.
        if session.response_written().is_none() {
            // The connection is not reused (below: part of the request body
            // may be unread), so the answer says `Connection: close`.
            session.set_keepalive(None);
            if let Err(write_err) = respond::send_error(session, failure, ctx).await {
                log::debug!("could not write error response: {write_err}");
            }
        }
        FailToProxy {
            error_code: failure.status(),
            can_reuse_downstream: false,
        }
    }

    /// Pingora's own error line for a failed request is not written: the
    /// gateway's and upstreams' failures get `logging`'s warn line (with the
    /// request id, route and upstream), and what a client causes (hanging
    /// up mid-request) belongs in the access log and metrics, not the error log.
    fn suppress_error_log(&self, _session: &Session, _ctx: &RequestCtx, _error: &Error) -> bool {
        true
    }

    /// Pingora's warn line for each attempt it retries is not written
    /// either: a request that fails in the end gets one line (`logging`),
    /// and one that a retry saved is no failure. Each retry is counted in
    /// `meshgate_upstream_retries_total`; at debug level it is logged here.
    fn suppress_proxy_warn_log(
        &self,
        _session: &Session,
        ctx: &RequestCtx,
        error: &Error,
        _context: pingora::proxy::ProxyWarnLogContext,
    ) -> bool {
        log::debug!(
            "request_id={} upstream={} attempt {} failed, retrying: {error}",
            ctx.request_id,
            ctx.upstream_name().unwrap_or("-"),
            ctx.tried.len()
        );
        true
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        // An HTTP/2 stream the client ended early counts against the
        // budget of its connection (checked before forwarding otherwise).
        if !ctx.client_cancelled
            && session.req_header().version == http::Version::HTTP_2
            && e.is_some_and(|e| *e.esource() == pingora::ErrorSource::Downstream)
        {
            conn::record_cancel();
        }
        observe::finished(session, e, ctx);
        trace::finish(session, e, ctx);
        // `RUST_LOG=meshgate=debug`: one line per request, whatever the
        // access log's setting.
        if log::log_enabled!(log::Level::Debug) {
            let req = session.req_header();
            log::debug!(
                "request request_id={} listener={} route={} upstream={} method={} path={} status={} duration_ms={:.3}",
                ctx.request_id,
                ctx.listener_name().unwrap_or("-"),
                ctx.route_name().unwrap_or("-"),
                ctx.upstream_name().unwrap_or("-"),
                req.method,
                req.uri.path(),
                session.response_written().map_or(0, |r| r.status.as_u16()),
                ctx.started.elapsed().as_secs_f64() * 1000.0
            );
        }
        // Client errors (404, 400) are visible in metrics and the access log;
        // the log proper carries what an operator must look at.
        // A client that hung up is its own business; log what failed on the
        // gateway's or the upstream's side.
        // A Redis outage under on_error = "deny" is logged once by the rate
        // limiter, not once per refused request.
        // A failure meshgate classified decides by its status (a 413 the
        // body filter raised is the client's); an unclassified error by
        // where it came from.
        let log_it = match ctx.failure {
            Some(f) => f.status() >= 500 && f != Failure::RateLimitUnavailable,
            None => e.is_some_and(|e| *e.esource() != pingora::ErrorSource::Downstream),
        };
        if log_it {
            let req = session.req_header();
            log::warn!(
                "request failed: request_id={} listener={} route={} upstream={} method={} path={} status={} reason={} error={}",
                ctx.request_id,
                ctx.listener_name().unwrap_or("-"),
                ctx.route_name().unwrap_or("-"),
                ctx.upstream_name().unwrap_or("-"),
                req.method,
                req.uri.path(),
                session.response_written().map_or(0, |r| r.status.as_u16()),
                ctx.failure.map_or("-", |f| f.message()),
                e.map_or_else(|| "-".to_string(), |e| e.to_string())
            );
        }
    }

    fn request_summary(&self, session: &Session, ctx: &RequestCtx) -> String {
        format!(
            "{} request_id={}",
            session.as_ref().request_summary(),
            ctx.request_id
        )
    }
}
