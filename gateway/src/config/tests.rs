//! One test per validation message: each bad config yields that message at
//! the right line, with a fix.

use std::path::Path;

use super::*;

const OK_LISTENER: &str = "[listeners.public]\nbind = \"127.0.0.1:18080\"\n";
const OK_UPSTREAM: &str = "[upstreams.u]\nendpoints = [\"127.0.0.1:9\"]\n";

fn diags(src: &str) -> Vec<Diagnostic> {
    match parse(Path::new("t.toml"), src) {
        Ok(_) => panic!("config unexpectedly valid:\n{src}"),
        Err(e) => e.diagnostics().to_vec(),
    }
}

/// Assert that `src` has an error containing `needle` on `line` (1-based),
/// carrying a fix.
fn expect(src: &str, line: usize, needle: &str) {
    let all = diags(src);
    let found = all
        .iter()
        .find(|d| d.message.contains(needle))
        .unwrap_or_else(|| {
            panic!(
                "no error containing `{needle}`; got: {:#?}",
                all.iter().map(|d| &d.message).collect::<Vec<_>>()
            )
        });
    let span = found.span.clone().expect("error has a location");
    assert_eq!(
        error::line_col(src, span.start).0,
        line,
        "`{needle}` on the wrong line"
    );
    assert!(
        found.fix.as_deref().is_some_and(|f| !f.is_empty()),
        "`{needle}` has no fix"
    );
}

macro_rules! bad {
    ($name:ident, $src:expr, $line:expr, $needle:expr) => {
        #[test]
        fn $name() {
            expect(AsRef::<str>::as_ref(&$src), $line, $needle);
        }
    };
}

fn with_route(route: &str) -> String {
    format!("{OK_LISTENER}{OK_UPSTREAM}[routes.r]\n{route}")
}

fn with_upstream(body: &str) -> String {
    format!("{OK_LISTENER}[upstreams.x]\n{body}")
}

