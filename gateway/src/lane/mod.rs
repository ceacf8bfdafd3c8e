//! The HTTP/1.1 fast lane (`gateway.http1_engine = "fast"`, the default): meshgate's own
//! driver for the requests Pingora's HTTP/1 path spends most on,
//! keep-alive HTTP/1.1 to HTTP/1.1 upstreams, over the same stages as the
//! Pingora driver ([`crate::proxy`]): routing, the forward edits, the retry
//! and budget decisions, endpoint choice and outlier accounting, answers
//! the gateway writes itself, the access log and metrics.
//!
//! The keep-alive loop ([`crate::downstream`]) hands the lane each request
//! head it read whole. The lane takes a request only when every decision
//! about it is one the lane makes exactly as Pingora's driver would
//! ([`plan`]); anything else (a refusal, a policy, a body still arriving,
//! a pipelined request, an upgrade, HTTP/1.0, HTTP/2 upstreams, tracing) is handed back with its bytes, and Pingora serves it as
//! before. What the lane writes is Pingora's bytes: the upstream request
//! and the response head are the same edits on the lines as read
//! ([`crate::http1::fields`]), with the same fields Pingora adds (`Date`,
//! `Connection`, chunked framing for a close-delimited body).
//!
//! Per request there is no `HeaderMap`, no task and no large future moved
//! about; upstream connections are pooled per worker thread ([`pool`]).

mod client;
mod plan;
pub mod pool;
mod upstream;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use pingora::{Error, ErrorType, RetryType};
use tokio::io::AsyncReadExt;

use crate::deadline::IdleTimer;
use crate::endpoints::Outcome;
use crate::http1::fields::FieldList;
use crate::http1::response::{self, Framing};
use crate::http1::spare;
use crate::proxy::ctx::{Failure, RequestCtx};
use crate::proxy::{observe, respond, retry};
use crate::resilience::Reason;
use crate::runtime::Runtime;
pub use client::Conn;
use client::LaneClient;
use plan::Plan;
use upstream::UpStream;

/// How a request handed to the lane ended.
#[derive(Debug)]
pub enum Served {
    /// Answered; the connection carries the next request.
    KeepAlive,
    /// Answered (or the client went away); the connection closes.
    Close,
    /// Not for the lane: Pingora serves it from these bytes.
    Fallback(BytesMut),
}

/// Most bytes of an upstream's response head (Pingora's client limit).
const MAX_RESPONSE_HEAD: usize = 1024 * 1024;
/// Each read of a response head: most heads, and small bodies with them,
/// fit (Pingora's client reads heads the same way), so that many answers
/// in flight at once take little memory.
const HEAD_READ: usize = 4 * 1024;
/// Each read of a response body past what came with its head.
const READ_SIZE: usize = 16 * 1024;

/// Serve the request whose whole head (and body) is `buf`, on listener
/// `listener` of `rt`. `last`: the connection closes after it whatever the
/// client asks (shutdown, the listener's `max_requests_per_connection`).
pub async fn serve(
    rt: &Arc<Runtime>,
    listener: usize,
    conn: Conn<'_>,
    buf: BytesMut,
    last: bool,
    timer: &mut IdleTimer,
) -> Served {
    let mut frozen = buf.freeze();
    let mut planned = plan::plan(rt, listener, &frozen, conn.tls.is_some());
    // A body the first read did not hold whole, whose rest has already
    // arrived: read, and the request planned again. A rest still on its
    // way is Pingora's to wait for.
    if planned.as_ref().err() == Some(&plan::BODY_NOT_WHOLE) {
        if let Some(total) = plan::whole_len(&frozen) {
            let mut buf = BytesMut::from(frozen);
            arrived(conn.stream, &mut buf, total);
            frozen = buf.freeze();
            planned = plan::plan(rt, listener, &frozen, conn.tls.is_some());
        }
    }
    let (mut plan, fields) = match planned {
        Ok(planned) => planned,
        Err(why) => {
            handed_to_pingora(why);
            return Served::Fallback(BytesMut::from(frozen));
        }
    };
    drop(frozen);
    SERVED.with(|c| c.inc());
    let served = answer_plan(rt, listener, conn, &mut plan, fields, last, timer).await;
    // Everything that shared the head's buffer is gone: the next request
    // on this thread reads into it.
    spare::give_bytes(spare::Use::Head, plan.into_buf());
    served
}

