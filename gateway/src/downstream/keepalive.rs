//! HTTP/1 connections between requests.
//!
//! Pingora's own HTTP/1 loop starts on the next request as soon as a response
//! is written: it allocates that request's state (one boxed future sized for
//! the whole proxy path, and a head buffer), which then waits, idle, for the
//! client. An idle keep-alive connection so costs what a request in flight
//! costs. This loop reads the next request's first bytes itself and only
//! then hands the connection to Pingora, with those bytes as the session's
//! first (Pingora's "pipelined prefix", parsed before any read): an idle
//! connection holds its socket and little else, and a head that came whole
//! is parsed without a second read or timer.
//!
//! HTTP/2 (prior knowledge or ALPN) and custom protocols take Pingora's own
//! loop, unchanged. The HTTP/1 loop is Pingora's, with the read added: the
//! same keep-alive settings carried from request to request, and a
//! connection closed after its listener's `idle_timeout` without a request,
//! or at shutdown. A plain HTTP/1 request is told from the HTTP/2 preface by
//! its first byte, so a request shorter than the preface (24 bytes) is
//! served.
//!
//! Pipelined requests (sent before the previous response came back) are
//! served in order, one at a time (RFC 9112 §9.3.2): Pingora keeps the bytes
//! it read past a request and hands them on in its persistent settings, and
//! then this loop does not wait for a read, since the next request's first
//! bytes have already arrived.
//!
//! A head Pingora never passes to the proxy (its parser refused it, it is a
//! `CONNECT`, or the client stopped sending it) leaves the proxy no hook to
//! log it: the loop logs it when Pingora gives the connection up without
//! the proxy having marked the request as its own ([`Fate`]).
//!
//! The loop reads each head whole before Pingora sees it (a head that came
//! in one read, most of them, is handed over at once): a head is refused
//! as soon as it passes its listener's limits, never buffered beyond them
//! ([`super::head`]); every head, not only a connection's
//! first, must be complete within `header_read_timeout`; and heads that
//! need more than one read count against the process-wide budget of
//! unfinished heads ([`super::pending`]), which cuts the oldest.
//!
//! The waits are bounded by one timer per connection, not one per request
//! (`IdleTimer`): a busy connection sets one about once per
//! `idle_timeout`.

use std::future::Future;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::BytesMut;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ServerApp};
use pingora::protocols::http::ServerSession;
use pingora::protocols::{Stream, ALPN};
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};

use super::admission::{Admission, Waiting};
use super::head::{progress, HeadLimits, HeadScan, Progress};
use super::pending::PendingHeads;
use super::probe::{carried_head, FirstLine};
use crate::deadline::IdleTimer;
use crate::lane::Served;
use crate::proxy::conn::{fate, head_handed, with_fate, Fate};
use crate::proxy::observe::refused;
use crate::proxy::observe::HeadEnd;
use crate::runtime::Runtime;

/// Unfinished request heads of every connection; its budget is
/// `[gateway] max_pending_head_bytes`, set at start and on reload.
pub static PENDING_HEADS: PendingHeads =
    PendingHeads::new(crate::config::model::DEFAULT_MAX_PENDING_HEAD_BYTES);

/// How long a refusal the loop writes itself may take to go out.
const REFUSAL_WRITE: Duration = Duration::from_secs(1);

const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Pingora's default keep-alive timeout: a first session's, and the wait of
/// a connection whose listener is unknown.
const DEFAULT_IDLE: Duration = Duration::from_secs(60);
/// Pingora's first head buffer (`INIT_HEADER_BUF_SIZE`); most heads fit.
pub(crate) const HEAD_BUFFER: usize = 4096;

/// One listener's connections: every connection the listener accepts is
/// served from here, the listener known from the start. It holds its slot
/// (`max_connections`), goes to an egress tunnel if it is one, or is
/// served as HTTP/2 or, here, as HTTP/1 with idle connections waiting
/// outside Pingora's proxy app.
pub struct Listener<A> {
    /// Pingora's proxy app, shared by every listener (one upstream pool).
    inner: Arc<A>,
    runtime: Arc<ArcSwap<Runtime>>,
    /// This listener's name: its place among the listeners changes when a
    /// reload adds or removes others, so each snapshot is asked for it.
    name: Arc<str>,
    admission: Arc<Admission>,
}