bad!(
    toml_syntax,
    "[listeners.public\n".to_string(),
    1,
    "TOML syntax"
);
bad!(
    unknown_section,
    format!("{OK_LISTENER}[upstream.x]\n"),
    3,
    "unknown section `upstream`"
);
bad!(
    section_not_a_table,
    format!("routes = 5\n{OK_LISTENER}"),
    1,
    "must be a table of named entries"
);
bad!(
    entry_not_a_table,
    "[listeners]\npublic = 1\n".to_string(),
    2,
    "must be a table"
);
bad!(
    invalid_name,
    "[listeners.\"a b\"]\nbind = \"127.0.0.1:1\"\n".to_string(),
    1,
    "invalid name `a b`"
);
bad!(
    unknown_key,
    format!("{OK_LISTENER}colour = 1\n"),
    3,
    "unknown key `colour`"
);
bad!(
    missing_key,
    "[listeners.public]\ndirection = \"mesh\"\n".to_string(),
    1,
    "missing required key `bind`"
);
bad!(
    wrong_type,
    "[listeners.public]\nbind = 8080\n".to_string(),
    2,
    "`bind` must be a string, in quotes, not the number 8080"
);
bad!(
    rate_limit_unknown,
    with_route("upstream = \"u\"\nrate_limits = [\"per_clinet\"]\n"),
    7,
    "unknown rate limit `per_clinet`"
);
bad!(
    rate_limit_key,
    format!("{OK_LISTENER}[rate_limits.p]\nkey = \"cookie\"\nrate = 1\n"),
    4,
    "unknown rate-limit key"
);
bad!(
    rate_limit_global_without_redis,
    format!("{OK_LISTENER}[rate_limits.p]\nkey = \"route\"\nrate = 1\nscope = \"global\"\n"),
    6,
    "there is no [redis] table"
);
const OK_REDIS: &str = "[redis]\nurl = \"redis://127.0.0.1:6379/0\"\n";
bad!(
    rate_limit_global_too_fine,
    format!("{OK_LISTENER}{OK_REDIS}[rate_limits.p]\nkey = \"route\"\nrate = 200000\nscope = \"global\"\n"),
    7,
    "finer than a global limit counts"
);
bad!(
    rate_limit_scope,
    format!("{OK_LISTENER}[rate_limits.p]\nkey = \"route\"\nrate = 1\nscope = \"cluster\"\n"),
    6,
    "unknown scope"
);
bad!(
    rate_limit_batch_local,
    format!("{OK_LISTENER}[rate_limits.p]\nkey = \"route\"\nrate = 1\nbatch = 2\n"),
    6,
    "applies only to scope = \"global\""
);
bad!(
    rate_limit_batch_above_burst,
    format!("{OK_LISTENER}{OK_REDIS}[rate_limits.p]\nkey = \"route\"\nrate = 10\nburst = 4\nscope = \"global\"\nbatch = 5\n"),
    10,
    "batch = 5 is out of range"
);
bad!(
    redis_url,
    format!("{OK_LISTENER}[redis]\nurl = \"http://127.0.0.1:6379\"\n"),
    4,
    "is not usable"
);
bad!(
    redis_on_error,
    format!("{OK_LISTENER}{OK_REDIS}on_error = \"retry\"\n"),
    5,
    "unknown on_error"
);
bad!(
    redis_timeout,
    format!("{OK_LISTENER}{OK_REDIS}timeout = \"0s\"\n"),
    5,
    "redis.timeout must be greater than zero"
);
bad!(
    redis_unknown_key,
    format!("{OK_LISTENER}{OK_REDIS}pool = 4\n"),
    5,
    "unknown key `pool`"
);
bad!(
    rate_limit_mode,
    format!("{OK_LISTENER}[rate_limits.p]\nkey = \"route\"\nrate = 1\nmode = \"loud\"\n"),
    6,
    "unknown mode"
);
bad!(
    rate_limit_rate,
    format!("{OK_LISTENER}[rate_limits.p]\nkey = \"route\"\nrate = 0\n"),
    5,
    "rate = 0 is out of range"
);
bad!(
    rate_limit_burst,
    format!("{OK_LISTENER}[rate_limits.p]\nkey = \"route\"\nrate = 1\nburst = -1\n"),
    6,
    "burst = -1 is out of range"
);
bad!(
    rate_limit_too_fine,
    format!("{OK_LISTENER}[rate_limits.p]\nkey = \"route\"\nrate = 1000000000\nper = \"1ms\"\n"),
    5,
    "finer than a nanosecond"
);
bad!(
    rate_limit_max_keys,
    format!("{OK_LISTENER}[rate_limits.p]\nkey = \"route\"\nrate = 1\nmax_keys = 0\n"),
    6,
    "max_keys = 0 is out of range"
);
bad!(
    trusted_proxy_cidr,
    format!("{OK_LISTENER}trusted_proxies = [\"10.0.0.0/99\"]\n"),
    3,
    "is not an IP network"
);
bad!(
    tracing_endpoint,
    format!("[telemetry.tracing]\nendpoint = \"collector:4318\"\n{OK_LISTENER}"),
    2,
    "is not an http(s) URL"
);
bad!(
    tracing_ratio,
    format!("[telemetry.tracing]\nsample_ratio = 1.5\n{OK_LISTENER}"),
    2,
    "sample_ratio = 1.5 is outside"
);
bad!(
    tracing_queue,
    format!("[telemetry.tracing]\nqueue_size = 0\n{OK_LISTENER}"),
    2,
    "queue_size = 0 is out of range"
);
bad!(
    tracing_service_name,
    format!("[telemetry.tracing]\nservice_name = \"\"\n{OK_LISTENER}"),
    2,
    "service_name is empty"
);
bad!(
    tracing_unknown_key,
    format!("[telemetry.tracing]\nendpont = \"x\"\n{OK_LISTENER}"),
    2,
    "unknown key `endpont`"
);
bad!(
    duration_too_long,
    with_route("upstream = \"u\"\ntimeout = \"9999999999999s\"\n"),
    7,
    "is longer than 24h"
);
bad!(
    port_zero_bind,
    "[listeners.public]\nbind = \"127.0.0.1:0\"\n",
    2,
    "has port 0"
);
bad!(
    port_zero_endpoint,
    with_upstream("endpoints = [\"127.0.0.1:0\"]\n"),
    4,
    "port 0 is not a port"
);
bad!(
    rewrite_framing,
    with_route("upstream = \"u\"\nrequest_headers = { set = { \"Content-Length\" = \"0\" } }\n"),
    7,
    "header `Content-Length` cannot be rewritten"
);
bad!(
    rewrite_hop_by_hop,
    with_route("upstream = \"u\"\nresponse_headers = { remove = [\"connection\"] }\n"),
    7,
    "header `connection` cannot be rewritten"
);
bad!(
    no_content_body,
    with_route("respond = { status = 204, body = \"x\" }\n"),
    6,
    "a 204 response has no body"
);
bad!(
    empty_gateway_name,
    format!("[gateway]\nname = \" \"\n{OK_LISTENER}"),
    2,
    "gateway.name is empty"
);
bad!(
    workers_range,
    format!("[gateway]\nworkers = 0\n{OK_LISTENER}"),
    2,
    "gateway.workers = 0 is out of range"
);
bad!(
    bad_duration,
    format!("[gateway]\nshutdown_grace_period = \"a while\"\n{OK_LISTENER}"),
    2,
    "is not a duration"
);
bad!(
    zero_duration,
    with_upstream("endpoints = [\"127.0.0.1:9\"]\nconnect_timeout = \"0s\"\n"),
    5,
    "must be greater than zero"
);
bad!(
    bad_admin_addr,
    format!("[admin]\nlisten = \"localhost\"\n{OK_LISTENER}"),
    2,
    "is not an IP address and port"
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
    route_no_listeners,
    with_route("listeners = []\nupstream = \"u\"\n"),
    6,
    "lists no listeners"
);
bad!(
    route_unknown_listener,
    with_route("listeners = [\"publik\"]\nupstream = \"u\"\n"),
    6,
    "unknown listener `publik`"
);
bad!(
    bad_host,
    with_route("host = \"http://a.com\"\nupstream = \"u\"\n"),
    6,
    "is not a host name"
);
bad!(
    two_path_matchers,
    with_route("path = \"/a\"\npath_prefix = \"/b\"\nupstream = \"u\"\n"),
    7,
    "more than one of path"
);
bad!(
    relative_path,
    with_route("path_prefix = \"v1/\"\nupstream = \"u\"\n"),
    6,
    "must start with `/`"
);
bad!(
    bad_regex,
    with_route("path_regex = \"(\"\nupstream = \"u\"\n"),
    6,
    "invalid path_regex"
);
bad!(
    empty_methods,
    with_route("methods = []\nupstream = \"u\"\n"),
    6,
    "matches nothing"
);
bad!(
    bad_method,
    with_route("methods = [\"GE T\"]\nupstream = \"u\"\n"),
    6,
    "is not an HTTP method"
);
bad!(
    bad_header_name,
    with_route("headers = { \"x y\" = \"1\" }\nupstream = \"u\"\n"),
    6,
    "is not a valid header name"
);
bad!(
    bad_header_value,
    with_route("headers = { \"x\" = \"a\\nb\" }\nupstream = \"u\"\n"),
    6,
    "is not a valid header value"
);
bad!(no_action, with_route("path = \"/a\"\n"), 5, "has no action");
bad!(
    two_actions,
    with_route("upstream = \"u\"\nrespond = { status = 200 }\n"),
    7,
    "more than one action"
);
bad!(
    strip_without_forward,
    with_route("respond = { status = 200 }\nstrip_prefix = \"/a\"\n"),
    7,
    "only applies to routes that forward"
);
bad!(
    unknown_upstream,
    with_route("upstream = \"uu\"\n"),
    6,
    "unknown upstream `uu`"
);
bad!(empty_split, with_route("split = {}\n"), 6, "empty split");
bad!(
    zero_split_weight,
    with_route("split = { u = 0 }\n"),
    6,
    "split weight 0"
);
bad!(
    respond_status,
    with_route("respond = { status = 42 }\n"),
    6,
    "respond.status 42 is out of range"
);
bad!(
    respond_content_type,
    with_route("respond = { content_type = \"a\\nb\" }\n"),
    6,
    "content_type is not a valid header value"
);
bad!(
    redirect_status,
    with_route("redirect = { location = \"/x\", status = 200 }\n"),
    6,
    "is not a redirect status"
);
bad!(
    redirect_location,
    with_route("redirect = { location = \"\" }\n"),
    6,
    "redirect.location is empty"
);
bad!(
    indistinguishable,
    format!("{OK_LISTENER}{OK_UPSTREAM}[routes.a]\npath = \"/x\"\nupstream = \"u\"\n[routes.b]\npath = \"/x\"\nupstream = \"u\"\n"),
    8,
    "route `b` can never match"
);

