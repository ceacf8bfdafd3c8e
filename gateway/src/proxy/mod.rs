//! The `ProxyHttp` implementation: a thin dispatcher. Each phase takes what it
//! needs from the request snapshot and calls the router, upstream pools,
//! header policy or responder.

pub(crate) mod admission;
mod body;
pub mod client;
pub mod conn;
pub mod ctx;
pub mod egress;
mod forward;
mod framing;
pub mod headers;
mod hedge;
pub(crate) mod observe;
pub(crate) mod policy;
pub mod respond;
pub(crate) mod retry;
mod trace;

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::Bytes;
use http::header;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorType, Result};

use crate::config::model::{Action, HeaderCase};
use crate::endpoints::Outcome;
use crate::router::{normalize_host, RequestParts};
use crate::runtime::Runtime;
use crate::telemetry::tracing::Tracing;
use admission::request_host;
use ctx::{Failure, RequestCtx};
use respond::refuse;

/// The proxy service shared by every data-plane listener.
pub struct Proxy {
    runtime: Arc<ArcSwap<Runtime>>,
    /// `None` when tracing is off: then no span work happens at all.
    tracing: Option<Arc<Tracing>>,
    /// Runs the requests of routes with `hedge`.
    hedger: hedge::Hedger,
}

impl Proxy {
    pub fn new(runtime: Arc<ArcSwap<Runtime>>, tracing: Option<Arc<Tracing>>) -> Self {
        Proxy {
            runtime,
            tracing,
            hedger: hedge::Hedger::default(),
        }
    }
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

/// Count a request refused by a listener or route limit.
fn count_rejection(ctx: &RequestCtx, reason: &str) {
    crate::telemetry::metrics::metrics()
        .rejected
        .with_label_values(&[ctx.listener_name().unwrap_or(""), reason])
        .inc();
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

/// Checks a request's connection must still pass: the gateway is not
/// overloaded, and its client certificate is still trusted.
fn connection_still_welcome(
    rt: &Runtime,
    listener: usize,
    session: &Session,
    ctx: &mut RequestCtx,
) -> std::result::Result<(), Failure> {
    if crate::lifecycle::overloaded() {
        crate::lifecycle::shed("request");
        return Err(Failure::Overloaded);
    }
    // A reload may have changed the client CAs or client_auth since this
    // connection's handshake: it must still pass them (a certificate is
    // checked once per connection and CA bundle). On HTTP/2 the
    // connection stays open, and each of its requests is refused.
    let Some(tls) = rt.config.listeners[listener]
        .tls
        .as_ref()
        .filter(|t| t.client_ca.is_some())
    else {
        return Ok(());
    };
    let trusted = match (peer_cert(session), &tls.client_ca) {
        (Some(peer), Some(ca)) => peer.trusted_by(&ca.fingerprint, &rt.material.ca(ca)),
        // Opened without a certificate under `optional`; `require` since.
        _ => tls.client_auth != crate::config::model::ClientAuth::Require,
    };
    if !trusted {
        ctx.peer_identity = None;
        return Err(Failure::ClientCertUntrusted);
    }
    Ok(())
}

/// The certificate the client presented in this connection's handshake.
fn peer_cert(session: &Session) -> Option<&crate::tls::PeerCert> {
    session
        .digest()
        .and_then(|d| d.ssl_digest.as_ref())
        .and_then(|tls| tls.extension.get::<crate::tls::TlsConnection>())
        .and_then(|c| c.peer.as_ref())
}

/// Wait `idle_timeout` for the next request on a kept-alive connection
/// (only where the client keeps the connection: never for a bare HTTP/1.0).
/// During SIGTERM's delay, each connection closes after its next response,
/// so clients reconnect to where the load balancer sends them.
fn keep_alive(session: &mut Session, limits: &crate::config::model::ListenerLimits) {
    if session.get_keepalive().is_some() {
        session.set_keepalive(if crate::lifecycle::draining() {
            None
        } else {
            Some(limits.idle_timeout.as_secs().max(1))
        });
    }
}

/// Put an admitted request in the shape every later stage sees.
fn prepare(session: &mut Session) {
    normalize_request_path(session.req_header_mut());
    if admission::asks_to_close(session.req_header()) {
        session.set_keepalive(None);
    }
    if session.req_header().version == http::Version::HTTP_10 {
        // HTTP/1.0 has no 1xx responses (RFC 9110 §15.2), and a server
        // ignores its 100-continue expectation (§10.1.1): no upstream
        // is asked for one, and none it sends reaches the client.
        session.req_header_mut().remove_header(&header::EXPECT);
        session.as_downstream_mut().set_ignore_info_resp(true);
    }
}

/// Answer a route whose action needs no upstream (`respond`, `redirect`).
async fn answer(
    session: &mut Session,
    ctx: &RequestCtx,
    route: &crate::config::model::Route,
) -> Result<bool> {
    let (status, mut hdrs, body) = match &route.action {
        Action::Forward(_) => return Ok(false),
        Action::Respond {
            status,
            body,
            content_type,
        } => (
            *status,
            vec![(header::CONTENT_TYPE, content_type.clone())],
            body.clone(),
        ),
        Action::Redirect { location, status } => (
            *status,
            vec![(header::LOCATION, location.clone())],
            Bytes::new(),
        ),
    };
    hdrs.extend(respond::rate_limit_headers(ctx));
    respond::send(
        session,
        status,
        &hdrs,
        body,
        &ctx.request_id,
        Some(&route.response_headers),
    )
    .await?;
    Ok(true)
}

/// A request an upstream's `limits` refused at an attempt: counted, and
/// the error (the caller notes `limit` and `Failure::UpstreamOverloaded`
/// on the request, so the answer is 503 `upstream_overloaded` naming it).
fn overflowed(
    pool: &crate::runtime::upstream::UpstreamPool,
    limit: crate::resilience::limit::Overflow,
) -> Box<Error> {
    pool.series.overflow(limit.as_str()).inc();
    Error::explain(
        ErrorType::Custom("upstream_overloaded"),
        format!("upstream `{}` is at {}", pool.name, limit.as_str()),
    )
}

/// The endpoint for the next attempt of `ctx`'s request (one not tried
/// yet where it can, keyed by the upstream's `hash_key`), its peer with
/// the attempt's time (`per_try_timeout` within `remaining`), and the
/// attempt's place in the endpoint's load.
fn choose(
    session: &Session,
    ctx: &RequestCtx,
    rt: &Runtime,
    pool: &crate::runtime::upstream::UpstreamPool,
    members: &crate::runtime::upstream::Members,
    remaining: Duration,
) -> Option<(
    usize,
    Box<HttpPeer>,
    Option<crate::endpoints::set::InFlight>,
)> {
    let req = session.req_header();
    let key = pool.hash_key.as_ref().and_then(|k| {
        let client = ctx
            .listener
            .and_then(|l| policy::effective_client_ip(rt, l, req, client_ip(session)));
        crate::endpoints::key::of(k, &req.headers, req.uri.path(), client)
    });
    let per_try = ctx
        .route
        .and_then(|r| rt.route(r).retries.as_ref())
        .and_then(|p| p.per_try_timeout);
    let remaining = per_try.map_or(remaining, |t| t.min(remaining));
    let (endpoint, mut peer) = pool.select(members, &ctx.tried, key.as_deref(), remaining)?;
    pool.use_current_client_cert(&mut peer, &rt.certs);
    Some((endpoint, peer, members.set.in_flight(endpoint)))
}

/// The longest a failed exchange's close may take: a lingering close's own
/// bound (`downstream::linger`), which also covers a TLS close_notify a
/// client that reads nothing leaves unwritten.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// The response stage for an upstream's answer, whichever driver got it:
/// the connection's keep-alive, the route's `response_headers`, the
/// request id and rate-limit fields, hop-by-hop fields dropped.
fn response_head(session: &mut Session, resp: &mut ResponseHeader, ctx: &mut RequestCtx) {
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
    // A proxy sends its own version (RFC 9110 §6.2): an HTTP/1.0
    // upstream's answer goes out as HTTP/1.1, as NGINX's does, so a client
    // does not take it for a server that cannot keep the connection.
    if resp.version == http::Version::HTTP_10 && !session.is_http2() {
        resp.set_version(http::Version::HTTP_11);
    }
    let edits = answer_edits(ctx, resp.status.as_u16());
    if keeps_case(ctx) {
        edits.apply(resp);
    } else {
        headers::edit_plain_response(resp, edits.room(), |fields| edits.apply(fields))
    }
}

/// The response stage's edits to an upstream's answer of `status`,
/// whichever driver passes it on.
pub(crate) fn answer_edits(ctx: &RequestCtx, status: u16) -> headers::Answer<'_> {
    headers::Answer {
        status: http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::OK),
        rate_limit: respond::rate_limit_headers(ctx),
        request_id: ctx.request_id.header_value(),
        rewrite: ctx.response_rewrite(),
    }
}

