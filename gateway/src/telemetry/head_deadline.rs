//! A total deadline for the first request head of a connection (slowloris).
//!
//! Pingora bounds each read of a head, not the whole head, and has no hook
//! before it parses one; a client sending a byte every few seconds could
//! hold a connection for as long as it likes. So the client's stream is
//! wrapped before Pingora sees it: reads are watched for the blank line that
//! ends a head, and once `header_read_timeout` has passed without one, the
//! next read fails and Pingora closes the connection.
//!
//! [`WithHeadDeadline`] wraps the HTTP proxy app (inside the egress sniffer,
//! so CONNECT and passthrough tunnels, which have deadlines of their own,
//! are never cut by it).

use std::future::Future;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, Ssl, Stream, UniqueID,
    UniqueIDType, ALPN,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::metrics::metrics;
use crate::runtime::Runtime;

/// The proxy app, given client streams with their listener's
/// `header_read_timeout`.
pub struct WithHeadDeadline<A> {
    inner: Arc<A>,
    runtime: Arc<ArcSwap<Runtime>>,
}

impl<A> WithHeadDeadline<A> {
    pub fn new(inner: A, runtime: Arc<ArcSwap<Runtime>>) -> Self {
        WithHeadDeadline {
            inner: Arc::new(inner),
            runtime,
        }
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for WithHeadDeadline<A> {
    async fn process_new(
        self: &Arc<Self>,
        session: Stream,
        shutdown: &pingora::server::ShutdownWatch,
    ) -> Option<Stream> {
        let rt = self.runtime.load();
        let deadline = rt.listener_of(&session).and_then(|i| {
            let timeout = rt.config.listeners.get(i)?.limits.header_read_timeout?;
            Some((timeout, rt.listeners.get(i)?.name.as_str()))
        });
        let session = match deadline {
            Some((timeout, name)) => HeadDeadline::wrap(session, timeout, name.into()),
            None => session,
        };
        drop(rt);
        self.inner.process_new(session, shutdown).await
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await
    }
}

/// Where the reader is in the first head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scan {
    /// Before the request line (RFC 9112 §2.2 allows empty lines there).
    Start,
    /// Inside a line.
    InLine,
    /// Just after a line feed: another one ends the head.
    LineStart,
    /// The head is complete; the deadline no longer applies.
    Done,
}

impl Scan {
    fn feed(mut self, bytes: &[u8]) -> Scan {
        for &b in bytes {
            self = match (self, b) {
                (Scan::Done, _) => return Scan::Done,
                (Scan::Start, b'\r' | b'\n') => Scan::Start,
                (Scan::InLine, b'\n') => Scan::LineStart,
                (Scan::LineStart, b'\n') => Scan::Done,
                (s @ (Scan::InLine | Scan::LineStart), b'\r') => s,
                _ => Scan::InLine,
            };
        }
        self
    }
}

/// Pingora's coarse timer (10 ms ticks, one clock thread): arming a tokio
/// `Sleep` for each new connection woke the runtime's driver through its
/// eventfd, a syscall and an extra wake-up per connection.
type Timer = Pin<Box<dyn Future<Output = ()> + Send + Sync>>;

pub struct HeadDeadline {
    inner: Stream,
    scan: Scan,
    /// `None` once the head is complete.
    timer: Option<Timer>,
    listener: Arc<str>,
    /// Bytes a peek read (already scanned), handed out again first.
    peeked: Vec<u8>,
}

/// How much a peek reads ahead: a request head, usually whole.
const READ_AHEAD: usize = crate::keepalive::HEAD_BUFFER;

impl HeadDeadline {
    pub fn wrap(inner: Stream, timeout: Duration, listener: Arc<str>) -> Stream {
        Box::new(HeadDeadline {
            inner,
            scan: Scan::Start,
            timer: Some(Box::pin(pingora::time::fast_timeout::fast_sleep(timeout))),
            listener,
            peeked: Vec::new(),
        })
    }