#[test]
fn no_listeners_has_no_location_but_a_fix() {
    let d = diags("[gateway]\nname = \"x\"\n");
    assert_eq!(d.len(), 1);
    assert!(d[0].message.contains("no listeners defined"));
    assert!(d[0].span.is_none() && d[0].fix.is_some());
}

#[test]
fn same_conditions_on_different_listeners_are_fine() {
    let src = format!(
        "{OK_LISTENER}[listeners.b]\nbind = \"127.0.0.1:18081\"\n{OK_UPSTREAM}[routes.a]\nlisteners = [\"public\"]\npath = \"/x\"\nupstream = \"u\"\n[routes.c]\nlisteners = [\"b\"]\npath = \"/x\"\nupstream = \"u\"\n"
    );
    parse(Path::new("t.toml"), &src).unwrap();
}

#[test]
fn errors_are_all_collected_in_file_order() {
    let src = format!(
        "[gateway]\nworkers = 0\n{OK_LISTENER}colour = 1\n[routes.r]\nupstream = \"nope\"\n"
    );
    let d = diags(&src);
    let messages: Vec<&str> = d.iter().map(|d| d.message.as_str()).collect();
    assert_eq!(d.len(), 3, "{messages:?}");
    let starts: Vec<usize> = d.iter().map(|d| d.span.clone().unwrap().start).collect();
    assert!(starts.windows(2).all(|w| w[0] <= w[1]), "{messages:?}");
}