/// Read into `buf`, until it holds `total` bytes, what the client has
/// already sent: no wait, and nothing past `total` (a pipelined request's
/// bytes stay in the socket).
fn arrived(stream: &mut pingora::protocols::Stream, buf: &mut BytesMut, total: usize) {
    use tokio::io::AsyncRead;
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let mut chunk = [0u8; 8192];
    buf.reserve(total - buf.len());
    while buf.len() < total {
        let want = (total - buf.len()).min(chunk.len());
        let mut read = tokio::io::ReadBuf::new(&mut chunk[..want]);
        match std::pin::Pin::new(&mut *stream).poll_read(&mut cx, &mut read) {
            std::task::Poll::Ready(Ok(())) if !read.filled().is_empty() => {
                buf.extend_from_slice(read.filled());
            }
            _ => return,
        }
    }
}

/// Serve the request `plan` describes, the client's `fields` forwarded.
async fn answer_plan(
    rt: &Arc<Runtime>,
    listener: usize,
    conn: Conn<'_>,
    plan: &mut Plan,
    fields: FieldList,
    last: bool,
    timer: &mut IdleTimer,
) -> Served {
    let pool = &rt.upstreams[plan.upstream];
    let mut ctx = RequestCtx::new();
    ctx.request_id = crate::proxy::headers::RequestId::from_request(plan.request_id.as_ref());
    ctx.listener = Some(listener);
    ctx.runtime = Some(rt.clone());
    ctx.tls = conn.tls.is_some();
    ctx.in_flight = Some(crate::telemetry::metrics::GaugeGuard::new(
        rt.in_flight(Some(listener)),
    ));
    ctx.route = Some(plan.route);
    ctx.deadline = ctx.started.checked_add(rt.route(plan.route).timeout);
    let policy_head = plan.policy_head.take();
    let peer_ip = LaneClient::peer_ip(conn.peer);
    let request = plan.upstream_request(fields, rt, &ctx, peer_ip);
    let plan = &*plan;
    let keep_alive = plan.keep_alive && !last && !crate::lifecycle::draining();
    let mut client = LaneClient::new(conn, plan, keep_alive);
    // The policy stage: authorization, then rate limits.
    if let Some(req) = policy_head.as_deref() {
        let refused =
            crate::proxy::policy::check(rt, listener, plan.route, req, peer_ip, &mut ctx).await;
        if let Some(refusal) = refused {
            refuse(&mut client, &mut ctx, refusal).await;
            return finish(&client, None, &ctx);
        }
    }
    ctx.upstream = Some(plan.upstream);
    if let Some(budget) = &pool.budget {
        budget.deposit(ctx.started);
    }
    // Circuit breaking: a place among the upstream's max_requests.
    let error = match pool.gate.enter().await {
        Ok(permit) => {
            ctx.upstream_permit = Some(permit);
            attempts(rt, plan, &request, &mut ctx, &mut client, timer).await
        }
        Err(limit) => {
            pool.series.overflow(limit.as_str()).inc();
            ctx.overflow = Some(limit);
            refuse(&mut client, &mut ctx, Failure::UpstreamOverloaded.into()).await;
            None
        }
    };
    if let Some(e) = &error {
        fail(e, &mut ctx, &mut client).await;
    }
    let served = finish(&client, error.as_deref(), &ctx);
    spare::give_bytes(spare::Use::Request, request);
    served
}

/// Answer with the respond stage's refusal; a connection it cannot be
/// written to ends.
async fn refuse(client: &mut LaneClient<'_>, ctx: &mut RequestCtx, refusal: respond::Refusal) {
    if let Err(e) = respond::refuse(client, ctx, refusal).await {
        log::debug!("could not write error response: {e}");
        client.close_after_now();
    }
}

/// The observe stage, and what becomes of the connection.
fn finish(client: &LaneClient<'_>, error: Option<&Error>, ctx: &RequestCtx) -> Served {
    observe::finished(client, error, ctx);
    observe::process_log(client, error, ctx);
    if client.keeps_alive() {
        Served::KeepAlive
    } else {
        Served::Close
    }
}

