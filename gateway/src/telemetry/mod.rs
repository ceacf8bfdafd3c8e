//! What meshgate exports about the traffic it sees: Prometheus metrics
//! ([`metrics`], names in [`names`]) and access logs ([`access_log`]).

pub mod access_log;
pub mod connections;
pub mod metrics;
pub mod names;
