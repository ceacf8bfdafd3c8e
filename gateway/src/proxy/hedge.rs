//! The hedge stage: on a route with `hedge`, a bodyless idempotent request
//! whose attempt has no response head after `after` is sent to another
//! endpoint too; the first head wins and the other attempts are cancelled.
//!
//! Pingora's proxy runs one attempt at a time, so for these requests this
//! stage runs the attempt loop itself, over Pingora's upstream connector
//! (its own pool). What to do with each failure and whether a hedge may
//! go is asked of `resilience`, as the Pingora path asks; the request is
//! built by the forward stage and the winner's head by the response stage,
//! so a hedged request looks the same upstream, to the client and in the
//! access log and metrics.

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};
use http::header;
use pingora::connectors::http::Connector;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::http::client::HttpSession;
use pingora::proxy::Session;
use pingora::upstreams::peer::{HttpPeer, Peer};
use pingora::{Error, ErrorSource, ErrorType, Result};

use super::ctx::{Failure, RequestCtx};
use super::{forward, headers, observe, retry, trace};
use crate::config::model::HedgePolicy;
use crate::endpoints::set::InFlight;
use crate::endpoints::Outcome;
use crate::resilience::limit::{Claim, Overflow};
use crate::resilience::{self, Reason};
use crate::runtime::upstream::{Members, UpstreamPool};
use crate::runtime::Runtime;
use crate::telemetry::tracing::Tracing;

/// Response heads read before the final one (1xx answers are skipped).
const MAX_INFORMATIONAL: usize = 8;

/// Runs hedged exchanges; one per process, with its own connection pool.
pub struct Hedger {
    connector: Connector,
}

impl Default for Hedger {
    fn default() -> Self {
        Hedger {
            connector: Connector::new(None),
        }
    }
}

/// One attempt of the request.
struct Attempt {
    endpoint: usize,
    addr: Option<std::net::SocketAddr>,
    hedge: bool,
    started: Instant,
    /// Still waiting for its head.
    running: bool,
    /// Its place in the endpoint's load, until it ends (the winner's, until
    /// the request ends).
    load: Option<InFlight>,
    span: Option<opentelemetry::Context>,
    /// The request went out (it was not still waiting or connecting).
    sent: Arc<AtomicBool>,
}

impl Attempt {
    fn sent(&self) -> bool {
        self.sent.load(Ordering::Relaxed)
    }
}

/// An attempt that got its final response head.
struct Answered {
    session: HttpSession,
    reused: bool,
    peer: Box<HttpPeer>,
    /// How long a new connection took to open.
    connect: Duration,
    /// 1xx heads before the final one (passed on with it: which attempt
    /// wins is not known while they arrive).
    informational: Vec<ResponseHeader>,
    /// Its connection under `max_connections`, until the answer is sent.
    _claim: Option<Claim>,
}

impl Answered {
    fn head(&self) -> Option<&ResponseHeader> {
        self.session.response_header()
    }
}

type Running<'a> = Pin<Box<dyn Future<Output = (usize, Result<Answered>)> + Send + 'a>>;

/// The race: attempts in flight, and when the next hedge or retry goes.
struct Race<'a> {
    running: FuturesUnordered<Running<'a>>,
    attempts: Vec<Attempt>,
    hedges: u32,
    next_hedge: Option<Instant>,
    retry_at: Option<Instant>,
    /// A retried status (a 503) set aside while other attempts ran: the
    /// answer when they fail too, as the Pingora path would have passed it.
    fallback: Option<(usize, Answered)>,
}

/// Pooled connections found closed, retried at once, at most.
const MAX_STALE_RETRIES: usize = 8;