impl<A> Listener<A> {
    pub fn new(
        inner: Arc<A>,
        runtime: Arc<ArcSwap<Runtime>>,
        name: &str,
        admission: Arc<Admission>,
    ) -> Self {
        Listener {
            inner,
            runtime,
            name: name.into(),
            admission,
        }
    }

    /// This listener's index in `rt`; `None` once a reload removed it (its
    /// connections drain).
    fn at(&self, rt: &Runtime) -> Option<usize> {
        rt.listener_named(&self.name)
    }

    /// This listener's limits on heads now (read per head, so that a
    /// reload applies).
    fn head_settings(&self) -> HeadSettings {
        let rt = self.runtime.load();
        HeadSettings::of(&rt, self.at(&rt))
    }
}

#[async_trait]
impl<A: HttpServerApp + Send + Sync + 'static> ServerApp for Listener<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let _open = self.admission.opened();
        let rt = self.runtime.load_full();
        // A connection accepted as a reload removed its listener: closed.
        let index = self.at(&rt)?;
        let mut stream = super::tunnel::sniff(rt, index, stream).await?;
        // The connection's idle deadline, from its first byte to its last
        // request.
        let mut idle = IdleTimer::default();
        let opened = Instant::now();
        if self.custom(&stream) {
            return ServerApp::process_new(&self.inner, stream, shutdown).await;
        }
        if !self.speaks_http1(&mut stream, &mut idle, opened).await? {
            let settings = self.head_settings();
            let limits = super::h2::H2Limits {
                listener: self.name.to_string(),
                handshake_timeout: settings.handshake_timeout,
                idle_timeout: settings.idle_timeout,
                max_requests: settings.max_requests,
            };
            // HTTP/2 connections get their GOAWAY when SIGTERM comes, not
            // only once its `shutdown_delay` is over.
            // Boxed: its state would otherwise be room every HTTP/1
            // connection holds. Bound before it is awaited: a temporary of
            // the awaiting statement would keep that room all the same.
            let serving = Box::pin(super::h2::serve(
                &self.inner,
                stream,
                limits,
                crate::lifecycle::h2_watch(),
                shutdown.clone(),
            ));
            serving.await;
            return None;
        }
        with_fate(
            self.name.clone(),
            self.serve_http1(stream, shutdown, idle, opened),
        )
        .await
    }

    async fn cleanup(&self) {
        self.inner.http_cleanup().await
    }
}