#[test]
fn defaults_are_filled_in() {
    let cfg = parse(
        Path::new("t.toml"),
        &format!("{OK_LISTENER}{OK_UPSTREAM}[routes.r]\nupstream = \"u\"\n"),
    )
    .unwrap();
    assert_eq!(cfg.gateway.name, model::DEFAULT_GATEWAY_NAME);
    assert_eq!(cfg.gateway.work_stealing, model::DEFAULT_WORK_STEALING);
    assert_eq!(cfg.gateway.header_case, model::HeaderCase::Preserve);
    assert_eq!(cfg.admin.listen.to_string(), model::DEFAULT_ADMIN_LISTEN);
    assert_eq!(cfg.listeners[0].direction, model::Direction::Ingress);
    assert_eq!(cfg.routes[0].timeout, model::DEFAULT_ROUTE_TIMEOUT);
    assert_eq!(cfg.routes[0].listeners, vec!["public".to_string()]);
    let u = &cfg.upstreams[0];
    assert_eq!(u.connect_timeout, model::DEFAULT_CONNECT_TIMEOUT);
    assert_eq!(u.idle_timeout, model::DEFAULT_IDLE_TIMEOUT);
    assert_eq!(u.connect_retries, model::DEFAULT_CONNECT_RETRIES);
    assert_eq!(u.endpoints[0].weight, 1);
}

#[test]
fn tracing_defaults_and_bare_endpoint() {
    let cfg = parse(
        Path::new("t.toml"),
        &format!("[telemetry.tracing]\nendpoint = \"http://otel:4318\"\n{OK_LISTENER}"),
    )
    .unwrap();
    let t = cfg.config.telemetry.tracing.expect("tracing on");
    assert_eq!(t.endpoint, "http://otel:4318/v1/traces");
    assert_eq!(t.sample_ratio, model::DEFAULT_SAMPLE_RATIO);
    assert_eq!(t.service_name, model::DEFAULT_SERVICE_NAME);
    let off = parse(
        Path::new("t.toml"),
        &format!("[telemetry.tracing]\nenabled = false\n{OK_LISTENER}"),
    )
    .unwrap();
    assert!(off.telemetry.tracing.is_none());
    let absent = parse(Path::new("t.toml"), OK_LISTENER).unwrap();
    assert!(absent.telemetry.tracing.is_none());
}

