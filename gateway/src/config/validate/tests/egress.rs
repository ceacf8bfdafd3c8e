//! `[egress]`.

use super::*;

const EGRESS_LISTENER: &str =
    "[listeners.out]\nbind = \"127.0.0.1:15001\"\ndirection = \"egress\"\n";

fn with_egress(body: &str) -> String {
    format!("{EGRESS_LISTENER}[egress]\n{body}")
}

bad!(
    egress_without_an_egress_listener,
    format!("{OK_LISTENER}[egress]\nallow = {{ hosts = [\"a.com\"] }}\n"),
    3,
    "no listener has direction = \"egress\""
);

bad!(
    egress_listener_with_tls,
    format!("[certs.c]\ncert = \"/nonexistent.pem\"\nkey = \"/nonexistent.key\"\n{EGRESS_LISTENER}tls = {{ certs = [\"c\"] }}\n[egress]\n"),
    8,
    "is an egress listener with tls"
);

bad!(
    egress_bad_host_pattern,
    with_egress("[egress.allow]\nhosts = [\"a.com\", \"*.com\"]\n"),
    6,
    "\"*.com\" is not a host pattern"
);

bad!(
    egress_ip_host,
    with_egress("[egress.allow]\nhosts = [\"10.1.2.3\"]\n"),
    6,
    "an IP address cannot be verified by name"
);

bad!(
    egress_bad_host_port,
    with_egress("[egress.allow]\nhosts = [\"a.com:70000\"]\n"),
    6,
    "not 1-65535"
);

bad!(
    egress_empty_ports,
    with_egress("[egress.allow]\nhosts = [\"a.com\"]\nports = []\n"),
    7,
    "egress.allow.ports is empty"
);

bad!(
    egress_zero_port,
    with_egress("[egress.allow]\nhosts = [\"a.com\"]\nports = [443, 0]\n"),
    7,
    "0 is not a port"
);

bad!(
    egress_unknown_key,
    with_egress("allowlist = [\"a.com\"]\n"),
    5,
    "unknown key"
);

bad!(
    egress_resolve_wildcard,
    with_egress("resolve = { \"*.a.com\" = \"127.0.0.1\" }\n"),
    5,
    "is not a host name"
);

bad!(
    egress_resolve_bad_address,
    with_egress("resolve = { \"a.com\" = \"somewhere\" }\n"),
    5,
    "is not an IP address"
);

bad!(
    egress_bad_deny_network,
    with_egress("deny_networks = [\"10.0.0.0/33\"]\n"),
    5,
    "is not an IP network"
);

bad!(
    egress_bad_timeout,
    with_egress("tunnel_idle_timeout = \"0s\"\n"),
    5,
    "egress.tunnel_idle_timeout must be greater than zero"
);

#[test]
fn egress_parses_with_defaults_and_per_host_ports() {
    let cfg = parse(
        Path::new("t.toml"),
        &with_egress(
            "resolve = { \"API.example.com.\" = [\"127.0.0.1\", \"[::1]:9443\"] }\n[egress.allow]\nhosts = [\"api.example.com\", \"**.cdn.example.com:8443\"]\nports = [443, 4443]\n",
        ),
    )
    .unwrap();
    let eg = cfg.config.egress.expect("[egress] is set");
    assert_eq!(eg.allow.len(), 2);
    assert_eq!(eg.allow[0].ports, vec![443, 4443]);
    assert_eq!(eg.allow[1].ports, vec![8443]);
    assert_eq!(eg.allow[1].pattern.to_string(), "**.cdn.example.com");
    assert_eq!(eg.resolve[0].0, "api.example.com");
    assert_eq!(eg.resolve[0].1[1].port, Some(9443));
    assert_eq!(eg.passthrough_port, model::DEFAULT_EGRESS_PASSTHROUGH_PORT);
    assert_eq!(eg.connect_timeout, model::DEFAULT_EGRESS_CONNECT_TIMEOUT);
    assert_eq!(eg.timeout, model::DEFAULT_EGRESS_TIMEOUT);
    assert_eq!(
        eg.deny_networks.len(),
        model::DEFAULT_EGRESS_DENY_NETWORKS.len()
    );
    assert!(eg.ca.is_none());
    // An egress listener needs no [egress]: then it serves its routes only.
    let plain = parse(Path::new("t.toml"), EGRESS_LISTENER).unwrap();
    assert!(plain.egress.is_none());
}
