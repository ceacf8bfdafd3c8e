//! `[listeners.NAME]`: binds, limits and server TLS.

use super::*;

/// BoringSSL sends at most 16.
const MAX_SESSION_TICKETS: u8 = 16;

impl Validator {
    pub(super) fn listeners(
        &mut self,
        raw: &[(Spanned<String>, RawListener)],
        admin: &Admin,
        cert_names: &[&str],
    ) -> Vec<Listener> {
        let mut out: Vec<Listener> = Vec::new();
        for (name, l) in raw {
            let what = format!("listeners.{}.bind", name.get_ref());
            let Some(bind) = self.socket_addr(&l.bind, &what) else {
                continue;
            };
            let direction = match l.direction.as_ref() {
                None => Direction::Ingress,
                Some(d) => match d.get_ref().as_str() {
                    "ingress" => Direction::Ingress,
                    "egress" => Direction::Egress,
                    "mesh" => Direction::Mesh,
                    other => {
                        self.error(
                            d.span(),
                            format!("unknown direction \"{other}\""),
                            "use \"ingress\" (north-south in), \"egress\" (north-south out) or \"mesh\" (east-west)",
                        );
                        Direction::Ingress
                    }
                },
            };
            if binds_conflict(bind, admin.listen) {
                self.error(
                    l.bind.span(),
                    format!(
                        "listener `{}` binds {bind}, which overlaps admin.listen = {}",
                        name.get_ref(),
                        admin.listen
                    ),
                    "give the listener or the admin endpoint another port",
                );
            }
            if let Some(other) = out.iter().find(|o| binds_conflict(o.bind, bind)) {
                self.error(
                    l.bind.span(),
                    format!(
                        "listener `{}` binds {bind}, which overlaps listener `{}` ({})",
                        name.get_ref(),
                        other.name,
                        other.bind
                    ),
                    "give each listener its own port (or distinct specific IPs on the same port)",
                );
                continue;
            }
            let trusted_proxies = l
                .trusted_proxies
                .iter()
                .flatten()
                .filter_map(|c| self.cidr(c))
                .collect();
            let tls = l
                .tls
                .as_ref()
                .and_then(|t| self.listener_tls(name.get_ref(), t, cert_names));
            let limits = l
                .limits
                .as_ref()
                .map(|lim| self.listener_limits(name.get_ref(), lim.get_ref()))
                .unwrap_or_default();
            out.push(Listener {
                name: name.get_ref().clone(),
                bind,
                direction,
                tls,
                limits,
                trusted_proxies,
            });
        }
        out
    }

    pub(super) fn listener_limits(
        &mut self,
        listener: &str,
        r: &RawListenerLimits,
    ) -> ListenerLimits {
        let d = ListenerLimits::default();
        let mut count = |v: &Option<Spanned<i64>>, key: &str, max: i64, default: usize| match v {
            None => default,
            Some(n) if (1..=max).contains(n.get_ref()) => *n.get_ref() as usize,
            Some(n) => {
                self.error(
                    n.span(),
                    format!(
                        "listeners.{listener}.limits.{key} = {} is out of range",
                        n.get_ref()
                    ),
                    format!("use 1..={max}"),
                );
                default
            }
        };
        let max_connections = r.max_connections.as_ref().map(|_| {
            count(
                &r.max_connections,
                "max_connections",
                10_000_000,
                usize::MAX,
            )
        });
        // Pingora itself refuses heads over 1 MiB and more than 256 fields.
        let max_request_header_bytes = count(
            &r.max_request_header_bytes,
            "max_request_header_bytes",
            1024 * 1024,
            d.max_request_header_bytes,
        );
        let max_request_headers = count(
            &r.max_request_headers,
            "max_request_headers",
            256,
            d.max_request_headers,
        );
        let max_uri_bytes = count(
            &r.max_uri_bytes,
            "max_uri_bytes",
            1024 * 1024,
            d.max_uri_bytes,
        );
        let max_requests_per_connection = count(
            &r.max_requests_per_connection,
            "max_requests_per_connection",
            10_000_000,
            d.max_requests_per_connection,
        );
        let idle_timeout = self.duration_or(
            r.idle_timeout.as_ref(),
            &format!("listeners.{listener}.limits.idle_timeout"),
            d.idle_timeout,
            false,
        );
        // "0s" turns the total deadline off.
        let header_read_timeout = Some(self.duration_or(
            r.header_read_timeout.as_ref(),
            &format!("listeners.{listener}.limits.header_read_timeout"),
            DEFAULT_HEADER_READ_TIMEOUT,
            true,
        ))
        .filter(|t| !t.is_zero());
        let body_read_timeout = self.duration_or(
            r.body_read_timeout.as_ref(),
            &format!("listeners.{listener}.limits.body_read_timeout"),
            d.body_read_timeout,
            false,
        );
        let handshake_timeout = self.duration_or(
            r.handshake_timeout.as_ref(),
            &format!("listeners.{listener}.limits.handshake_timeout"),
            d.handshake_timeout,
            false,
        );
        ListenerLimits {
            max_connections,
            max_request_header_bytes,
            max_request_headers,
            max_uri_bytes,
            idle_timeout,
            header_read_timeout,
            handshake_timeout,
            max_requests_per_connection,
            body_read_timeout,
        }
    }