impl<A: HttpServerApp + Send + Sync + 'static> Listener<A> {
    /// Pingora's HTTP/1 loop, with the wait between requests done here.
    async fn serve_http1(
        self: &Arc<Self>,
        mut stream: Stream,
        shutdown: &ShutdownWatch,
        mut idle: IdleTimer,
        opened: Instant,
    ) -> Option<Stream> {
        // Where a refused head came from; one reference each per connection.
        let digest = stream.get_socket_digest();
        let tls = stream.get_ssl_digest();
        let admission = Some(self.admission.clone()).filter(|a| a.limited());
        // Shutdown closes a connection waiting for a request, as Pingora's
        // loop does; one wake-up registration for the connection's life,
        // not one per wait.
        let mut watch = shutdown.clone();
        let shutting_down = watch.changed();
        tokio::pin!(shutting_down);
        // `None` before the first request; then what Pingora carries over.
        let mut carried: Option<Option<HttpPersistentSettings>> = None;
        // The start of each head, for the log line of one Pingora refuses:
        // the session and its bytes are gone by then. Kept here, and filled
        // in place, so that it is not moved about per request.
        let mut line = FirstLine::default();
        // Requests served on this connection, and those the fast lane
        // served since Pingora's last session (Pingora counts its own).
        let mut served: usize = 0;
        let mut lane_since: u32 = 0;
        loop {
            line.clear();
            // A pipelined request whose first bytes Pingora read with the
            // last one is served at once, even at shutdown; otherwise wait
            // for the client.
            let pipelined = match &carried {
                Some(Some(settings)) => match carried_head(settings, &mut line) {
                    Some(carries) => carries,
                    None => {
                        // Bytes Pingora carried could be lost and the
                        // stream read from the middle of a request: close.
                        static ONCE: std::sync::Once = std::sync::Once::new();
                        ONCE.call_once(|| {
                            log::error!("cannot tell whether Pingora carried a pipelined request (its HttpPersistentSettings Debug output changed): connections are closed after each request");
                        });
                        return None;
                    }
                },
                _ => false,
            };
            let head = if pipelined {
                None
            } else {
                // The first head's deadline runs from the connection's start.
                let started = carried.is_none().then_some(opened);
                let waits = Waits {
                    idle: &mut idle,
                    shutting_down: &mut shutting_down,
                    shutdown,
                    admission: admission.as_ref(),
                };
                match self.read_head(&mut stream, started, waits).await {
                    Head::Complete(head) => {
                        let at = (*shutdown.borrow(), served);
                        match self
                            .lane(&mut stream, head, &digest, tls.as_deref(), at, &mut idle)
                            .await
                        {
                            Served::KeepAlive => {
                                served += 1;
                                lane_since = lane_since.saturating_add(1);
                                continue;
                            }
                            // Closed by the lane, lingering (`linger`).
                            Served::Close => return None,
                            Served::Fallback(head) => Some(head),
                        }
                    }
                    Head::Gone => return None,
                    Head::Unfinished(bytes, end) => {
                        line.fill(&bytes);
                        // Boxed, as the rare path it is: its state would
                        // otherwise be held by every idle connection (and
                        // bound first: a temporary of the awaiting statement
                        // would still hold room for it).
                        let answering = Box::pin(async {
                            let (request_id, answered) = answer(&mut stream, end).await;
                            {
                                let rt = self.runtime.load();
                                refused(
                                    &rt,
                                    self.at(&rt),
                                    digest.as_deref(),
                                    tls.as_deref(),
                                    line.bytes(),
                                    end,
                                    &request_id,
                                );
                            }
                            // Closed lingering, once counted: one still
                            // sending its head reads the answer; one cut
                            // for the budget gives its memory back at once.
                            if answered && end != HeadEnd::Cut {
                                super::linger::close(&mut stream).await;
                            }
                        });
                        answering.await;
                        return None;
                    }
                }
            };
            // Boxed (and bound first, as above): Pingora's session is room
            // no idle connection should hold.
            let serving = Box::pin(self.pingora_request(
                stream,
                head,
                carried,
                (served, lane_since),
                &mut line,
                shutdown,
                (&digest, tls.as_deref()),
            ));
            let next = serving.await?;
            served += 1;
            lane_since = 0;
            (stream, carried) = (next.0, Some(next.1));
        }
    }

    /// One request served by Pingora's HTTP/1 driver, `head` (what the loop
    /// read of it, if anything) as its start, after `served` requests on
    /// the connection (`lane_since` of them by the fast lane since
    /// Pingora's last). The connection back, with what Pingora carries on
    /// to the next request; `None` once it is closed (a head Pingora
    /// refused is logged, from `line`).
    #[allow(clippy::too_many_arguments)]
    async fn pingora_request(
        &self,
        stream: Stream,
        head: Option<BytesMut>,
        carried: Option<Option<HttpPersistentSettings>>,
        (served, lane_since): (usize, u32),
        line: &mut FirstLine,
        shutdown: &ShutdownWatch,
        (digest, tls): (
            &Option<Arc<pingora::protocols::SocketDigest>>,
            Option<&pingora::protocols::tls::SslDigest>,
        ),
    ) -> Option<(Stream, Option<HttpPersistentSettings>)> {
        // A plain connection's socket has no write buffer of its own
        // (`accept`): Pingora's driver gets one while it serves.
        let mut session = ServerSession::new_http1(if tls.is_none() {
            super::buffered::buffered(stream)
        } else {
            stream
        });
        match carried {
            None => {
                // Carried on to every later session by Pingora.
                session.set_pipelining_enabled(true);
                // Pingora's defaults; the proxy sets the listener's own
                // per request.
                session.set_keepalive(if *shutdown.borrow() {
                    None
                } else {
                    Some(DEFAULT_IDLE.as_secs())
                });
                // This request and those the lane served before it
                // count; the rest are reuses.
                let max = self.head_settings().max_requests;
                session.set_keepalive_reuses_remaining(Some(
                    u32::try_from(max.saturating_sub(1 + served)).unwrap_or(u32::MAX),
                ));
            }
            Some(Some(settings)) => {
                settings.apply_to_session(&mut session);
                if lane_since > 0 {
                    let left = session.get_keepalive_reuses_remaining();
                    session
                        .set_keepalive_reuses_remaining(left.map(|n| n.saturating_sub(lane_since)));
                }
            }
            Some(None) => {}
        }
        if let Some(head) = head {
            line.fill(&head);
            start_with(&mut session, head);
        }
        head_handed();
        let Some(reused) = self.inner.process_new_http(session, shutdown).await else {
            let end = match fate() {
                Fate::Taken => return None,
                // Pingora drops a session it has not parsed yet.
                Fate::Handed if *shutdown.borrow() => HeadEnd::Shutdown,
                Fate::Handed => HeadEnd::Refused,
            };
            // Empty lines are no request (a CRLF some clients send after
            // a body, RFC 9112 §2.2), even unfinished.
            if !line.is_blank() {
                let rt = self.runtime.load();
                refused(
                    &rt,
                    self.at(&rt),
                    digest.as_deref(),
                    tls,
                    line.bytes(),
                    end,
                    "",
                );
            }
            return None;
        };
        let (next, settings) = reused.consume();
        let next = super::buffered::unbuffered(next).await.ok()?;
        Some((next, settings))
    }

    /// Offer a whole request head to the fast lane, when the listener's
    /// config asks for it; `Served::Fallback` hands it back. With it: whether
    /// the connection is stopping, and the requests it has served so far.
    async fn lane(
        &self,
        stream: &mut Stream,
        head: BytesMut,
        digest: &Option<Arc<pingora::protocols::SocketDigest>>,
        tls: Option<&pingora::protocols::tls::SslDigest>,
        (stopping, served): (bool, usize),
        idle: &mut IdleTimer,
    ) -> Served {
        // Without the lane, a look at the config, not a reference kept.
        let rt = self.runtime.load();
        if rt.config.gateway.http1_engine != crate::config::model::Http1Engine::Fast {
            return Served::Fallback(head);
        }
        let rt = arc_swap::Guard::into_inner(rt);
        let Some(listener) = self.at(&rt) else {
            return Served::Fallback(head);
        };
        // The connection's last request: the process or the listener stops,
        // or `max_requests_per_connection` is reached with this one.
        let max = rt.config.listeners[listener]
            .limits
            .max_requests_per_connection;
        let last = stopping || served + 1 >= max;
        let peer = digest
            .as_ref()
            .and_then(|d| d.peer_addr())
            .and_then(|a| a.as_inet())
            .copied();
        // Boxed (and bound first): the lane's state is room no idle
        // connection should hold. A connection the lane ends is closed in
        // it, lingering (`linger`), so that a client still sending reads
        // its answer.
        let serving = Box::pin(async move {
            let conn = crate::lane::Conn {
                stream: &mut *stream,
                peer,
                tls,
            };
            let served = crate::lane::serve(&rt, listener, conn, head, last, idle).await;
            if let Served::Close = served {
                let closing = Box::pin(super::linger::close(stream));
                closing.await;
            }
            served
        });
        serving.await
    }

    /// Pingora's choice of protocol, made here so that only HTTP/1 takes this
    /// loop; `None` when the connection failed, or sent nothing within its
    /// `idle_timeout`, while being looked at.
    async fn speaks_http1(
        &self,
        stream: &mut Stream,
        idle: &mut IdleTimer,
        opened: Instant,
    ) -> Option<bool> {
        let options = self.inner.server_options();
        if matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
            return Some(false);
        }
        if stream.get_ssl_digest().is_some() || !options.is_some_and(|o| o.h2c) {
            return Some(true);
        }
        // Pingora reads 24 bytes to compare with the preface, which a short
        // HTTP/1 request (`GET / HTTP/1.0` and a blank line is 18) never
        // sends: the first byte tells most requests apart at once, and the
        // first three the rest (`PUT`, `POST`, `PATCH`, `PROPFIND`: `PRI` is
        // the preface's alone, RFC 9113 §3.4).
        let settings = self.head_settings();
        let head_deadline = settings.header_read_timeout.map(|t| opened + t);
        let deadline = earliest(Instant::now() + settings.idle_timeout, head_deadline);
        let peek = async {
            let mut first = [0u8; 1];
            if !stream.try_peek(&mut first).await? {
                // A stream that cannot be peeked at: Pingora takes it for h2c.
                return Ok(false);
            }
            if first[0] != H2_PREFACE[0] {
                return Ok(true);
            }
            let mut method = [0u8; 3];
            stream.try_peek(&mut method).await?;
            if method != H2_PREFACE[..3] {
                return Ok(true);
            }
            let mut preface = [0u8; H2_PREFACE.len()];
            stream.try_peek(&mut preface).await?;
            Ok::<_, std::io::Error>(preface != *H2_PREFACE)
        };
        tokio::select! {
            biased;
            peeked = peek => peeked.ok(),
            () = idle.until(deadline) => {
                if head_deadline.is_some_and(|d| d <= deadline) {
                    // Counted as the head's timeout it is.
                    let (_, _, reason) = HeadEnd::TimedOut.describe(b"");
                    crate::telemetry::metrics::metrics()
                        .rejected
                        .with_label_values(&[&self.name, reason.unwrap_or_default()])
                        .inc();
                }
                None
            }
        }
    }

    /// A custom protocol's connection, which Pingora's loop serves.
    fn custom(&self, stream: &Stream) -> bool {
        self.inner.server_options().is_some_and(|o| o.force_custom)
            || matches!(stream.selected_alpn_proto(), Some(ALPN::Custom(_)))
    }

    /// Read the next request head whole. `started` is when its deadline
    /// started (the connection's start, for its first head); `None` starts
    /// it at the head's first byte, after an idle wait of up to
    /// `idle_timeout`.
    async fn read_head<F>(
        &self,
        stream: &mut Stream,
        started: Option<Instant>,
        waits: Waits<'_, F>,
    ) -> Head
    where
        F: Future + Unpin,
    {
        let settings = self.head_settings();
        let Waits {
            idle,
            shutting_down,
            shutdown,
            admission,
        } = waits;
        // While it waits, a full listener may take its slot.
        let waiting = admission.map(|a| a.waiting());
        let mut head_deadline = started
            .zip(settings.header_read_timeout)
            .map(|(s, t)| s + t);
        let wait = earliest(Instant::now() + settings.idle_timeout, head_deadline);
        // A new connection gets its first request served even when a
        // reload stops its listener (moved or started again): it was
        // accepted, so its client has sent, or is sending, a request.
        // Kept-alive ones close instead, and every one when the process
        // stops.
        let first = started.is_some();
        let buf = loop {
            tokio::select! {
                // A request already sent is served, even at shutdown.
                biased;
                read = read_some(stream) => match read {
                    Ok(Some(buf)) => break buf,
                    _ => return Head::Gone,
                },
                () = idle.until(wait) => {
                    // A new connection that sent nothing in time is a head
                    // that timed out; a kept-alive one that idled, no head.
                    return if head_deadline.is_some_and(|d| d <= wait) {
                        Head::Unfinished(BytesMut::new(), HeadEnd::TimedOut)
                    } else {
                        Head::Gone
                    };
                }
                // Polled only until the stop shows (it is then done).
                _ = &mut *shutting_down, if !*shutdown.borrow() => {
                    if closes_at_stop(first) {
                        return Head::Gone;
                    }
                }
                () = std::future::ready(()), if *shutdown.borrow() && closes_at_stop(first) => return Head::Gone,
                () = evicted(waiting.as_ref()), if waiting.is_some() => return Head::Gone,
            }
        };
        drop(waiting);
        if head_deadline.is_none() {
            head_deadline = settings.header_read_timeout.map(|t| Instant::now() + t);
        }
        // Most heads came whole in that first read.
        match progress(&buf, settings.limits, &mut 0) {
            Progress::Complete(_) => return Head::Complete(buf),
            Progress::TooLarge => return Head::Unfinished(buf, HeadEnd::TooLarge),
            Progress::UriTooLong => return Head::Unfinished(buf, HeadEnd::UriTooLong),
            Progress::Blank | Progress::Partial => {}
        }
        // The rest (rare: most heads come in one read) in a future of its
        // own, so that an idle connection does not hold room for it.
        let rest = Box::pin(Self::read_rest(
            stream,
            buf,
            settings,
            head_deadline,
            idle,
            Stop {
                first,
                shutting_down,
                shutdown,
            },
        ));
        rest.await
    }

    /// The rest of a head that did not come in one read: into the first
    /// buffer while it has room (most heads end there), then into memory of
    /// its own (an anonymous mapping as large as the head may be, of which
    /// only the pages written to take memory), counted against the budget
    /// of unfinished heads before each read. What it counts is what it
    /// takes, and dropping it gives it all back to the system at once,
    /// which the allocator would not (it keeps freed pages for reuse: a
    /// flood of heads cut for the budget left several MiB behind).
    async fn read_rest<F>(
        stream: &mut Stream,
        mut buf: BytesMut,
        settings: HeadSettings,
        head_deadline: Option<Instant>,
        idle: &mut IdleTimer,
        stop: Stop<'_, F>,
    ) -> Head
    where
        F: Future + Unpin,
    {
        let mut scan = HeadScan::new(settings.limits);
        let mut state = scan.feed(&buf, 0);
        let first_room = buf.capacity();
        // What the head takes: its state, its first buffer, the pages of
        // the rest written to (or about to be).
        let taken = |rest: usize| HEAD_STATE + first_room + rest.next_multiple_of(PAGE);
        let ticket = PENDING_HEADS.register();
        ticket.resize(taken(0));
        // Room for a head one read past its limit, which the scan refuses.
        let room = settings.limits.max_bytes.saturating_sub(first_room) + HEAD_READ;
        let mut rest: Option<memmap2::MmapMut> = None;
        let mut filled = 0;
        loop {
            match state {
                Progress::Complete(_) => {
                    if let Some(rest) = &rest {
                        buf.extend_from_slice(&rest[..filled]);
                    }
                    return Head::Complete(buf);
                }
                Progress::TooLarge => return Head::Unfinished(buf, HeadEnd::TooLarge),
                Progress::UriTooLong => return Head::Unfinished(buf, HeadEnd::UriTooLong),
                Progress::Blank | Progress::Partial => {}
            }
            // Checked before each read, not only while one waits: a client
            // that keeps sending would otherwise be read on after its cut.
            if ticket.is_cut() {
                return Head::Unfinished(buf, HeadEnd::Cut);
            }
            let end = (filled + HEAD_READ).min(room);
            if buf.len() == first_room && rest.is_none() {
                match memmap2::MmapMut::map_anon(room) {
                    Ok(map) => rest = Some(map),
                    Err(e) => {
                        log::warn!(
                            "cannot map {room} bytes for an unfinished request head ({e}); refused"
                        );
                        return Head::Unfinished(buf, HeadEnd::Refused);
                    }
                }
            }
            if rest.is_some() {
                // The next read is counted before it is made.
                ticket.resize(taken(end));
                // Heads the budget cut give their memory back when their
                // tasks next run: until then take no more, or one worker
                // could read for many heads before any cut one is freed.
                while PENDING_HEADS.over_budget() && !ticket.is_cut() {
                    tokio::task::yield_now().await;
                }
                if ticket.is_cut() {
                    return Head::Unfinished(buf, HeadEnd::Cut);
                }
            }
            let wait = earliest(Instant::now() + settings.idle_timeout, head_deadline);
            let before = buf.len() + filled;
            let into = async {
                match &mut rest {
                    // Within the first buffer's room: it does not grow.
                    None => stream.read_buf(&mut buf).await,
                    Some(rest) => stream.read(&mut rest[filled..end]).await,
                }
            };
            let read = tokio::select! {
                biased;
                read = into => read,
                () = ticket.cut() => return Head::Unfinished(buf, HeadEnd::Cut),
                () = idle.until(wait) => return Head::Unfinished(buf, HeadEnd::TimedOut),
                _ = &mut *stop.shutting_down, if !*stop.shutdown.borrow() => {
                    if closes_at_stop(stop.first) {
                        return Head::Unfinished(buf, HeadEnd::Shutdown);
                    }
                    continue;
                }
                () = std::future::ready(()), if *stop.shutdown.borrow() && closes_at_stop(stop.first) => return Head::Unfinished(buf, HeadEnd::Shutdown),
            };
            match read {
                Ok(n) if n > 0 => {
                    let new = match &rest {
                        None => &buf[before..],
                        Some(rest) => &rest[filled..filled + n],
                    };
                    state = scan.feed(new, before);
                    if rest.is_some() {
                        filled += n;
                    }
                }
                // Empty lines and then the end are no request.
                _ if state == Progress::Blank => return Head::Gone,
                _ => return Head::Unfinished(buf, HeadEnd::Refused),
            }
        }
    }
}