    /// A read from the client, through the deadline while it applies.
    fn poll_read_inner(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if let Some(timer) = self.timer.as_mut() {
            if timer.as_mut().poll(cx).is_ready() {
                self.timer = None;
                self.scan = Scan::Done;
                metrics()
                    .rejected
                    .with_label_values(&[&*self.listener, "header_timeout"])
                    .inc();
                crate::keepalive::head_timed_out();
                return Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "request head not complete within header_read_timeout",
                )));
            }
        }
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if self.timer.is_some() {
            self.scan = self.scan.feed(&buf.filled()[before..]);
            if self.scan == Scan::Done {
                self.timer = None;
            }
        }
        result
    }

    /// Read what the client has sent (up to [`READ_AHEAD`] bytes) onto the
    /// peeked bytes; 0 at end of stream.
    fn poll_read_ahead(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        // On the stack, not in `peeked`: a connection waiting for its next
        // request keeps no buffer.
        let mut storage = [MaybeUninit::<u8>::uninit(); READ_AHEAD];
        let mut buf = ReadBuf::uninit(&mut storage);
        std::task::ready!(self.poll_read_inner(cx, &mut buf))?;
        self.peeked.extend_from_slice(buf.filled());
        Poll::Ready(Ok(buf.filled().len()))
    }
}

impl std::fmt::Debug for HeadDeadline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeadDeadline")
            .field("inner", &self.inner)
            .field("scan", &self.scan)
            .field("armed", &self.timer.is_some())
            .field("listener", &self.listener)
            .finish()
    }
}

impl AsyncRead for HeadDeadline {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if !this.peeked.is_empty() {
            let n = this.peeked.len().min(buf.remaining());
            buf.put_slice(&this.peeked[..n]);
            if n == this.peeked.len() {
                // Nothing kept while the connection idles.
                this.peeked = Vec::new();
            } else {
                this.peeked.drain(..n);
            }
            return Poll::Ready(Ok(()));
        }
        this.poll_read_inner(cx, buf)
    }
}

impl AsyncWrite for HeadDeadline {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[async_trait]
impl Shutdown for HeadDeadline {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await
    }
}

impl UniqueID for HeadDeadline {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for HeadDeadline {
    fn get_ssl(&self) -> Option<&pingora::protocols::tls::TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<pingora::protocols::tls::SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for HeadDeadline {
    fn get_timing_digest(&self) -> Vec<Option<pingora::protocols::TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for HeadDeadline {
    fn get_proxy_digest(&self) -> Option<Arc<pingora::protocols::raw_connect::ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: pingora::protocols::raw_connect::ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for HeadDeadline {
    fn get_socket_digest(&self) -> Option<Arc<pingora::protocols::SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: pingora::protocols::SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

/// The first bytes of a plain connection are peeked at (is it the HTTP/2
/// preface?) by the keep-alive loop and by Pingora; reading them through the
/// deadline bounds that wait too. A peek reads what is there, not just what
/// was asked, so the read that follows gets the head in one piece.
#[async_trait]
impl Peek for HeadDeadline {
    async fn try_peek(&mut self, buf: &mut [u8]) -> std::io::Result<bool> {
        while self.peeked.len() < buf.len() {
            if std::future::poll_fn(|cx| self.poll_read_ahead(cx)).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
        buf.copy_from_slice(&self.peeked[..buf.len()]);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_blank_line_ends_the_head() {
        let done = |parts: &[&[u8]]| parts.iter().fold(Scan::Start, |s, p| s.feed(p));
        assert_eq!(done(&[b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"]), Scan::Done);
        // Split anywhere, bare LF, leading empty lines.
        assert_eq!(
            done(&[b"GET / HTTP/1.1\r", b"\nHost: a\r\n\r", b"\n"]),
            Scan::Done
        );
        assert_eq!(done(&[b"GET / HTTP/1.1\nHost: a\n\n"]), Scan::Done);
        assert_eq!(done(&[b"\r\n\r\n\r\n"]), Scan::Start);
        assert_eq!(done(&[b"\r\n\r\nGET / HTTP/1.1\r\n"]), Scan::LineStart);
        // Not yet.
        assert_eq!(done(&[b"GET / HTTP/1.1\r\nHost: a\r\n"]), Scan::LineStart);
        assert_eq!(done(&[b"GET / HTTP/1.1\r\nX: a\r\rb\r\n"]), Scan::LineStart);
        // The HTTP/2 preface holds a blank line too: h2c is let through.
        assert_eq!(done(&[b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"]), Scan::Done);
    }
}
