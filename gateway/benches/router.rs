//! Route lookup cost against the number of routes on a listener: 1, 100,
//! 1,000 and 10,000 routes, each a host + path-prefix pair (10 prefixes per
//! host), looked up for the last route defined, for a path-only route and
//! for a request no route matches.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed run"
)]

use std::hint::black_box;
use std::path::Path;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use http::{HeaderMap, Method};
use meshgate::router::{RequestParts, RouteTable};

fn config(n: usize) -> String {
    let mut text = String::from(
        "[listeners.public]\nbind = \"127.0.0.1:18080\"\n[upstreams.u]\nendpoints = [\"127.0.0.1:9\"]\n",
    );
    for i in 0..n {
        text.push_str(&format!(
            "[routes.r{i}]\nhost = \"svc{}.bench.local\"\npath_prefix = \"/api/{i}/\"\nupstream = \"u\"\n",
            i / 10
        ));
    }
    text.push_str("[routes.health]\npath = \"/healthz\"\nupstream = \"u\"\n");
    text
}

fn lookups(c: &mut Criterion) {
    let headers = HeaderMap::new();
    let method = Method::GET;
    let mut group = c.benchmark_group("route_lookup");
    for n in [1usize, 100, 1_000, 10_000] {
        let cfg = meshgate::config::parse(Path::new("bench.toml"), &config(n))
            .expect("the generated config is valid");
        let table = RouteTable::build(&cfg.routes, "public");
        let last_host = format!("svc{}.bench.local", (n - 1) / 10);
        let last_path = format!("/api/{}/items/7", n - 1);
        let hit = RequestParts {
            host: Some(&last_host),
            path: &last_path,
            method: &method,
            headers: &headers,
        };
        assert!(table.find(&hit).is_some());
        group.bench_with_input(BenchmarkId::new("host_and_prefix", n), &hit, |b, req| {
            b.iter(|| table.find(black_box(req)))
        });
        let health = RequestParts {
            host: Some("unknown.example"),
            path: "/healthz",
            ..hit
        };
        group.bench_with_input(BenchmarkId::new("path_only", n), &health, |b, req| {
            b.iter(|| table.find(black_box(req)))
        });
        let miss = RequestParts {
            host: Some(&last_host),
            path: "/nothing/here",
            ..hit
        };
        group.bench_with_input(BenchmarkId::new("no_match", n), &miss, |b, req| {
            b.iter(|| table.find(black_box(req)))
        });
    }
    group.finish();
}

criterion_group!(benches, lookups);
criterion_main!(benches);
