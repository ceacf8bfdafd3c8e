//! Upstream pools: endpoint choice (weighted round robin, from
//! pingora-load-balancing, over the endpoints outlier detection has not
//! ejected) and the peer each request connects to.

use crate::config::Material;
use std::any::Any;
use std::cell::RefCell;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use pingora::lb::discovery::Static;
use pingora::lb::selection::RoundRobin;
use pingora::lb::{Backend, Backends, LoadBalancer};
use pingora::protocols::ALPN;
use pingora::upstreams::peer::HttpPeer;

use crate::config::model::{Upstream, UpstreamProtocol, UpstreamTls};
use crate::endpoints::outlier::{self, Change};
use crate::endpoints::{Now, Outcome};
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
    /// Each endpoint's address, parallel to `peers`.
    sockets: Vec<SocketAddr>,
    /// `None` with `outlier = false`.
    outlier: Option<outlier::Upstream>,
    pub connect_retries: u32,
    read_timeout: Duration,
    /// What the upstream's certificate must carry (`tls.verify`).
    pub verify: Option<IdentityPattern>,
    /// The certificate store's name for this upstream's client certificate.
    pub client_cert_slot: Option<String>,
    pub series: crate::telemetry::metrics::UpstreamSeries,
}

impl UpstreamPool {
    /// `previous`: the pool of the same name in the config being
    /// replaced; its endpoints that stay keep their outlier records.
    pub fn build(u: &Upstream, material: &Material, previous: Option<&UpstreamPool>) -> Self {
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
        let sockets: Vec<SocketAddr> = u.endpoints.iter().map(|e| e.socket).collect();
        let outlier = u.outlier.map(|policy| {
            let mut kept = vec![false; previous.map_or(0, |p| p.sockets.len())];
            let records = sockets
                .iter()
                .map(|addr| {
                    previous
                        .and_then(|p| p.record_at(*addr, &mut kept))
                        .unwrap_or_default()
                })
                .collect();
            outlier::Upstream::new(policy, records)
        });
        let pool = UpstreamPool {
            series: crate::telemetry::metrics::UpstreamSeries::new(&u.name),
            name: u.name.clone(),
            balancer,
            peers,
            sockets,
            outlier,
            connect_retries: u.connect_retries,
            read_timeout: u.read_timeout,
            verify: u.tls.as_ref().and_then(|t| t.verify.clone()),
            client_cert_slot: u
                .tls
                .as_ref()
                .and_then(|t| t.client.as_ref())
                .map(|_| crate::runtime::certs::upstream_slot(&u.name)),
        };
        pool.count_states(&mut Now::default());
        pool
    }

    /// The outlier record of the endpoint at `addr` not taken yet.
    fn record_at(&self, addr: SocketAddr, taken: &mut [bool]) -> Option<Arc<outlier::Endpoint>> {
        let o = self.outlier.as_ref()?;
        let i = (0..self.sockets.len())
            .find(|&i| self.sockets[i] == addr && !taken.get(i).copied().unwrap_or(true))?;
        taken[i] = true;
        o.endpoint(i).cloned()
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

    /// Pick an endpoint: one that is usable (not ejected) and not in
    /// `tried`; else one usable; else, none being usable, one not tried;
    /// else any. The peer's read timeout is capped by `remaining` (the
    /// route's deadline).
    pub fn select(&self, tried: &[usize], remaining: Duration) -> Option<(usize, HttpPeer)> {
        // One endpoint: there is no other to send to, ejected or not.
        let idx = if self.peers.len() == 1 {
            0
        } else {
            self.choose(tried)?
        };
        let mut peer = self.peers.get(idx)?.clone();
        peer.options.read_timeout = Some(self.read_timeout.min(remaining));
        peer.options.connection_timeout = peer.options.connection_timeout.map(|c| c.min(remaining));
        Some((idx, peer))
    }

    fn choose(&self, tried: &[usize]) -> Option<usize> {
        let now = RefCell::new(Now::default());
        let usable = |i: usize| self.usable(i, &mut now.borrow_mut());
        let pick = |accept: &dyn Fn(usize) -> bool| {
            self.balancer
                .select_with(b"", self.peers.len() * 4, |b, _healthy| {
                    b.ext.get::<EndpointIndex>().is_some_and(|i| accept(i.0))
                })
                .and_then(|b| b.ext.get::<EndpointIndex>().map(|i| i.0))
        };
        pick(&|i| !tried.contains(&i) && usable(i))
            .or_else(|| pick(&usable))
            .or_else(|| pick(&|i| !tried.contains(&i)))
            .or_else(|| pick(&|_| true))
    }

    /// Whether endpoint `i` may get requests now; an ejection that has run
    /// its time ends here.
    fn usable(&self, i: usize, now: &mut Now) -> bool {
        let Some(o) = &self.outlier else {
            return true;
        };
        let (usable, change) = o.usable(i, now);
        if change == Some(Change::Back) {
            log::info!(
                "upstream `{}` endpoint {} is back from ejection",
                self.name,
                self.sockets
                    .get(i)
                    .map_or(String::new(), ToString::to_string)
            );
            self.count_states(now);
        }
        usable
    }

    /// Count how an attempt at endpoint `i` ended; `outlier` may eject it.
    pub fn report(&self, i: usize, outcome: Outcome) {
        let Some(o) = &self.outlier else {
            return;
        };
        let mut now = Now::default();
        let addr = || {
            self.sockets
                .get(i)
                .map_or(String::new(), ToString::to_string)
        };
        match o.report(i, outcome, &mut now) {
            None | Some(Change::Back) => {}
            Some(Change::Ejected { until, times }) => {
                let time = until.saturating_duration_since(now.get());
                log::warn!(
                    "upstream `{}` endpoint {} ejected for {} after failing {} times in a row{}",
                    self.name,
                    addr(),
                    humantime::format_duration(Duration::from_secs(time.as_secs().max(1))),
                    o.policy().consecutive_failures,
                    if times > 1 {
                        format!(" (ejection {times} in a row)")
                    } else {
                        String::new()
                    }
                );
                self.series.ejections().inc();
                self.count_states(&mut now);
            }
            Some(Change::AtLimit) => log::warn!(
                "upstream `{}` endpoint {} keeps failing but stays in: max_ejected_percent = {} of the endpoints are ejected already",
                self.name,
                addr(),
                o.policy().max_ejected_percent
            ),
        }
    }

    /// `meshgate_upstream_endpoints` for this upstream.
    fn count_states(&self, now: &mut Now) {
        let ejected = self.outlier.as_ref().map_or(0, |o| o.ejected(now.get()));
        self.series
            .set_endpoints([self.peers.len() - ejected, ejected]);
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