#[test]
fn rate_limit_defaults() {
    let cfg = parse(
        Path::new("t.toml"),
        &format!("{OK_LISTENER}trusted_proxies = [\"10.0.0.0/8\", \"192.0.2.1\"]\n[rate_limits.p]\nkey = \"header:X-Api-Key\"\nrate = 7\n"),
    )
    .unwrap();
    let p = &cfg.rate_limits[0];
    assert_eq!(
        (p.rate, p.burst, p.per),
        (7, 7, model::DEFAULT_RATE_LIMIT_PER)
    );
    assert_eq!(p.mode, model::LimitMode::Enforce);
    assert_eq!(
        p.key,
        model::RateLimitKey::Header(http::HeaderName::from_static("x-api-key"))
    );
    assert!(!p.headers_on_allowed);
    assert_eq!(p.max_keys, model::DEFAULT_MAX_KEYS);
    assert_eq!(cfg.listeners[0].trusted_proxies.len(), 2);
}

#[test]
fn redis_and_global_defaults() {
    let cfg = parse(
        Path::new("t.toml"),
        &format!("{OK_LISTENER}[redis]\nurl = \"redis://:s3cret@127.0.0.1:6379/2\"\n[rate_limits.p]\nkey = \"route\"\nrate = 7\nscope = \"global\"\n"),
    )
    .unwrap();
    let r = cfg.redis.as_ref().unwrap();
    assert_eq!(r.on_error, model::OnError::Allow);
    assert_eq!(r.timeout, model::DEFAULT_REDIS_TIMEOUT);
    assert_eq!(r.key_prefix, model::DEFAULT_REDIS_KEY_PREFIX);
    assert_eq!(r.redacted_url(), "redis://:***@127.0.0.1:6379/2");
    assert_eq!(
        cfg.rate_limits[0].scope,
        model::LimitScope::Global { batch: 1 }
    );
}

#[test]
fn passwords_never_appear_in_errors_or_redacted_urls() {
    use model::redact_secrets;
    assert_eq!(
        redact_secrets("redis://user:pw@h:1/0"),
        "redis://user:***@h:1/0"
    );
    assert_eq!(redact_secrets("redis://pw@h:1/0"), "redis://***@h:1/0");
    assert_eq!(
        redact_secrets("unix:///run/redis.sock?db=1&pass=pw"),
        "unix:///run/redis.sock?db=1&pass=***"
    );
    assert_eq!(
        redact_secrets("url = \"rediss://:pw@h:6380/0\" # x"),
        "url = \"rediss://:***@h:6380/0\" # x"
    );
    assert_eq!(redact_secrets("redis://h:1/0"), "redis://h:1/0");
    assert_eq!(redact_secrets("bypass=1"), "bypass=1");

    // An invalid URL: the message and the quoted source line hide the password.
    let src = format!("{OK_LISTENER}[redis]\nurl = \"redis://:s3cret@127.0.0.1:6380/x\"\n");
    let err = parse(Path::new("t.toml"), &src).unwrap_err().to_string();
    assert!(err.contains("is not usable"), "{err}");
    assert!(!err.contains("s3cret"), "{err}");
    // One the Redis library cannot use (TLS) is said so in meshgate's words.
    let src = format!("{OK_LISTENER}[redis]\nurl = \"rediss://:s3cret@127.0.0.1:6380/0\"\n");
    let err = parse(Path::new("t.toml"), &src).unwrap_err().to_string();
    assert!(
        err.contains("redis.url: Redis over TLS (rediss://) is not supported in this version"),
        "{err}"
    );
    assert!(!err.contains("feature"), "{err}");
    assert!(!err.contains("s3cret"), "{err}");
    // A syntax error on the line shows it redacted too.
    let src = format!("{OK_LISTENER}[redis]\nurl = \"redis://:s3cret@h:1/0\" x\n");
    let err = parse(Path::new("t.toml"), &src).unwrap_err().to_string();
    assert!(!err.contains("s3cret"), "{err}");
    let cfg = parse(
        Path::new("t.toml"),
        &format!("{OK_LISTENER}[redis]\nurl = \"redis://:s3cret@h:1/0\"\n"),
    )
    .unwrap();
    assert!(!format!("{cfg:?}").contains("s3cret"));
}

