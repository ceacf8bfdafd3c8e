//! A write buffer for Pingora's HTTP/1 driver on a plain connection.
//!
//! A plain listener's sockets have none of their own ([`super::accept`]):
//! the fast lane writes whole buffers. Pingora's driver writes a
//! response's head and body as separate writes and flushes at the end,
//! counting on the buffer its own listener puts in front of every socket;
//! the keep-alive loop puts this one in front for each request it hands
//! Pingora, and takes it away again for the wait for the next.

use std::pin::Pin;
use std::task::{Context, Poll};

use pingora::protocols::Stream;
use tokio::io::{AsyncRead, AsyncWrite, BufWriter, ReadBuf};

use super::linger::Linger;

/// A stream with Pingora's write buffer in front: a small response leaves
/// in one write, as from Pingora's own listener. Pingora's driver shuts a
/// connection down just before it drops it: the shut is a lingering close
/// ([`super::linger`]), so that a client still sending is not reset before
/// it reads the answer.
#[derive(Debug)]
pub(crate) struct WriteBuffered(BufWriter<Stream>, Linger);

/// Pingora's L4 write buffer size (a TCP segment's payload).
const WRITE_BUFFER: usize = pingora::protocols::l4::stream::DEFAULT_L4_WRITE_BUFFER_SIZE;

/// `stream` with the write buffer in front.
pub(crate) fn buffered(stream: Stream) -> Stream {
    Box::new(WriteBuffered(
        BufWriter::with_capacity(WRITE_BUFFER, stream),
        Linger::default(),
    ))
}

/// `stream` without the buffer [`buffered`] put in front (flushed first,
/// though Pingora flushes what it writes), for the wait for the next
/// request; any other stream as it is.
pub(crate) async fn unbuffered(stream: Stream) -> std::io::Result<Stream> {
    if !stream.as_any().is::<WriteBuffered>() {
        return Ok(stream);
    }
    let Ok(mut b) = stream.into_any().downcast::<WriteBuffered>() else {
        // Checked above.
        return Err(std::io::Error::other("not a write-buffered stream"));
    };
    tokio::io::AsyncWriteExt::flush(&mut b.0).await?;
    Ok(b.0.into_inner())
}

impl WriteBuffered {
    fn io(&self) -> &Stream {
        self.0.get_ref()
    }

    fn io_mut(&mut self) -> &mut Stream {
        self.0.get_mut()
    }
}

impl AsyncRead for WriteBuffered {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for WriteBuffered {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let WriteBuffered(io, linger) = &mut *self;
        linger.poll_close(io, cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

/// Pingora's own shut, as its driver's: the buffer flushed, then the
/// lingering close.
#[async_trait::async_trait]
impl pingora::protocols::Shutdown for WriteBuffered {
    async fn shutdown(&mut self) {
        if let Err(e) = tokio::io::AsyncWriteExt::shutdown(self).await {
            log::debug!("could not shut a closing connection down: {e}");
        }
    }
}

crate::delegate_stream_traits!(but_shutdown: WriteBuffered, io, io_mut);

#[cfg(test)]
mod tests {
    use super::super::tests::pair;
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn writes_wait_for_a_flush_and_the_buffer_comes_off_again() {
        let (stream, mut peer) = pair().await;
        let mut stream = buffered(stream);
        stream.write_all(b"HTTP/1.1 200 OK\r\n").await.unwrap();
        stream
            .write_all(b"content-length: 2\r\n\r\nok")
            .await
            .unwrap();
        // Nothing has left yet: both writes are in the buffer.
        let mut got = [0u8; 64];
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), peer.read(&mut got))
                .await
                .is_err()
        );
        stream.flush().await.unwrap();
        let mut all = Vec::new();
        while all.len() < 40 {
            let n = peer.read(&mut got).await.unwrap();
            assert!(n > 0);
            all.extend_from_slice(&got[..n]);
        }
        assert_eq!(all, b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
        // Unwrapped, writes leave at once again; reads pass through both.
        let mut stream = unbuffered(stream).await.unwrap();
        assert!(!stream.as_any().is::<WriteBuffered>());
        stream.write_all(b"x").await.unwrap();
        assert_eq!(peer.read(&mut got).await.unwrap(), 1);
        peer.write_all(b"y").await.unwrap();
        assert_eq!(stream.read(&mut got).await.unwrap(), 1);
        // A stream without the buffer is handed back as it is.
        let same = unbuffered(stream).await.unwrap();
        assert!(same.as_any().is::<pingora::protocols::l4::stream::Stream>());
    }

    /// Pingora's shut of a connection whose client reads nothing (the
    /// answer's end cannot leave) gives up at the close's time, and a
    /// second shut is done at once. The clock is paused: it moves on only
    /// by the waits.
    #[tokio::test(start_paused = true)]
    async fn a_shut_the_client_does_not_read_gives_up_in_time() {
        let (stream, _peer) = pair().await;
        let mut stream = buffered(stream);
        // Fill the sockets' buffers, and leave some in ours.
        let big = vec![b'x'; 64 << 20];
        let filled =
            tokio::time::timeout(std::time::Duration::from_millis(10), stream.write_all(&big))
                .await;
        assert!(filled.is_err(), "64 MiB went into the sockets' buffers");
        stream.write_all(b"the end").await.unwrap();
        let started = tokio::time::Instant::now();
        let _ = AsyncWriteExt::shutdown(&mut stream).await;
        assert_eq!(started.elapsed(), crate::downstream::linger::LINGER_TIME);
        let started = tokio::time::Instant::now();
        assert!(AsyncWriteExt::shutdown(&mut stream).await.is_ok());
        assert_eq!(started.elapsed(), std::time::Duration::ZERO);
    }
}
