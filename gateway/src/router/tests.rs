use std::path::Path;

use http::{HeaderMap, HeaderValue, Method};

use super::*;
use crate::config;

const HEAD: &str = r#"
[listeners.public]
bind = "127.0.0.1:18080"
[listeners.internal]
bind = "127.0.0.1:18081"
direction = "mesh"
[upstreams.u]
endpoints = ["127.0.0.1:9"]
"#;

/// Build a table for `listener` from route tables written in TOML.
fn table(routes: &str, listener: &str) -> (RouteTable, Vec<String>) {
    let cfg = config::parse(Path::new("test.toml"), &format!("{HEAD}{routes}"))
        .unwrap_or_else(|e| panic!("{e}"));
    let names = cfg.routes.iter().map(|r| r.name.clone()).collect();
    (RouteTable::build(&cfg.routes, listener), names)
}

struct Req<'a> {
    host: Option<&'a str>,
    path: &'a str,
    method: Method,
    headers: HeaderMap,
}

fn req<'a>(host: Option<&'a str>, path: &'a str) -> Req<'a> {
    Req {
        host,
        path,
        method: Method::GET,
        headers: HeaderMap::new(),
    }
}

fn pick(t: &(RouteTable, Vec<String>), r: &Req<'_>) -> Option<String> {
    let parts = RequestParts {
        host: r.host,
        path: r.path,
        method: &r.method,
        headers: &r.headers,
    };
    t.0.find(&parts).map(|i| t.1[i].clone())
}

#[test]
fn exact_path_beats_prefix_beats_regex_beats_catch_all() {
    let t = table(
        r#"
[routes.all]
upstream = "u"
[routes.re]
path_regex = "^/v[0-9]+/items$"
upstream = "u"
[routes.short]
path_prefix = "/v1/"
upstream = "u"
[routes.long]
path_prefix = "/v1/items"
upstream = "u"
[routes.exact]
path = "/v1/items"
upstream = "u"
"#,
        "public",
    );
    assert_eq!(pick(&t, &req(None, "/v1/items")).as_deref(), Some("exact"));
    assert_eq!(pick(&t, &req(None, "/v1/items/3")).as_deref(), Some("long"));
    assert_eq!(pick(&t, &req(None, "/v1/other")).as_deref(), Some("short"));
    assert_eq!(pick(&t, &req(None, "/v2/items")).as_deref(), Some("re"));
    assert_eq!(pick(&t, &req(None, "/")).as_deref(), Some("all"));
}

#[test]
fn exact_host_beats_wildcard_beats_any_and_falls_through() {
    let t = table(
        r#"
[routes.any]
path_prefix = "/"
upstream = "u"
[routes.wild]
host = "*.example.com"
path_prefix = "/w/"
upstream = "u"
[routes.deeper_wild]
host = "*.api.example.com"
upstream = "u"
[routes.api]
host = "api.example.com"
path_prefix = "/v1/"
upstream = "u"
"#,
        "public",
    );
    assert_eq!(
        pick(&t, &req(Some("api.example.com"), "/v1/x")).as_deref(),
        Some("api")
    );
    // Host matches but path does not: falls through to the wildcard, then any.
    assert_eq!(
        pick(&t, &req(Some("api.example.com"), "/w/x")).as_deref(),
        Some("wild")
    );
    assert_eq!(
        pick(&t, &req(Some("api.example.com"), "/z")).as_deref(),
        Some("any")
    );
    assert_eq!(
        pick(&t, &req(Some("a.b.example.com"), "/w/")).as_deref(),
        Some("wild")
    );
    assert_eq!(
        pick(&t, &req(Some("x.api.example.com"), "/anything")).as_deref(),
        Some("deeper_wild")
    );
    // The wildcard does not match the apex.
    assert_eq!(
        pick(&t, &req(Some("example.com"), "/w/")).as_deref(),
        Some("any")
    );
    assert_eq!(pick(&t, &req(None, "/w/")).as_deref(), Some("any"));
}

#[test]
fn host_only_routes_do_not_match_other_hosts() {
    let t = table(
        r#"
[routes.api]
host = "api.example.com"
upstream = "u"
"#,
        "public",
    );
    assert_eq!(
        pick(&t, &req(Some("api.example.com"), "/")).as_deref(),
        Some("api")
    );
    assert_eq!(pick(&t, &req(Some("www.example.com"), "/")), None);
    assert_eq!(pick(&t, &req(None, "/")), None);
}

/// Routes narrowed by a header, and by two headers and methods.
fn canary_routes() -> (RouteTable, Vec<String>) {
    table(
        r#"
[routes.plain]
path_prefix = "/p/"
upstream = "u"
[routes.canary]
path_prefix = "/p/"
headers = { "x-canary" = "true" }
upstream = "u"
[routes.writes]
path_prefix = "/p/"
methods = ["POST", "put"]
headers = { "x-canary" = "true", "x-team" = "a" }
upstream = "u"
"#,
        "public",
    )
}