#[test]
fn an_invalid_redis_table_is_not_reported_as_missing() {
    let all = diags(&format!(
        "{OK_LISTENER}[redis]\ntimeout = \"1s\"\n[rate_limits.p]\nkey = \"route\"\nrate = 1\nscope = \"global\"\n"
    ));
    assert!(all.iter().any(|d| d.message.contains("missing")), "{all:?}");
    assert!(!all.iter().any(|d| d.message.contains("no [redis] table")));
}

const OK_ROUTE: &str = "[routes.r]\npath_prefix = \"/\"\nrespond = { body = \"ok\" }\n";
bad!(
    policy_unknown_on_route,
    format!(
        "{OK_LISTENER}[policies.orders]\ndefault = \"allow\"\n{OK_ROUTE}policies = [\"ordres\"]\n"
    ),
    8,
    "unknown policy `ordres`"
);
bad!(
    policy_default,
    format!("{OK_LISTENER}[policies.p]\ndefault = \"maybe\"\n"),
    4,
    "unknown default"
);
bad!(
    policy_mode,
    format!("{OK_LISTENER}[policies.p]\nmode = \"loud\"\n"),
    4,
    "unknown mode"
);
bad!(
    policy_empty_rule,
    format!("{OK_LISTENER}[policies.p]\nallow = [{{}}]\n"),
    4,
    "a rule without conditions"
);
bad!(
    policy_identity_pattern,
    format!("{OK_LISTENER}[policies.p]\nallow = [{{ identity = \"spiffe://*/web\" }}]\n"),
    4,
    "is not an identity pattern"
);
bad!(
    policy_source,
    format!("{OK_LISTENER}[policies.p]\ndeny = [{{ source = [\"10.0.0.0/8\", \"nope\"] }}]\n"),
    4,
    "is not an IP network"
);
bad!(
    policy_rule_unknown_key,
    format!("{OK_LISTENER}[policies.p]\nallow = [{{ path = \"/x\" }}]\n"),
    4,
    "unknown key `path`"
);
bad!(
    policy_identity_type,
    format!("{OK_LISTENER}[policies.p]\nallow = [{{ identity = 3 }}]\n"),
    4,
    "must be a string or a non-empty list"
);
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
    access_log_directory_missing,
    format!("{OK_LISTENER}[telemetry]\naccess_log_file = \"/nonexistent/meshgate/access.log\"\n"),
    4,
    "the directory /nonexistent/meshgate does not exist"
);
/// Two wrong types in one table are both reported, and a route naming an
/// upstream with a wrong type is not also told the upstream is unknown.
#[test]
fn every_type_error_is_reported_and_references_do_not_dangle() {
    let src = format!(
        "[gateway]\nworkers = \"two\"\nshutdown_grace_period = \"5 parsecs\"\n{OK_LISTENER}[upstreams.u2]\nendpoints = [\"127.0.0.1:9\"]\nread_timeout = 5\nconnect_retries = \"x\"\n[routes.a]\nupstream = \"u2\"\n[rate_limits.rl]\nkey = \"client_ip\"\nrate = \"ten\"\nper = \"1s\"\n[routes.b]\npath_prefix = \"/b\"\nupstream = \"u2\"\nrate_limits = [\"rl\"]\n"
    );
    let all = diags(&src);
    let messages: Vec<&str> = all.iter().map(|d| d.message.as_str()).collect();
    let line_of = |needle: &str| {
        let d = all
            .iter()
            .find(|d| d.message.contains(needle))
            .unwrap_or_else(|| panic!("no `{needle}` in {messages:#?}"));
        error::line_col(&src, d.span.clone().unwrap().start).0
    };
    assert_eq!(
        line_of("`workers` must be a whole number, not the string \"two\""),
        2
    );
    assert_eq!(line_of("5 parsecs"), 3);
    assert_eq!(
        line_of("`read_timeout` must be a duration with a unit, in quotes, not the number 5"),
        8
    );
    assert_eq!(
        line_of("`connect_retries` must be a whole number, not the string \"x\""),
        9
    );
    assert_eq!(
        line_of("`rate` must be a whole number, not the string \"ten\""),
        14
    );
    for d in &all {
        assert!(!d.message.contains("unknown"), "{messages:#?}");
        assert!(!d.message.contains("missing"), "{messages:#?}");
    }
}

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
    cert_file_missing,
    format!("{OK_LISTENER}[certs.edge]\ncert = \"/nonexistent/edge.pem\"\nkey = \"/nonexistent/edge.key\"\n"),
    4,
    "cannot read /nonexistent/edge.pem"
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

