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
//! The wait is bounded by one timer per connection, not one per request
//! ([`IdleTimer`]): a busy connection sets one about once per
//! `idle_timeout`.

use std::cell::Cell;
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
use tokio::io::{AsyncRead, ReadBuf};

use crate::runtime::Runtime;

const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Pingora's default keep-alive timeout: a first session's, and the wait of
/// a connection whose listener is unknown.
const DEFAULT_IDLE: Duration = Duration::from_secs(60);
/// Pingora's first head buffer (`INIT_HEADER_BUF_SIZE`); most heads fit.
pub(crate) const HEAD_BUFFER: usize = 4096;

/// The HTTP proxy app, with idle HTTP/1 connections waiting outside it.
pub struct KeepAlive<A> {
    inner: Arc<A>,
    runtime: Arc<ArcSwap<Runtime>>,
}

impl<A> KeepAlive<A> {
    pub fn new(inner: A, runtime: Arc<ArcSwap<Runtime>>) -> Self {
        KeepAlive {
            inner: Arc::new(inner),
            runtime,
        }
    }
}

#[async_trait]
impl<A: HttpServerApp + Send + Sync + 'static> ServerApp for KeepAlive<A> {
    async fn process_new(
        self: &Arc<Self>,
        mut stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        // The connection's idle deadline, from its first byte to its last
        // request.
        let mut idle = IdleTimer::default();
        if !self.speaks_http1(&mut stream, &mut idle).await? {
            // HTTP/2 connections get their GOAWAY when SIGTERM comes, not
            // only once its `shutdown_delay` is over.
            return ServerApp::process_new(&self.inner, stream, &crate::shutdown::h2_watch()).await;
        }
        FATE.scope(
            Cell::new(Fate::Handed),
            self.serve_http1(stream, shutdown, idle),
        )
        .await
    }

    async fn cleanup(&self) {
        self.inner.http_cleanup().await
    }
}

impl<A: HttpServerApp + Send + Sync + 'static> KeepAlive<A> {
    /// Pingora's HTTP/1 loop, with the wait between requests done here.
    async fn serve_http1(
        self: &Arc<Self>,
        mut stream: Stream,
        shutdown: &ShutdownWatch,
        mut idle: IdleTimer,
    ) -> Option<Stream> {
        let options = self.inner.server_options();
        // Where a refused head came from; one reference each per connection.
        let digest = stream.get_socket_digest();
        let tls = stream.get_ssl_digest();
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
        loop {
            line.len = 0;
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
                Some(tokio::select! {
                    // A request already sent is served, even at shutdown.
                    biased;
                    head = self.next_request(&mut stream, &mut idle) => head?,
                    _ = &mut shutting_down => return None,
                    () = std::future::ready(()), if *shutdown.borrow() => return None,
                })
            };
            let mut session = ServerSession::new_http1(stream);
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
                    session.set_keepalive_reuses_remaining(
                        options.and_then(|o| o.keepalive_request_limit),
                    );
                }
                Some(Some(settings)) => settings.apply_to_session(&mut session),
                Some(None) => {}
            }
            if let Some(head) = head {
                line.fill(&head);
                start_with(&mut session, head);
            }
            let _ = FATE.try_with(|f| f.set(Fate::Handed));
            let Some(reused) = self.inner.process_new_http(session, shutdown).await else {
                use crate::proxy::observe::{refused, HeadEnd};
                let end = match FATE.try_with(Cell::get).unwrap_or(Fate::Taken) {
                    Fate::Taken => return None,
                    Fate::TimedOut => HeadEnd::TimedOut,
                    // Pingora drops a session it has not parsed yet.
                    Fate::Handed if *shutdown.borrow() => HeadEnd::Shutdown,
                    Fate::Handed => HeadEnd::Refused,
                };
                // Empty lines are no request (a CRLF some clients send after
                // a body, RFC 9112 §2.2), even unfinished.
                if !line.is_blank() {
                    refused(
                        &self.runtime.load(),
                        digest.as_deref(),
                        tls.as_deref(),
                        line.bytes(),
                        end,
                    );
                }
                return None;
            };
            let (next, settings) = reused.consume();
            stream = next;
            carried = Some(settings);
        }
    }

    /// Pingora's choice of protocol, made here so that only HTTP/1 takes this
    /// loop; `None` when the connection failed, or sent nothing within its
    /// `idle_timeout`, while being looked at.
    async fn speaks_http1(&self, stream: &mut Stream, idle: &mut IdleTimer) -> Option<bool> {
        let options = self.inner.server_options();
        if options.is_some_and(|o| o.force_custom)
            || matches!(
                stream.selected_alpn_proto(),
                Some(ALPN::H2) | Some(ALPN::Custom(_))
            )
        {
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
        let deadline = Instant::now() + self.idle_timeout(stream);
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
            () = idle.until(deadline) => None,
        }
    }

    /// The listener's `idle_timeout`, read per wait so that a reload applies.
    fn idle_timeout(&self, stream: &Stream) -> Duration {
        let rt = self.runtime.load();
        rt.listener_of(stream)
            .and_then(|i| rt.config.listeners.get(i))
            .map_or(DEFAULT_IDLE, |l| l.limits.idle_timeout)
            // At least a second, as the proxy tells Pingora.
            .max(Duration::from_secs(1))
    }

    /// Read the next request's first bytes: `None` when the connection
    /// closed, failed or idled past its listener's `idle_timeout`.
    async fn next_request(&self, stream: &mut Stream, idle: &mut IdleTimer) -> Option<BytesMut> {
        let deadline = Instant::now() + self.idle_timeout(stream);
        tokio::select! {
            biased;
            read = read_some(stream) => read.ok().flatten(),
            () = idle.until(deadline) => None,
        }
    }
}

