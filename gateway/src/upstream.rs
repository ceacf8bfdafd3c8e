//! Upstream pools: endpoint choice (weighted round robin, from
//! pingora-load-balancing) and the peer each request connects to.

use std::collections::BTreeSet;
use std::time::Duration;

use pingora::lb::discovery::Static;
use pingora::lb::selection::RoundRobin;
use pingora::lb::{Backend, Backends, LoadBalancer};
use pingora::protocols::ALPN;
use pingora::upstreams::peer::HttpPeer;

use crate::config::model::{Upstream, UpstreamProtocol};

/// Concurrent HTTP/2 streams per h2c connection to an upstream.
const H2C_MAX_STREAMS: usize = 128;

/// The endpoint index carried in a pingora `Backend`.
#[derive(Clone, Copy)]
struct EndpointIndex(usize);

/// A compiled upstream: its balancer and one ready-made peer per endpoint.
pub struct UpstreamPool {
    pub name: String,
    balancer: LoadBalancer<RoundRobin>,
    /// Peers built once at load; a request clones one and sets its deadline.
    peers: Vec<HttpPeer>,
    pub connect_retries: u32,
    read_timeout: Duration,
}

impl UpstreamPool {
    pub fn build(u: &Upstream) -> Self {
        let mut backends = BTreeSet::new();
        let mut peers = Vec::with_capacity(u.endpoints.len());
        for (i, e) in u.endpoints.iter().enumerate() {
            let mut backend = Backend {
                addr: pingora::protocols::l4::socket::SocketAddr::Inet(e.socket),
                weight: e.weight as usize,
                ext: Default::default(),
            };
            backend.ext.insert(EndpointIndex(i));
            backends.insert(backend);
            let mut peer = HttpPeer::new(e.socket, false, String::new());
            peer.options.connection_timeout = Some(u.connect_timeout);
            peer.options.read_timeout = Some(u.read_timeout);
            peer.options.write_timeout = Some(u.write_timeout);
            peer.options.idle_timeout = Some(u.idle_timeout);
            if u.protocol == UpstreamProtocol::H2c {
                peer.options.alpn = ALPN::H2;
                peer.options.max_h2_streams = H2C_MAX_STREAMS;
            }
            peers.push(peer);
        }
        let balancer = LoadBalancer::from_backends(Backends::new(Static::new(backends)));
        // Static discovery completes at once; this only fills the selector.
        let _ = futures_lite_now(balancer.update());
        UpstreamPool {
            name: u.name.clone(),
            balancer,
            peers,
            connect_retries: u.connect_retries,
            read_timeout: u.read_timeout,
        }
    }

    /// Pick an endpoint, avoiding those in `tried` while others remain. The
    /// peer's read timeout is capped by `remaining` (the route's deadline).
    pub fn select(&self, tried: &[usize], remaining: Duration) -> Option<(usize, HttpPeer)> {
        let pick = |avoid: bool| {
            self.balancer
                .select_with(b"", self.peers.len().max(1) * 4, |b, _healthy| {
                    !avoid
                        || b.ext
                            .get::<EndpointIndex>()
                            .is_some_and(|i| !tried.contains(&i.0))
                })
        };
        let backend = pick(true).or_else(|| pick(false))?;
        let idx = backend.ext.get::<EndpointIndex>()?.0;
        let mut peer = self.peers.get(idx)?.clone();
        peer.options.read_timeout = Some(self.read_timeout.min(remaining));
        peer.options.connection_timeout = peer.options.connection_timeout.map(|c| c.min(remaining));
        Some((idx, peer))
    }

    pub fn endpoint_count(&self) -> usize {
        self.peers.len()
    }
}

/// Poll a future that is known not to wait (static discovery) to completion.
fn futures_lite_now<F: std::future::Future>(f: F) -> Option<F::Output> {
    use std::task::{Context, Poll, Waker};
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => Some(v),
        Poll::Pending => None,
    }
}
