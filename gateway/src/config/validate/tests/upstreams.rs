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

bad!(
    outlier_failures_zero,
    with_upstream("endpoints = [\"127.0.0.1:9\"]\noutlier = {\n  consecutive_failures = 0 }\n"),
    6,
    "upstreams.x.outlier.consecutive_failures = 0 is out of range"
);

bad!(
    outlier_max_below_base,
    with_upstream(
        "endpoints = [\"127.0.0.1:9\"]\noutlier = { base_ejection = \"1m\",\n  max_ejection = \"10s\" }\n"
    ),
    6,
    "upstreams.x.outlier.max_ejection = \"10s\" is shorter than base_ejection (1m)"
);

bad!(
    outlier_percent_range,
    with_upstream("endpoints = [\"127.0.0.1:9\"]\noutlier = { max_ejected_percent = 101 }\n"),
    5,
    "upstreams.x.outlier.max_ejected_percent = 101 is out of range"
);

bad!(
    outlier_bad_duration,
    with_upstream("endpoints = [\"127.0.0.1:9\"]\noutlier = { base_ejection = \"soon\" }\n"),
    5,
    "base_ejection"
);

bad!(
    outlier_unknown_key,
    with_upstream("endpoints = [\"127.0.0.1:9\"]\noutlier = { consecutive_errors = 3 }\n"),
    5,
    "consecutive_errors"
);

bad!(
    outlier_wrong_type,
    with_upstream("endpoints = [\"127.0.0.1:9\"]\noutlier = \"on\"\n"),
    5,
    "outlier"
);

fn outlier_of(body: &str) -> Option<crate::config::model::OutlierDetection> {
    let src = format!("{}endpoints = [\"127.0.0.1:9\"]\n{body}", with_upstream(""));
    let loaded = parse(Path::new("t.toml"), &src).expect("valid");
    loaded.config.upstreams[0].outlier
}

#[test]
fn outlier_on_by_default_off_with_false_and_partly_set() {
    use crate::config::model::OutlierDetection;
    use std::time::Duration;
    assert_eq!(outlier_of(""), Some(OutlierDetection::default()));
    assert_eq!(
        outlier_of("outlier = true\n"),
        Some(OutlierDetection::default())
    );
    assert_eq!(outlier_of("outlier = false\n"), None);
    assert_eq!(
        outlier_of("outlier = { consecutive_failures = 2, base_ejection = \"30s\" }\n"),
        Some(OutlierDetection {
            consecutive_failures: 2,
            base_ejection: Duration::from_secs(30),
            ..OutlierDetection::default()
        })
    );
    // A base above the default maximum raises the maximum with it.
    assert_eq!(
        outlier_of("outlier = { base_ejection = \"10m\" }\n").map(|o| o.max_ejection),
        Some(Duration::from_secs(600))
    );
}

bad!(
    unknown_load_balancing,
    with_upstream("endpoints = [\"127.0.0.1:9\"]\nload_balancing = \"least_requests\"\n"),
    5,
    "unknown upstreams.x.load_balancing \"least_requests\""
);

bad!(
    hash_key_without_consistent_hash,
    with_upstream(
        "endpoints = [\"127.0.0.1:9\"]\nload_balancing = \"least_request\"\nhash_key = \"path\"\n"
    ),
    6,
    "hash_key is set, but upstreams.x.load_balancing = \"least_request\" uses no key"
);

bad!(
    consistent_hash_without_key,
    with_upstream("endpoints = [\"127.0.0.1:9\"]\nload_balancing = \"consistent_hash\"\n"),
    5,
    "needs a hash_key"
);

bad!(
    hash_key_unknown,
    with_upstream(
        "endpoints = [\"127.0.0.1:9\"]\nload_balancing = \"consistent_hash\"\nhash_key = \"header:\"\n"
    ),
    6,
    "hash_key = \"header:\" is not a key meshgate knows"
);

bad!(
    slow_start_with_consistent_hash,
    with_upstream(
        "endpoints = [\"127.0.0.1:9\"]\nload_balancing = \"consistent_hash\"\nhash_key = \"path\"\nslow_start = \"30s\"\n"
    ),
    7,
    "slow_start is set, but load_balancing = \"consistent_hash\""
);

bad!(
    panic_threshold_range,
    with_upstream("endpoints = [\"127.0.0.1:9\"]\npanic_threshold = 150\n"),
    5,
    "panic_threshold = 150 is out of range"
);