thread_local! {
    /// This thread's handle on the `served` series: no label lookup per request.
    static SERVED: prometheus::IntCounter = crate::telemetry::metrics::metrics()
        .http1_lane
        .with_label_values(&["fast", ""]);
}

/// Count a request head left to Pingora's driver, and why.
fn handed_to_pingora(why: &'static str) {
    crate::telemetry::metrics::metrics()
        .http1_lane
        .with_label_values(&["pingora", why])
        .inc();
}

/// An error from the upstream's side.
fn upstream_error(etype: ErrorType, why: &'static str) -> Box<Error> {
    Error::explain(etype, why).into_up()
}

/// The attempt loop: endpoints chosen, connections made or taken from
/// the pool, failures decided by the shared retry policy. `None` once the
/// upstream's answer went to the client.
async fn attempts(
    rt: &Runtime,
    plan: &Plan,
    request: &Bytes,
    ctx: &mut RequestCtx,
    client: &mut LaneClient<'_>,
    timer: &mut IdleTimer,
) -> Option<Box<Error>> {
    let pool = &rt.upstreams[plan.upstream];
    let members = pool.members();
    ctx.members = Some(members.clone());
    let route = rt.route(plan.route);
    let sent = plan.sent();
    loop {
        if !ctx.backoff.is_zero() {
            tokio::time::sleep(std::mem::take(&mut ctx.backoff)).await;
        }
        let remaining = match crate::proxy::time_left(ctx) {
            Ok(left) => left,
            Err(e) => return Some(e),
        };
        let per_try = route.retries.as_ref().and_then(|p| p.per_try_timeout);
        let remaining = per_try.map_or(remaining, |t| t.min(remaining));
        let Some((endpoint, addr, times)) = pool.select_addr(&members, &ctx.tried, None, remaining)
        else {
            ctx.failure = Some(Failure::NoEndpoints);
            return Some(Error::explain(
                ErrorType::ConnectNoRoute,
                "upstream has no endpoints",
            ));
        };
        observe::attempt_started(ctx, endpoint, Some(addr));
        ctx.at_endpoint = members.set.in_flight(endpoint);
        // A TLS upstream's peer, with the client certificate as its files
        // hold it now; its settings key the pooled connections.
        let tls = pool.tls_peer(&members, endpoint, &rt.certs);
        let key = tls.as_ref().map_or(0, |p| {
            use pingora::upstreams::peer::Peer;
            p.reuse_hash()
        });
        let (mut up, reused) = match pool::checkout(addr, key) {
            Some(stream) => (stream, true),
            None => match UpStream::connect(addr, times.connect, tls.as_ref()).await {
                Ok(stream) => (stream, false),
                Err(e) => {
                    observe::attempt_failed(ctx, &e);
                    observe::attempt_outcome(ctx, Outcome::Failure);
                    if retry::after_connect_failure_for(&sent, ctx, pool.connect_retries as usize) {
                        continue;
                    }
                    return Some(e);
                }
            },
        };
        observe::connected(ctx, reused);
        if let Err(why) = up.check_identity(pool) {
            log::warn!("request_id={} {why}", ctx.request_id);
            let e = Error::create(
                ErrorType::InvalidCert,
                pingora::ErrorSource::Upstream,
                Some(why.into()),
                None,
            );
            observe::attempt_failed(ctx, &e);
            observe::attempt_outcome(ctx, Outcome::Failure);
            return Some(e);
        }
        let exchange = Exchange {
            read_timeout: times.read,
            write_timeout: times.write,
            head: plan.method == http::Method::HEAD,
            sent: &sent,
        };
        match exchange.run(&mut up, request, ctx, client, timer).await {
            Ok(Some(reuse)) => {
                if reuse {
                    pool::give_back(addr, key, up, times.idle);
                }
                return None;
            }
            // Answered, then cut short: nothing more to send.
            Ok(None) => return None,
            Err(Attempt::Cut(e)) => return Some(e),
            Err(Attempt::Failed(mut e)) => {
                // An answer whose status the route retries.
                if let Some(reason) = ctx.retry_reason.take() {
                    ctx.next_attempt_reason = reason.label();
                    continue;
                }
                // A pooled connection the endpoint had closed (it ended, or
                // its socket failed, before an answer): tried again at once,
                // and no mark against the endpoint, as Pingora decides.
                e.retry.decide_reuse(reused);
                if plan.method.is_idempotent() && e.retry() {
                    continue;
                }
                observe::attempt_failed(ctx, &e);
                observe::attempt_outcome(ctx, Outcome::Failure);
                if retry::reason_of(&e).is_some_and(|r| retry::decide_for(&sent, ctx, r)) {
                    continue;
                }
                return Some(e);
            }
        }
    }
}