/// The time left of the route's deadline before an attempt, whichever
/// driver makes it; none left is the 504 that ends the request.
pub(crate) fn time_left(ctx: &mut RequestCtx) -> Result<Duration> {
    let remaining = ctx.remaining();
    if remaining.is_zero() {
        ctx.failure = Some(Failure::Timeout);
        return Err(Error::explain(
            ErrorType::HTTPStatus(504),
            "route timeout passed before connecting",
        ));
    }
    Ok(remaining)
}

/// Whether the answer's field names keep their case: unless
/// `gateway.header_case = "lowercase"`, and always for egress, which goes
/// to the outside, where names are left as they are.
pub(crate) fn keeps_case(ctx: &RequestCtx) -> bool {
    let case = ctx.runtime.as_ref().map(|rt| rt.config.gateway.header_case);
    !matches!(
        case.filter(|_| ctx.egress.is_none()),
        Some(HeaderCase::Lowercase)
    )
}

impl Proxy {
    /// Take a snapshot of the runtime for this request, and note what the
    /// connection says about it: its listener, its TLS identity.
    fn begin(&self, session: &Session, ctx: &mut RequestCtx) -> Arc<Runtime> {
        let rt = self.runtime.load_full();
        ctx.request_id = headers::RequestId::from_request(
            session.req_header().headers.get(headers::X_REQUEST_ID),
        );
        let local = session.server_addr().and_then(|a| a.as_inet()).copied();
        // By the address the connection arrived on; a connection to an
        // address a reload moved its listener from, by the listener's name.
        ctx.listener = rt
            .listener_for(local)
            .or_else(|| conn::with_listener(|name| name.and_then(|n| rt.listener_named(n))));
        ctx.runtime = Some(rt.clone());
        if session.digest().is_some_and(|d| d.ssl_digest.is_some()) {
            ctx.tls = true;
            ctx.peer_identity = peer_cert(session).and_then(|p| p.identity.clone());
        }
        ctx.in_flight = Some(crate::telemetry::metrics::GaugeGuard::new(
            rt.in_flight(ctx.listener),
        ));
        if let Some(t) = &self.tracing {
            trace::start_server(t, session, ctx);
        }
        rt
    }