#[test]
fn methods_and_headers_narrow_and_rank_first() {
    let t = canary_routes();
    let mut r = req(None, "/p/1");
    assert_eq!(pick(&t, &r).as_deref(), Some("plain"));
    r.headers
        .insert("x-canary", HeaderValue::from_static("true"));
    assert_eq!(pick(&t, &r).as_deref(), Some("canary"));
    r.headers.insert("x-team", HeaderValue::from_static("a"));
    assert_eq!(
        pick(&t, &r).as_deref(),
        Some("canary"),
        "GET is not in writes' methods"
    );
    r.method = Method::PUT;
    assert_eq!(pick(&t, &r).as_deref(), Some("writes"));
    r.headers
        .insert("x-canary", HeaderValue::from_static("TRUE"));
    assert_eq!(
        pick(&t, &r).as_deref(),
        Some("plain"),
        "header values match exactly"
    );
}

#[test]
fn equal_specificity_keeps_file_order() {
    let t = table(
        r#"
[routes.first]
path_prefix = "/a"
headers = { "x-a" = "1" }
upstream = "u"
[routes.second]
path_prefix = "/a"
headers = { "x-b" = "1" }
upstream = "u"
"#,
        "public",
    );
    let mut r = req(None, "/a");
    r.headers.insert("x-a", HeaderValue::from_static("1"));
    r.headers.insert("x-b", HeaderValue::from_static("1"));
    assert_eq!(pick(&t, &r).as_deref(), Some("first"));
}

#[test]
fn routes_are_scoped_to_their_listeners() {
    let routes = r#"
[routes.pub]
listeners = ["public"]
path = "/x"
upstream = "u"
[routes.mesh]
listeners = ["internal"]
path = "/x"
upstream = "u"
[routes.both]
path = "/y"
upstream = "u"
"#;
    let public = table(routes, "public");
    let internal = table(routes, "internal");
    assert_eq!(pick(&public, &req(None, "/x")).as_deref(), Some("pub"));
    assert_eq!(pick(&internal, &req(None, "/x")).as_deref(), Some("mesh"));
    assert_eq!(pick(&internal, &req(None, "/y")).as_deref(), Some("both"));
    assert_eq!(public.0.len(), 2);
    assert!(table(routes, "nope").0.is_empty());
}

#[test]
fn host_normalization() {
    assert_eq!(normalize_host("API.Example.com:8080"), "api.example.com");
    assert_eq!(normalize_host("api.example.com."), "api.example.com");
    assert_eq!(normalize_host("[::1]:8080"), "::1");
    assert_eq!(normalize_host("127.0.0.1"), "127.0.0.1");
    assert!(matches!(normalize_host("plain"), Cow::Borrowed(_)));
}

#[test]
fn paths_are_normalized_like_upstream_servers_read_them() {
    use super::normalize_path as n;
    assert_eq!(n("/a/b"), None);
    assert_eq!(n("/a/b/"), None);
    assert_eq!(n("*"), None);
    assert_eq!(n("/a/./b/../c").as_deref(), Some("/a/c"));
    assert_eq!(n("/orders/../admin").as_deref(), Some("/admin"));
    assert_eq!(n("/../../etc/passwd").as_deref(), Some("/etc/passwd"));
    assert_eq!(n("/%61dmin").as_deref(), Some("/admin"));
    assert_eq!(n("/%2e%2e/admin").as_deref(), Some("/admin"));
    assert_eq!(n("/x/%2E%2E/admin/").as_deref(), Some("/admin/"));
    assert_eq!(n("//admin").as_deref(), Some("/admin"));
    assert_eq!(n("/a//b///c").as_deref(), Some("/a/b/c"));
    assert_eq!(n("/a/b/..").as_deref(), Some("/a/"));
    assert_eq!(n("/.").as_deref(), Some("/"));
    assert_eq!(n("/..").as_deref(), Some("/"));
    // Encoded slashes and other reserved characters stay encoded.
    assert_eq!(n("/orders%2Fadmin"), None);
    assert_eq!(n("/orders%2fadmin").as_deref(), Some("/orders%2Fadmin"));
    assert_eq!(n("/caf%C3%A9"), None);
    // Malformed escapes are left as they are.
    assert_eq!(n("/a%"), None);
    assert_eq!(n("/a%zz"), None);
    assert_eq!(n("/a%+1"), None);
    assert_eq!(n("/a/.hidden"), None);
    assert_eq!(n("/a/..b"), None);
}

/// The fast lane's fields (slices of the read buffer) route as a
/// `HeaderMap` does: the same route for every combination of fields.
#[test]
fn parsed_fields_route_as_a_header_map_does() {
    let t = canary_routes();
    let fields: [&[(&str, &str)]; 6] = [
        &[],
        &[("X-Canary", "true")],
        &[("x-canary", "TRUE")],
        &[("x-team", "a"), ("x-canary", "true")],
        &[("x-canary", "no"), ("x-canary", "true"), ("X-TEAM", "a")],
        &[("x-team", "b"), ("x-canary", "true")],
    ];
    for set in fields {
        let mut map = HeaderMap::new();
        let mut parsed = Vec::new();
        for (name, value) in set {
            map.append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
            parsed.push(httparse::Header {
                name,
                value: value.as_bytes(),
            });
        }
        for method in [Method::GET, Method::PUT] {
            let by = |headers: &dyn FieldView| {
                let parts = RequestParts {
                    host: None,
                    path: "/p/1",
                    method: &method,
                    headers,
                };
                t.0.find(&parts).map(|i| t.1[i].clone())
            };
            assert_eq!(by(&map), by(&ParsedFields(&parsed)), "{method} {set:?}");
        }
    }
}