/// What a head's reads know of the listener stopping: the connection's
/// shutdown watch, and its one wake-up future (done once the stop shows,
/// so polled only until then).
struct Stop<'a, F> {
    /// The head is the connection's first.
    first: bool,
    shutting_down: &'a mut F,
    shutdown: &'a ShutdownWatch,
}

/// Whether a head still coming is cut when its listener stops: a kept-alive
/// connection's next one is; a new connection's first is served, unless
/// the process itself is stopping (not handing over to a new one).
fn closes_at_stop(first: bool) -> bool {
    use crate::lifecycle::{draining, handing_over};
    !first || (draining() && !handing_over())
}

/// The most one read of a slow head takes (and counts against the budget
/// before it is made).
const HEAD_READ: usize = 16 * 1024;

/// The unit in which a slow head's memory is taken: a page.
const PAGE: usize = 4096;

/// What an unfinished head counts against the budget besides its bytes:
/// its connection's own state while the head is read (the connection's
/// task and socket, ~3 KiB, the reader's state), so that the budget bounds
/// the memory a flood of unfinished heads takes, not only their bytes.
const HEAD_STATE: usize = 8 * 1024;

/// What the loop waits on besides the client, for [`Listener::read_head`].
struct Waits<'a, F> {
    idle: &'a mut IdleTimer,
    shutting_down: &'a mut F,
    shutdown: &'a ShutdownWatch,
    /// The listener's slots, when it has a limit.
    admission: Option<&'a Arc<Admission>>,
}

