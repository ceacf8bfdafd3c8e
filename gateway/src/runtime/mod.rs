//! The compiled runtime: everything a request needs, built once from a
//! validated config and swapped whole on reload. A request loads one snapshot
//! at its start and uses it to its end.

pub mod certs;
pub mod discovery;
pub mod health;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use prometheus::IntGauge;

use crate::config::model::{Action, Config, Direction, LimitScope, Route};
use crate::config::{Loaded, Material};
use crate::ratelimit::global::RedisBackend;
use crate::ratelimit::Policy;
use crate::router::{RequestParts, RouteTable};
use crate::runtime::certs::CertStore;
use crate::runtime::upstream::UpstreamPool;
use crate::telemetry::metrics::{RouteSeries, UpstreamSeries};

pub struct Runtime {
    pub config: Arc<Config>,
    /// What the config's files held when it was loaded (CA bundles; the
    /// served pairs are in `certs`, which follows their files).
    pub material: Arc<Material>,
    /// 1 for the config loaded at start, +1 per successful reload.
    pub generation: u64,
    /// In config order.
    pub listeners: Vec<ListenerRuntime>,
    /// Parallel to `config.routes`.
    pub routes: Vec<RouteRuntime>,
    pub upstreams: Vec<UpstreamPool>,
    /// One per `[rate_limits]` entry.
    pub policies: Vec<Arc<Policy>>,
    /// The store of global rate limits.
    pub redis: Option<Arc<RedisBackend>>,
    /// `[certs]`, as served now (files are watched for changes).
    pub certs: CertStore,
    /// The series of the shared `(egress)` upstream label.
    pub egress_series: UpstreamSeries,
    /// Where `[egress]` destinations are (pins, lookups, deny_networks).
    pub egress_resolver: Option<crate::egress::resolve::Resolver>,
    /// `dns` and `srv` discovery (when an upstream uses them).
    pub discoverer: Option<Arc<discovery::Discoverer>>,
}

pub struct ListenerRuntime {
    pub name: String,
    pub bind: SocketAddr,
    pub direction: Direction,
    pub table: RouteTable,
    /// `meshgate_requests_in_flight` for this listener, looked up once.
    pub in_flight: OnceLock<IntGauge>,
    /// `meshgate_connections_active` for this listener, looked up once.
    pub connections: OnceLock<IntGauge>,
}

/// A route plus what its action resolved to.
pub struct RouteRuntime {
    /// For `split`: (upstream index, cumulative weight); a single upstream is one entry.
    targets: Vec<(usize, u32)>,
    /// The route's rate-limit policies, in order.
    pub limits: Vec<Arc<Policy>>,
    /// Indexes into `config.policies` (authorization), in order.
    pub authz: Vec<usize>,
    /// The route's request series per listener index, made on first use.
    series: Box<[OnceLock<Box<RouteSeries>>]>,
}

impl Runtime {
    pub fn build(loaded: Loaded, generation: u64) -> Self {
        Self::build_after(loaded, generation, None)
    }

