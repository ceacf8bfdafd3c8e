//! Closing a connection the client is still sending on.
//!
//! An answer that does not wait for the whole request (a `413` for a body
//! over the limit, a `431`, an error mid-upload) is followed by closing the
//! connection. Bytes the client sends after that reach a closed socket, and
//! the kernel answers them with a reset: the client's next send fails, and a
//! client that sends its whole upload before it reads (as curl does) never
//! reads the answer (RFC 9112 §9.6). So, as NGINX's lingering close does,
//! the write side is closed first (the client sees the answer end) and what
//! the client still sends is read and dropped, for a bounded time, before
//! the socket is closed, or until the client closes its side, as a client
//! that has read the answer does at once.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use pingora::protocols::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// The longest a closing connection is kept reading in all (NGINX's
/// `lingering_timeout`).
pub const LINGER_TIME: Duration = Duration::from_secs(5);
/// The longest wait for the client's next bytes (or its close).
const LINGER_WAIT: Duration = Duration::from_secs(1);
/// The most bytes read and dropped: past it the client is not reading
/// what it was answered, and gets the reset.
const LINGER_BYTES: usize = 64 << 20;
const READ: usize = 4096;
/// Read in one turn before the task lets others run.
const TURN: usize = 256 * 1024;

/// Where a lingering close is.
#[derive(Debug, Default)]
pub enum Linger {
    /// Not begun.
    #[default]
    Open,
    /// The write side being shut (what is left of the answer flushed
    /// first), within the close's whole time.
    Shutting {
        until: Instant,
        timer: Pin<Box<Sleep>>,
    },
    /// Shut: what the client still sends is read and dropped.
    Reading {
        until: Instant,
        wait: Pin<Box<Sleep>>,
        dropped: usize,
    },
    /// The socket may be closed.
    Done,
}

impl Linger {
    /// Drive the close of `io` on: shut its write side, then read while the
    /// client sends, all within [`LINGER_TIME`]. Ready once the socket may
    /// be closed, with the result of shutting it; at once when it is done.
    pub fn poll_close<S: AsyncRead + AsyncWrite + Unpin + ?Sized>(
        &mut self,
        io: &mut S,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self {
            Linger::Done => return Poll::Ready(Ok(())),
            Linger::Open => {
                let until = Instant::now() + LINGER_TIME;
                *self = Linger::Shutting {
                    until,
                    timer: Box::pin(tokio::time::sleep_until(until)),
                };
            }
            Linger::Shutting { .. } | Linger::Reading { .. } => {}
        }
        if let Linger::Shutting { timer, .. } = self {
            match Pin::new(&mut *io).poll_shutdown(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => {
                    *self = Linger::Done;
                    return Poll::Ready(Err(e));
                }
                // A client that reads nothing can leave the answer's end
                // unwritten: given up on at the close's time.
                Poll::Pending => {
                    if timer.as_mut().poll(cx).is_ready() {
                        *self = Linger::Done;
                        return Poll::Ready(Ok(()));
                    }
                    return Poll::Pending;
                }
            }
            // Waited for even when nothing has come yet: bytes that are on
            // their way may not have been seen arriving.
            if let Linger::Shutting { until, mut timer } = std::mem::take(self) {
                timer
                    .as_mut()
                    .reset((Instant::now() + LINGER_WAIT).min(until));
                *self = Linger::Reading {
                    until,
                    wait: timer,
                    dropped: 0,
                };
            }
        }
        // Shut: reading until the client ends, stops, or the time or the
        // bytes run out.
        let Linger::Reading {
            until,
            wait,
            dropped,
        } = self
        else {
            return Poll::Ready(Ok(()));
        };
        let mut buf = [0u8; READ];
        let mut turn = 0;
        loop {
            let mut read = ReadBuf::new(&mut buf);
            let n = match Pin::new(&mut *io).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) => read.filled().len(),
                // The client's end, or a connection already broken.
                Poll::Ready(Err(_)) => 0,
                Poll::Pending if wait.as_mut().poll(cx).is_pending() => return Poll::Pending,
                Poll::Pending => break,
            };
            *dropped += n;
            if n == 0 || *dropped >= LINGER_BYTES {
                break;
            }
            wait.as_mut()
                .reset((Instant::now() + LINGER_WAIT).min(*until));
            turn += n;
            if turn >= TURN {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
        }
        *self = Linger::Done;
        Poll::Ready(Ok(()))
    }
}

/// Close `io` with a lingering close (the caller drops it after), within
/// [`LINGER_TIME`] in all (over TLS the shut writes a close_notify, which a
/// client that reads nothing could leave unwritten).
pub async fn close(io: &mut Stream) {
    let mut linger = Linger::default();
    let _ = std::future::poll_fn(|cx| linger.poll_close(io, cx)).await;
}

#[cfg(test)]
mod tests {
    use super::super::tests::pair;
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A client that sends all it has before it reads (as curl uploads a
    /// body) can send it all, far more than the sockets' buffers hold,
    /// and then reads the answer and the end of the connection.
    #[tokio::test]
    async fn a_client_still_sending_sends_all_then_reads_the_answer() {
        let (mut server, client) = pair().await;
        let (mut from, mut to) = client.into_split();
        let sending = tokio::spawn(async move {
            let chunk = vec![7u8; 64 * 1024];
            for _ in 0..256 {
                to.write_all(&chunk).await?;
            }
            Ok::<_, std::io::Error>(to)
        });
        // The server reads a little of it, answers, and closes.
        let mut first = [0u8; 1024];
        server.read_exact(&mut first).await.unwrap();
        server.write_all(b"answer").await.unwrap();
        server.flush().await.unwrap();
        let closing = tokio::spawn(async move {
            close(&mut server).await;
        });
        let sent = sending.await.unwrap();
        assert!(sent.is_ok(), "16 MiB not sent: {:?}", sent.err());
        let mut got = Vec::new();
        let end = from.read_to_end(&mut got).await;
        assert_eq!(got, b"answer");
        assert!(end.is_ok(), "the client saw {end:?}, not the end");
        drop(sent);
        closing.await.unwrap();
    }

    /// A client that reads the end and closes its side ends the close,
    /// without the wait for more.
    #[tokio::test]
    async fn a_client_closing_its_side_ends_the_close() {
        let (mut server, mut client) = pair().await;
        let started = std::time::Instant::now();
        let ((), read) = tokio::join!(close(&mut server), async {
            let mut rest = Vec::new();
            let read = client.read_to_end(&mut rest).await;
            drop(client);
            read
        });
        assert_eq!(read.unwrap(), 0);
        assert!(started.elapsed() < LINGER_WAIT, "{:?}", started.elapsed());
    }

    /// One that neither sends nor closes is waited for `LINGER_WAIT` (the
    /// clock is paused: it moves on only by the waits).
    #[tokio::test(start_paused = true)]
    async fn a_quiet_client_is_waited_for_briefly() {
        let (mut server, mut client) = pair().await;
        let started = tokio::time::Instant::now();
        close(&mut server).await;
        assert_eq!(started.elapsed(), LINGER_WAIT);
        let mut rest = Vec::new();
        assert_eq!(client.read_to_end(&mut rest).await.unwrap(), 0);
    }
}