#[test]
fn balancing_keys_reach_the_model() {
    use crate::config::model::{HashKey, LoadBalancing};
    use std::time::Duration;
    let src = with_upstream(
        "endpoints = [\"127.0.0.1:9\"]\nload_balancing = \"consistent_hash\"\nhash_key = \"cookie:session\"\npanic_threshold = 30\n",
    );
    let u = &parse(Path::new("t.toml"), &src)
        .expect("valid")
        .config
        .upstreams[0];
    assert_eq!(
        u.load_balancing,
        LoadBalancing::ConsistentHash(HashKey::Cookie("session".into()))
    );
    assert_eq!(u.panic_threshold, 30);
    let src = with_upstream("endpoints = [\"127.0.0.1:9\"]\nslow_start = \"30s\"\n");
    let u = &parse(Path::new("t.toml"), &src)
        .expect("valid")
        .config
        .upstreams[0];
    assert_eq!(u.load_balancing, LoadBalancing::RoundRobin);
    assert_eq!(u.slow_start, Some(Duration::from_secs(30)));
    assert_eq!(u.panic_threshold, 0);
}

bad!(
    health_healthy_zero,
    with_upstream("endpoints = [\"127.0.0.1:9\"]\nhealth_check = { healthy = 0 }\n"),
    5,
    "upstreams.x.health_check.healthy = 0 is out of range"
);

bad!(
    health_timeout_not_below_interval,
    with_upstream(
        "endpoints = [\"127.0.0.1:9\"]\nhealth_check = { interval = \"1s\",\n  timeout = \"2s\" }\n"
    ),
    6,
    "upstreams.x.health_check.timeout (2s) is not shorter than interval (1s)"
);

bad!(
    health_unknown_kind,
    with_upstream("endpoints = [\"127.0.0.1:9\"]\nhealth_check = { kind = \"icmp\" }\n"),
    5,
    "unknown upstreams.x.health_check.kind \"icmp\""
);

bad!(
    health_grpc_needs_http2,
    with_upstream("endpoints = [\"127.0.0.1:9\"]\nhealth_check = { kind = \"grpc\" }\n"),
    5,
    "needs HTTP/2, but upstream `x` speaks protocol = \"http1\""
);

bad!(
    health_tcp_with_path,
    with_upstream(
        "endpoints = [\"127.0.0.1:9\"]\nhealth_check = { kind = \"tcp\", path = \"/h\" }\n"
    ),
    5,
    "health_check.path is set, but kind = \"tcp\" does not use it"
);

bad!(
    health_bad_path,
    with_upstream("endpoints = [\"127.0.0.1:9\"]\nhealth_check = { path = \"healthz\" }\n"),
    5,
    "health_check.path = \"healthz\" is not a path"
);

bad!(
    health_bad_status,
    with_upstream("endpoints = [\"127.0.0.1:9\"]\nhealth_check = { expect_status = [200, 700] }\n"),
    5,
    "health_check.expect_status has 700"
);

bad!(
    health_unknown_key,
    with_upstream("endpoints = [\"127.0.0.1:9\"]\nhealth_check = { intervall = \"1s\" }\n"),
    5,
    "intervall"
);

#[test]
fn health_check_defaults() {
    use crate::config::model::{HealthCheck, HealthCheckKind};
    let src = with_upstream("endpoints = [\"127.0.0.1:9\"]\nhealth_check = {}\n");
    let u = &parse(Path::new("t.toml"), &src)
        .expect("valid")
        .config
        .upstreams[0];
    let h = u.health_check.as_ref().expect("on");
    assert_eq!(h.kind, HealthCheckKind::Http);
    assert_eq!(h.path, "/");
    assert_eq!(h.interval, HealthCheck::DEFAULT_INTERVAL);
    assert_eq!(h.timeout, HealthCheck::DEFAULT_TIMEOUT);
    assert_eq!((h.healthy, h.unhealthy), (2, 3));
    assert!(h.passes(204) && h.passes(302) && !h.passes(404) && !h.passes(503));
    let src = with_upstream("endpoints = [\"127.0.0.1:9\"]\n");
    let u = &parse(Path::new("t.toml"), &src)
        .expect("valid")
        .config
        .upstreams[0];
    assert!(u.health_check.is_none());
}

bad!(
    discovery_unknown,
    with_upstream("endpoints = [\"127.0.0.1:9\"]\ndiscovery = \"consul\"\n"),
    5,
    "unknown upstreams.x.discovery \"consul\""
);

bad!(
    srv_entry_with_port,
    with_upstream("discovery = \"srv\"\nendpoints = [\"_http._tcp.api.consul:80\"]\n"),
    5,
    "is not an SRV name: it has a port"
);

bad!(
    dns_entry_without_port,
    with_upstream("discovery = \"dns\"\nendpoints = [\"api.internal\"]\n"),
    5,
    "missing `:PORT`"
);

bad!(
    resolver_bad_nameserver,
    format!("{OK_LISTENER}[resolver]\nnameservers = [\"dns.example\"]\n"),
    4,
    "resolver.nameservers has \"dns.example\""
);

bad!(
    resolver_max_below_min,
    format!("{OK_LISTENER}[resolver]\nmin_ttl = \"1m\"\nmax_ttl = \"10s\"\n"),
    5,
    "resolver.max_ttl (10s) is shorter than min_ttl (1m)"
);

