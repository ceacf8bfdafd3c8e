//! `dns` and `srv` discovery: the names of an upstream's `endpoints`
//! looked up (with hickory-resolver, at `[resolver]`'s nameservers or the
//! system's) into endpoints, each answer with the time it may be kept.
//! The lookups run in a background service; the pool swaps its endpoint
//! set when the answers change, and keeps the last good endpoints of a
//! name that fails or comes back empty.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use hickory_resolver::config::{
    LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::TokioResolver;

use super::upstream::Found;
use crate::config::model::{Discovery, Resolver};

/// Lookups per refresh at most: SRV targets beyond it are not followed.
const MAX_SRV_TARGETS: usize = 64;

pub struct Discoverer {
    pub settings: Resolver,
    resolver: TokioResolver,
}

impl Discoverer {
    pub fn new(settings: &Resolver) -> Result<Self, String> {
        let mut opts = ResolverOpts::default();
        opts.timeout = settings.timeout;
        opts.attempts = 2;
        opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        // Answers are refreshed at their TTL: the cache must not outlive it.
        opts.positive_max_ttl = Some(settings.max_ttl);
        opts.negative_max_ttl = Some(settings.min_ttl);
        let builder = if settings.nameservers.is_empty() {
            TokioResolver::builder_tokio()
                .map_err(|e| format!("reading the system's resolver configuration: {e}"))?
        } else {
            let mut config = ResolverConfig::new();
            for ns in &settings.nameservers {
                config.add_name_server(NameServerConfig::new(*ns, Protocol::Udp));
                config.add_name_server(NameServerConfig::new(*ns, Protocol::Tcp));
            }
            opts.use_hosts_file = ResolveHosts::Never;
            TokioResolver::builder_with_config(config, TokioConnectionProvider::default())
        };
        Ok(Discoverer {
            settings: settings.clone(),
            resolver: builder.with_options(opts).build(),
        })
    }

    /// Look up every entry (`HOST:PORT`, or an SRV name): one answer per
    /// entry, and how long the answers may be kept (their shortest TTL,
    /// within `[min_ttl, max_ttl]`).
    pub async fn look_up(
        &self,
        discovery: Discovery,
        entries: &[(String, u32)],
    ) -> (Vec<Result<Vec<Found>, String>>, Duration) {
        let mut ttl = self.settings.max_ttl;
        let mut answers = Vec::with_capacity(entries.len());
        for (entry, (name, weight)) in entries.iter().enumerate() {
            let answer = match discovery {
                Discovery::Srv => self.srv(name, entry).await,
                _ => self.host(name, *weight, entry).await,
            };
            answers.push(answer.map(|(found, valid)| {
                ttl = ttl.min(valid);
                found
            }));
        }
        (
            answers,
            ttl.clamp(self.settings.min_ttl, self.settings.max_ttl),
        )
    }

    /// Every address of `HOST:PORT`.
    async fn host(
        &self,
        addr: &str,
        weight: u32,
        entry: usize,
    ) -> Result<(Vec<Found>, Duration), String> {
        if let Ok(a) = addr.parse::<SocketAddr>() {
            let found = Found {
                addr: a,
                weight,
                name: addr.to_string(),
                entry,
            };
            return Ok((vec![found], self.settings.max_ttl));
        }
        let (host, port) = addr
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
            .ok_or_else(|| format!("`{addr}` is not HOST:PORT"))?;
        let (ips, valid) = self.ips(host).await?;
        let found = ips
            .into_iter()
            .map(|ip| Found {
                addr: SocketAddr::new(ip, port),
                weight,
                name: addr.to_string(),
                entry,
            })
            .collect();
        Ok((found, valid))
    }

    async fn ips(&self, host: &str) -> Result<(Vec<IpAddr>, Duration), String> {
        let lookup = self
            .resolver
            .lookup_ip(host)
            .await
            .map_err(|e| format!("`{host}`: {e}"))?;
        let valid = lookup
            .valid_until()
            .saturating_duration_since(Instant::now());
        let mut ips: Vec<IpAddr> = Vec::new();
        for ip in lookup.iter() {
            if !ips.contains(&ip) {
                ips.push(ip);
            }
        }
        Ok((ips, valid))
    }

    /// The targets of the SRV records of the lowest priority, each at its
    /// port and weight (a weight of 0 counts as 1).
    async fn srv(&self, name: &str, entry: usize) -> Result<(Vec<Found>, Duration), String> {
        let lookup = self
            .resolver
            .srv_lookup(name)
            .await
            .map_err(|e| format!("`{name}` (SRV): {e}"))?;
        let mut valid = lookup
            .as_lookup()
            .valid_until()
            .saturating_duration_since(Instant::now());
        let records: Vec<_> = lookup.iter().cloned().collect();
        let Some(best) = records.iter().map(|r| r.priority()).min() else {
            return Err(format!("`{name}` has no SRV records"));
        };
        let mut found = Vec::new();
        let mut failures = Vec::new();
        for r in records
            .iter()
            .filter(|r| r.priority() == best)
            .take(MAX_SRV_TARGETS)
        {
            let target = r.target().to_utf8();
            let target = target.trim_end_matches('.');
            match self.ips(target).await {
                Ok((ips, v)) => {
                    valid = valid.min(v);
                    found.extend(ips.into_iter().map(|ip| Found {
                        addr: SocketAddr::new(ip, r.port()),
                        weight: u32::from(r.weight()).max(1),
                        name: format!("{target}:{}", r.port()),
                        entry,
                    }));
                }
                Err(why) => failures.push(why),
            }
        }
        if found.is_empty() {
            return Err(format!(
                "`{name}` (SRV): no target has an address ({})",
                failures.join("; ")
            ));
        }
        if !failures.is_empty() {
            log::warn!("SRV `{name}`: targets left out: {}", failures.join("; "));
        }
        Ok((found, valid))
    }
}