/// What became of the request head the loop last handed to Pingora. Pingora
/// answers a head it cannot parse (`400`) or a `CONNECT` (`405`) itself and
/// drops the connection, without a hook; the proxy marks each request it
/// takes, so one Pingora refused, or the client left unfinished, is logged
/// here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// Not taken by the proxy (yet).
    Handed,
    /// The proxy took it, and logs it.
    Taken,
    /// `header_read_timeout` ended it.
    TimedOut,
}

tokio::task_local! {
    static FATE: Cell<Fate>;
}

/// The proxy took the request the loop handed over: it logs it itself.
pub(crate) fn request_taken() {
    let _ = FATE.try_with(|f| f.set(Fate::Taken));
}

/// `header_read_timeout` ended the head being read.
pub(crate) fn head_timed_out() {
    let _ = FATE.try_with(|f| f.set(Fate::TimedOut));
}

/// The start of a request head, copied before Pingora takes the bytes: the
/// request line of a refused head, for its log line.
struct FirstLine {
    bytes: [u8; FirstLine::MAX],
    len: usize,
}

impl FirstLine {
    /// Enough for a method and a path to tell what a client sent.
    const MAX: usize = 128;

    fn fill(&mut self, head: &[u8]) {
        self.len = head.len().min(Self::MAX);
        self.bytes[..self.len].copy_from_slice(&head[..self.len]);
    }

    fn bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    /// Only line ends: what a client may send before a request.
    fn is_blank(&self) -> bool {
        self.len > 0 && self.bytes().iter().all(|b| matches!(b, b'\r' | b'\n'))
    }
}

impl Default for FirstLine {
    fn default() -> Self {
        FirstLine {
            bytes: [0; FirstLine::MAX],
            len: 0,
        }
    }
}

/// A connection's idle deadline, kept with one of Pingora's (10 ms coarse)
/// timers that outlives the wait that set it. Registering a timer costs
/// about as much as the rest of the wait; a timer set by an earlier wait
/// fires before this one's deadline, and is then set again for the rest.
#[derive(Default)]
struct IdleTimer {
    /// When the armed timer fires, and the timer.
    armed: Option<(Instant, Sleep)>,
}