bad!(
    resolver_unknown_key,
    format!("{OK_LISTENER}[resolver]\nname_servers = [\"127.0.0.1\"]\n"),
    4,
    "name_servers"
);

#[test]
fn dns_and_srv_names_are_not_looked_up_by_check() {
    use crate::config::model::Discovery;
    // Names that no resolver knows: `check` (and load) must not ask.
    let src = format!(
        "{OK_LISTENER}[resolver]\nnameservers = [\"127.0.0.1:5353\", \"10.0.0.2\"]\n\
         [upstreams.d]\ndiscovery = \"dns\"\nendpoints = [\"api.nowhere.invalid:8080\", \"10.1.2.3:80\"]\n\
         [upstreams.s]\ndiscovery = \"srv\"\nendpoints = [\"_http._tcp.api.nowhere.invalid\"]\n"
    );
    let c = parse(Path::new("t.toml"), &src).expect("valid").config;
    assert_eq!(c.upstreams[0].discovery, Discovery::Dns);
    assert!(c.upstreams[0].endpoints[0].sockets.is_empty());
    assert_eq!(
        c.upstreams[0].endpoints[1].sockets,
        vec!["10.1.2.3:80".parse().unwrap()]
    );
    assert_eq!(c.upstreams[1].discovery, Discovery::Srv);
    assert_eq!(
        c.resolver.nameservers,
        vec![
            "127.0.0.1:5353".parse().unwrap(),
            "10.0.0.2:53".parse().unwrap()
        ]
    );
}

#[test]
fn static_names_become_every_address() {
    let src = with_upstream("endpoints = [\"localhost:8080\"]\n");
    let c = parse(Path::new("t.toml"), &src).expect("valid").config;
    let sockets = &c.upstreams[0].endpoints[0].sockets;
    assert!(!sockets.is_empty());
    assert!(
        sockets
            .iter()
            .all(|s| s.ip().is_loopback() && s.port() == 8080),
        "{sockets:?}"
    );
}

bad!(
    retry_budget_ratio_range,
    with_upstream("endpoints = [\"127.0.0.1:9\"]\nretry_budget = { ratio = 50.0 }\n"),
    5,
    "upstreams.x.retry_budget.ratio = 50 is out of range"
);

#[test]
fn retry_budget_on_by_default() {
    use crate::config::model::RetryBudget;
    let budget = |body: &str| {
        let src = with_upstream(&format!("endpoints = [\"127.0.0.1:9\"]\n{body}"));
        parse(Path::new("t.toml"), &src)
            .expect("valid")
            .config
            .upstreams[0]
            .retry_budget
    };
    assert_eq!(budget(""), Some(RetryBudget::default()));
    assert_eq!(budget("retry_budget = false\n"), None);
    assert_eq!(
        budget("retry_budget = { min_per_second = 0 }\n"),
        Some(RetryBudget {
            ratio: 0.2,
            min_per_second: 0
        })
    );
}

bad!(
    limits_pending_without_requests,
    with_upstream("endpoints = [\"127.0.0.1:9\"]\nlimits = { max_pending = 5 }\n"),
    5,
    "upstreams.x.limits.max_pending is set without max_requests or max_connections"
);

bad!(
    limits_requests_zero,
    with_upstream("endpoints = [\"127.0.0.1:9\"]\nlimits = { max_requests = 0 }\n"),
    5,
    "upstreams.x.limits.max_requests = 0 is out of range"
);

bad!(
    concurrency_unknown,
    with_upstream("endpoints = [\"127.0.0.1:9\"]\nconcurrency = \"gradient\"\n"),
    5,
    "unknown upstreams.x.concurrency \"gradient\""
);

bad!(
    max_connections_on_an_h2_upstream,
    with_upstream(
        "endpoints = [\"127.0.0.1:9\"]\nprotocol = \"h2c\"\nlimits = { max_connections = 4 }\n"
    ),
    6,
    "upstreams.x.limits.max_connections is for HTTP/1.1 upstreams, and this one speaks HTTP/2"
);

bad!(
    max_connections_zero,
    with_upstream("endpoints = [\"127.0.0.1:9\"]\nlimits = { max_connections = 0 }\n"),
    5,
    "upstreams.x.limits.max_connections = 0 is out of range"
);

#[test]
fn max_connections_alone_lets_requests_wait() {
    let c = parse(
        Path::new("t.toml"),
        &with_upstream(
            "endpoints = [\"127.0.0.1:9\"]\nlimits = { max_connections = 4, max_pending = 2 }\n",
        ),
    )
    .expect("valid")
    .config;
    assert_eq!(c.upstreams[0].limits.max_connections, Some(4));
    assert_eq!(c.upstreams[0].limits.max_pending, 2);
}