/// Done when the listener wants the waiting connection's slot.
async fn evicted(waiting: Option<&Waiting>) {
    match waiting {
        Some(w) => w.evicted().await,
        None => std::future::pending().await,
    }
}

/// How one request head read ended.
enum Head {
    /// Complete (maybe with the start of its body): Pingora's.
    Complete(BytesMut),
    /// The connection closed, idled out or is shutting down with no head
    /// begun: nothing to log.
    Gone,
    /// Begun and not finished: its first bytes, and why.
    Unfinished(BytesMut, HeadEnd),
}

/// A listener's limits on heads, read per head so that a reload applies.
struct HeadSettings {
    limits: HeadLimits,
    idle_timeout: Duration,
    header_read_timeout: Option<Duration>,
    handshake_timeout: Duration,
    max_requests: usize,
}

impl HeadSettings {
    fn of(rt: &Runtime, listener: Option<usize>) -> Self {
        let limits = listener
            .and_then(|i| rt.config.listeners.get(i))
            .map(|l| l.limits)
            .unwrap_or_default();
        HeadSettings {
            limits: HeadLimits {
                max_bytes: limits.max_request_header_bytes,
                max_uri_bytes: limits.max_uri_bytes,
            },
            // At least a second, as the proxy tells Pingora.
            idle_timeout: listener
                .map_or(DEFAULT_IDLE, |_| limits.idle_timeout)
                .max(Duration::from_secs(1)),
            header_read_timeout: limits.header_read_timeout,
            handshake_timeout: limits.handshake_timeout,
            max_requests: limits.max_requests_per_connection,
        }
    }
}