type Sleep = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Pingora's timer resolution: a deadline this close counts as reached.
const TIMER_SLACK: Duration = Duration::from_millis(10);

impl IdleTimer {
    /// Done once `deadline` has passed. Dropping this keeps the timer for
    /// the next wait.
    async fn until(&mut self, deadline: Instant) {
        loop {
            match &mut self.armed {
                Some((fires, sleep)) if *fires <= deadline => {
                    sleep.as_mut().await;
                    self.armed = None;
                    let now = Instant::now();
                    if now + TIMER_SLACK >= deadline {
                        return;
                    }
                    self.arm(deadline, deadline - now);
                }
                // None yet, or one for a later deadline (a reload shortened
                // `idle_timeout`).
                _ => self.arm(deadline, deadline.saturating_duration_since(Instant::now())),
            }
        }
    }

    fn arm(&mut self, deadline: Instant, rest: Duration) {
        let sleep = pingora::time::fast_timeout::fast_sleep(rest);
        self.armed = Some((deadline, Box::pin(sleep)));
    }
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
        let mut head = BytesMut::with_capacity(HEAD_BUFFER);
        head.extend_from_slice(buf.filled());
        Poll::Ready(Ok(Some(head)))
    })
    .await
}

/// Whether Pingora carried the start of a pipelined request over in
/// `settings`; if so, that start goes into `line` (for the log line of a
/// head Pingora then refuses).
///
/// `HttpPersistentSettings` has no getter for those bytes, only its derived
/// `Debug`, which names each field before its value. The probe reads that
/// output up to the value of `pipelined_prefix`; when there is one, it reads
/// on through enough of its escaped bytes for a [`FirstLine`], then stops,
/// so nothing is formatted past that. A unit test holds the probe to
/// Pingora's output. `None` if the output has no such field (Pingora
/// changed it).
fn carried_head(settings: &HttpPersistentSettings, line: &mut FirstLine) -> Option<bool> {
    use std::fmt::Write;

    /// Escaped text enough for `FirstLine::MAX` bytes (`\xNN` is four).
    const ESCAPED: usize = 4 * FirstLine::MAX + 8;

    #[derive(Default)]
    struct Probe {
        at_field: bool,
        found: Option<bool>,
        /// The value's `Debug` text once it is known to be `Some`.
        escaped: String,
    }
    impl Write for Probe {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            match self.found {
                None if !self.at_field => {
                    self.at_field = s == "pipelined_prefix";
                    Ok(())
                }
                None if s == ": " => Ok(()),
                None => {
                    let some = s.starts_with("Some");
                    self.found = Some(some);
                    // Stop formatting once the answer is known.
                    if some {
                        Ok(())
                    } else {
                        Err(std::fmt::Error)
                    }
                }
                Some(_) => {
                    self.escaped.push_str(s);
                    if self.escaped.len() < ESCAPED {
                        Ok(())
                    } else {
                        Err(std::fmt::Error)
                    }
                }
            }
        }
    }
    let mut probe = Probe::default();
    let _ = write!(probe, "{settings:?}");
    let carries = probe.found?;
    if carries {
        unescape(&probe.escaped, line);
    }
    Some(carries)
}

