//! What meshgate exports about the traffic it sees: Prometheus metrics
//! ([`metrics`], names in [`names`]), access logs ([`access_log`]) and
//! OpenTelemetry traces ([`tracing`]).

pub mod access_log;
pub mod connections;
pub mod metrics;
pub mod names;
pub mod tracing;