fn earliest(a: Instant, b: Option<Instant>) -> Instant {
    b.map_or(a, |b| a.min(b))
}

/// Answer a head the loop refused, as the proxy would have; the request id
/// the answer carries (none for what gets no answer), and whether an
/// answer was written whole.
async fn answer(stream: &mut Stream, end: HeadEnd) -> (String, bool) {
    use crate::proxy::ctx::Failure;
    let (status, reason) = match end {
        HeadEnd::TooLarge => (
            Failure::HeadersTooLarge.status(),
            "Request Header Fields Too Large",
        ),
        HeadEnd::UriTooLong => (Failure::UriTooLong.status(), "URI Too Long"),
        // A client cut for the budget may be a prompt one: told to retry.
        HeadEnd::Cut => (408, "Request Timeout"),
        // One that let its time run out is closed on, as NGINX does; one
        // that left or sent nothing parseable gets Pingora's answer, if any.
        HeadEnd::TimedOut | HeadEnd::Refused | HeadEnd::Shutdown => return (String::new(), false),
    };
    let (_, message, _) = end.describe(b"");
    let id = crate::proxy::headers::RequestId::from_request(None);
    let body = serde_json::json!({
        "error": message,
        "status": status,
        "route": null,
        "request_id": id.as_str(),
    })
    .to_string();
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nX-Request-Id: {}\r\nConnection: close\r\n\r\n{body}",
        body.len(),
        id.as_str()
    );
    let write = async {
        stream.write_all(response.as_bytes()).await?;
        stream.flush().await
    };
    // A client that does not read gets no more of our time.
    let written = pingora::time::timeout(REFUSAL_WRITE, write).await;
    (id.as_str().to_string(), written.is_ok_and(|w| w.is_ok()))
}

/// What the client has sent, once it has sent something; `None` at end of
/// stream. Read through a buffer on the stack, so that a connection waiting
/// here holds none.
async fn read_some(stream: &mut Stream) -> std::io::Result<Option<BytesMut>> {
    std::future::poll_fn(|cx| {
        let mut storage = [MaybeUninit::<u8>::uninit(); HEAD_BUFFER];
        let mut buf = ReadBuf::uninit(&mut storage);
        std::task::ready!(Pin::new(&mut *stream).poll_read(cx, &mut buf))?;
        if buf.filled().is_empty() {
            return Poll::Ready(Ok(None));
        }
        // Pingora would have allocated its head buffer this size.
        let mut head = crate::http1::spare::take(crate::http1::spare::Use::Head, HEAD_BUFFER);
        head.extend_from_slice(buf.filled());
        Poll::Ready(Ok(Some(head)))
    })
    .await
}

/// Hand Pingora the bytes already read, as the start of the request.
///
/// Pingora's own use of this prefix is for pipelined requests; the loop only
/// sets it on a session that carries none.
fn start_with(session: &mut ServerSession, head: BytesMut) {
    if let ServerSession::H1(h1) = session {
        h1.set_pipelined_prefix(head);
    }
}