/// How an attempt did not end in an answer.
enum Attempt {
    /// Nothing reached the client: the loop decides whether to try again.
    Failed(Box<Error>),
    /// The answer was cut short after its head went out.
    Cut(Box<Error>),
}

/// One exchange on an upstream connection.
struct Exchange<'a> {
    read_timeout: Option<Duration>,
    write_timeout: Option<Duration>,
    head: bool,
    /// What the retry policy is told of the request (nothing of the
    /// answer has reached the client when it is asked).
    sent: &'a retry::Sent<'a>,
}

impl Exchange<'_> {
    /// Send `request`, pass the answer on. `Ok(Some(reuse))`: answered
    /// whole, the connection reusable or not; `Ok(None)`: the client went
    /// away while it was answered.
    async fn run(
        &self,
        up: &mut UpStream,
        request: &Bytes,
        ctx: &mut RequestCtx,
        client: &mut LaneClient<'_>,
        timer: &mut IdleTimer,
    ) -> Result<Option<bool>, Attempt> {
        write(up, request, self.write_timeout, timer)
            .await
            .map_err(Attempt::Failed)?;
        let mut buf = spare::take(spare::Use::Response, HEAD_READ);
        loop {
            let (head_len, mut answer) = self
                .read_head(up, &mut buf, timer)
                .await
                .map_err(Attempt::Failed)?;
            answer.head = buf.split_to(head_len).freeze();
            match answer.framing {
                Framing::Interim => {
                    // Passed on (103 Early Hints) through the same response
                    // stage, and the final answer read.
                    ctx.upstream_status = Some(answer.status);
                    observe::attempt_outcome(ctx, Outcome::of_status(answer.status));
                    let mut fields = answer.fields(ctx);
                    crate::proxy::answer_edits(ctx, answer.status).apply(&mut fields);
                    client
                        .write_interim(answer.status, answer.reason(), fields)
                        .await
                        .map_err(|e| Attempt::Cut(e.into_down()))?;
                    continue;
                }
                _ => return self.answer(up, answer, buf, ctx, client, timer).await,
            }
        }
    }

    /// Read a response head into `buf`: its length and what it says.
    async fn read_head(
        &self,
        up: &mut UpStream,
        buf: &mut BytesMut,
        timer: &mut IdleTimer,
    ) -> Result<(usize, Answer), Box<Error>> {
        loop {
            if !buf.is_empty() {
                let mut fields = [httparse::EMPTY_HEADER; response::MAX_FIELDS];
                match response::parse(buf, &mut fields) {
                    response::Parse::Complete(h) => {
                        let framing = h
                            .framing(self.head)
                            .map_err(|why| upstream_error(ErrorType::InvalidHTTPHeader, why))?;
                        return Ok((h.len, Answer::of(&h, buf, framing)));
                    }
                    response::Parse::Invalid(why) => {
                        return Err(upstream_error(ErrorType::InvalidHTTPHeader, why))
                    }
                    response::Parse::Partial if buf.len() >= MAX_RESPONSE_HEAD => {
                        return Err(upstream_error(
                            ErrorType::InvalidHTTPHeader,
                            "response head too large",
                        ))
                    }
                    response::Parse::Partial => {}
                }
            }
            buf.reserve(HEAD_READ);
            let n = read(up, buf, self.read_timeout, timer).await?;
            if n == 0 {
                let mut e = upstream_error(
                    ErrorType::ConnectionClosed,
                    "the upstream closed the connection before its response head",
                );
                e.retry = RetryType::ReusedOnly;
                return Err(e);
            }
        }
    }

    /// The response stage for the final answer, then its body.
    async fn answer(
        &self,
        up: &mut UpStream,
        answer: Answer,
        mut rest: BytesMut,
        ctx: &mut RequestCtx,
        client: &mut LaneClient<'_>,
        timer: &mut IdleTimer,
    ) -> Result<Option<bool>, Attempt> {
        ctx.upstream_status = Some(answer.status);
        // A gRPC error answered in the head counts as the status it stands for.
        let status = answer.grpc_status.unwrap_or(answer.status);
        observe::attempt_outcome(ctx, Outcome::of_status(status));
        if status >= 500 {
            let reason = Reason::Status(status);
            if retry::decide_for(self.sent, ctx, reason) {
                ctx.retry_reason = Some(reason);
                return Err(Attempt::Failed(upstream_error(
                    ErrorType::HTTPStatus(status),
                    "answer retried",
                )));
            }
        }
        if answer.status == 101 {
            return Err(Attempt::Failed(upstream_error(
                ErrorType::InvalidHTTPHeader,
                "101 Switching Protocols to a request that asked for no upgrade",
            )));
        }
        let mut fields = answer.fields(ctx);
        // Pingora's proxy turns a body delimited by the upstream's close
        // into a chunked one, so the client's connection can stay; not one
        // with a `Transfer-Encoding` other than chunked, which goes on as
        // it came, ending the connection.
        let coded = answer.framing == Framing::UntilClose
            && fields.values(b"transfer-encoding").next().is_some();
        let to_chunked = answer.framing == Framing::UntilClose && !coded;
        if coded {
            client.close_after_now();
        }
        if to_chunked {
            fields.insert(
                Bytes::from_static(b"Transfer-Encoding"),
                http::HeaderValue::from_static("chunked"),
            );
        }
        crate::proxy::answer_edits(ctx, answer.status).apply(&mut fields);
        let chunked = to_chunked || answer.framing == Framing::Chunked;
        let body = Body {
            framing: answer.framing,
            chunked,
            read_timeout: self.read_timeout,
        };
        client
            .write_answer(answer.status, answer.reason(), &mut fields, body.is_empty())
            .await
            .map_err(|e| Attempt::Cut(e.into_down()))?;
        match body.pass(up, &mut rest, ctx, client, timer).await {
            Ok(overread) => {
                let reuse = answer.reusable(overread);
                spare::give(spare::Use::Response, rest);
                Ok(Some(reuse))
            }
            Err(e) => {
                if e.esource() == &pingora::ErrorSource::Downstream {
                    // The client went away: its answer ends here.
                    let _ = client.flush().await;
                }
                Err(Attempt::Cut(e))
            }
        }
    }
}