    /// Build, keeping the limiter state of every policy whose settings did not
    /// change, so a reload does not hand out a fresh budget.
    pub fn build_after(loaded: Loaded, generation: u64, previous: Option<&Runtime>) -> Self {
        let Loaded {
            config, material, ..
        } = loaded;
        // What a global policy cached came from the old Redis.
        let same_redis = previous.is_some_and(|p| p.config.redis == config.redis);
        let policies: Vec<Arc<Policy>> = config
            .rate_limits
            .iter()
            .filter_map(|model| {
                previous
                    .filter(|_| same_redis || model.scope == LimitScope::Local)
                    .and_then(|p| p.policies.iter().find(|old| old.model == *model))
                    .cloned()
                    .or_else(|| Policy::build(model))
            })
            .collect();
        // An unchanged [redis] keeps its connection.
        let redis = config.redis.as_ref().and_then(|model| {
            if let Some(old) = previous
                .and_then(|p| p.redis.as_ref())
                .filter(|old| old.model == *model)
            {
                return Some(old.clone());
            }
            match RedisBackend::new(model) {
                Ok(b) => Some(Arc::new(b)),
                Err(e) => {
                    log::error!("[redis] {}: {e}", model.redacted_url());
                    None
                }
            }
        });
        let policy_index = |name: &str| policies.iter().find(|p| p.model.name == name).cloned();
        let upstreams: Vec<UpstreamPool> = config
            .upstreams
            .iter()
            .map(|u| {
                let old = previous.and_then(|p| p.upstreams.iter().find(|o| o.name == u.name));
                UpstreamPool::build(u, &material, old)
            })
            .collect();
        for gone in previous
            .iter()
            .flat_map(|p| &p.upstreams)
            .filter(|o| !upstreams.iter().any(|u| u.name == o.name))
        {
            crate::telemetry::metrics::UpstreamSeries::forget(&gone.name);
        }
        let upstream_index = |name: &str| upstreams.iter().position(|u| u.name == name);
        let routes = config
            .routes
            .iter()
            .map(|r| {
                let mut targets = Vec::new();
                if let Action::Forward(f) = &r.action {
                    let mut total = 0u32;
                    for (name, weight) in &f.targets {
                        // Validation guarantees every name resolves.
                        if let Some(u) = upstream_index(name) {
                            total = total.saturating_add(*weight);
                            targets.push((u, total));
                        }
                    }
                }
                let limits = r
                    .rate_limits
                    .iter()
                    .filter_map(|n| policy_index(n))
                    .collect();
                let authz = r
                    .policies
                    .iter()
                    .filter_map(|n| config.policies.iter().position(|p| p.name == *n))
                    .collect();
                RouteRuntime {
                    targets,
                    limits,
                    authz,
                    series: config.listeners.iter().map(|_| OnceLock::new()).collect(),
                }
            })
            .collect();
        let listeners = config
            .listeners
            .iter()
            .map(|l| ListenerRuntime {
                name: l.name.clone(),
                bind: l.bind,
                direction: l.direction,
                table: RouteTable::build(&config.routes, &l.name),
                in_flight: OnceLock::new(),
                connections: OnceLock::new(),
            })
            .collect();
        let certs = CertStore::build(&config, &material);
        let egress_resolver = config
            .egress
            .as_ref()
            .map(crate::egress::resolve::Resolver::new);
        let discovering = config
            .upstreams
            .iter()
            .any(|u| u.discovery != crate::config::model::Discovery::Static);
        // The same [resolver] keeps its resolver (and what it has cached).
        let discoverer = previous
            .and_then(|p| p.discoverer.as_ref())
            .filter(|d| d.settings == config.resolver)
            .cloned()
            .or_else(|| match discovery::Discoverer::new(&config.resolver) {
                Ok(d) => Some(Arc::new(d)),
                Err(e) => {
                    log::error!(
                        "[resolver]: {e}; dns and srv upstreams keep the endpoints they have"
                    );
                    None
                }
            })
            .filter(|_| discovering);
        Runtime {
            discoverer,
            egress_series: UpstreamSeries::new(crate::telemetry::names::EGRESS_UPSTREAM),
            certs,
            egress_resolver,
            config: Arc::new(config),
            material: Arc::new(material),
            generation,
            listeners,
            routes,
            upstreams,
            policies,
            redis,
        }
    }

    /// Whether every `dns` or `srv` upstream's first lookup has ended
    /// (answered or failed): before, its requests would find no endpoint.
    /// Without a resolver (its settings failed, as logged) none is coming.
    pub fn discovery_answered(&self) -> Result<(), String> {
        if self.discoverer.is_none() {
            return Ok(());
        }
        match self.upstreams.iter().find(|u| {
            u.discovery != crate::config::model::Discovery::Static && u.last_refresh().is_none()
        }) {
            Some(u) => Err(format!(
                "starting: upstream {} has not had its first discovery answer",
                u.name
            )),
            None => Ok(()),
        }
    }

