//! Every end-to-end test, in one binary: the real `meshgate` binary on
//! ephemeral ports against real upstreams, clients, TLS, Redis and
//! Prometheus started by the tests ([`support`]). One binary links once and
//! shares the harness; a module per area.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed run"
)]

mod support;

mod authz;
mod chaos;
mod cli;
mod deploy;
mod egress;
mod endpoints;
mod errors;
mod global_ratelimit;
mod lanes;
mod limits;
mod listeners;
mod metrics;
mod netns_mesh;
mod protocols;
mod ratelimit;
mod retries;
mod routing;
mod smuggling;
mod tls;
mod tls_scan;
mod tracing;
