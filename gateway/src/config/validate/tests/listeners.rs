//! `[listeners.NAME]`.

use super::*;

bad!(
    trusted_proxy_cidr,
    format!("{OK_LISTENER}trusted_proxies = [\"10.0.0.0/99\"]\n"),
    3,
    "is not an IP network"
);

bad!(
    port_zero_bind,
    "[listeners.public]\nbind = \"127.0.0.1:0\"\n",
    2,
    "has port 0"
);

bad!(
    bad_bind,
    "[listeners.public]\nbind = \"8080\"\n".to_string(),
    2,
    "is not an IP address and port"
);

bad!(
    unknown_direction,
    format!("{OK_LISTENER}direction = \"up\"\n"),
    3,
    "unknown direction \"up\""
);

bad!(
    overlaps_admin,
    "[admin]\nlisten = \"127.0.0.1:9901\"\n[listeners.a]\nbind = \"0.0.0.0:9901\"\n".to_string(),
    4,
    "overlaps admin.listen"
);

bad!(
    duplicate_bind,
    format!("{OK_LISTENER}[listeners.b]\nbind = \"127.0.0.1:18080\"\n"),
    4,
    "overlaps listener `public`"
);

#[test]
fn no_listeners_has_no_location_but_a_fix() {
    let d = diags("[gateway]\nname = \"x\"\n");
    assert_eq!(d.len(), 1);
    assert!(d[0].message.contains("no listeners defined"));
    assert!(d[0].span.is_none() && d[0].fix.is_some());
}

bad!(
    listener_tls_unknown_cert,
    format!("{OK_LISTENER}tls = {{ certs = [\"edge\"] }}\n"),
    3,
    "unknown cert `edge`"
);

bad!(
    listener_tls_min_version,
    format!("{OK_LISTENER}tls = {{ certs = [], min_version = \"1.0\" }}\n"),
    3,
    "is not offered"
);

bad!(
    listener_tls_session_tickets_range,
    format!("{OK_LISTENER}tls = {{ certs = [], session_tickets = 17 }}\n"),
    3,
    "session_tickets = 17 is out of range"
);

bad!(
    listener_tls_session_tickets_negative,
    format!("{OK_LISTENER}tls = {{ certs = [], session_tickets = -1 }}\n"),
    3,
    "session_tickets = -1 is out of range"
);

bad!(
    listener_tls_session_tickets_with_client_ca,
    format!("{OK_LISTENER}tls = {{ certs = [], client_ca = \"ca.pem\", session_tickets = 2 }}\n"),
    3,
    "session_tickets with client_ca"
);

bad!(
    listener_tls_without_certs,
    format!("{OK_LISTENER}tls = {{ min_version = \"1.3\" }}\n"),
    3,
    "missing required key `certs`"
);

bad!(
    listener_client_auth_without_ca,
    format!("{OK_LISTENER}tls = {{ certs = [], client_auth = \"optional\" }}\n"),
    3,
    "client_auth needs client_ca"
);

bad!(
    handshake_timeout_zero,
    format!("{OK_LISTENER}limits = {{ handshake_timeout = \"0s\" }}\n"),
    3,
    "listeners.public.limits.handshake_timeout must be greater than zero"
);

bad!(
    max_requests_per_connection_zero,
    format!("{OK_LISTENER}limits = {{ max_requests_per_connection = 0 }}\n"),
    3,
    "listeners.public.limits.max_requests_per_connection = 0 is out of range"
);

#[test]
fn body_and_connection_defaults() {
    let cfg = parse(Path::new("t.toml"), &with_route("upstream = \"u\"\n")).unwrap();
    let route = &cfg.routes[0];
    assert_eq!(route.max_body_bytes, 10 * 1024 * 1024);
    assert_eq!(route.buffer_request_body, 0);
    let limits = cfg.listeners[0].limits;
    assert_eq!(limits.handshake_timeout, std::time::Duration::from_secs(10));
    assert_eq!(limits.body_read_timeout, std::time::Duration::from_secs(30));
    assert_eq!(limits.max_requests_per_connection, 1000);
    assert_eq!(cfg.gateway.max_pending_head_bytes, 32 * 1024 * 1024);
    assert_eq!(cfg.gateway.overload_memory, None);
}
