//! Upstream pools: the endpoints an upstream has now (a set swapped whole
//! when discovery finds others), which endpoint each attempt goes to (from
//! `endpoints/`), and the ready-made peer of each endpoint.

use crate::config::Material;
use std::any::Any;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use pingora::protocols::l4::socket::SocketAddr as PeerAddr;
use pingora::protocols::ALPN;
use pingora::upstreams::peer::{HttpPeer, Tracer, Tracing};

use crate::config::model::{Discovery, HashKey, Upstream, UpstreamProtocol, UpstreamTls};
use crate::endpoints::balance::nanos;
use crate::endpoints::health::Turned;
use crate::endpoints::outlier::Change;
use crate::endpoints::set::{Endpoint, EndpointSet, Member, Policy, State};
use crate::endpoints::{Now, Outcome};
use crate::resilience::limit::{Connections, Gate};
use crate::types::identity::IdentityPattern;

/// The identities (URI and DNS SANs) an upstream's certificate carries,
/// recorded on the connection after its handshake.
#[derive(Debug)]
pub struct UpstreamIdentities(pub Vec<String>);

/// Concurrent HTTP/2 streams per h2c connection to an upstream.
const H2C_MAX_STREAMS: usize = 128;

/// One endpoint as found: in the config, or by discovery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub addr: SocketAddr,
    pub weight: u32,
    /// The name it was found under (`HOST:PORT`; for SRV, the target and
    /// port): the default Host of its health checks.
    pub name: String,
    /// The `endpoints` entry it came from.
    pub entry: usize,
}

/// An upstream's endpoints at one moment, with their peers.
pub struct Members {
    pub set: EndpointSet,
    /// Parallel to the set's members.
    peers: Vec<HttpPeer>,
    found: Vec<Found>,
    /// The Host each endpoint's health check sends.
    check_hosts: Vec<String>,
}

impl Members {
    pub fn found(&self) -> &[Found] {
        &self.found
    }
}

/// What the last discovery refresh did, for `/upstreams`.
#[derive(Debug, Clone)]
pub struct Refresh {
    pub at: SystemTime,
    /// `None`: every name answered; else what failed (the last good
    /// endpoints of those names were kept).
    pub failed: Option<String>,
}

/// An attempt's timeouts, as Pingora's peer for it would carry them.
#[derive(Debug, Clone, Copy)]
pub struct AttemptTimes {
    pub connect: Option<Duration>,
    pub read: Option<Duration>,
    pub write: Option<Duration>,
    /// How long a pooled connection may stay idle.
    pub idle: Option<Duration>,
}