/// `work`, bounded by `timeout` on the connection's timer; past it, an
/// upstream error of type `late`.
async fn within<T>(
    work: impl std::future::Future<Output = std::io::Result<T>>,
    timeout: Option<Duration>,
    timer: &mut IdleTimer,
    late: ErrorType,
    why: &'static str,
) -> Result<std::io::Result<T>, Box<Error>> {
    let Some(t) = timeout else {
        return Ok(work.await);
    };
    let deadline = Instant::now() + t;
    tokio::select! {
        biased;
        done = work => Ok(done),
        () = timer.until(deadline) => Err(upstream_error(late, why)),
    }
}

/// One read from the upstream into `buf`, within `timeout`.
async fn read(
    up: &mut UpStream,
    buf: &mut BytesMut,
    timeout: Option<Duration>,
    timer: &mut IdleTimer,
) -> Result<usize, Box<Error>> {
    let why = "reading the response";
    within(
        up.read_buf(buf),
        timeout,
        timer,
        ErrorType::ReadTimedout,
        why,
    )
    .await?
    .map_err(|io| {
        // A socket's own failure (not TLS's) is what a pooled connection
        // the endpoint closed shows.
        let os = io.raw_os_error().is_some();
        let mut e = Error::because(ErrorType::ReadError, why, io).into_up();
        if os {
            e.retry = RetryType::ReusedOnly;
        }
        e
    })
}

