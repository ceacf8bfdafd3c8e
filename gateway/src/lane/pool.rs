//! The lane's idle upstream connections, one pool per worker thread: no
//! contended lock, no task per connection. A connection is checked on
//! checkout (an upstream that closed it, or sent something unasked, is
//! dropped) and dropped once idle past its upstream's `idle_timeout`. A
//! background sweep ([`sweep`], every [`SWEEP_INTERVAL`]) does the same
//! for pools no request has used since, so that a connection the upstream
//! closed is closed here too, not left half-open until the next request.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use super::upstream::UpStream;

/// Idle connections a worker thread keeps, over all endpoints (Pingora's
/// `upstream_keepalive_pool_size` default).
const MAX_IDLE: usize = 128;

/// How often every thread's pool is swept.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

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

/// One thread's idle connections. Its own thread locks it per request,
/// the sweep once per interval: the lock is all but never contended.
type Shard = Mutex<Vec<Idle>>;

/// Every thread's pool, for the sweep; a thread's goes with it.
static SHARDS: Mutex<Vec<Weak<Shard>>> = Mutex::new(Vec::new());

thread_local! {
    static IDLE: Arc<Shard> = {
        let shard = Arc::new(Mutex::new(Vec::new()));
        lock(&SHARDS).push(Arc::downgrade(&shard));
        shard
    };
}

/// A pool's lock; a panic that poisoned it left its list whole.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// An idle connection to `addr` made with `key`'s settings, the most
/// recently used first.
pub fn checkout(addr: SocketAddr, key: u64) -> Option<UpStream> {
    IDLE.with(|idle| {
        let mut idle = lock(idle);
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
        let mut idle = lock(idle);
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

/// Drop, from every thread's pool, the connections idle past their
/// timeout and those the upstream closed or wrote to unasked.
pub fn sweep() {
    let shards: Vec<Arc<Shard>> = {
        let mut all = lock(&SHARDS);
        all.retain(|s| s.strong_count() > 0);
        all.iter().filter_map(Weak::upgrade).collect()
    };
    let now = Instant::now();
    for shard in shards {
        // Closed once the lock is let go: the request path waits on it.
        let gone: Vec<Idle> = lock(&shard)
            .extract_if(.., |c| c.expired(now) || !c.stream.usable())
            .collect();
        drop(gone);
    }
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

    /// The upstream's end, once the gateway's is closed: EOF.
    async fn closed_here(peer: &mut TcpStream) -> bool {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 8];
        let read = tokio::time::timeout(Duration::from_secs(10), peer.read(&mut buf)).await;
        matches!(read, Ok(Ok(0)))
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_sweep_closes_what_the_upstream_closed_and_what_expired() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // The upstream half-closed it: it goes, and the gateway's end closes.
        let a = TcpStream::connect(addr).await.unwrap();
        let (mut a_peer, _) = listener.accept().await.unwrap();
        a_peer.shutdown().await.unwrap();
        a.readable().await.unwrap();
        give_back(addr, 7, plain(a), None);
        // Idle past its timeout: goes too.
        let b = TcpStream::connect(addr).await.unwrap();
        let (mut b_peer, _) = listener.accept().await.unwrap();
        give_back(addr, 7, plain(b), Some(Duration::from_micros(1)));
        std::thread::sleep(Duration::from_millis(1));
        // Quiet and within its timeout: stays.
        let c = TcpStream::connect(addr).await.unwrap();
        let (_c_peer, _) = listener.accept().await.unwrap();
        give_back(addr, 7, plain(c), Some(Duration::from_secs(600)));

        sweep();
        assert!(closed_here(&mut a_peer).await, "closed by the upstream");
        assert!(closed_here(&mut b_peer).await, "expired");
        assert!(checkout(addr, 7).is_some(), "the quiet one stays");
        assert!(checkout(addr, 7).is_none(), "and only it");
    }
}
