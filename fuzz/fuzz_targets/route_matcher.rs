//! A fuzzed config (before the first NUL byte) and a fuzzed request (after
//! it: "METHOD HOST PATH", then header lines): building route tables and
//! matching must never panic, and a match must name a route of the table's
//! listener.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshgate::router::{RequestParts, RouteTable};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (config, request) = text.split_once('\0').unwrap_or((text, "GET example.com /"));
    let Ok(config) = meshgate::config::parse(std::path::Path::new("fuzz.toml"), config) else {
        return;
    };
    let mut lines = request.lines();
    let mut first = lines.next().unwrap_or("").splitn(3, ' ');
    let method = http::Method::from_bytes(first.next().unwrap_or("GET").as_bytes())
        .unwrap_or(http::Method::GET);
    let host = first.next().map(meshgate::router::normalize_host);
    let path = first.next().unwrap_or("/");
    let mut headers = http::HeaderMap::new();
    for line in lines {
        if let Some((k, v)) = line.split_once(':') {
            if let (Ok(k), Ok(v)) = (
                http::HeaderName::from_bytes(k.trim().as_bytes()),
                http::HeaderValue::from_str(v.trim()),
            ) {
                headers.append(k, v);
            }
        }
    }
    let req = RequestParts {
        host: host.as_deref(),
        path,
        method: &method,
        headers: &headers,
    };
    for l in &config.listeners {
        let table = RouteTable::build(&config.routes, &l.name);
        if let Some(i) = table.find(&req) {
            assert!(config.routes[i].listeners.contains(&l.name));
        }
    }
});