/// Send `request` within `timeout`: at once when the socket takes it
/// whole (nearly always), without setting a timer.
async fn write(
    up: &mut UpStream,
    request: &[u8],
    timeout: Option<Duration>,
    timer: &mut IdleTimer,
) -> Result<(), Box<Error>> {
    let why = "writing the request";
    let failed = |e| Error::because(ErrorType::WriteError, why, e).into_up();
    let sent = up.try_write_now(request).map_err(failed)?;
    let rest = &request[sent..];
    if rest.is_empty() {
        return Ok(());
    }
    within(
        up.write_rest(rest),
        timeout,
        timer,
        ErrorType::WriteTimedout,
        why,
    )
    .await?
    .map_err(failed)
}

/// What an upstream's response head says, kept as offsets into its bytes.
struct Answer {
    /// The head's bytes (once read whole).
    head: Bytes,
    status: u16,
    framing: Framing,
    /// Where the reason phrase is, if the status line had one.
    reason: Option<(usize, usize)>,
    /// Each line's name and value, as ranges of the head.
    lines: Vec<(usize, usize, usize, usize)>,
    /// A value may span lines (an obs-fold, which the parser allows in
    /// responses, as Pingora's does).
    folded: bool,
    grpc_status: Option<u16>,
    /// The connection may carry another request once the body is read
    /// whole and nothing came after it.
    reusable: bool,
}

impl Answer {
    fn of(h: &response::Head<'_, '_>, buf: &[u8], framing: Framing) -> Answer {
        let base = buf.as_ptr() as usize;
        let at = |s: &[u8]| (s.as_ptr() as usize - base, s.len());
        let lines: Vec<(usize, usize, usize, usize)> = h
            .headers
            .iter()
            .map(|f| {
                let (n, nl) = at(f.name.as_bytes());
                let (v, vl) = at(f.value);
                (n, nl, v, vl)
            })
            .collect();
        // Each line's CRLF, and the empty line's, right after its value:
        // no value spans lines. Otherwise (a fold, bare LFs, trailing
        // blanks) each value is looked at.
        let tight = lines.windows(2).all(|w| w[1].0 == w[0].2 + w[0].3 + 2)
            && lines.last().is_none_or(|l| l.2 + l.3 + 4 == h.len);
        let grpc_status = h
            .headers
            .iter()
            .find(|f| f.name.eq_ignore_ascii_case("grpc-status"))
            .and_then(|f| crate::resilience::grpc_status_as_http(f.value));
        Answer {
            head: Bytes::new(),
            status: h.status,
            framing,
            reason: h.reason.map(|r| at(r.as_bytes())),
            lines,
            folded: !tight,
            grpc_status,
            // Decided now, from the head, as Pingora's client decides it.
            reusable: h.keep_alive(framing, false, false),
        }
    }

    fn reason(&self) -> Option<&str> {
        let sent = self
            .reason
            .and_then(|(at, len)| std::str::from_utf8(&self.head[at..at + len]).ok());
        response::reason_phrase(sent, self.status)
    }

    /// The head's lines, sharing its bytes, in the case the gateway keeps.
    fn fields(&self, ctx: &RequestCtx) -> FieldList {
        let keep_case = crate::proxy::keeps_case(ctx);
        let mut fields = FieldList::over(self.head.clone(), self.lines.len() + 4, keep_case);
        for &(n, nl, v, vl) in &self.lines {
            if self.folded && self.head[v..v + vl].contains(&b'\n') {
                fields.append_unfolded(n..n + nl, v..v + vl);
            } else {
                fields.append_read(n..n + nl, v..v + vl);
            }
        }
        fields
    }

    fn reusable(&self, overread: bool) -> bool {
        self.reusable && !overread
    }
}

/// How the answer's body is passed on.
struct Body {
    framing: Framing,
    /// The client is sent it chunked.
    chunked: bool,
    read_timeout: Option<Duration>,
}

impl Body {
    /// Whether the answer has a body for the client.
    fn is_empty(&self) -> bool {
        matches!(self.framing, Framing::Empty | Framing::Length(0))
    }

