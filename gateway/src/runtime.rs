//! The compiled runtime: everything a request needs, built once from a
//! validated config and swapped whole on reload. A request loads one snapshot
//! at its start and uses it to its end.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::config::model::{Action, Config, Direction, LimitScope, Route};
use crate::ratelimit::global::RedisBackend;
use crate::ratelimit::Policy;
use crate::router::{RequestParts, RouteTable};
use crate::tls::store::CertStore;
use crate::upstream::UpstreamPool;

pub struct Runtime {
    pub config: Arc<Config>,
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
    /// Where `[egress]` destinations are (pins, lookups, deny_networks).
    pub egress_resolver: Option<crate::egress::resolve::Resolver>,
}

pub struct ListenerRuntime {
    pub name: String,
    pub bind: SocketAddr,
    pub direction: Direction,
    pub table: RouteTable,
}

/// A route plus what its action resolved to.
pub struct RouteRuntime {
    /// For `split`: (upstream index, cumulative weight); a single upstream is one entry.
    targets: Vec<(usize, u32)>,
    /// The route's rate-limit policies, in order.
    pub limits: Vec<Arc<Policy>>,
    /// Indexes into `config.policies` (authorization), in order.
    pub authz: Vec<usize>,
}

impl Runtime {
    pub fn build(config: Config, generation: u64) -> Self {
        Self::build_after(config, generation, None)
    }

    /// Build, keeping the limiter state of every policy whose settings did not
    /// change, so a reload does not hand out a fresh budget.
    pub fn build_after(config: Config, generation: u64, previous: Option<&Runtime>) -> Self {
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
        let upstreams: Vec<UpstreamPool> =
            config.upstreams.iter().map(UpstreamPool::build).collect();
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
            })
            .collect();
        let certs = CertStore::build(&config);
        let egress_resolver = config
            .egress
            .as_ref()
            .map(crate::egress::resolve::Resolver::new);
        Runtime {
            certs,
            egress_resolver,
            config: Arc::new(config),
            generation,
            listeners,
            routes,
            upstreams,
            policies,
            redis,
        }
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

    pub fn route(&self, index: usize) -> &Route {
        &self.config.routes[index]
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
