//! Upstream pools: endpoint choice (weighted round robin, from
//! pingora-load-balancing) and the peer each request connects to.

use crate::config::Material;
use std::any::Any;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use pingora::lb::discovery::Static;
use pingora::lb::selection::RoundRobin;
use pingora::lb::{Backend, Backends, LoadBalancer};
use pingora::protocols::ALPN;
use pingora::upstreams::peer::HttpPeer;

use crate::config::model::{Upstream, UpstreamProtocol, UpstreamTls};
use crate::types::identity::IdentityPattern;

/// The identities (URI and DNS SANs) an upstream's certificate carries,
/// recorded on the connection after its handshake.
#[derive(Debug)]
pub struct UpstreamIdentities(pub Vec<String>);

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
    /// What the upstream's certificate must carry (`tls.verify`).
    pub verify: Option<IdentityPattern>,
    /// The certificate store's name for this upstream's client certificate.
    pub client_cert_slot: Option<String>,
    pub series: crate::telemetry::metrics::UpstreamSeries,
}

impl UpstreamPool {
    pub fn build(u: &Upstream, material: &Material) -> Self {
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
            let mut peer = HttpPeer::new(
                e.socket,
                u.tls.is_some(),
                u.tls.as_ref().map_or(String::new(), |t| t.sni.clone()),
            );
            peer.options.connection_timeout = Some(u.connect_timeout);
            peer.options.read_timeout = Some(u.read_timeout);
            peer.options.write_timeout = Some(u.write_timeout);
            peer.options.idle_timeout = Some(u.idle_timeout);
            match u.protocol {
                UpstreamProtocol::H2c | UpstreamProtocol::H2 => {
                    peer.options.alpn = ALPN::H2;
                    peer.options.max_h2_streams = H2C_MAX_STREAMS;
                }
                UpstreamProtocol::Http1 => peer.options.alpn = ALPN::H1,
            }
            if let Some(tls) = &u.tls {
                set_tls(&mut peer, tls, &u.name, material);
            }
            peers.push(peer);
        }
        let balancer = LoadBalancer::from_backends(Backends::new(Static::new(backends)));
        // Static discovery completes at once; this only fills the selector.
        let _ = futures_lite_now(balancer.update());
        UpstreamPool {
            series: crate::telemetry::metrics::UpstreamSeries::new(&u.name),
            name: u.name.clone(),
            balancer,
            peers,
            connect_retries: u.connect_retries,
            read_timeout: u.read_timeout,
            verify: u.tls.as_ref().and_then(|t| t.verify.clone()),
            client_cert_slot: u
                .tls
                .as_ref()
                .and_then(|t| t.client.as_ref())
                .map(|_| crate::runtime::certs::upstream_slot(&u.name)),
        }
    }

    /// Whether an established connection's peer is who `tls.verify` asks
    /// for. Checked on every request, pooled connections included.
    pub fn check_identity(
        &self,
        digest: Option<&pingora::protocols::Digest>,
    ) -> Result<(), String> {
        let Some(want) = &self.verify else {
            return Ok(());
        };
        let found = digest
            .and_then(|d| d.ssl_digest.as_ref())
            .and_then(|s| s.extension.get::<UpstreamIdentities>());
        match found {
            Some(ids) if ids.0.iter().any(|id| want.matches(id)) => Ok(()),
            Some(ids) => Err(format!(
                "upstream `{}` presented {:?}, which does not match verify = \"{}\"",
                self.name,
                ids.0,
                want.as_text()
            )),
            None => Err(format!(
                "upstream `{}` presented no certificate identity to check against verify = \"{}\"",
                self.name,
                want.as_text()
            )),
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
        // One endpoint: the balancer would return it whatever was tried
        // (the second pick), so skip its hashing and `Backend` clone.
        let idx = if self.peers.len() == 1 {
            0
        } else {
            let backend = pick(true).or_else(|| pick(false))?;
            backend.ext.get::<EndpointIndex>()?.0
        };
        let mut peer = self.peers.get(idx)?.clone();
        peer.options.read_timeout = Some(self.read_timeout.min(remaining));
        peer.options.connection_timeout = peer.options.connection_timeout.map(|c| c.min(remaining));
        Some((idx, peer))
    }

    pub fn endpoint_count(&self) -> usize {
        self.peers.len()
    }
}

/// Certificate checks for a TLS upstream: the chain against `ca` (or the
/// system store), then the name: the SNI by BoringSSL, or `verify` (SPIFFE
/// ID or DNS name) by meshgate on each request, from the identities recorded
/// at the handshake.
fn set_tls(peer: &mut HttpPeer, tls: &UpstreamTls, upstream: &str, material: &Material) {
    // Pooled connections are keyed by the peer's hash, which leaves out the
    // CA: without this, a connection verified for one upstream could serve
    // another with a different CA or identity at the same address.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    std::hash::Hash::hash(&upstream, &mut h);
    if let Some(ca) = &tls.ca {
        std::hash::Hash::hash(&ca.fingerprint, &mut h);
    }
    std::hash::Hash::hash(&tls.verify.as_ref().map(|v| v.as_text()), &mut h);
    peer.group_key = std::hash::Hasher::finish(&h);
    peer.options.verify_cert = true;
    peer.options.verify_hostname = tls.verify.is_none();
    if let Some(ca) = &tls.ca {
        peer.options.ca = Some(Arc::new(material.ca(ca).to_vec().into_boxed_slice()));
    }
    if let Some(pair) = tls.client.as_ref().and(material.upstream_client(upstream)) {
        // Replaced per request by the current pair (see `with_client_cert`).
        peer.client_cert_key = Some(pair.cert_key());
    }
    if tls.verify.is_some() {
        peer.options.upstream_tls_handshake_complete_hook = Some(Arc::new(|ssl| {
            let ids = ssl
                .peer_certificate()
                .map(|c| crate::tls::identities_of(&c))
                .unwrap_or_default();
            Some(Arc::new(UpstreamIdentities(ids)) as Arc<dyn Any + Send + Sync>)
        }));
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
