//! `[routes.NAME]`.

use super::*;

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
fn same_conditions_on_different_listeners_are_fine() {
    let src = format!(
        "{OK_LISTENER}[listeners.b]\nbind = \"127.0.0.1:18081\"\n{OK_UPSTREAM}[routes.a]\nlisteners = [\"public\"]\npath = \"/x\"\nupstream = \"u\"\n[routes.c]\nlisteners = [\"b\"]\npath = \"/x\"\nupstream = \"u\"\n"
    );
    parse(Path::new("t.toml"), &src).unwrap();
}

bad!(
    path_prefix_not_normal,
    with_route("path_prefix = \"//admin/../x\"\nupstream = \"u\"\n"),
    6,
    "is not in normal form"
);

bad!(
    rewrite_identity_header,
    with_route("upstream = \"u\"\nrequest_headers = { set = { \"X-Meshgate-Peer-Identity\" = \"spiffe://x/y\" } }\n"),
    7,
    "x-meshgate-peer-identity cannot be rewritten"
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

fn forward_route(extra: &str) -> String {
    with_route(&format!("path_prefix = \"/\"\nupstream = \"u\"\n{extra}"))
}

bad!(
    retries_attempts_zero,
    forward_route("retries = { attempts = 0 }\n"),
    8,
    "routes.r.retries.attempts = 0 is out of range"
);

bad!(
    retries_unknown_condition,
    forward_route("retries = { on = [\"reset\", \"404\"] }\n"),
    8,
    "routes.r.retries.on has \"404\", which meshgate does not retry on"
);

bad!(
    retries_per_try_not_below_timeout,
    forward_route("timeout = \"1s\"\nretries = { per_try_timeout = \"2s\" }\n"),
    9,
    "routes.r.retries.per_try_timeout (2s) is not shorter than the route's timeout (1s)"
);

bad!(
    retries_body_limit_over_replay,
    forward_route("retries = { body_limit = \"1MiB\" }\n"),
    8,
    "routes.r.retries.body_limit = \"1MiB\" is over 64 KiB"
);

bad!(
    retries_max_backoff_below_backoff,
    forward_route("retries = { backoff = \"1s\", max_backoff = \"10ms\" }\n"),
    8,
    "routes.r.retries.max_backoff is shorter than backoff"
);

bad!(
    retries_wrong_type,
    forward_route("retries = 3\n"),
    8,
    "retries"
);

#[test]
fn retries_default_off_and_set() {
    use crate::config::model::RetryPolicy;
    use std::time::Duration;
    let route = |extra: &str| {
        parse(Path::new("t.toml"), &forward_route(extra))
            .expect("valid")
            .config
            .routes[0]
            .retries
            .clone()
    };
    assert_eq!(route(""), Some(RetryPolicy::default()));
    assert_eq!(route("retries = false\n"), None);
    let p = route("retries = { attempts = 3, on = [\"5xx\", \"timeout\"], per_try_timeout = \"300ms\", methods = [\"GET\", \"POST\"] }\n")
        .expect("on");
    assert_eq!(p.attempts, 3);
    assert!(p.on.timeout && !p.on.reset && !p.on.connect_failure);
    assert_eq!(p.on.statuses.len(), 100);
    assert_eq!(p.per_try_timeout, Some(Duration::from_millis(300)));
    assert_eq!(p.methods, vec![http::Method::GET, http::Method::POST]);
}

bad!(
    hedge_without_after,
    forward_route("hedge = { max = 1 }\n"),
    8,
    "routes.r.hedge has no `after`"
);

bad!(
    hedge_on_post,
    forward_route("methods = [\"GET\", \"POST\"]\nhedge = { after = \"100ms\" }\n"),
    9,
    "routes.r.hedge on a route whose methods include POST"
);

bad!(
    hedge_not_before_per_try_timeout,
    forward_route("retries = { per_try_timeout = \"100ms\" }\nhedge = { after = \"150ms\" }\n"),
    9,
    "routes.r.hedge.after (150ms) is not shorter than retries.per_try_timeout (100ms)"
);

bad!(
    hedge_max_zero,
    forward_route("hedge = { after = \"100ms\", max = 0 }\n"),
    8,
    "routes.r.hedge.max = 0 is out of range"
);

bad!(
    hedge_to_an_h2_upstream,
    format!(
        "{}[upstreams.g]\nendpoints = [\"127.0.0.1:9000\"]\nprotocol = \"h2c\"\n[routes.r]\npath_prefix = \"/\"\nupstream = \"g\"\nhedge = {{ after = \"100ms\" }}\n",
        super::OK_LISTENER
    ),
    9,
    "routes.r.hedge: upstream `g` speaks HTTP/2, and hedging is for HTTP/1.1 upstreams"
);

#[test]
fn hedge_is_off_by_default_and_max_defaults_to_one() {
    use crate::config::model::HedgePolicy;
    use std::time::Duration;
    let route = |extra: &str| {
        parse(Path::new("t.toml"), &forward_route(extra))
            .expect("valid")
            .config
            .routes[0]
            .hedge
    };
    assert_eq!(route(""), None);
    assert_eq!(
        route("hedge = { after = \"150ms\" }\n"),
        Some(HedgePolicy {
            after: Duration::from_millis(150),
            max: 1
        })
    );
}
