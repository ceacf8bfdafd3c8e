//! The egress allowlist: which outside destinations applications on this
//! machine may reach through an `egress` listener, and how.
//!
//! Three paths share one decision (`Egress::check`, host and port against
//! `[egress.allow]`):
//! - plain HTTP (`http_proxy`, or a `Host` header): meshgate originates TLS to
//!   the destination and verifies it (the proxy's `egress` phase);
//! - `CONNECT host:port`: a tunnel, where the client's TLS ClientHello must
//!   name the same host ([`crate::downstream::tunnel`]);
//! - a bare TLS ClientHello: passed through to the host its SNI names
//!   ([`crate::downstream::tunnel`]).
//!
//! Names are compared after [`normalize_host`]; addresses come from
//! [`resolve`], which pins names and refuses `deny_networks`.

mod client_hello;
pub mod resolve;

pub use client_hello::{bytes_needed, parse_client_hello, Hello, MAX_HELLO_BYTES};

use crate::config::model::Egress;
use crate::telemetry::metrics::{destination_label, metrics};
use crate::types::host::{normalize_dns_host, NotAName};

/// A destination host as the allowlist compares it: ASCII lower case, one
/// trailing dot removed, a plain DNS name (no IP literal, no user info, no
/// escapes). The same form is used for the SNI and the upstream's name check.
pub fn normalize_host(raw: &str) -> Result<String, Denial> {
    normalize_dns_host(raw).map_err(|e| match e {
        NotAName::IpLiteral => Denial::IpLiteral,
        NotAName::Malformed => Denial::Malformed,
    })
}

/// `host[:port]` as written in a request's authority, split; `None` when the
/// text is not of that shape (user info, a bad port, an empty host).
pub fn split_authority(authority: &str) -> Option<(&str, Option<u16>)> {
    if authority.contains('@') || authority.is_empty() {
        return None;
    }
    if authority.starts_with('[') {
        // IPv6 literal: kept whole so `normalize_host` can refuse it.
        let end = authority.find(']')?;
        let (host, rest) = authority.split_at(end + 1);
        return match rest.strip_prefix(':') {
            None if rest.is_empty() => Some((host, None)),
            Some(p) => Some((host, Some(parse_port(p)?))),
            None => None,
        };
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() => Some((host, Some(parse_port(port)?))),
        Some(_) => None,
        None => Some((authority, None)),
    }
}

fn parse_port(p: &str) -> Option<u16> {
    if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    p.parse::<u16>().ok().filter(|port| *port != 0)
}

/// How a connection asked to leave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Plain HTTP; meshgate originates TLS.
    Http,
    /// `CONNECT host:port`, then the client's own TLS.
    Connect,
    /// A bare TLS ClientHello, routed by its SNI.
    Sni,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Http => "http",
            Mode::Connect => "connect",
            Mode::Sni => "sni",
        }
    }
}

/// Why a destination was refused; the `reason` label and the audit line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    /// No allowlist entry names the host.
    Host,
    /// An entry names the host, but not on this port.
    Port,
    /// An IP address instead of a name.
    IpLiteral,
    /// Not a host name (bad characters, user info, bad port).
    Malformed,
    /// The name resolves only into `deny_networks`.
    Address,
    /// The tunnel's TLS ClientHello named no server.
    NoSni,
    /// The ClientHello named another host than `CONNECT` did.
    SniMismatch,
    /// The tunnel did not start with a TLS ClientHello.
    NotTls,
}

impl Denial {
    pub const ALL: [Denial; 8] = [
        Denial::Host,
        Denial::Port,
        Denial::IpLiteral,
        Denial::Malformed,
        Denial::Address,
        Denial::NoSni,
        Denial::SniMismatch,
        Denial::NotTls,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Denial::Host => "host_not_allowed",
            Denial::Port => "port_not_allowed",
            Denial::IpLiteral => "ip_literal",
            Denial::Malformed => "malformed",
            Denial::Address => "address_denied",
            Denial::NoSni => "no_sni",
            Denial::SniMismatch => "sni_mismatch",
            Denial::NotTls => "not_tls",
        }
    }

    pub fn explain(self) -> &'static str {
        match self {
            Denial::Host => "the host is not on the egress allowlist",
            Denial::Port => "the host is on the egress allowlist, but not for this port",
            Denial::IpLiteral => "egress destinations must be host names, not IP addresses",
            Denial::Malformed => "the destination is not a valid host[:port]",
            Denial::Address => "the host resolves only to addresses in [egress] deny_networks",
            Denial::NoSni => "the TLS ClientHello names no server (SNI)",
            Denial::SniMismatch => "the TLS ClientHello names another host than CONNECT did",
            Denial::NotTls => "the tunnel did not start with a TLS ClientHello",
        }
    }
}

