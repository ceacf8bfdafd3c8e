//! `[upstreams.NAME]` and endpoints.

use super::*;

bad!(
    port_zero_endpoint,
    with_upstream("endpoints = [\"127.0.0.1:0\"]\n"),
    4,
    "port 0 is not a port"
);

bad!(
    no_endpoints,
    with_upstream("endpoints = []\n"),
    4,
    "has no endpoints"
);

bad!(
    unknown_protocol,
    with_upstream("endpoints = [\"127.0.0.1:9\"]\nprotocol = \"h3\"\n"),
    5,
    "unknown upstream protocol"
);

bad!(
    retries_range,
    with_upstream("endpoints = [\"127.0.0.1:9\"]\nconnect_retries = 99\n"),
    5,
    "connect_retries = 99 is out of range"
);

bad!(
    endpoint_unknown_key,
    with_upstream("endpoints = [{ addr = \"127.0.0.1:9\", wieght = 2 }]\n"),
    4,
    "unknown key `wieght` in endpoint"
);

bad!(
    endpoint_no_addr,
    with_upstream("endpoints = [{ weight = 2 }]\n"),
    4,
    "has no `addr`"
);

bad!(
    endpoint_weight,
    with_upstream("endpoints = [{ addr = \"127.0.0.1:9\", weight = 0 }]\n"),
    4,
    "endpoint weight 0"
);

bad!(
    endpoint_type,
    with_upstream("endpoints = [9001]\n"),
    4,
    "must be a string or a table"
);

bad!(
    endpoint_no_port,
    with_upstream("endpoints = [\"localhost\"]\n"),
    4,
    "missing `:PORT`"
);

bad!(
    endpoint_bad_port,
    with_upstream("endpoints = [\"localhost:99999\"]\n"),
    4,
    "is not a port"
);

bad!(
    endpoint_no_host,
    with_upstream("endpoints = [\":80\"]\n"),
    4,
    "missing host"
);

bad!(
    endpoint_scheme,
    with_upstream("endpoints = [\"http://a:80\"]\n"),
    4,
    "not a host name"
);

bad!(
    endpoint_twice,
    with_upstream("endpoints = [\"127.0.0.1:9\", \"127.0.0.1:9\"]\n"),
    4,
    "lists endpoint 127.0.0.1:9 twice"
);

bad!(
    upstream_tls_needs_sni_for_ips,
    with_upstream(
        "endpoints = [\"127.0.0.1:9\"]\ntls = { verify = \"spiffe://prod.example/ns/orders/*\" }\n"
    ),
    5,
    "has no tls.sni"
);

bad!(
    upstream_h2_without_tls,
    with_upstream("endpoints = [\"127.0.0.1:9\"]\nprotocol = \"h2\"\n"),
    5,
    "HTTP/2 over TLS, but this upstream has no `tls`"
);

bad!(
    upstream_tls_half_client_cert,
    with_upstream("endpoints = [\"127.0.0.1:9\"]\ntls = { sni = \"x\", cert = \"a.pem\" }\n"),
    5,
    "needs both `cert` and `key`"
);