/// A compiled upstream: its endpoints now and how to reach them.
pub struct UpstreamPool {
    pub name: String,
    pub discovery: Discovery,
    /// `endpoints` as written, with their weights: what discovery asks for.
    pub entries: Vec<(String, u32)>,
    members: ArcSwap<Members>,
    /// Every endpoint's peer is this one at its address.
    template: HttpPeer,
    policy: Policy,
    /// `health_check.host`, else the upstream's SNI.
    check_host: Option<String>,
    /// Discovery: when the next refresh is due ([`nanos`]); 0: now.
    next_refresh: AtomicU64,
    refreshing: AtomicBool,
    /// The last refresh failed (logged once until one succeeds).
    failing: AtomicBool,
    last_refresh: Mutex<Option<Refresh>>,
    /// `consistent_hash`: what a request is placed on the ring by.
    pub hash_key: Option<HashKey>,
    /// Active health checks.
    prober: Option<super::health::Prober>,
    /// `retry_budget`; kept over a reload while its settings stay.
    pub budget: Option<Arc<crate::resilience::budget::Budget>>,
    /// `limits`; kept over a reload while its settings stay.
    pub gate: Arc<crate::resilience::limit::Gate>,
    /// `concurrency = "adaptive"`; kept over a reload while it stays on.
    pub adaptive: Option<Arc<crate::resilience::adaptive::Adaptive>>,
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
    /// replaced. Its endpoints that stay keep their records (health,
    /// ejections, load), new ones ramp up under `slow_start`, and a `dns`
    /// or `srv` upstream asking for the same names starts from what they
    /// found last.
    pub fn build(u: &Upstream, material: &Material, previous: Option<&UpstreamPool>) -> Self {
        let mut template = HttpPeer::new(
            SocketAddr::from(([127, 0, 0, 1], 1)),
            u.tls.is_some(),
            u.tls.as_ref().map_or(String::new(), |t| t.sni.clone()),
        );
        template.options.connection_timeout = Some(u.connect_timeout);
        template.options.read_timeout = Some(u.read_timeout);
        template.options.write_timeout = Some(u.write_timeout);
        template.options.idle_timeout = Some(u.idle_timeout);
        match u.protocol {
            UpstreamProtocol::H2c | UpstreamProtocol::H2 => {
                template.options.alpn = ALPN::H2;
                template.options.max_h2_streams = H2C_MAX_STREAMS;
            }
            UpstreamProtocol::Http1 => template.options.alpn = ALPN::H1,
        }
        if let Some(tls) = &u.tls {
            set_tls(&mut template, tls, &u.name, material);
        }
        let entries: Vec<(String, u32)> = u
            .endpoints
            .iter()
            .map(|e| (e.addr.clone(), e.weight))
            .collect();
        // Written addresses (and, under `static`, every address of a name).
        let mut found: Vec<Found> = Vec::new();
        for (entry, e) in u.endpoints.iter().enumerate() {
            for addr in &e.sockets {
                found.push(Found {
                    addr: *addr,
                    weight: e.weight,
                    name: e.addr.clone(),
                    entry,
                });
            }
        }
        let same_names = previous
            .filter(|_| u.discovery != Discovery::Static)
            .filter(|p| p.discovery == u.discovery && p.entries == entries);
        let pool_before = previous.is_some();
        if let Some(p) = same_names {
            found = p.members.load().found.clone();
        }
        let policy = Policy::of(u);
        let check_host = u
            .health_check
            .as_ref()
            .and_then(|h| h.host.clone())
            .or_else(|| {
                u.tls
                    .as_ref()
                    .map(|t| t.sni.clone())
                    .filter(|s| !s.is_empty())
            });
        let gate = previous
            .map(|p| p.gate.clone())
            .filter(|g| g.settings == u.limits)
            .unwrap_or_else(|| {
                let counted = previous.and_then(|p| p.gate.connections.clone());
                Arc::new(Gate::new(u.limits, counted))
            });
        let members = members(
            &policy,
            &template,
            check_host.as_deref(),
            found,
            previous.map(|p| p.members.load_full()).as_deref(),
            pool_before,
            gate.connections.as_ref(),
        );
        let next_refresh = match same_names {
            Some(p) => p.next_refresh.load(Ordering::Relaxed),
            None => 0,
        };
        let series = crate::telemetry::metrics::UpstreamSeries::new(&u.name);
        // Series that exist from the start: dashboards see 0, not no data.
        series.ejections();
        series.budget_exhausted();
        for limit in crate::telemetry::names::OVERFLOW_LIMITS {
            series.overflow(limit);
        }
        if u.health_check.is_some() {
            series.health_check(true);
            series.health_check(false);
        }
        if u.discovery != Discovery::Static {
            series.discovery_refresh(true);
            series.discovery_refresh(false);
        }
        UpstreamPool {
            series,
            name: u.name.clone(),
            discovery: u.discovery,
            entries,
            members: ArcSwap::from_pointee(members),
            template,
            policy,
            check_host,
            next_refresh: AtomicU64::new(next_refresh),
            refreshing: AtomicBool::new(false),
            failing: AtomicBool::new(same_names.is_some_and(|p| p.failing.load(Ordering::Relaxed))),
            last_refresh: Mutex::new(same_names.and_then(|p| p.last_refresh())),
            hash_key: match &u.load_balancing {
                crate::config::model::LoadBalancing::ConsistentHash(k) => Some(k.clone()),
                _ => None,
            },
            prober: u.health_check.clone().map(super::health::Prober::new),
            budget: u.retry_budget.map(|settings| {
                previous
                    .and_then(|p| p.budget.clone())
                    .filter(|b| b.settings == settings)
                    .unwrap_or_else(|| Arc::new(crate::resilience::budget::Budget::new(settings)))
            }),
            adaptive: u.adaptive_concurrency.then(|| {
                previous
                    .and_then(|p| p.adaptive.clone())
                    .filter(|_| previous.is_some_and(|p| p.gate.settings == u.limits))
                    .unwrap_or_else(|| {
                        Arc::new(crate::resilience::adaptive::Adaptive::new(
                            u.limits.max_requests,
                        ))
                    })
            }),
            gate,
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

    /// The endpoints now, for one request from its first attempt to its end.
    pub fn members(&self) -> Arc<Members> {
        self.members.load_full()
    }

    pub fn last_refresh(&self) -> Option<Refresh> {
        self.last_refresh
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
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

    /// The endpoint for an attempt among `members` (see
    /// `EndpointSet::select`), and its peer with the connect and read
    /// timeouts capped by `remaining` (the attempt's time: the route's
    /// deadline, or `per_try_timeout`).
    pub fn select(
        &self,
        members: &Members,
        tried: &[usize],
        key: Option<&[u8]>,
        remaining: Duration,
    ) -> Option<(usize, Box<HttpPeer>)> {
        let idx = self.choose(members, tried, key)?;
        // Boxed once here: Pingora takes it boxed, and it is large to move.
        let mut peer = Box::new(members.peers.get(idx)?.clone());
        peer.options.read_timeout = Some(self.read_timeout.min(remaining));
        peer.options.connection_timeout = peer.options.connection_timeout.map(|c| c.min(remaining));
        Some((idx, peer))
    }

    /// [`Self::select`] for a driver that connects itself: the endpoint's
    /// address and the attempt's timeouts, without a copy of its peer.
    pub fn select_addr(
        &self,
        members: &Members,
        tried: &[usize],
        key: Option<&[u8]>,
        remaining: Duration,
    ) -> Option<(usize, std::net::SocketAddr, AttemptTimes)> {
        let idx = self.choose(members, tried, key)?;
        let peer = members.peers.get(idx)?;
        let addr = *peer._address.as_inet()?;
        let o = &peer.options;
        Some((
            idx,
            addr,
            AttemptTimes {
                connect: o.connection_timeout.map(|c| c.min(remaining)),
                read: Some(self.read_timeout.min(remaining)),
                write: o.write_timeout,
                idle: o.idle_timeout,
            },
        ))
    }

    /// Endpoint `idx`'s peer for a TLS upstream, with the client
    /// certificate as its files hold it now (rotated ones are picked up by
    /// the watcher); `None` for a plain one.
    pub fn tls_peer(
        &self,
        members: &Members,
        idx: usize,
        certs: &super::certs::CertStore,
    ) -> Option<HttpPeer> {
        let peer = members.peers.get(idx)?;
        if !peer.is_tls() {
            return None;
        }
        let mut peer = peer.clone();
        self.use_current_client_cert(&mut peer, certs);
        Some(peer)
    }

    /// Give `peer` the client certificate as its files hold it now
    /// (rotated certificates are picked up by the watcher); a new pair
    /// also means new pooled connections.
    pub fn use_current_client_cert(&self, peer: &mut HttpPeer, certs: &super::certs::CertStore) {
        if let Some(current) = self.client_cert_slot.as_ref().and_then(|s| certs.get(s)) {
            peer.client_cert_key = Some(current.get().cert_key());
        }
    }

    /// The endpoint for an attempt, noting those back from ejection.
    fn choose(&self, members: &Members, tried: &[usize], key: Option<&[u8]>) -> Option<usize> {
        let chosen = members.set.select(tried, key);
        for i in chosen.back {
            log::info!(
                "upstream `{}` endpoint {} is back from ejection",
                self.name,
                addr_of(members, i)
            );
        }
        chosen.index
    }

    /// Count how an attempt at endpoint `i` of `members` ended, `rtt`
    /// after it began; outlier detection may eject the endpoint.
    pub fn report(&self, members: &Members, i: usize, outcome: Outcome, rtt: Duration) {
        let now = Now::default();
        match members.set.report(i, outcome, rtt, &now) {
            None | Some(Change::Back) => {}
            Some(Change::Ejected { until, times }) => {
                let time = until.saturating_duration_since(now.get());
                log::warn!(
                    "upstream `{}` endpoint {} ejected for {} after failing {} times in a row{}",
                    self.name,
                    addr_of(members, i),
                    humantime::format_duration(Duration::from_millis(time.as_millis() as u64)),
                    self.policy.outlier.map_or(0, |o| o.consecutive_failures),
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
                addr_of(members, i),
                self.policy.outlier.map_or(0, |o| o.max_ejected_percent)
            ),
        }
    }

    /// How many endpoints are in each of `names::ENDPOINT_STATES`.
    pub fn state_counts(&self) -> [usize; crate::telemetry::names::ENDPOINT_STATES.len()] {
        let now = Now::default();
        let members = self.members.load();
        let mut counts = [0; crate::telemetry::names::ENDPOINT_STATES.len()];
        for i in 0..members.set.len() {
            let name = members.set.state(i, &now).unwrap_or(State::Healthy).name();
            if let Some(slot) = crate::telemetry::names::ENDPOINT_STATES
                .iter()
                .position(|s| *s == name)
            {
                counts[slot] += 1;
            }
        }
        counts
    }

    /// Claim the health checks due now: the endpoints to check, in the
    /// set they belong to.
    pub fn due_checks(&self) -> Option<(Arc<Members>, Vec<usize>)> {
        self.prober.as_ref()?;
        let members = self.members.load_full();
        let due = members.set.due_checks(Instant::now());
        (!due.is_empty()).then_some((members, due))
    }

    /// Run endpoint `i`'s health check (claimed with `due_checks`), count
    /// it, and log a change of its health.
    pub async fn check(&self, members: &Members, i: usize, certs: &super::certs::CertStore) {
        let (Some(prober), Some(peer), Some(host)) = (
            &self.prober,
            members.peers.get(i),
            members.check_hosts.get(i),
        ) else {
            return;
        };
        let mut peer = peer.clone();
        // A check's own connection is not traffic: `max_connections` leaves it out.
        peer.options.tracer = None;
        // The client certificate as its files hold it now, as for requests.
        self.use_current_client_cert(&mut peer, certs);
        let identity = |digest: Option<&pingora::protocols::Digest>| self.check_identity(digest);
        let (passed, seen) = prober.probe(&peer, host, &identity).await;
        self.series.health_check(passed).inc();
        let addr = addr_of(members, i);
        match members.set.health_result(i, passed, seen.clone()) {
            Some(Turned::Unhealthy) => log::warn!(
                "upstream `{}` endpoint {addr} is unhealthy: its health check failed ({seen})",
                self.name
            ),
            Some(Turned::Healthy) => log::info!(
                "upstream `{}` endpoint {addr} is healthy again ({seen})",
                self.name
            ),
            None => log::debug!(
                "upstream `{}` endpoint {addr} health check: {} ({seen})",
                self.name,
                if passed { "passed" } else { "failed" }
            ),
        }
    }

    /// Whether a discovery refresh is due at `now`; claims it.
    pub fn refresh_due(&self, now: Instant) -> bool {
        self.discovery != Discovery::Static
            && self.next_refresh.load(Ordering::Relaxed) <= nanos(now)
            && !self.refreshing.swap(true, Ordering::AcqRel)
    }

    /// Take a refresh's answers, one per entry (`Err`: that name failed,
    /// its last endpoints stay). Swaps the set when it changed; the next
    /// refresh is due after `ttl` (or `retry` when something failed).
    pub fn refreshed(
        &self,
        answers: Vec<Result<Vec<Found>, String>>,
        ttl: Duration,
        retry: Duration,
    ) {
        let current = self.members.load_full();
        let mut found: Vec<Found> = Vec::new();
        let mut failures = Vec::new();
        for (entry, answer) in answers.into_iter().enumerate() {
            match answer {
                Ok(list) if !list.is_empty() => found.extend(list),
                Ok(_) | Err(_) => {
                    if let Err(why) = answer {
                        failures.push(why);
                    } else if let Some((name, _)) = self.entries.get(entry) {
                        failures.push(format!("`{name}` has no address"));
                    }
                    found.extend(current.found.iter().filter(|f| f.entry == entry).cloned());
                }
            }
        }
        // An address two names share is one endpoint.
        let mut unique: Vec<Found> = Vec::with_capacity(found.len());
        for f in found {
            if !unique.iter().any(|u| u.addr == f.addr) {
                unique.push(f);
            }
        }
        let failed = (!failures.is_empty()).then(|| failures.join("; "));
        self.series.discovery_refresh(failed.is_none()).inc();
        match &failed {
            Some(why) if !self.failing.swap(true, Ordering::Relaxed) => log::warn!(
                "upstream `{}` discovery failed, keeping the last endpoints found: {why}",
                self.name
            ),
            None if self.failing.swap(false, Ordering::Relaxed) => {
                log::info!("upstream `{}` discovery answers again", self.name)
            }
            _ => {}
        }
        let same = unique.len() == current.found.len()
            && unique.iter().all(|f| {
                current
                    .found
                    .iter()
                    .any(|c| c.addr == f.addr && c.weight == f.weight)
            });
        if !same {
            let added: Vec<String> = unique
                .iter()
                .filter(|f| !current.found.iter().any(|c| c.addr == f.addr))
                .map(|f| format!("+{}", f.addr))
                .collect();
            let removed: Vec<String> = current
                .found
                .iter()
                .filter(|c| !unique.iter().any(|f| f.addr == c.addr))
                .map(|c| format!("-{}", c.addr))
                .collect();
            let change = added
                .into_iter()
                .chain(removed)
                .collect::<Vec<_>>()
                .join(" ");
            let now = unique.len();
            let next = members(
                &self.policy,
                &self.template,
                self.check_host.as_deref(),
                unique,
                Some(&current),
                true,
                self.gate.connections.as_ref(),
            );
            self.members.store(Arc::new(next));
            // Logged once in force: a request sent after this line never
            // goes to an endpoint it says was removed.
            log::info!(
                "upstream `{}` endpoints changed: {change} (now {now})",
                self.name
            );
        }
        *self.last_refresh.lock().unwrap_or_else(|p| p.into_inner()) = Some(Refresh {
            at: SystemTime::now(),
            failed,
        });
        let wait = if failures.is_empty() { ttl } else { retry };
        self.next_refresh
            .store(nanos(Instant::now() + wait).max(1), Ordering::Relaxed);
        self.refreshing.store(false, Ordering::Release);
    }
}

/// Build the members for `found`, each keeping its record from `before`
/// when it was there (a new one ramps up under slow start when `ramp`).
fn members(
    policy: &Policy,
    template: &HttpPeer,
    check_host: Option<&str>,
    found: Vec<Found>,
    before: Option<&Members>,
    ramp: bool,
    connections: Option<&Arc<Connections>>,
) -> Members {
    let now = Instant::now();
    let mut taken = vec![false; before.map_or(0, |b| b.set.len())];
    let mut list = Vec::with_capacity(found.len());
    let mut peers = Vec::with_capacity(found.len());
    let mut check_hosts = Vec::with_capacity(found.len());
    for f in &found {
        let record = before
            .and_then(|b| b.set.record_at(f.addr, &mut taken))
            .unwrap_or_else(|| {
                let fresh = Arc::<Endpoint>::default();
                if ramp && policy.slow_start.is_some() {
                    fresh.start_ramp(now);
                }
                fresh
            });
        list.push(Member {
            addr: f.addr,
            weight: f.weight,
            record,
        });
        let mut peer = template.clone();
        peer._address = PeerAddr::Inet(f.addr);
        if let Some(c) = connections {
            peer.options.tracer = Some(Tracer(Box::new(Counted {
                connections: c.clone(),
                addr: f.addr,
            })));
        }
        peers.push(peer);
        check_hosts.push(check_host.map_or_else(|| f.name.clone(), str::to_string));
    }
    Members {
        set: EndpointSet::new(policy.clone(), list),
        peers,
        found,
        check_hosts,
    }
}

/// Tells `limits.max_connections` of each connection to an endpoint as it
/// opens and closes (Pingora calls it from the connection itself).
#[derive(Debug)]
struct Counted {
    connections: Arc<Connections>,
    addr: SocketAddr,
}

impl Tracing for Counted {
    fn on_connected(&self) {
        self.connections.opened(self.addr);
    }

    fn on_disconnected(&self) {
        self.connections.closed(self.addr);
    }

    fn boxed_clone(&self) -> Box<dyn Tracing> {
        Box::new(Counted {
            connections: self.connections.clone(),
            addr: self.addr,
        })
    }
}

fn addr_of(members: &Members, i: usize) -> String {
    members
        .set
        .member(i)
        .map_or(String::new(), |m| m.addr.to_string())
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