/// Send `req` to `peer` and read its final response head. As on
/// Pingora's path, each phase has its own bound: the wait for a connection
/// under `max_connections` (`queue_timeout`), connecting (the peer's
/// connect timeout), then writing and reading the head (`within`). `sent`
/// is set once the request went out. An error on a pooled connection is
/// marked to retry at once (its endpoint had closed it).
async fn exchange(
    connector: &Connector,
    pool: &UpstreamPool,
    peer: Box<HttpPeer>,
    req: RequestHeader,
    within: Duration,
    request_id: String,
    sent: Arc<AtomicBool>,
) -> Result<Answered> {
    let claim = match peer._address.as_inet() {
        Some(addr) => pool.gate.connection(*addr).await.map_err(|limit| {
            // `settle` reads the limit back from the error's type.
            Error::explain(ErrorType::Custom(limit.as_str()), "upstream limits")
        })?,
        None => None,
    };
    let begun = Instant::now();
    let (mut session, reused) = connector
        .get_http_session(&*peer)
        .await
        .map_err(Error::into_up)?;
    let connect = begun.elapsed();
    if let Err(why) = pool.check_identity(session.digest()) {
        log::warn!("request_id={request_id} {why}");
        return Err(Error::create(
            ErrorType::InvalidCert,
            ErrorSource::Upstream,
            Some(why.into()),
            None,
        ));
    }
    session.set_read_timeout(peer.options.read_timeout);
    session.set_write_timeout(peer.options.write_timeout);
    let work = async {
        session.write_request_header(Box::new(req)).await?;
        sent.store(true, Ordering::Relaxed);
        session.finish_request_body().await?;
        let mut informational = Vec::new();
        for _ in 0..=MAX_INFORMATIONAL {
            session.read_response_header().await?;
            match session.response_header().map(|h| h.status) {
                Some(s) if s == http::StatusCode::SWITCHING_PROTOCOLS => {
                    // RFC 9110 §7.8: no upgrade was asked for.
                    return Error::e_explain(
                        ErrorType::InvalidHTTPHeader,
                        "101 Switching Protocols to a request that asked for no upgrade",
                    );
                }
                Some(s) if s.is_informational() => {
                    informational.extend(session.response_header().cloned())
                }
                _ => return Ok(informational),
            }
        }
        Error::e_explain(ErrorType::InvalidHTTPHeader, "too many 1xx responses")
    };
    let head = match tokio::time::timeout(within, work).await {
        Ok(r) => r,
        Err(_) => Err(Error::explain(
            ErrorType::ReadTimedout,
            "no response head within the attempt's time",
        )),
    };
    match head {
        Ok(informational) => Ok(Answered {
            session,
            reused,
            peer,
            connect,
            informational,
            _claim: claim,
        }),
        Err(mut e) => {
            e.retry.decide_reuse(reused);
            Err(e.into_up())
        }
    }
}

/// The request an attempt sends: the client's, made an HTTP/1.1 request
/// as Pingora makes it (`Host` from the authority, hop-by-hop fields
/// dropped), then edited by the forward stage.
fn upstream_request(
    session: &Session,
    ctx: &RequestCtx,
    client: Option<IpAddr>,
) -> Result<RequestHeader> {
    let client_req = session.req_header();
    let mut req = client_req.clone();
    req.set_version(http::Version::HTTP_11);
    // The authority the request was routed by (an HTTP/2 `:authority`, an
    // absolute-form target) is its Host, as Pingora sends it.
    if let Some(authority) = client_req.uri.authority() {
        let host = http::HeaderValue::from_str(authority.as_str())
            .map_err(|e| Error::because(ErrorType::InvalidHTTPHeader, "authority", e))?;
        req.insert_header(header::HOST, host)?;
    }
    headers::strip_request_hop_by_hop(&mut req);
    forward::upstream_request(ctx, client_req, client, &mut req)?;
    Ok(req)
}

/// The error of a client that hung up (or reset its stream) while its
/// answer was awaited or sent: what watching its connection returned.
fn client_left(watched: Result<Option<bytes::Bytes>>) -> Box<Error> {
    match watched {
        Err(e) => e,
        Ok(_) => Error::explain(ErrorType::ConnectionClosed, "the client left"),
    }
    .into_down()
}

/// Whether an error happened before anything reached the endpoint.
fn before_connected(e: &Error) -> bool {
    use ErrorType::*;
    matches!(
        e.etype(),
        ConnectTimedout
            | ConnectRefused
            | ConnectNoRoute
            | ConnectError
            | BindError
            | SocketError
            | TLSHandshakeFailure
            | TLSHandshakeTimedout
            | InvalidCert
            | HandshakeError
    )
}

/// The status an answer counts as for retries and outlier detection (a
/// gRPC `UNAVAILABLE` in the head is a 503).
fn counted_status(resp: &ResponseHeader) -> u16 {
    resp.headers
        .get("grpc-status")
        .and_then(|s| resilience::grpc_status_as_http(s.as_bytes()))
        .unwrap_or(resp.status.as_u16())
}

