//! Where an allowed egress host is: a pin from `[egress] resolve`, or the
//! system resolver (getaddrinfo), with answers in `deny_networks` dropped so
//! an allowed name cannot be pointed back inside. Names with a dot are
//! looked up as absolute names (`api.example.com.`): the resolver's search
//! domains are never tried, so the address always belongs to the name that
//! was checked.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::model::{Egress, EgressPin};

/// How long a looked-up answer is reused. getaddrinfo gives no TTLs; this
/// keeps lookups off the request path without holding a stale answer long.
const CACHE_TTL: Duration = Duration::from_secs(30);
/// Answers kept at most; the cache starts over when full.
const CACHE_MAX: usize = 4096;
/// How long a failed lookup is remembered, so a client asking for names
/// that do not exist cannot keep the lookup threads busy.
const NEGATIVE_TTL: Duration = Duration::from_secs(5);
/// Lookups in progress at once (each holds a blocking thread).
const MAX_LOOKUPS: usize = 16;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResolveError {
    #[error("{host} has no address: {why}")]
    NotFound { host: String, why: String },
    #[error("{host} resolves only to {addr}, which is in [egress] deny_networks")]
    Denied { host: String, addr: IpAddr },
    #[error("looking up {host} took longer than {0:?}", .timeout)]
    Timeout { host: String, timeout: Duration },
}

pub struct Resolver {
    pins: HashMap<String, Vec<EgressPin>>,
    deny: Vec<ipnet::IpNet>,
    timeout: Duration,
    /// An empty list: the name was not found (kept for [`NEGATIVE_TTL`]).
    cache: Mutex<HashMap<String, (Instant, Vec<IpAddr>)>>,
    lookups: tokio::sync::Semaphore,
}

impl Resolver {
    pub fn new(egress: &Egress) -> Self {
        Resolver {
            pins: egress.resolve.iter().cloned().collect(),
            deny: egress.deny_networks.clone(),
            timeout: egress.connect_timeout,
            cache: Mutex::new(HashMap::new()),
            lookups: tokio::sync::Semaphore::new(MAX_LOOKUPS),
        }
    }

    /// The addresses to connect to for `host` (normalized) on `port`, in
    /// the resolver's order. A pin's own port replaces `port`.
    pub async fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, ResolveError> {
        if let Some(pins) = self.pins.get(host) {
            // The operator wrote these: no deny_networks check.
            return Ok(pins
                .iter()
                .map(|p| SocketAddr::new(p.ip, p.port.unwrap_or(port)))
                .collect());
        }
        let ips = match self.cached(host) {
            Some(ips) if ips.is_empty() => {
                return Err(ResolveError::NotFound {
                    host: host.to_string(),
                    why: "not found (cached)".into(),
                })
            }
            Some(ips) => ips,
            None => match self.lookup(host).await {
                Ok(ips) => {
                    self.remember(host, &ips);
                    ips
                }
                Err(e) => {
                    if matches!(e, ResolveError::NotFound { .. }) {
                        self.remember(host, &[]);
                    }
                    return Err(e);
                }
            },
        };
        Ok(ips
            .into_iter()
            .map(|ip| SocketAddr::new(ip, port))
            .collect())
    }

    fn cached(&self, host: &str) -> Option<Vec<IpAddr>> {
        let cache = self.cache.lock().ok()?;
        let (at, ips) = cache.get(host)?;
        let ttl = if ips.is_empty() {
            NEGATIVE_TTL
        } else {
            CACHE_TTL
        };
        (at.elapsed() < ttl).then(|| ips.clone())
    }

    fn remember(&self, host: &str, ips: &[IpAddr]) {
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= CACHE_MAX {
                cache.clear();
            }
            cache.insert(host.to_string(), (Instant::now(), ips.to_vec()));
        }
    }

    async fn lookup(&self, host: &str) -> Result<Vec<IpAddr>, ResolveError> {
        let timed_out = || ResolveError::Timeout {
            host: host.to_string(),
            timeout: self.timeout,
        };
        let deadline = tokio::time::Instant::now() + self.timeout;
        let _slot = tokio::time::timeout_at(deadline, self.lookups.acquire())
            .await
            .map_err(|_| timed_out())?;
        // A single label (`localhost`) stays relative so /etc/hosts serves it.
        let name = if host.contains('.') {
            format!("{host}.")
        } else {
            host.to_string()
        };
        let found = tokio::time::timeout_at(deadline, tokio::net::lookup_host((name.as_str(), 0)))
            .await
            .map_err(|_| timed_out())?
            .map_err(|e| ResolveError::NotFound {
                host: host.to_string(),
                why: e.to_string(),
            })?;
        let mut ips: Vec<IpAddr> = Vec::new();
        let mut denied = None;
        for ip in found.map(|a| a.ip().to_canonical()) {
            if self.deny.iter().any(|n| n.contains(&ip)) {
                denied.get_or_insert(ip);
            } else if !ips.contains(&ip) {
                ips.push(ip);
            }
        }
        match (ips.is_empty(), denied) {
            (false, _) => Ok(ips),
            (true, Some(addr)) => Err(ResolveError::Denied {
                host: host.to_string(),
                addr,
            }),
            (true, None) => Err(ResolveError::NotFound {
                host: host.to_string(),
                why: "no addresses".into(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::model::DEFAULT_EGRESS_DENY_NETWORKS;

    fn egress() -> Egress {
        Egress {
            resolve: vec![(
                "api.example.test".into(),
                vec![
                    EgressPin {
                        ip: "127.0.0.1".parse().unwrap(),
                        port: None,
                    },
                    EgressPin {
                        ip: "::1".parse().unwrap(),
                        port: Some(9443),
                    },
                ],
            )],
            ..Egress::default()
        }
    }

    #[tokio::test]
    async fn pins_win_and_may_carry_a_port() {
        let r = Resolver::new(&egress());
        assert_eq!(
            r.resolve("api.example.test", 443).await.unwrap(),
            vec![
                "127.0.0.1:443".parse::<SocketAddr>().unwrap(),
                "[::1]:9443".parse().unwrap()
            ]
        );
    }

    #[tokio::test]
    async fn looked_up_addresses_in_deny_networks_are_refused() {
        // `localhost` comes from /etc/hosts, so this needs no DNS.
        let r = Resolver::new(&egress());
        assert!(!DEFAULT_EGRESS_DENY_NETWORKS.is_empty());
        match r.resolve("localhost", 443).await {
            Err(ResolveError::Denied { addr, .. }) => assert!(addr.is_loopback()),
            other => panic!("expected a refusal, got {other:?}"),
        }
        let open = Resolver::new(&Egress {
            deny_networks: Vec::new(),
            ..Egress::default()
        });
        let addrs = open.resolve("localhost", 8443).await.unwrap();
        assert!(addrs
            .iter()
            .all(|a| a.ip().is_loopback() && a.port() == 8443));
    }
}