    /// Bookkeeping for each connection attempt to `peer` (endpoint index
    /// `endpoint`): timers, the retry count, the attempt's span.
    fn attempt_started(
        &self,
        session: &Session,
        ctx: &mut RequestCtx,
        endpoint: usize,
        peer: &HttpPeer,
    ) {
        observe::attempt_started(ctx, endpoint, peer._address.as_inet().copied());
        if let Some(t) = &self.tracing {
            trace::start_attempt(t, session.req_header(), ctx);
        }
    }
}

#[async_trait]
impl ProxyHttp for Proxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::new()
    }

    fn init_downstream_modules(&self, modules: &mut pingora::modules::http::HttpModules) {
        modules.add_module(Box::new(framing::Http10FramingBuilder));
    }

    /// Route the request; answer it here when the route needs no upstream.
    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        // Pingora parsed the head and handed it over (nothing before this
        // phase can fail): the request is logged by `logging`.
        conn::request_taken();
        client_still_there(session, ctx)?;
        let rt = self.begin(session, ctx);
        let Some(listener) = ctx.listener else {
            return refuse(session, ctx, Failure::NoListener.into()).await;
        };
        if let Err(failure) = connection_still_welcome(&rt, listener, session, ctx) {
            return refuse(session, ctx, failure.into()).await;
        }
        let limits = rt.config.listeners[listener].limits;
        keep_alive(session, &limits);
        if let Err(refused) = admission::admit(session.req_header(), &limits) {
            if let Some(reason) = refused.reason {
                count_rejection(ctx, reason);
            }
            return refuse(session, ctx, refused.failure.into()).await;
        }
        prepare(session);

        let req = session.req_header();
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
            return refuse(session, ctx, Failure::NoRoute.into()).await;
        };
        let route = rt.route(route_idx);
        ctx.deadline = ctx.started.checked_add(route.timeout);
        // A gRPC client's own deadline caps the route's.
        if let Some(t) = session
            .req_header()
            .headers
            .get("grpc-timeout")
            .and_then(|v| crate::resilience::grpc_timeout(v.as_bytes()))
        {
            ctx.deadline = match (ctx.deadline, ctx.started.checked_add(t)) {
                (Some(route), Some(grpc)) => Some(route.min(grpc)),
                (route, grpc) => route.or(grpc),
            };
        }
        ctx.websocket = headers::is_websocket_upgrade(session.req_header());
        let declared = headers::declared_length(session.req_header());
        if declared.is_some_and(|len| len > route.max_body_bytes) {
            count_rejection(ctx, "body_size");
            return refuse(session, ctx, Failure::BodyTooLarge.into()).await;
        }
        let peer = client_ip(session);
        if let Some(refusal) =
            policy::check(&rt, listener, route_idx, session.req_header(), peer, ctx).await
        {
            return refuse(session, ctx, refusal).await;
        }
        let Action::Forward(_) = &route.action else {
            return answer(session, ctx, route).await;
        };
        ctx.upstream = rt.pick_upstream(route_idx);
        let Some(pool) = ctx.upstream.and_then(|u| rt.upstreams.get(u)) else {
            return refuse(session, ctx, Failure::Internal.into()).await;
        };
        if let Some(budget) = &pool.budget {
            budget.deposit(ctx.started);
        }
        // Circuit breaking: a place among the upstream's max_requests.
        match pool.gate.enter().await {
            Ok(permit) => ctx.upstream_permit = Some(permit),
            Err(limit) => {
                pool.series.overflow(limit.as_str()).inc();
                ctx.overflow = Some(limit);
                return refuse(session, ctx, Failure::UpstreamOverloaded.into()).await;
            }
        }
        if let Some(adaptive) = &pool.adaptive {
            let Some(slot) = adaptive.try_enter() else {
                let limit = crate::resilience::limit::Overflow::Concurrency;
                pool.series.overflow(limit.as_str()).inc();
                ctx.overflow = Some(limit);
                return refuse(session, ctx, Failure::UpstreamOverloaded.into()).await;
            };
            ctx.adaptive_slot = Some(slot);
        }
        // Only a hedged route asks whether the request has a body.
        let hedge = route.hedge.as_ref().and_then(|policy| {
            let has_body = !session.as_mut().is_body_empty();
            crate::resilience::hedge::applies(
                Some(policy),
                &session.req_header().method,
                has_body,
                ctx.websocket,
            )
        });
        if let Some(h) = hedge {
            let client = client_ip(session);
            // Boxed: its state would otherwise enlarge every request's future.
            return Box::pin(
                self.hedger
                    .serve(self.tracing.as_deref(), session, ctx, *h, client),
            )
            .await;
        }
        if !ctx.websocket {
            ctx.body_read_timeout = limits.body_read_timeout;
            body::set_read_deadline(session, ctx);
            if declared.is_some_and(|len| len > 0 && len <= route.buffer_request_body) {
                body::buffer(session, ctx).await?;
            }
        }
        Ok(false)
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
        if !ctx.backoff.is_zero() {
            tokio::time::sleep(std::mem::take(&mut ctx.backoff)).await;
        }
        // Cancelled while it was routed (or rate limited): never forwarded.
        client_still_there(session, ctx)?;
        let remaining = time_left(ctx)?;
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
        let members = ctx.members.get_or_insert_with(|| pool.members()).clone();
        let Some((endpoint, peer, in_flight)) = choose(session, ctx, rt, pool, &members, remaining)
        else {
            ctx.failure = Some(Failure::NoEndpoints);
            return Err(Error::explain(
                ErrorType::ConnectNoRoute,
                "upstream has no endpoints",
            ));
        };
        if pool.gate.connections.is_some() {
            // The previous attempt's connection is closed or pooled by now.
            ctx.connection_claim = None;
            if let Some(addr) = peer._address.as_inet().copied() {
                // Boxed, as it is rare: it would enlarge every attempt's future.
                match Box::pin(pool.gate.connection(addr)).await {
                    Ok(claim) => ctx.connection_claim = claim,
                    Err(limit) => {
                        ctx.overflow = Some(limit);
                        ctx.failure = Some(Failure::UpstreamOverloaded);
                        return Err(overflowed(pool, limit));
                    }
                }
            }
        }
        self.attempt_started(session, ctx, endpoint, &peer);
        ctx.at_endpoint = in_flight;
        Ok(peer)
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
        // An answer whose status is retried (decided on its arrival).
        if let Some(reason) = ctx.retry_reason.take() {
            trace::attempt_failed(ctx, &e);
            e.set_retry(true);
            ctx.next_attempt_reason = reason.label();
            return e;
        }
        if !session.req_header().method.is_idempotent() || session.as_ref().retry_buffer_truncated()
        {
            e.set_retry(false);
        } else {
            e.retry.decide_reuse(client_reused);
        }
        if *e.esource() == pingora::ErrorSource::Upstream {
            observe::attempt_failed(ctx, &e);
            trace::attempt_failed(ctx, &e);
            // A pooled connection the endpoint had closed is retried at
            // once and says nothing about the endpoint's health.
            if !e.retry() {
                observe::attempt_outcome(ctx, Outcome::Failure);
                if let Some(reason) = retry::reason_of(&e) {
                    let again = retry::decide(session, ctx, reason);
                    e.set_retry(again);
                }
            }
        }
        e
    }

    fn fail_to_connect(
        &self,
        session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        observe::attempt_failed(ctx, &e);
        trace::attempt_failed(ctx, &e);
        observe::attempt_outcome(ctx, Outcome::Failure);
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
        if retry::after_connect_failure(session, ctx, retries) {
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
        body::count(session, body.as_ref(), end_of_stream, ctx)
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
        let client = client_ip(session);
        forward::upstream_request(ctx, session.req_header(), client, upstream)
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
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        ctx.upstream_status = Some(resp.status.as_u16());
        // A gRPC error answered in the head (trailers-only) counts as the
        // HTTP status it stands for (UNAVAILABLE: 503).
        let status = resp
            .headers
            .get("grpc-status")
            .and_then(|s| crate::resilience::grpc_status_as_http(s.as_bytes()))
            .unwrap_or(resp.status.as_u16());
        observe::attempt_outcome(ctx, Outcome::of_status(status));
        // A status the route retries: this answer goes nowhere, another
        // attempt is made (the retry buffer replays the body).
        if status >= 500 {
            let reason = crate::resilience::Reason::Status(status);
            if retry::decide(session, ctx, reason) {
                ctx.retry_reason = Some(reason);
                let mut e = Error::explain(ErrorType::HTTPStatus(status), "answer retried");
                e.as_up();
                return Err(e);
            }
        }
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
        response_head(session, resp, ctx);
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
        // A final head already sent: the response can only be cut short.
        // After an interim one (an upstream's `100 Continue` relayed) the
        // client still waits for the final answer, and gets the error.
        let interim = |r: &ResponseHeader| r.status.is_informational() && r.status.as_u16() != 101;
        if session.response_written().is_none_or(interim) {
            // The connection is not reused (below: part of the request body
            // may be unread), so the answer says `Connection: close`.
            session.set_keepalive(None);
            match respond::send_error(session, failure, ctx).await {
                Ok(()) => ctx.error_answered = true,
                Err(write_err) => log::debug!("could not write error response: {write_err}"),
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
        observe::process_log(session, e, ctx);
        // A failed HTTP/1 exchange ends its connection, which Pingora then
        // drops unshut: when it was answered with an error, shut it here,
        // with a lingering close on a plain connection (`downstream::linger`),
        // so that a client still sending its body reads the answer (a 413
        // mid-upload) instead of a reset. After the log line, and with what
        // the request held upstream given back: the linger is no part of
        // the request. A response cut short is left to be dropped (a clean
        // end could pass for a whole close-delimited body).
        if e.is_some()
            && ctx.error_answered
            && !session.is_http2()
            && session.get_keepalive().is_none()
        {
            ctx.let_go();
            let closing = session.downstream_session.shutdown();
            let _ = tokio::time::timeout(CLOSE_WAIT, closing).await;
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