impl Hedger {
    /// Serve the request through a hedged race; `Ok(true)`: the response
    /// was written. An error goes to `fail_to_proxy` as any other.
    pub async fn serve(
        &self,
        tracing: Option<&Tracing>,
        session: &mut Session,
        ctx: &mut RequestCtx,
        policy: HedgePolicy,
        client: Option<IpAddr>,
    ) -> Result<bool> {
        let rt: Arc<Runtime> = ctx
            .runtime
            .clone()
            .ok_or_else(|| Error::new_in(ErrorType::InternalError))?;
        let pool = ctx
            .upstream
            .and_then(|u| rt.upstreams.get(u))
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "no upstream chosen"))?;
        let members = ctx.members.get_or_insert_with(|| pool.members()).clone();
        let mut race = Race {
            running: FuturesUnordered::new(),
            attempts: Vec::new(),
            hedges: 0,
            next_hedge: None,
            retry_at: None,
            fallback: None,
        };
        ctx.upstream_started = Some(Instant::now());
        super::client_still_there(session, ctx)?;
        self.start(
            &mut race, tracing, session, ctx, &rt, pool, &members, client, false,
        )?;
        race.next_hedge = resilience::hedge::next_due(&policy, 0, Instant::now(), ctx.deadline);
        let far = || tokio::time::Instant::now() + Duration::from_secs(86_400);
        let at = |t: Option<Instant>| t.map_or_else(far, tokio::time::Instant::from_std);
        let winner = loop {
            let (hedge_at, retry_at, deadline) =
                (at(race.next_hedge), at(race.retry_at), at(ctx.deadline));
            tokio::select! {
                Some((id, result)) = race.running.next(), if !race.running.is_empty() => {
                    if let Some(won) = self.settle(&mut race, session, ctx, pool, &members, id, result)? {
                        break won;
                    }
                }
                _ = tokio::time::sleep_until(hedge_at), if race.next_hedge.is_some() => {
                    let now = Instant::now();
                    if resilience::hedge::afford(pool.budget.as_deref(), now) {
                        race.hedges += 1;
                        ctx.hedges = race.hedges;
                        self.start(&mut race, tracing, session, ctx, &rt, pool, &members, client, true)?;
                        race.next_hedge =
                            resilience::hedge::next_due(&policy, race.hedges, now, ctx.deadline);
                    } else {
                        pool.series.budget_exhausted().inc();
                        race.next_hedge = None;
                    }
                }
                _ = tokio::time::sleep_until(retry_at), if race.retry_at.is_some() => {
                    race.retry_at = None;
                    super::client_still_there(session, ctx)?;
                    if let Some(series) = ctx.upstream_series() {
                        series.retries(ctx.next_attempt_reason).inc();
                    }
                    self.start(&mut race, tracing, session, ctx, &rt, pool, &members, client, false)?;
                    race.next_hedge = resilience::hedge::next_due(
                        &policy,
                        race.hedges,
                        Instant::now(),
                        ctx.deadline,
                    );
                }
                // The client hung up (or reset its stream) while it waited:
                // the attempts are dropped, and say nothing of their endpoints.
                gone = session.as_mut().read_body_or_idle(true) => {
                    for a in race.attempts.iter_mut().filter(|a| a.running) {
                        trace::end_attempt(a.span.take(), None, Some("cancelled"));
                    }
                    return Err(client_left(gone));
                }
                _ = tokio::time::sleep_until(deadline), if ctx.deadline.is_some() => {
                    if let Some(answer) = race.fallback.take() {
                        break answer;
                    }
                    // The first attempt sent timed out, as on Pingora's path;
                    // the hedges raced it and say nothing.
                    let mut reported = false;
                    for a in race.attempts.iter_mut().filter(|a| a.running) {
                        if !reported && a.sent() {
                            pool.report(&members, a.endpoint, Outcome::Failure, a.started.elapsed());
                            reported = true;
                        }
                        trace::end_attempt(a.span.take(), None, Some("timeout"));
                    }
                    ctx.failure = Some(Failure::Timeout);
                    return Err(Error::explain(
                        ErrorType::ReadTimedout,
                        "route timeout passed before a response head",
                    )
                    .into_up());
                }
            }
        };
        let (id, answered) = winner;
        drop(race.running);
        drop(race.fallback);
        let won_at = race.attempts[id].started;
        for (i, a) in race.attempts.iter_mut().enumerate() {
            // The attempt a hedge beat waited longer than the winner took:
            // its endpoint hears of it as of a timeout, so one that hangs is
            // ejected though hedges hide it from clients. A hedge that lost,
            // or an attempt never sent, says nothing of its endpoint.
            if a.running && i != id && a.started < won_at && a.sent() {
                pool.report(&members, a.endpoint, Outcome::Failure, a.started.elapsed());
            }
            if i != id {
                trace::end_attempt(a.span.take(), None, Some("cancelled"));
            }
            if a.hedge {
                pool.series.hedges(i == id).inc();
            }
        }
        let won = &mut race.attempts[id];
        ctx.endpoint = won.addr;
        ctx.client_cx = won.span.take();
        // It counts in its endpoint's load until the request ends.
        ctx.at_endpoint = won.load.take();
        ctx.connected = true;
        pool.series.connections(answered.reused).inc();
        if !answered.reused {
            crate::telemetry::metrics::metrics()
                .upstream_connect_duration
                .with_label_values(&[pool.name.as_str()])
                .observe(answered.connect.as_secs_f64());
        }
        self.respond(session, ctx, answered).await
    }

    /// Start an attempt (a hedge when `hedge`) at an endpoint not tried yet
    /// where there is one.
    #[allow(
        clippy::too_many_arguments,
        reason = "the race's parts, borrowed apart"
    )]
    fn start<'a>(
        &'a self,
        race: &mut Race<'a>,
        tracing: Option<&Tracing>,
        session: &Session,
        ctx: &mut RequestCtx,
        rt: &Runtime,
        pool: &'a UpstreamPool,
        members: &Members,
        client: Option<IpAddr>,
        hedge: bool,
    ) -> Result<()> {
        let remaining = ctx.remaining();
        let Some((endpoint, peer, load)) =
            super::choose(session, ctx, rt, pool, members, remaining)
        else {
            ctx.failure = Some(Failure::NoEndpoints);
            return Err(Error::explain(
                ErrorType::ConnectNoRoute,
                "upstream has no endpoints",
            ));
        };
        let addr = peer._address.as_inet().copied();
        ctx.tried.push(endpoint);
        ctx.endpoint = addr;
        let span = tracing.and_then(|t| trace::attempt_span(t, session.req_header(), ctx));
        // The forward stage puts the attempt's trace context on its request.
        ctx.client_cx = span.clone();
        let req = upstream_request(session, ctx, client);
        ctx.client_cx = None;
        let req = match req {
            Ok(req) => req,
            Err(e) => {
                trace::end_attempt(span, None, Some("internal"));
                return Err(e);
            }
        };
        let within = peer.options.read_timeout.unwrap_or(remaining);
        let id = race.attempts.len();
        let sent = Arc::new(AtomicBool::new(false));
        race.attempts.push(Attempt {
            endpoint,
            addr,
            hedge,
            started: Instant::now(),
            running: true,
            load,
            span,
            sent: sent.clone(),
        });
        let connector = &self.connector;
        let request_id = ctx.request_id.to_string();
        race.running.push(Box::pin(async move {
            (
                id,
                exchange(connector, pool, peer, req, within, request_id, sent).await,
            )
        }));
        Ok(())
    }

    /// An attempt ended: its answer wins, or it failed and the race goes on
    /// (others still run, or a retry is due), or the failure is the
    /// request's.
    #[allow(
        clippy::too_many_arguments,
        reason = "the race's parts, borrowed apart"
    )]
    fn settle(
        &self,
        race: &mut Race<'_>,
        session: &Session,
        ctx: &mut RequestCtx,
        pool: &UpstreamPool,
        members: &Members,
        id: usize,
        result: Result<Answered>,
    ) -> Result<Option<(usize, Answered)>> {
        let a = &mut race.attempts[id];
        a.running = false;
        if result.is_err() {
            a.load = None;
        }
        let rtt = a.started.elapsed();
        let others_running = !race.running.is_empty();
        let rt = ctx.runtime.clone();
        let policy = rt
            .as_deref()
            .zip(ctx.route)
            .and_then(|(rt, r)| rt.route(r).retries.as_ref());
        match result {
            Ok(answered) => {
                let status = answered.head().map_or(0, counted_status);
                pool.report(members, a.endpoint, Outcome::of_status(status), rtt);
                if let Some(adaptive) = &pool.adaptive {
                    adaptive.sample(rtt, Instant::now());
                }
                let reason = Reason::Status(status);
                if status < 500 || !resilience::retried_on(policy, reason) {
                    return Ok(Some((id, answered)));
                }
                let addr = a.addr;
                if others_running {
                    // Set aside: the answer if the others fail too.
                    race.fallback = Some((id, answered));
                    return Ok(None);
                }
                if retry::decide(session, ctx, reason) {
                    trace::end_attempt(a.span.take(), Some(status), None);
                    a.load = None;
                    self.retry_later(race, ctx, addr);
                    return Ok(None);
                }
                Ok(Some((id, answered)))
            }
            Err(e) => {
                if let ErrorType::Custom(label) = e.etype() {
                    if let Some(limit) = Overflow::from_label(label) {
                        // Refused by the upstream's limits: nothing was sent.
                        trace::end_attempt(a.span.take(), None, Some("upstream_overloaded"));
                        if others_running {
                            return Ok(None);
                        }
                        if let Some(answer) = race.fallback.take() {
                            return Ok(Some(answer));
                        }
                        ctx.overflow = Some(limit);
                        ctx.failure = Some(Failure::UpstreamOverloaded);
                        return Err(super::overflowed(pool, limit));
                    }
                }
                let connected = !before_connected(&e);
                // A pooled connection the endpoint had closed: tried again
                // at once, and no failure of the endpoint (as on Pingora's path).
                if connected && e.retry() && ctx.tried.len() < MAX_STALE_RETRIES {
                    trace::end_attempt(a.span.take(), None, Some("retried"));
                    if others_running {
                        return Ok(None);
                    }
                    ctx.next_attempt_reason = "stale_connection";
                    let addr = a.addr;
                    self.retry_later(race, ctx, addr);
                    return Ok(None);
                }
                observe::attempt_failed(ctx, &e);
                pool.report(members, a.endpoint, Outcome::Failure, rtt);
                if connected {
                    if let Some(adaptive) = &pool.adaptive {
                        adaptive.sample(rtt, Instant::now());
                    }
                }
                trace::end_attempt(a.span.take(), None, Some(observe::upstream_error_kind(&e)));
                let addr = a.addr;
                if others_running {
                    return Ok(None);
                }
                let again = if connected {
                    retry::reason_of(&e).is_some_and(|r| retry::decide(session, ctx, r))
                } else {
                    retry::after_connect_failure(session, ctx, pool.connect_retries as usize)
                };
                if again {
                    self.retry_later(race, ctx, addr);
                    return Ok(None);
                }
                match race.fallback.take() {
                    Some(answer) => Ok(Some(answer)),
                    None => Err(e),
                }
            }
        }
    }

    /// A retry decided: it goes after its backoff; no hedge is due meanwhile.
    fn retry_later(
        &self,
        race: &mut Race<'_>,
        ctx: &mut RequestCtx,
        failed: Option<std::net::SocketAddr>,
    ) {
        ctx.retried.push((failed, ctx.next_attempt_reason));
        race.retry_at = Some(Instant::now() + std::mem::take(&mut ctx.backoff));
        race.next_hedge = None;
    }

    /// Write the winner's answer to the client through the response stage,
    /// streaming its body; its connection goes back to the pool when whole.
    async fn respond(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        mut answered: Answered,
    ) -> Result<bool> {
        let Some(head) = answered.head() else {
            return Error::e_explain(ErrorType::InternalError, "no response head");
        };
        let mut resp = head.clone();
        ctx.upstream_status = Some(resp.status.as_u16());
        for mut info in std::mem::take(&mut answered.informational) {
            super::response_head(session, &mut info, ctx);
            session.write_response_header(Box::new(info), false).await?;
        }
        let no_body = session.req_header().method == http::Method::HEAD
            || matches!(resp.status.as_u16(), 204 | 304);
        let length = resp
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let end = no_body || length == Some(0);
        // As Pingora does: a body delimited by the upstream's close goes
        // to the client chunked, so the client's connection stays.
        if !end && length.is_none() && !resp.headers.contains_key(header::TRANSFER_ENCODING) {
            resp.set_version(http::Version::HTTP_11);
            resp.insert_header(header::TRANSFER_ENCODING, "chunked")?;
        }
        super::response_head(session, &mut resp, ctx);
        session.write_response_header(Box::new(resp), end).await?;
        if !end {
            loop {
                // As Pingora's proxy does, a client that leaves while the
                // upstream is slow to send ends the exchange.
                let chunk = tokio::select! {
                    chunk = answered.session.read_response_body() => {
                        chunk.map_err(Error::into_up)?
                    }
                    gone = session.as_mut().read_body_or_idle(true) => {
                        return Err(client_left(gone));
                    }
                };
                if ctx.deadline.is_some_and(|d| Instant::now() > d) {
                    ctx.failure = Some(Failure::Timeout);
                    return Err(Error::explain(
                        ErrorType::ReadTimedout,
                        "route timeout passed while reading the response body",
                    )
                    .into_up());
                }
                let done = chunk.is_none() || answered.session.response_done();
                session.write_response_body(chunk, done).await?;
                if done {
                    break;
                }
            }
        }
        let idle = answered.peer.idle_timeout();
        self.connector
            .release_http_session(answered.session, &*answered.peer, idle)
            .await;
        Ok(true)
    }
}
