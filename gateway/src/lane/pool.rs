//! The lane's idle upstream connections, one pool per worker thread: no
//! lock, no task per connection. A connection is checked on checkout (an
//! upstream that closed it, or sent something unasked, is dropped) and
//! dropped once idle past its upstream's `idle_timeout`.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::upstream::UpStream;

/// Idle connections a worker thread keeps, over all endpoints (Pingora's
/// `upstream_keepalive_pool_size` default).
const MAX_IDLE: usize = 128;

struct Idle {
    addr: SocketAddr,
    /// What else a connection to `addr` must match (its TLS settings).
    key: u64,
    stream: UpStream,
    since: Instant,
    idle_timeout: Option<Duration>,
}

impl Idle {
    fn expired(&self, now: Instant) -> bool {
        self.idle_timeout
            .is_some_and(|t| now.saturating_duration_since(self.since) >= t)
    }
}

thread_local! {
    static IDLE: RefCell<Vec<Idle>> = const { RefCell::new(Vec::new()) };
}

/// An idle connection to `addr` made with `key`'s settings, the most
/// recently used first.
pub fn checkout(addr: SocketAddr, key: u64) -> Option<UpStream> {
    IDLE.with(|idle| {
        let mut idle = idle.borrow_mut();
        let now = Instant::now();
        idle.retain(|c| !c.expired(now));
        while let Some(at) = idle.iter().rposition(|c| c.addr == addr && c.key == key) {
            let mut c = idle.remove(at);
            if c.stream.usable() {
                return Some(c.stream);
            }
        }
        None
    })
}

/// Keep `stream` to `addr` for a later request, for up to `idle_timeout`.
pub fn give_back(addr: SocketAddr, key: u64, stream: UpStream, idle_timeout: Option<Duration>) {
    if idle_timeout.is_some_and(|t| t.is_zero()) {
        return;
    }
    IDLE.with(|idle| {
        let mut idle = idle.borrow_mut();
        let now = Instant::now();
        // Expired ones go at checkout; here only when the pool is full.
        if idle.len() >= MAX_IDLE {
            idle.retain(|c| !c.expired(now));
            if idle.len() >= MAX_IDLE {
                idle.remove(0);
            }
        }
        idle.push(Idle {
            addr,
            key,
            stream,
            since: now,
            idle_timeout,
        });
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpStream;

    fn plain(s: TcpStream) -> UpStream {
        UpStream::Plain(s)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn connections_come_back_unless_closed_chatty_or_expired() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let a = TcpStream::connect(addr).await.unwrap();
        let (mut a_peer, _) = listener.accept().await.unwrap();
        give_back(addr, 0, plain(a), None);
        assert!(checkout(addr, 1).is_none(), "made with other settings");
        let Some(UpStream::Plain(a)) = checkout(addr, 0) else {
            panic!("an idle, quiet connection comes back");
        };
        assert!(checkout(addr, 0).is_none(), "it is no longer idle");

        // The upstream wrote to it unasked: dropped.
        a_peer.write_all(b"x").await.unwrap();
        a.readable().await.unwrap();
        give_back(addr, 0, plain(a), None);
        assert!(checkout(addr, 0).is_none());

        // The upstream closed it: dropped.
        let b = TcpStream::connect(addr).await.unwrap();
        let (b_peer, _) = listener.accept().await.unwrap();
        drop(b_peer);
        b.readable().await.unwrap();
        give_back(addr, 0, plain(b), None);
        assert!(checkout(addr, 0).is_none());

        // Idle past its timeout: dropped.
        let c = TcpStream::connect(addr).await.unwrap();
        let (_c_peer, _) = listener.accept().await.unwrap();
        give_back(addr, 0, plain(c), Some(Duration::from_micros(1)));
        // The timeout is the condition here: let it pass.
        std::thread::sleep(Duration::from_millis(1));
        assert!(checkout(addr, 0).is_none());
    }
}
