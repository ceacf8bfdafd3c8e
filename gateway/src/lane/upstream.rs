//! The lane's connection to an upstream endpoint: plain TCP, or TLS made
//! by Pingora's connector from the upstream's peer (its CA, SNI or
//! `verify`, client certificate and handshake hook), then checked against
//! the upstream's `verify` as Pingora's driver checks it on every use.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::LazyLock;
use std::task::{Context, Poll};
use std::time::Duration;

use pingora::connectors::TransportConnector;
use pingora::protocols::Stream;
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorType};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::runtime::upstream::UpstreamPool;

/// An upstream connection.
pub enum UpStream {
    Plain(TcpStream),
    Tls(Stream),
}

/// Pingora's connector for TLS upstreams (its own pool unused: the lane
/// pools per thread).
static CONNECTOR: LazyLock<TransportConnector> = LazyLock::new(|| TransportConnector::new(None));

impl UpStream {
    /// Connect to `addr` within `timeout`: plain, or with the TLS of
    /// `peer` (the upstream's, with this attempt's client certificate).
    pub async fn connect(
        addr: SocketAddr,
        timeout: Option<Duration>,
        tls: Option<&HttpPeer>,
    ) -> Result<UpStream, Box<Error>> {
        if let Some(peer) = tls {
            let mut peer = peer.clone();
            peer.options.connection_timeout = timeout;
            return CONNECTOR
                .new_stream(&peer)
                .await
                .map(UpStream::Tls)
                .map_err(|e| e.into_up());
        }
        let connecting = TcpStream::connect(addr);
        let made = match timeout {
            Some(t) => tokio::time::timeout(t, connecting).await.map_err(|_| {
                Error::explain(ErrorType::ConnectTimedout, "connect timed out").into_up()
            })?,
            None => connecting.await,
        };
        let stream = made.map_err(|e| {
            let etype = match e.kind() {
                io::ErrorKind::ConnectionRefused => ErrorType::ConnectRefused,
                _ => ErrorType::ConnectError,
            };
            Error::because(etype, "connecting to the upstream", e).into_up()
        })?;
        let _ = stream.set_nodelay(true);
        Ok(UpStream::Plain(stream))
    }

    /// The upstream's identity against its `verify`, on every use (as
    /// Pingora's driver checks it in `connected_to_upstream`).
    pub fn check_identity(&self, pool: &UpstreamPool) -> Result<(), String> {
        let UpStream::Tls(stream) = self else {
            return Ok(());
        };
        let digest = pingora::protocols::Digest {
            ssl_digest: stream.get_ssl_digest(),
            ..Default::default()
        };
        pool.check_identity(Some(&digest))
    }

    /// Whether an idle connection is still open and quiet: an upstream
    /// that closed it, or wrote to it unasked, makes it unusable.
    pub fn usable(&mut self) -> bool {
        let mut probe = [0u8; 1];
        match self {
            UpStream::Plain(s) => {
                matches!(s.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
            // A TLS record that is not data (a session ticket) is read and
            // kept quiet; data or the end is not.
            UpStream::Tls(s) => {
                let mut cx = Context::from_waker(std::task::Waker::noop());
                let mut buf = ReadBuf::new(&mut probe);
                matches!(Pin::new(s).poll_read(&mut cx, &mut buf), Poll::Pending)
            }
        }
    }

    /// Write what the socket takes of `request` now, without waiting: how
    /// much went (none over TLS, which writes through its buffer).
    pub fn try_write_now(&mut self, request: &[u8]) -> io::Result<usize> {
        match self {
            UpStream::Plain(s) => match s.try_write(request) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
                other => other,
            },
            UpStream::Tls(_) => Ok(0),
        }
    }

    /// Write all of `rest`, flushed.
    pub async fn write_rest(&mut self, rest: &[u8]) -> io::Result<()> {
        self.write_all(rest).await?;
        self.flush().await
    }
}

impl AsyncRead for UpStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpStream::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            UpStream::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpStream::Plain(s) => Pin::new(s).poll_flush(cx),
            UpStream::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpStream::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
