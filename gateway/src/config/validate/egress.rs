//! `[egress]`: the forward proxy's allow list and its listeners.

use super::*;

impl Validator {
    pub(super) fn egress(
        &mut self,
        section: Range<usize>,
        r: RawEgress,
        listeners: &[Listener],
    ) -> Option<Egress> {
        let before = self.diags.len();
        let egress_listeners: Vec<&Listener> = listeners
            .iter()
            .filter(|l| l.direction == Direction::Egress)
            .collect();
        if egress_listeners.is_empty() && !listeners.is_empty() {
            self.error(
                section.clone(),
                "[egress] is set, but no listener has direction = \"egress\"",
                "add a listener for applications on this machine, e.g. [listeners.outbound] with bind = \"127.0.0.1:15001\" and direction = \"egress\"",
            );
        }
        for l in egress_listeners.iter().filter(|l| l.tls.is_some()) {
            self.error(
                section.clone(),
                format!(
                    "listener `{}` is an egress listener with tls; the egress allowlist serves plain HTTP, CONNECT and bare TLS ClientHellos, which need a plain listener",
                    l.name
                ),
                format!("remove tls from listener `{}` (bind it to 127.0.0.1: applications on this machine talk to it, meshgate originates the TLS)", l.name),
            );
        }
        let default = Egress::default();
        let ports = match &r.allow.as_ref().and_then(|a| a.get_ref().ports.as_ref()) {
            None => DEFAULT_EGRESS_PORTS.to_vec(),
            Some(list) if list.get_ref().is_empty() => {
                self.error(
                    list.span(),
                    "egress.allow.ports is empty, so nothing could leave",
                    "list the ports, e.g. ports = [443], or remove the key (default [443])",
                );
                Vec::new()
            }
            Some(list) => list
                .get_ref()
                .iter()
                .filter_map(|p| self.port(p, "egress.allow.ports"))
                .collect(),
        };
        let mut allow = Vec::new();
        for h in r.allow.iter().flat_map(|a| a.get_ref().hosts.get_ref()) {
            let text = h.get_ref().trim();
            // `host:port` limits one entry to its own port.
            let (pattern, port) = match text.rsplit_once(':') {
                Some((host, p)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
                    (host, Some(p))
                }
                _ => (text, None),
            };
            let entry_ports = match port {
                None => ports.clone(),
                Some(p) => match p.parse::<u16>() {
                    Ok(p) if p != 0 => vec![p],
                    _ => {
                        self.error(
                            h.span(),
                            format!("\"{text}\" has port {p}, which is not 1-65535"),
                            "write host:port with a port from 1 to 65535, or the host alone for `ports`",
                        );
                        continue;
                    }
                },
            };
            match crate::types::host::HostPattern::parse(pattern) {
                Ok(pattern) => allow.push(EgressAllow {
                    pattern,
                    ports: entry_ports,
                }),
                Err(why) => self.error(
                    h.span(),
                    format!("egress.allow.hosts: \"{text}\" is not a host pattern: {why}"),
                    "write a host name (\"api.example.com\"), `*.` for one more label (\"*.example.com\") or `**.` for any depth, optionally with :port",
                ),
            }
        }
        let ca = r.ca.as_ref().and_then(|p| self.ca_bundle(p));
        let mut resolve = Vec::new();
        for (host, value) in r.resolve.iter().flatten() {
            let name = match crate::types::host::normalize_dns_host(host.get_ref()) {
                Ok(n) => n,
                Err(_) => {
                    self.error(
                        host.span(),
                        format!("egress.resolve: \"{}\" is not a host name", host.get_ref()),
                        "pin an exact host name (no wildcards, no IP address), e.g. \"api.example.com\" = \"203.0.113.7\"",
                    );
                    continue;
                }
            };
            let mut pins = Vec::new();
            for a in self.string_or_list(value, "resolve") {
                let text = a.get_ref().trim();
                if let Ok(ip) = text.parse::<std::net::IpAddr>() {
                    pins.push(EgressPin { ip, port: None });
                } else if let Ok(sa) = text.parse::<SocketAddr>().map_err(|_| ()).and_then(|sa| {
                    if sa.port() == 0 {
                        Err(())
                    } else {
                        Ok(sa)
                    }
                }) {
                    pins.push(EgressPin {
                        ip: sa.ip(),
                        port: Some(sa.port()),
                    });
                } else {
                    self.error(
                        a.span(),
                        format!("egress.resolve.\"{name}\": \"{text}\" is not an IP address"),
                        "write an address (\"203.0.113.7\", \"2001:db8::7\") or address:port (\"203.0.113.7:8443\", \"[2001:db8::7]:8443\")",
                    );
                }
            }
            if resolve.iter().any(|(n, _): &(String, _)| *n == name) {
                self.error(
                    host.span(),
                    format!("egress.resolve pins \"{name}\" twice"),
                    "keep one entry per host; give a list for several addresses",
                );
            }
            resolve.push((name, pins));
        }
        let deny_networks = match &r.deny_networks {
            None => default.deny_networks,
            Some(list) => list.iter().filter_map(|c| self.cidr(c)).collect(),
        };
        let passthrough_port = match &r.passthrough_port {
            None => DEFAULT_EGRESS_PASSTHROUGH_PORT,
            Some(p) => self
                .port(p, "egress.passthrough_port")
                .unwrap_or(DEFAULT_EGRESS_PASSTHROUGH_PORT),
        };
        let connect_timeout = self.duration_or(
            r.connect_timeout.as_ref(),
            "egress.connect_timeout",
            DEFAULT_EGRESS_CONNECT_TIMEOUT,
            false,
        );
        let timeout = self.duration_or(
            r.timeout.as_ref(),
            "egress.timeout",
            DEFAULT_EGRESS_TIMEOUT,
            false,
        );
        let tunnel_idle_timeout = self.duration_or(
            r.tunnel_idle_timeout.as_ref(),
            "egress.tunnel_idle_timeout",
            DEFAULT_EGRESS_TUNNEL_IDLE_TIMEOUT,
            false,
        );
        if self.diags.len() > before {
            return None;
        }
        Some(Egress {
            allow,
            ca,
            resolve,
            deny_networks,
            connect_timeout,
            timeout,
            tunnel_idle_timeout,
            passthrough_port,
        })
    }
}
