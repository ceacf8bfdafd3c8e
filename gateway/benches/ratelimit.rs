//! Local rate-limit decision cost: one hot key, keys spread over 10,000
//! clients, and the whole per-request check (key extraction, decision,
//! `RateLimit` header values) as the proxy runs it.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed run"
)]

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use meshgate::ratelimit::limiter::KeyedLimiter;
use meshgate::ratelimit::{self, KeyInputs, Policy};

fn limiter(c: &mut Criterion) {
    let mut group = c.benchmark_group("rate_limit");
    let hot = KeyedLimiter::new(100_000_000, Duration::from_secs(1), 100_000_000, 100_000)
        .expect("valid limiter");
    group.bench_function("one_key", |b| b.iter(|| hot.check(black_box("10.0.0.1"))));

    let spread = KeyedLimiter::new(100_000_000, Duration::from_secs(1), 100_000_000, 100_000)
        .expect("valid limiter");
    let keys: Vec<String> = (0..10_000u32)
        .map(|i| Ipv4Addr::from(0x0a00_0000 + i).to_string())
        .collect();
    let mut i = 0;
    group.bench_function("10k_keys", |b| {
        b.iter(|| {
            i = (i + 1) % keys.len();
            spread.check(black_box(&keys[i]))
        })
    });

    let cfg = meshgate::config::parse(
        Path::new("bench.toml"),
        "[listeners.public]\nbind = \"127.0.0.1:18080\"\n[rate_limits.per_client]\nkey = \"client_ip\"\nrate = 100000000\nheaders_on_allowed = true\n",
    )
    .expect("valid config");
    let policies = vec![Policy::build(&cfg.rate_limits[0]).expect("a local policy")];
    let headers = http::HeaderMap::new();
    let inputs = KeyInputs {
        client_ip: Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))),
        headers: &headers,
        route: "api",
        identity: None,
    };
    group.bench_function("request_check_with_headers", |b| {
        b.iter(|| futures_executor::block_on(ratelimit::check(&policies, black_box(&inputs), None)))
    });
    group.finish();
}

criterion_group!(benches, limiter);
criterion_main!(benches);
