//! meshgate: an HTTP gateway on Pingora, configured from one TOML file.
//!
//! # Layout
//! In layers, each importing only from its own and those below it
//! (`docs/architecture.md`; `make lint` checks it).
//!
//! - L0 leaf: [`types`] (host, identity and path types), [`http1`] (the
//!   HTTP/1.1 fast lane's framing: heads as slices, their fields as Pingora
//!   writes them, chunked bodies),
//!   [`lifecycle`]
//!   (draining and overload flags), [`deadline`] (one timer for a
//!   connection's waits), `telemetry::{names, metrics}`, and
//!   [`tls`] (certificate chains and keys, peer identities, BoringSSL hooks).
//! - L1 [`config`]: the file. `raw` (serde, the only serde structs) ->
//!   `validate/` (a file per section; every error with file:line:col and a
//!   fix) -> `model` (plain data), with `Material` (what the named files
//!   hold) beside it and endpoint names looked up by `resolve`.
//! - L2 domain: [`router`] (pure route selection for one listener),
//!   [`authz`] (authorization policies), [`ratelimit`] (keyed GCRA
//!   policies, local or in Redis; client IP behind trusted proxies),
//!   [`egress`] (the egress allow list and name resolution),
//!   [`endpoints`] (which endpoint gets each request: outlier ejection,
//!   slow start, load balancing), [`resilience`] (retries: whether, when,
//!   within the upstream's budget),
//!   and [`telemetry`]'s access log and tracing.
//! - L3 [`runtime`]: the compiled config (route tables, upstream pools,
//!   certificate store, limiters) held in an `ArcSwap`; each request takes
//!   one snapshot.
//! - L4 data plane: [`proxy`], the request stages (admission, route, policy,
//!   body, forward, respond, observe) behind a thin `ProxyHttp`
//!   dispatcher; [`lane`], the HTTP/1.1 fast lane, a second driver over
//!   the same stages; [`downstream`], the connection drivers (plain
//!   listeners' accept loop, a listener's slots, TLS, whole request heads
//!   and their memory budget, HTTP/1 keep-alive outside Pingora and its
//!   lingering close, HTTP/2, egress tunnels).
//! - L5 process: [`server`] (assembly), [`listening`] (the listeners as
//!   one service: started, stopped and moved by reloads), [`reload`]
//!   (SIGHUP: load off the workers, swap the runtime whole or keep the old
//!   one), [`admin`]
//!   (`/healthz`, `/readyz`, `/config`, `/upstreams`, `/metrics`) and [`admin_client`]
//!   (`meshgate health`), [`shutdown`] (signals, SIGTERM's drain),
//!   [`background`] (key eviction, certificate watch, overload, endpoints),
//!   [`notify`] (systemd's READY/RELOADING/STOPPING/WATCHDOG), [`upgrade`]
//!   (a binary upgrade the process starts itself), [`demo`]
//!   (the echo upstream of `make run`).

pub mod admin;
pub mod admin_client;
pub mod authz;
pub mod background;
pub mod config;
pub mod deadline;
pub mod demo;
pub mod downstream;
pub mod egress;
pub mod endpoints;
pub mod http1;
pub mod lane;
pub mod lifecycle;
pub mod listening;
pub mod notify;
pub mod proxy;
pub mod ratelimit;
pub mod reload;
pub mod resilience;
pub mod router;
pub mod runtime;
pub mod server;
pub mod shutdown;
pub mod telemetry;
pub mod tls;
pub mod types;
pub mod upgrade;

/// Exit status for an invalid config or command line (sysexits EX_USAGE).
pub const EXIT_CONFIG: i32 = 64;