    /// Whether every listener accepts a connection now (a wildcard bind
    /// is tried on loopback); the first that does not, and why.
    pub async fn probe_listeners(&self) -> Result<(), String> {
        const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(500);
        for l in &self.listeners {
            let mut addr = l.bind;
            if addr.ip().is_unspecified() {
                addr.set_ip(match addr {
                    SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                    SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
                });
            }
            match tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(addr)).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    return Err(format!(
                        "listener {} ({}) not accepting: {e}",
                        l.name, l.bind
                    ))
                }
                Err(_) => {
                    return Err(format!(
                        "listener {} ({}) did not accept within {PROBE_TIMEOUT:?}",
                        l.name, l.bind
                    ))
                }
            }
        }
        Ok(())
    }

    /// The listener a connection arrived on, by its local address: an exact
    /// bind first, then a wildcard bind on the same port.
    pub fn listener_for(&self, local: Option<SocketAddr>) -> Option<usize> {
        let local = local?;
        self.listeners
            .iter()
            .position(|l| l.bind == local)
            .or_else(|| {
                self.listeners
                    .iter()
                    .position(|l| l.bind.port() == local.port() && l.bind.ip().is_unspecified())
            })
    }

    /// The listener named `name`: a connection knows its listener by name,
    /// which a reload keeps while the listeners around it come and go.
    pub fn listener_named(&self, name: &str) -> Option<usize> {
        self.listeners.iter().position(|l| l.name == name)
    }

    /// `[egress]`, when `listener` is an `egress` listener and it is set.
    pub fn egress_for(&self, listener: usize) -> Option<&crate::config::model::Egress> {
        let l = self.listeners.get(listener)?;
        (l.direction == Direction::Egress)
            .then_some(())
            .and(self.config.egress.as_ref())
    }

    /// The listener a client connection arrived on, from its socket (for
    /// the connection wrappers, which see the stream before any request).
    pub fn listener_of(&self, stream: &pingora::protocols::Stream) -> Option<usize> {
        let local = stream
            .get_socket_digest()
            .and_then(|d| d.local_addr().and_then(|a| a.as_inet()).copied());
        self.listener_for(local)
    }

    pub fn find_route(&self, listener: usize, req: &RequestParts<'_>) -> Option<usize> {
        self.listeners.get(listener)?.table.find(req)
    }

    /// The request series of `route` on `listener`.
    pub fn route_series(&self, listener: usize, route: usize) -> Option<&RouteSeries> {
        let slot = self.routes.get(route)?.series.get(listener)?;
        let series = slot.get_or_init(|| {
            Box::new(RouteSeries::new(
                &self.listeners[listener].name,
                &self.config.routes[route].name,
            ))
        });
        Some(series)
    }

    /// The in-flight gauge of `listener`; an unknown listener's is looked
    /// up each time (empty label).
    pub fn in_flight(&self, listener: Option<usize>) -> IntGauge {
        let m = crate::telemetry::metrics::metrics();
        match listener.and_then(|i| self.listeners.get(i)) {
            Some(l) => l
                .in_flight
                .get_or_init(|| m.in_flight.with_label_values(&[&l.name]))
                .clone(),
            None => m.in_flight.with_label_values(&[""]),
        }
    }

    /// The open-connections gauge of `listener`, as [`Self::in_flight`].
    pub fn connections_gauge(&self, listener: Option<usize>) -> IntGauge {
        let m = crate::telemetry::metrics::metrics();
        match listener.and_then(|i| self.listeners.get(i)) {
            Some(l) => l
                .connections
                .get_or_init(|| {
                    m.connections_active
                        .with_label_values(&[&l.name, l.direction.as_str()])
                })
                .clone(),
            None => m.connections_active.with_label_values(&["", ""]),
        }
    }

    pub fn route(&self, index: usize) -> &Route {
        &self.config.routes[index]
    }

    /// Every upstream a forwarding route may pick.
    pub fn route_upstreams(&self, route: usize) -> impl Iterator<Item = usize> + '_ {
        self.routes
            .get(route)
            .into_iter()
            .flat_map(|r| r.targets.iter().map(|(u, _)| *u))
    }

    /// The upstream for one request of a forwarding route (weighted draw for a split).
    pub fn pick_upstream(&self, route: usize) -> Option<usize> {
        let targets = &self.routes.get(route)?.targets;
        match targets.as_slice() {
            [] => None,
            [(u, _)] => Some(*u),
            many => {
                let total = many.last()?.1;
                let draw = fastrand::u32(0..total);
                many.iter().find(|(_, cum)| draw < *cum).map(|(u, _)| *u)
            }
        }
    }
}