    pub(super) fn listener_tls(
        &mut self,
        listener: &str,
        t: &Spanned<RawListenerTls>,
        cert_names: &[&str],
    ) -> Option<ListenerTls> {
        let before = self.diags.len();
        let r = t.get_ref();
        let mut certs = Vec::new();
        if r.certs.get_ref().is_empty() {
            self.error(
                r.certs.span(),
                format!("listener `{listener}` has tls but no certs"),
                "name at least one [certs] entry: tls = { certs = [\"edge\"] }",
            );
        }
        for c in r.certs.get_ref() {
            if cert_names.contains(&c.get_ref().as_str()) {
                certs.push(c.get_ref().clone());
            } else {
                let fix = match suggest(c.get_ref(), cert_names) {
                    Some(s) => format!(
                        "did you mean `{s}`? Otherwise define [certs.{}]",
                        c.get_ref()
                    ),
                    None => format!("define [certs.{}] with cert and key paths", c.get_ref()),
                };
                self.error(c.span(), format!("unknown cert `{}`", c.get_ref()), fix);
            }
        }
        let min_version = match r.min_version.as_ref().map(|v| v.get_ref().as_str()) {
            None | Some("1.2") => TlsVersion::V1_2,
            Some("1.3") => TlsVersion::V1_3,
            Some(other) => {
                if let Some(v) = &r.min_version {
                    self.error(
                        v.span(),
                        format!("min_version = \"{other}\" is not offered"),
                        "use \"1.2\" (default) or \"1.3\"; older versions are insecure",
                    );
                }
                TlsVersion::V1_2
            }
        };
        let alpn = match &r.alpn {
            None => Alpn::H2H1,
            Some(list) => {
                let names: Vec<&str> = list
                    .get_ref()
                    .iter()
                    .map(|a| a.get_ref().as_str())
                    .collect();
                match names.as_slice() {
                    ["h2", "http/1.1"] => Alpn::H2H1,
                    ["http/1.1"] => Alpn::H1,
                    ["h2"] => Alpn::H2,
                    _ => {
                        self.error(
                            list.span(),
                            format!("alpn = {names:?} is not supported"),
                            "use [\"h2\", \"http/1.1\"] (default), [\"http/1.1\"] or [\"h2\"]",
                        );
                        Alpn::H2H1
                    }
                }
            }
        };
        let client_ca = r.client_ca.as_ref().and_then(|p| self.ca_bundle(p));
        let client_auth = match (r.client_auth.as_ref(), &r.client_ca) {
            (None, _) => ClientAuth::Require,
            (Some(a), None) => {
                self.error(
                    a.span(),
                    "client_auth needs client_ca (the CAs that sign client certificates)",
                    "add client_ca = \"/etc/meshgate/tls/clients-ca.pem\", or remove client_auth",
                );
                ClientAuth::Require
            }
            (Some(a), Some(_)) => match a.get_ref().as_str() {
                "require" => ClientAuth::Require,
                "optional" => ClientAuth::Optional,
                other => {
                    self.error(
                        a.span(),
                        format!("unknown client_auth \"{other}\""),
                        "use \"require\" (default) or \"optional\"",
                    );
                    ClientAuth::Require
                }
            },
        };
        if r.forward_identity == Some(true) && r.client_ca.is_none() {
            self.error(
                t.span(),
                "forward_identity needs client certificates: there is no identity without client_ca",
                "add client_ca, or remove forward_identity",
            );
        }
        let session_tickets = match &r.session_tickets {
            None => DEFAULT_SESSION_TICKETS,
            Some(n) if r.client_ca.is_some() && *n.get_ref() != 0 => {
                self.error(
                    n.span(),
                    "session_tickets with client_ca: listeners checking client certificates send no tickets",
                    "remove session_tickets, or set it to 0 (every connection's certificate is checked in full)",
                );
                DEFAULT_SESSION_TICKETS
            }
            Some(n) => match u8::try_from(*n.get_ref()) {
                Ok(v) if v <= MAX_SESSION_TICKETS => v,
                _ => {
                    self.error(
                        n.span(),
                        format!("session_tickets = {} is out of range", n.get_ref()),
                        format!(
                            "use 0..={MAX_SESSION_TICKETS} (default {DEFAULT_SESSION_TICKETS}; 0 turns TLS 1.3 resumption off)"
                        ),
                    );
                    DEFAULT_SESSION_TICKETS
                }
            },
        };
        if self.diags.len() > before {
            return None;
        }
        Some(ListenerTls {
            certs,
            min_version,
            alpn,
            client_ca,
            client_auth,
            forward_identity: r.forward_identity.unwrap_or(false),
            session_tickets,
        })
    }
}

/// Two binds conflict when they share a port and either is the wildcard address
/// of the same family, or both are the same address.
pub(super) fn binds_conflict(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}