#[test]
fn policies_parse_with_lists_and_defaults() {
    let cfg = parse(
        Path::new("t.toml"),
        &format!("{OK_LISTENER}[policies.p]\nallow = [{{ identity = [\"spiffe://a/*\", \"*.mesh\"], methods = [\"get\"], path_prefix = \"/o/\", headers = {{ \"x-env\" = \"prod\" }} }}, {{ source = \"10.0.0.0/8\" }}]\ndeny = [{{ source = [\"10.9.0.0/16\", \"192.0.2.1\"] }}]\n{OK_ROUTE}policies = [\"p\"]\n"),
    )
    .unwrap();
    let p = &cfg.policies[0];
    assert!(!p.default_allow);
    assert_eq!(p.mode, model::LimitMode::Enforce);
    assert_eq!(p.allow.len(), 2);
    assert_eq!(p.allow[0].identity.len(), 2);
    assert_eq!(p.allow[0].methods, vec![http::Method::GET]);
    assert_eq!(p.deny[0].source.len(), 2);
    assert_eq!(cfg.routes[0].policies, vec!["p".to_string()]);
}

/// What the fuzz targets (fuzz/) do, briefly and on stable, so CI covers
/// it: mutate the example configs and feed them, and random requests, to
/// validation and route matching. Nothing may panic.
#[test]
fn mutated_configs_and_requests_never_panic() {
    let seeds = [
        include_str!("../../../config/full.toml"),
        include_str!("../../../config/gateway.toml"),
        include_str!("../../../config/compose.toml"),
    ];
    const TOKENS: &[&str] = &[
        "[",
        "]",
        "{",
        "}",
        "=",
        "\"",
        "'",
        ",",
        ".",
        "\n",
        "#",
        "*",
        ":",
        "/",
        " ",
        "0",
        "-1",
        "\\u0000",
        "é",
        "[[",
        "]]",
        "\"\"\"",
        "1e400",
        "true",
        "*.",
        "/*",
        "spiffe://",
    ];
    let mut rng = fastrand::Rng::with_seed(0x6d65_7368);
    for i in 0..1500 {
        let mut text = seeds[i % seeds.len()].to_string();
        for _ in 0..rng.usize(1..6) {
            // Cut at char boundaries only: the text must stay a &str.
            let pos = |rng: &mut fastrand::Rng, t: &str| {
                let mut p = rng.usize(0..=t.len());
                while !t.is_char_boundary(p) {
                    p -= 1;
                }
                p
            };
            let a = pos(&mut rng, &text);
            match rng.u8(0..4) {
                0 => {
                    let b = pos(&mut rng, &text).max(a);
                    text.replace_range(a..b.min(a + 40), "");
                }
                1 => text.insert_str(a, TOKENS[rng.usize(0..TOKENS.len())]),
                2 => {
                    let b = pos(&mut rng, &text).max(a);
                    let piece = text[a..b.min(a + 60)].to_string();
                    text.insert_str(a, &piece);
                }
                _ => text.truncate(a),
            }
        }
        match parse(Path::new("fuzz.toml"), &text) {
            Err(e) => {
                let _ = e.to_string();
            }
            Ok(cfg) => {
                let method = http::Method::GET;
                let headers = http::HeaderMap::new();
                for host in [
                    None,
                    Some("api.example.com"),
                    Some("x.example.com"),
                    Some(""),
                ] {
                    for path in ["/", "/v1/items", "/ping", "//", "/orders/1?x"] {
                        let req = crate::router::RequestParts {
                            host,
                            path,
                            method: &method,
                            headers: &headers,
                        };
                        for l in &cfg.listeners {
                            let table = crate::router::RouteTable::build(&cfg.routes, &l.name);
                            if let Some(r) = table.find(&req) {
                                assert!(cfg.routes[r].listeners.contains(&l.name));
                            }
                        }
                    }
                }
            }
        }
    }
}