/// Into `line`, the bytes of `bytes`' `Debug` text (`(b"GET /\r\n...")`),
/// up to [`FirstLine::MAX`]; none if the text is not in that form.
fn unescape(escaped: &str, line: &mut FirstLine) {
    line.len = 0;
    let Some((_, rest)) = escaped.split_once("b\"") else {
        return;
    };
    let mut chars = rest.bytes();
    while line.len < FirstLine::MAX {
        let byte = match chars.next() {
            None | Some(b'"') => break,
            Some(b'\\') => match chars.next() {
                Some(b'n') => b'\n',
                Some(b'r') => b'\r',
                Some(b't') => b'\t',
                Some(b'0') => 0,
                Some(b'x') => {
                    let hex = [chars.next().unwrap_or(0), chars.next().unwrap_or(0)];
                    match std::str::from_utf8(&hex)
                        .ok()
                        .and_then(|h| u8::from_str_radix(h, 16).ok())
                    {
                        Some(b) => b,
                        None => break,
                    }
                }
                Some(other) => other,
                None => break,
            },
            Some(b) => b,
        };
        line.bytes[line.len] = byte;
        line.len += 1;
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_probe_sees_a_carried_request_and_only_that() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let stream: Stream = Box::new(pingora::protocols::l4::stream::Stream::from(tcp));
        let mut session = ServerSession::new_http1(stream);
        session.set_keepalive(Some(60));
        session.set_keepalive_reuses_remaining(Some(7));
        session.set_pipelining_enabled(true);
        let mut settings = HttpPersistentSettings::for_session(&session);
        settings.set_user_context(Box::new(3u8));
        let head = |settings: &HttpPersistentSettings| {
            let mut line = FirstLine::default();
            carried_head(settings, &mut line).map(|carries| carries.then(|| line.bytes().to_vec()))
        };
        assert_eq!(head(&settings), Some(None));
        // Bytes that spell the field's name do not fool it.
        settings.set_pipelined_prefix(BytesMut::from(&b"pipelined_prefix: None"[..]));
        assert_eq!(
            head(&settings),
            Some(Some(b"pipelined_prefix: None".to_vec()))
        );
        assert_eq!(
            head(&HttpPersistentSettings::for_session(&session)),
            Some(None)
        );
        // Every kind of byte comes back as it was, up to FirstLine::MAX.
        let mut all: Vec<u8> = (0..=255u8).collect();
        all.extend_from_slice(b"\"\\\r\n\t\0");
        let mut settings = HttpPersistentSettings::for_session(&session);
        settings.set_pipelined_prefix(BytesMut::from(&all[..]));
        assert_eq!(head(&settings), Some(Some(all[..FirstLine::MAX].to_vec())));
        let mut settings = HttpPersistentSettings::for_session(&session);
        let tail = &all[200..];
        settings.set_pipelined_prefix(BytesMut::from(tail));
        assert_eq!(head(&settings), Some(Some(tail.to_vec())));
    }

    #[tokio::test]
    async fn one_timer_serves_several_waits_and_none_ends_early() {
        let mut idle = IdleTimer::default();
        let start = Instant::now();
        let first = start + Duration::from_millis(150);
        // A wait cut short by its read: the timer stays armed.
        let cut = tokio::time::timeout(Duration::from_millis(20), idle.until(first)).await;
        assert!(cut.is_err(), "fired before its deadline");
        assert_eq!(idle.armed.as_ref().map(|(at, _)| *at), Some(first));

        // The next wait, with a later deadline, keeps that timer until it
        // fires, then sets one for the rest.
        let second = Instant::now() + Duration::from_millis(300);
        let cut = tokio::time::timeout(Duration::from_millis(20), idle.until(second)).await;
        assert!(cut.is_err());
        assert_eq!(idle.armed.as_ref().map(|(at, _)| *at), Some(first));
        idle.until(second).await;
        assert!(
            Instant::now() + TIMER_SLACK >= second,
            "ended before the deadline"
        );

        // A shorter deadline than the armed one (a reload) gets its own timer.
        let later = Instant::now() + Duration::from_secs(60);
        let _ = tokio::time::timeout(Duration::from_millis(5), idle.until(later)).await;
        let sooner = Instant::now() + Duration::from_millis(50);
        tokio::time::timeout(Duration::from_secs(5), idle.until(sooner))
            .await
            .expect("a timer for the sooner deadline");
        assert!(Instant::now() + TIMER_SLACK >= sooner);
    }
}
