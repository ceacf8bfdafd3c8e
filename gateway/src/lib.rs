//! meshgate: an HTTP gateway on Pingora, configured from one TOML file.
//!
//! # Layout
//! - [`config`]: the file. `raw` (serde, the only serde structs) -> `validate`
//!   (collects every error with file:line:col and a fix) -> `model` (plain data).
//! - [`router`]: pure route selection for one listener (`RouteTable`).
//! - [`upstream`]: upstream pools: weighted endpoint choice and pre-built peers.
//! - [`ratelimit`]: keyed GCRA policies (governor, or Redis for global ones),
//!   client IP behind trusted proxies, `RateLimit` headers.
//! - [`authz`]: authorization policies (identity, source, method, path,
//!   header rules; deny wins), evaluated per route.
//! - [`egress`]: the egress allowlist: host patterns, name resolution with
//!   pins and denied networks, CONNECT and SNI-passthrough tunnels at L4.
//! - [`tls`]: certificates (`[certs]`, watched for changes), TLS termination
//!   with SNI and client certificates, peer identities and their patterns.
//! - [`runtime`]: the compiled config (routes, tables, pools) held in an
//!   `ArcSwap`; each request takes one snapshot.
//! - [`proxy`]: the `ProxyHttp` implementation, a thin dispatcher over the
//!   modules above; `headers` (forwarding policy), `respond` (errors, direct
//!   responses) and `framing` (bodies for HTTP/1.0 clients) live beside it.
//! - [`telemetry`]: Prometheus metrics (names in one module) and access logs.
//! - [`admin`]: the admin listener (`/healthz`, `/readyz`, `/config`, `/metrics`);
//!   [`admin_client`] is the command line's side of it (`meshgate health`).
//! - [`reload`]: SIGHUP reload: validate, then swap the runtime whole or keep the old one.
//! - [`server`]: builds the pingora `Server` and runs it; [`keepalive`] is its
//!   HTTP/1 loop, where idle connections wait for requests outside Pingora.
//! - [`shutdown`]: the signals that stop the process; SIGTERM's
//!   `shutdown_delay`, when `/readyz` fails while listeners still accept.
//! - [`downstream`]: client connections before the proxy: whole request heads
//!   within their limits, and the memory budget of unfinished ones.
//! - [`demo`]: the bundled echo upstream used by `make run`.

pub mod admin;
pub mod admin_client;
pub mod authz;
pub mod background;
pub mod config;
pub mod demo;
pub mod downstream;
pub mod egress;
pub mod lifecycle;
pub mod proxy;
pub mod ratelimit;
pub mod reload;
pub mod router;
pub mod runtime;
pub mod server;
pub mod shutdown;
pub mod telemetry;
pub mod tls;
pub mod types;

/// Exit status for an invalid config or command line (sysexits EX_USAGE).
pub const EXIT_CONFIG: i32 = 64;