impl Egress {
    /// `raw_host` (as the client named it) normalized, and its `host:port`,
    /// when the allowlist lets it be reached on `port`; else the destination
    /// as asked for (for the audit line) and why not.
    pub fn admit(&self, raw_host: &str, port: u16) -> Result<(String, String), (String, Denial)> {
        let host = normalize_host(raw_host)
            .map_err(|d| (destination(&raw_host.to_ascii_lowercase(), port), d))?;
        let dest = destination(&host, port);
        match self.check(&host, port) {
            Ok(()) => Ok((host, dest)),
            Err(d) => Err((dest, d)),
        }
    }

    /// Whether the allowlist lets `host` (normalized) be reached on `port`.
    pub fn check(&self, host: &str, port: u16) -> Result<(), Denial> {
        let mut named = false;
        for entry in self.allow.iter().filter(|e| e.pattern.matches(host)) {
            named = true;
            if entry.ports.contains(&port) {
                return Ok(());
            }
        }
        Err(if named { Denial::Port } else { Denial::Host })
    }
}

/// The port a plain-HTTP egress request goes to when its target names none.
pub const DEFAULT_PORT: u16 = 443;

/// An allowed destination of a plain-HTTP egress request, resolved.
pub struct Target {
    pub host: String,
    pub port: u16,
    pub addrs: Vec<std::net::SocketAddr>,
}

impl Target {
    /// The `Host` the destination is sent.
    pub fn host_header(&self) -> String {
        if self.port == DEFAULT_PORT {
            self.host.clone()
        } else {
            destination(&self.host, self.port)
        }
    }
}

/// `host:port` for logs, labels and error bodies.
pub fn destination(host: &str, port: u16) -> String {
    format!("{host}:{port}")
}

/// The audit line for a refused destination. Logged at warn: an application
/// on this machine tried to reach something it may not.
fn audit_denied(listener: &str, mode: Mode, client: &str, destination: &str, denial: Denial) {
    log::warn!(
        target: "meshgate::egress",
        "egress denied: listener={listener} mode={} client={client} destination={destination:?} reason={} ({})",
        mode.as_str(),
        denial.as_str(),
        denial.explain()
    );
}

