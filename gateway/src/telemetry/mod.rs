//! What meshgate exports about the traffic it sees: Prometheus metrics
//! ([`metrics`], names in [`names`]), access logs ([`access_log`]) and
//! OpenTelemetry traces ([`tracing`]). The
//! process's own log (stderr) is set up in [`process_log`].

pub mod access_log;
pub mod metrics;
pub mod names;
pub mod process_log;
pub mod tracing;