bad!(
    path_prefix_not_normal,
    with_route("path_prefix = \"//admin/../x\"\nupstream = \"u\"\n"),
    6,
    "is not in normal form"
);
bad!(
    rule_path_prefix_not_normal,
    format!("{OK_LISTENER}[policies.p]\ndeny = [{{ path_prefix = \"/%61dmin\" }}]\n"),
    4,
    "is not in normal form"
);
bad!(
    rule_empty_headers,
    format!("{OK_LISTENER}[policies.p]\nallow = [{{ headers = {{}} }}]\n"),
    4,
    "a rule without conditions"
);
bad!(
    rule_on_identity_header,
    format!("{OK_LISTENER}[policies.p]\nallow = [{{ headers = {{ \"x-meshgate-peer-identity\" = \"a\" }} }}]\n"),
    4,
    "cannot test x-meshgate-peer-identity"
);
bad!(
    rewrite_identity_header,
    with_route("upstream = \"u\"\nrequest_headers = { set = { \"X-Meshgate-Peer-Identity\" = \"spiffe://x/y\" } }\n"),
    7,
    "x-meshgate-peer-identity cannot be rewritten"
);

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

bad!(
    header_case_unknown,
    format!("[gateway]\nheader_case = \"upper\"\n{OK_LISTENER}"),
    2,
    "unknown gateway.header_case \"upper\""
);

#[test]
fn header_case_is_read() {
    let src = format!("[gateway]\nheader_case = \"lowercase\"\n{OK_LISTENER}");
    let cfg = parse(Path::new("t.toml"), &src).unwrap();
    assert_eq!(cfg.gateway.header_case, model::HeaderCase::Lowercase);
}

bad!(
    work_stealing_not_a_bool,
    format!("[gateway]\nwork_stealing = \"no\"\n{OK_LISTENER}"),
    2,
    "`work_stealing` must be true or false, not the string \"no\""
);

bad!(
    buffer_request_body_over_what_pingora_replays,
    with_route("upstream = \"u\"\nbuffer_request_body = \"1MiB\"\n"),
    7,
    "routes.r.buffer_request_body = \"1MiB\" (1048576 bytes) is over 64 KiB"
);
bad!(
    buffer_request_body_not_a_size,
    with_route("upstream = \"u\"\nbuffer_request_body = \"lots\"\n"),
    7,
    "routes.r.buffer_request_body = \"lots\" is not a size"
);
bad!(
    overload_memory_too_small,
    format!("[gateway]\noverload = {{ memory = \"1MiB\" }}\n{OK_LISTENER}"),
    2,
    "gateway.overload.memory = \"1MiB\" is below 16 MiB"
);
bad!(
    overload_memory_not_a_size,
    format!("[gateway]\noverload = {{ memory = \"2 gigs\" }}\n{OK_LISTENER}"),
    2,
    "gateway.overload.memory = \"2 gigs\" is not a size"
);
bad!(
    pending_head_budget_out_of_range,
    format!("[gateway]\nmax_pending_head_bytes = 100\n{OK_LISTENER}"),
    2,
    "gateway.max_pending_head_bytes = 100 is out of range"
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
fn sizes_are_bytes_or_binary_units() {
    use super::validate::parse_size;
    assert_eq!(parse_size("512"), Some(512));
    assert_eq!(parse_size("64KiB"), Some(65536));
    assert_eq!(parse_size("1 MiB"), Some(1 << 20));
    assert_eq!(parse_size("2GiB"), Some(2 << 30));
    assert_eq!(parse_size("16b"), Some(16));
    assert_eq!(
        parse_size("64KB"),
        None,
        "decimal units are refused, not guessed"
    );
    assert_eq!(parse_size("-1"), None);
    assert_eq!(parse_size("99999999999999999999GiB"), None);
}

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