/// Record one decision: a sample of `meshgate_egress_decisions_total`,
/// and the audit line when `denial` says it was refused.
pub fn record(listener: &str, mode: Mode, client: &str, destination: &str, denial: Option<Denial>) {
    if let Some(d) = denial {
        audit_denied(listener, mode, client, destination, d);
    }
    metrics()
        .egress_decisions
        .with_label_values(&[
            listener,
            mode.as_str(),
            &destination_label(destination, denial.is_some()),
            if denial.is_some() {
                "denied"
            } else {
                "allowed"
            },
            denial.map_or("", Denial::as_str),
        ])
        .inc();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::model::EgressAllow;
    use crate::types::host::HostPattern;

    fn pattern(s: &str) -> HostPattern {
        HostPattern::parse(s).unwrap()
    }

    #[test]
    fn exact_patterns_ignore_case_and_one_trailing_dot() {
        let p = pattern("API.Example.com.");
        assert_eq!(p, HostPattern::Exact("api.example.com".into()));
        assert!(p.matches("api.example.com"));
        assert!(!p.matches("api.example.com.evil.net"));
        assert!(!p.matches("xapi.example.com"));
    }

    #[test]
    fn one_label_wildcards_match_exactly_one_label() {
        let p = pattern("*.example.com");
        assert!(p.matches("a.example.com"));
        assert!(!p.matches("example.com"));
        assert!(!p.matches("a.b.example.com"));
        // No suffix matching without a dot boundary.
        assert!(!p.matches("evilexample.com"));
        assert!(!p.matches(".example.com"));
        assert_eq!(p.to_string(), "*.example.com");
    }

    #[test]
    fn any_depth_wildcards_match_one_or_more_labels() {
        let p = pattern("**.example.com");
        assert!(p.matches("a.example.com"));
        assert!(p.matches("a.b.example.com"));
        assert!(!p.matches("example.com"));
        assert!(!p.matches("evilexample.com"));
        assert!(!p.matches(".example.com"));
        assert!(!p.matches("a..example.com"));
        assert_eq!(p.to_string(), "**.example.com");
    }

    #[test]
    fn bad_patterns_are_refused_with_a_reason() {
        for bad in [
            "",
            "*",
            "**",
            "*.com",
            "a.*.com",
            "*example.com",
            "exa mple.com",
            "10.0.0.1",
            "[::1]",
            "api.example.com:443",
            "example.123",
        ] {
            assert!(
                HostPattern::parse(bad).is_err(),
                "{bad:?} should be refused"
            );
        }
    }

    #[test]
    fn hosts_are_normalized_or_refused() {
        assert_eq!(
            normalize_host("API.Example.COM.").unwrap(),
            "api.example.com"
        );
        assert_eq!(normalize_host("127.0.0.1"), Err(Denial::IpLiteral));
        assert_eq!(normalize_host("[::1]"), Err(Denial::IpLiteral));
        assert_eq!(normalize_host("2130706433"), Err(Denial::Malformed));
        assert_eq!(normalize_host("0x7f.1"), Err(Denial::Malformed));
        assert_eq!(normalize_host("0x7f000001"), Err(Denial::Malformed));
        assert_eq!(normalize_host("127.0.0.0x1"), Err(Denial::Malformed));
        assert_eq!(
            normalize_host("0xcafe.example.com").unwrap(),
            "0xcafe.example.com"
        );
        assert_eq!(normalize_host("a%2eb.com"), Err(Denial::Malformed));
        assert_eq!(normalize_host("a.com\0.evil"), Err(Denial::Malformed));
        assert_eq!(normalize_host(""), Err(Denial::Malformed));
        assert_eq!(normalize_host("a..com"), Err(Denial::Malformed));
    }

    #[test]
    fn authorities_split_into_host_and_port() {
        assert_eq!(split_authority("a.com"), Some(("a.com", None)));
        assert_eq!(split_authority("a.com:8443"), Some(("a.com", Some(8443))));
        assert_eq!(split_authority("[::1]:443"), Some(("[::1]", Some(443))));
        assert_eq!(split_authority("[::1]"), Some(("[::1]", None)));
        assert_eq!(split_authority("allowed.com@evil.com"), None);
        assert_eq!(split_authority("a.com:"), None);
        assert_eq!(split_authority("a.com:0"), None);
        assert_eq!(split_authority("a.com:65536"), None);
        assert_eq!(split_authority("a.com:+443"), None);
        assert_eq!(split_authority(":443"), None);
        assert_eq!(split_authority(""), None);
        assert_eq!(split_authority("[::1]x"), None);
    }

    #[test]
    fn the_allowlist_tells_a_wrong_port_from_an_unknown_host() {
        let egress = Egress {
            allow: vec![
                EgressAllow {
                    pattern: pattern("api.example.com"),
                    ports: vec![443],
                },
                EgressAllow {
                    pattern: pattern("*.hooks.example.com"),
                    ports: vec![443, 8443],
                },
            ],
            ..Egress::default()
        };
        assert_eq!(egress.check("api.example.com", 443), Ok(()));
        assert_eq!(egress.check("api.example.com", 8443), Err(Denial::Port));
        assert_eq!(egress.check("a.hooks.example.com", 8443), Ok(()));
        assert_eq!(egress.check("hooks.example.com", 443), Err(Denial::Host));
        assert_eq!(egress.check("other.com", 443), Err(Denial::Host));
        assert_eq!(
            Egress::default().check("api.example.com", 443),
            Err(Denial::Host)
        );
    }
}