    /// Pass the body from `up` (after the `rest` already read) to the
    /// client. `Ok(overread)`: whole, with or without bytes past its end.
    async fn pass(
        &self,
        up: &mut UpStream,
        rest: &mut BytesMut,
        ctx: &mut RequestCtx,
        client: &mut LaneClient<'_>,
        timer: &mut IdleTimer,
    ) -> Result<bool, Box<Error>> {
        match self.framing {
            Framing::Empty | Framing::Interim => {
                client.flush().await?;
                Ok(!rest.is_empty())
            }
            Framing::Length(n) => {
                let mut left = n;
                loop {
                    if !rest.is_empty() {
                        let take = rest.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                        let piece = rest.split_to(take).freeze();
                        left -= take as u64;
                        client.write_piece(piece, false).await?;
                    }
                    if left == 0 {
                        client.flush().await?;
                        return Ok(!rest.is_empty());
                    }
                    self.more_of_body(up, rest, ctx, timer).await?;
                }
            }
            Framing::Chunked => {
                let mut decoder = crate::http1::chunked::Decoder::default();
                loop {
                    if !rest.is_empty() {
                        let mut pieces = Vec::new();
                        let used = decoder
                            .decode(rest, |d| pieces.push(Bytes::copy_from_slice(d)))
                            .map_err(|_| {
                                upstream_error(ErrorType::InvalidHTTPHeader, "invalid chunked body")
                            })?;
                        let _ = rest.split_to(used);
                        for piece in pieces {
                            client.write_piece(piece, self.chunked).await?;
                        }
                        client.flush().await?;
                    }
                    if decoder.is_done() {
                        client.end_chunked(self.chunked).await?;
                        return Ok(!rest.is_empty());
                    }
                    self.more_of_body(up, rest, ctx, timer).await?;
                }
            }
            Framing::UntilClose => loop {
                if !rest.is_empty() {
                    let piece = rest.split().freeze();
                    client.write_piece(piece, self.chunked).await?;
                    client.flush().await?;
                }
                if self.more(up, rest, ctx, timer).await?.is_none() {
                    client.end_chunked(self.chunked).await?;
                    return Ok(false);
                }
            },
        }
    }

    /// Read more of a body of known end: its close before then cuts it.
    async fn more_of_body(
        &self,
        up: &mut UpStream,
        rest: &mut BytesMut,
        ctx: &mut RequestCtx,
        timer: &mut IdleTimer,
    ) -> Result<(), Box<Error>> {
        match self.more(up, rest, ctx, timer).await? {
            Some(_) => Ok(()),
            None => Err(upstream_error(
                ErrorType::ConnectionClosed,
                "the upstream closed the connection before the body's end",
            )),
        }
    }

    /// Read more of the body; `None` at the upstream's close. The route's
    /// deadline is checked at each read, as Pingora's driver checks it.
    async fn more(
        &self,
        up: &mut UpStream,
        rest: &mut BytesMut,
        ctx: &mut RequestCtx,
        timer: &mut IdleTimer,
    ) -> Result<Option<usize>, Box<Error>> {
        rest.reserve(READ_SIZE);
        let n = read(up, rest, self.read_timeout, timer).await?;
        if ctx.deadline.is_some_and(|d| Instant::now() > d) {
            ctx.failure = Some(Failure::Timeout);
            return Err(upstream_error(
                ErrorType::ReadTimedout,
                "route timeout passed while reading the response body",
            ));
        }
        Ok((n > 0).then_some(n))
    }
}

/// A request that failed before its answer began: the gateway answers,
/// and the connection closes (part of it may be unread).
async fn fail(e: &Error, ctx: &mut RequestCtx, client: &mut LaneClient<'_>) {
    let failure = respond::classify(e, ctx);
    ctx.failure = failure;
    client.close_after_now();
    // Nothing to write when the client is gone, or its answer has begun.
    let Some(failure) = failure.filter(|_| !client.status_written_any()) else {
        return;
    };
    if let Err(write_err) = respond::send_error(client, failure, ctx).await {
        log::debug!("could not write error response: {write_err}");
    }
}
