//! Reading the document: syntax, sections, keys, types, durations and sizes.

use super::*;

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
    duration_too_long,
    with_route("upstream = \"u\"\ntimeout = \"9999999999999s\"\n"),
    7,
    "is longer than 24h"
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

/// What the fuzz targets (fuzz/) do, briefly and on stable, so CI covers
/// it: mutate the example configs and feed them, and random requests, to
/// validation and route matching. Nothing may panic.
#[test]
fn mutated_configs_and_requests_never_panic() {
    let seeds = [
        include_str!("../../../../../config/full.toml"),
        include_str!("../../../../../config/gateway.toml"),
        include_str!("../../../../../config/compose.toml"),
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

#[test]
fn sizes_are_bytes_or_binary_units() {
    use crate::config::validate::parse_size;
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

bad!(
    env_variable_unset,
    format!("{OK_LISTENER}[routes.r]\npath_prefix = \"/\"\nrespond = {{ body = \"${{MESHGATE_TEST_SURELY_UNSET}}\" }}\n"),
    5,
    "environment variable MESHGATE_TEST_SURELY_UNSET (in `${MESHGATE_TEST_SURELY_UNSET}`) is not set"
);

#[test]
fn env_defaults_fill_in_at_load() {
    let src = format!(
        "[gateway]\nname = \"${{MESHGATE_TEST_SURELY_UNSET:-edge-1}}\"\n{OK_LISTENER}[routes.r]\nrespond = {{ body = \"ok\" }}\n"
    );
    let c = parse(Path::new("t.toml"), &src).expect("valid").config;
    assert_eq!(c.gateway.name, "edge-1");
}
