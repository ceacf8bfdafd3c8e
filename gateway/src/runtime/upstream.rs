//! Upstream pools: the endpoint set (which endpoint each attempt goes
//! to, from `endpoints/`) and the ready-made peer of each endpoint.

use crate::config::Material;
use std::any::Any;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pingora::protocols::ALPN;
use pingora::upstreams::peer::HttpPeer;

use crate::config::model::{HashKey, Upstream, UpstreamProtocol, UpstreamTls};
use crate::endpoints::health::Turned;
use crate::endpoints::outlier::Change;
use crate::endpoints::set::{EndpointSet, InFlight, Member, Policy, State};
use crate::endpoints::{Now, Outcome};
use crate::types::identity::IdentityPattern;

/// The identities (URI and DNS SANs) an upstream's certificate carries,
/// recorded on the connection after its handshake.
#[derive(Debug)]
pub struct UpstreamIdentities(pub Vec<String>);

/// Concurrent HTTP/2 streams per h2c connection to an upstream.
const H2C_MAX_STREAMS: usize = 128;

/// A compiled upstream: its endpoints and one ready-made peer per endpoint.
pub struct UpstreamPool {
    pub name: String,
    set: EndpointSet,
    /// Peers built once at load, parallel to the set's members; a request
    /// clones one and sets its deadline.
    peers: Vec<HttpPeer>,
    /// `consistent_hash`: what a request is placed on the ring by.
    pub hash_key: Option<HashKey>,
    /// Active health checks, and the Host each endpoint's check sends.
    prober: Option<super::health::Prober>,
    check_hosts: Vec<String>,
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
    /// replaced; its endpoints that stay keep their records (ejections,
    /// load), and new ones ramp up under `slow_start`.
    pub fn build(u: &Upstream, material: &Material, previous: Option<&UpstreamPool>) -> Self {
        let mut peers = Vec::with_capacity(u.endpoints.len());
        let mut taken = vec![false; previous.map_or(0, |p| p.set.len())];
        let now = Instant::now();
        let mut members = Vec::with_capacity(u.endpoints.len());
        for e in &u.endpoints {
            let record = previous
                .and_then(|p| p.set.record_at(e.socket, &mut taken))
                .unwrap_or_else(|| {
                    let fresh = Arc::<crate::endpoints::set::Endpoint>::default();
                    if previous.is_some() && u.slow_start.is_some() {
                        fresh.start_ramp(now);
                    }
                    fresh
                });
            members.push(Member {
                addr: e.socket,
                weight: e.weight,
                record,
            });
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
        UpstreamPool {
            series: crate::telemetry::metrics::UpstreamSeries::new(&u.name),
            name: u.name.clone(),
            set: EndpointSet::new(Policy::of(u), members),
            peers,
            hash_key: match &u.load_balancing {
                crate::config::model::LoadBalancing::ConsistentHash(k) => Some(k.clone()),
                _ => None,
            },
            prober: u.health_check.clone().map(super::health::Prober::new),
            check_hosts: u
                .endpoints
                .iter()
                .map(|e| {
                    let configured = u.health_check.as_ref().and_then(|h| h.host.clone());
                    let sni = u
                        .tls
                        .as_ref()
                        .map(|t| t.sni.clone())
                        .filter(|s| !s.is_empty());
                    configured.or(sni).unwrap_or_else(|| e.addr.clone())
                })
                .collect(),
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

    /// The endpoint for an attempt (see `EndpointSet::select`), and its
    /// peer with the read timeout capped by `remaining` (the route's
    /// deadline).
    pub fn select(
        &self,
        tried: &[usize],
        key: Option<&[u8]>,
        remaining: Duration,
    ) -> Option<(usize, HttpPeer)> {
        let chosen = self.set.select(tried, key);
        for i in chosen.back {
            log::info!(
                "upstream `{}` endpoint {} is back from ejection",
                self.name,
                self.addr(i)
            );
        }
        let idx = chosen.index?;
        let mut peer = self.peers.get(idx)?.clone();
        peer.options.read_timeout = Some(self.read_timeout.min(remaining));
        peer.options.connection_timeout = peer.options.connection_timeout.map(|c| c.min(remaining));
        Some((idx, peer))
    }

    fn addr(&self, i: usize) -> String {
        self.set
            .member(i)
            .map_or(String::new(), |m| m.addr.to_string())
    }

    /// Count a request in flight at endpoint `i` until the guard drops.
    pub fn in_flight(&self, i: usize) -> Option<InFlight> {
        self.set.in_flight(i)
    }

    /// Count how an attempt at endpoint `i` ended, `rtt` after it began;
    /// outlier detection may eject the endpoint.
    pub fn report(&self, i: usize, outcome: Outcome, rtt: Duration) {
        let now = Now::default();
        match self.set.report(i, outcome, rtt, &now) {
            None | Some(Change::Back) => {}
            Some(Change::Ejected { until, times }) => {
                let time = until.saturating_duration_since(now.get());
                log::warn!(
                    "upstream `{}` endpoint {} ejected for {} after failing {} times in a row{}",
                    self.name,
                    self.addr(i),
                    humantime::format_duration(Duration::from_secs(time.as_secs().max(1))),
                    self.set
                        .policy()
                        .outlier
                        .map_or(0, |o| o.consecutive_failures),
                    if times > 1 {
                        format!(" (ejection {times} in a row)")
                    } else {
                        String::new()
                    }
                );
                self.series.ejections().inc();
            }
            Some(Change::AtLimit) => log::warn!(
                "upstream `{}` endpoint {} keeps failing but stays in: max_ejected_percent = {} of the endpoints are ejected already",
                self.name,
                self.addr(i),
                self.set.policy().outlier.map_or(0, |o| o.max_ejected_percent)
            ),
        }
    }

    /// How many endpoints are in each of `names::ENDPOINT_STATES`.
    pub fn state_counts(&self) -> [usize; crate::telemetry::names::ENDPOINT_STATES.len()] {
        let now = Now::default();
        let mut counts = [0; crate::telemetry::names::ENDPOINT_STATES.len()];
        for i in 0..self.set.len() {
            let slot = match self.set.state(i, &now) {
                Some(State::Healthy) | None => 0,
                Some(State::Ejected { .. }) => 1,
                Some(State::SlowStart) => 2,
                Some(State::Unhealthy) => 3,
            };
            counts[slot] += 1;
        }
        counts
    }

    /// Claim the health checks due now: the endpoints to check.
    pub fn due_checks(&self) -> Vec<usize> {
        if self.prober.is_none() {
            return Vec::new();
        }
        self.set.due_checks(Instant::now())
    }

    /// Run endpoint `i`'s health check (claimed with `due_checks`), count
    /// it, and log a change of its health.
    pub async fn check(&self, i: usize, certs: &super::certs::CertStore) {
        let (Some(prober), Some(peer), Some(host)) =
            (&self.prober, self.peers.get(i), self.check_hosts.get(i))
        else {
            return;
        };
        let mut peer = peer.clone();
        // The client certificate as its files hold it now, as for requests.
        if let Some(current) = self.client_cert_slot.as_ref().and_then(|s| certs.get(s)) {
            peer.client_cert_key = Some(current.get().cert_key());
        }
        let (passed, seen) = prober.probe(&peer, host).await;
        self.series.health_check(passed).inc();
        match self.set.health_result(i, passed, seen.clone()) {
            Some(Turned::Unhealthy) => log::warn!(
                "upstream `{}` endpoint {} is unhealthy: its health check failed ({seen})",
                self.name,
                self.addr(i)
            ),
            Some(Turned::Healthy) => log::info!(
                "upstream `{}` endpoint {} is healthy again ({seen})",
                self.name,
                self.addr(i)
            ),
            None => log::debug!(
                "upstream `{}` endpoint {} health check: {} ({seen})",
                self.name,
                self.addr(i),
                if passed { "passed" } else { "failed" }
            ),
        }
    }

    /// The endpoint set, for `/upstreams`.
    pub fn set(&self) -> &EndpointSet {
        &self.set
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
