//! Every metric name and label meshgate exports, in one place. Documented in
//! docs/metrics.md; the Grafana dashboards are checked against the scraped
//! output, so a rename here must be made there too.

pub const DOWNSTREAM_REQUESTS_TOTAL: &str = "meshgate_downstream_requests_total";
pub const DOWNSTREAM_REQUEST_DURATION_SECONDS: &str =
    "meshgate_downstream_request_duration_seconds";
pub const DOWNSTREAM_REQUEST_BYTES_TOTAL: &str = "meshgate_downstream_request_bytes_total";
pub const DOWNSTREAM_RESPONSE_BYTES_TOTAL: &str = "meshgate_downstream_response_bytes_total";
pub const DOWNSTREAM_REQUESTS_IN_FLIGHT: &str = "meshgate_downstream_requests_in_flight";
pub const DOWNSTREAM_CONNECTIONS_ACTIVE: &str = "meshgate_downstream_connections_active";
pub const NO_ROUTE_TOTAL: &str = "meshgate_no_route_total";
pub const DOWNSTREAM_REJECTED_TOTAL: &str = "meshgate_downstream_rejected_total";
pub const DOWNSTREAM_GOAWAYS_TOTAL: &str = "meshgate_downstream_goaways_total";
pub const DOWNSTREAM_CLIENT_RESETS_TOTAL: &str = "meshgate_downstream_client_resets_total";
pub const DOWNSTREAM_CONNECTIONS_EVICTED_TOTAL: &str =
    "meshgate_downstream_connections_evicted_total";
pub const OVERLOAD_ACTIVE: &str = "meshgate_overload_active";
pub const OVERLOAD_SHED_TOTAL: &str = "meshgate_overload_shed_total";
pub const HTTP1_LANE_REQUESTS_TOTAL: &str = "meshgate_http1_lane_requests_total";

pub const UPSTREAM_REQUESTS_TOTAL: &str = "meshgate_upstream_requests_total";
pub const UPSTREAM_REQUEST_DURATION_SECONDS: &str = "meshgate_upstream_request_duration_seconds";
pub const UPSTREAM_CONNECT_DURATION_SECONDS: &str = "meshgate_upstream_connect_duration_seconds";
pub const UPSTREAM_CONNECTIONS_TOTAL: &str = "meshgate_upstream_connections_total";
pub const UPSTREAM_ERRORS_TOTAL: &str = "meshgate_upstream_errors_total";
pub const UPSTREAM_RETRIES_TOTAL: &str = "meshgate_upstream_retries_total";
pub const UPSTREAM_RETRY_BUDGET_EXHAUSTED_TOTAL: &str =
    "meshgate_upstream_retry_budget_exhausted_total";
pub const UPSTREAM_OVERFLOW_TOTAL: &str = "meshgate_upstream_overflow_total";
pub const UPSTREAM_HEDGES_TOTAL: &str = "meshgate_upstream_hedges_total";
pub const UPSTREAM_PENDING: &str = "meshgate_upstream_pending";
pub const UPSTREAM_CONCURRENCY_LIMIT: &str = "meshgate_upstream_concurrency_limit";
pub const UPSTREAM_EJECTIONS_TOTAL: &str = "meshgate_upstream_ejections_total";
pub const UPSTREAM_ENDPOINTS: &str = "meshgate_upstream_endpoints";
pub const UPSTREAM_HEALTH_CHECKS_TOTAL: &str = "meshgate_upstream_health_checks_total";
pub const DISCOVERY_REFRESHES_TOTAL: &str = "meshgate_discovery_refreshes_total";

pub const RATE_LIMIT_DECISIONS_TOTAL: &str = "meshgate_rate_limit_decisions_total";
pub const RATE_LIMIT_KEYS: &str = "meshgate_rate_limit_keys";
pub const RATE_LIMIT_BACKEND_DURATION_SECONDS: &str =
    "meshgate_rate_limit_backend_duration_seconds";
pub const RATE_LIMIT_BACKEND_ERRORS_TOTAL: &str = "meshgate_rate_limit_backend_errors_total";

pub const AUTHZ_DECISIONS_TOTAL: &str = "meshgate_authz_decisions_total";

pub const EGRESS_DECISIONS_TOTAL: &str = "meshgate_egress_decisions_total";
pub const EGRESS_TUNNELS_ACTIVE: &str = "meshgate_egress_tunnels_active";
pub const EGRESS_TUNNEL_BYTES_TOTAL: &str = "meshgate_egress_tunnel_bytes_total";

pub const TLS_CERT_EXPIRY_TIMESTAMP_SECONDS: &str = "meshgate_tls_cert_expiry_timestamp_seconds";
pub const TLS_CERT_RELOADS_TOTAL: &str = "meshgate_tls_cert_reloads_total";
pub const TLS_HANDSHAKE_ERRORS_TOTAL: &str = "meshgate_tls_handshake_errors_total";

pub const CONFIG_GENERATION: &str = "meshgate_config_generation";
pub const CONFIG_LAST_LOAD_TIMESTAMP_SECONDS: &str = "meshgate_config_last_load_timestamp_seconds";
pub const CONFIG_RELOADS_TOTAL: &str = "meshgate_config_reloads_total";
pub const TRACE_SPANS_EXPORTED_TOTAL: &str = "meshgate_trace_spans_exported_total";
pub const TRACE_SPANS_DROPPED_TOTAL: &str = "meshgate_trace_spans_dropped_total";
pub const TRACE_EXPORT_ERRORS_TOTAL: &str = "meshgate_trace_export_errors_total";
pub const ACCESS_LOG_DROPPED_TOTAL: &str = "meshgate_access_log_dropped_total";
pub const BUILD_INFO: &str = "meshgate_build_info";

/// The `upstream` label of plain-HTTP egress requests (no `[upstreams]`).
pub const EGRESS_UPSTREAM: &str = "(egress)";
/// The `limit` label values of `meshgate_upstream_overflow_total`.
pub const OVERFLOW_LIMITS: [&str; 4] = [
    "max_requests",
    "max_pending",
    "concurrency",
    "max_connections",
];
/// The `state` label values of `meshgate_upstream_endpoints`.
pub const ENDPOINT_STATES: [&str; 4] = ["healthy", "ejected", "slow_start", "unhealthy"];
/// The `kind` label values of `meshgate_rate_limit_backend_errors_total`.
pub const RATE_LIMIT_BACKEND_ERROR_KINDS: [&str; 3] = ["timeout", "unavailable", "error"];

/// Label names.
pub mod label {
    pub const LISTENER: &str = "listener";
    pub const DIRECTION: &str = "direction";
    pub const ROUTE: &str = "route";
    pub const UPSTREAM: &str = "upstream";
    pub const METHOD: &str = "method";
    pub const STATUS_CLASS: &str = "status_class";
    pub const KIND: &str = "kind";
    pub const REUSED: &str = "reused";
    pub const RESULT: &str = "result";
    pub const STATE: &str = "state";
    pub const LIMIT: &str = "limit";
    pub const VERSION: &str = "version";
    pub const CONFIG_HASH: &str = "config_hash";
    pub const POLICY: &str = "policy";
    pub const OUTCOME: &str = "outcome";
    pub const CERT: &str = "cert";
    pub const REASON: &str = "reason";
    pub const MODE: &str = "mode";
    pub const DESTINATION: &str = "destination";
    pub const WON: &str = "won";
    pub const DRIVER: &str = "driver";
}

/// Distinct `destination` label values kept before new ones read `other`:
/// the destinations are whatever applications ask for, so they are capped.
pub const MAX_DESTINATIONS: usize = 1000;
pub const OTHER_DESTINATION: &str = "other";

/// Histogram buckets for a proxy: 100µs to 30s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

/// The label value for "no route matched".
pub const NO_ROUTE: &str = "";

/// Values of the method label: the standard methods, everything else `other`.
pub const METHOD_CLASSES: [&str; 10] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE", "other",
];

/// Index into [`METHOD_CLASSES`].
pub fn method_index(m: &http::Method) -> usize {
    match *m {
        http::Method::GET => 0,
        http::Method::HEAD => 1,
        http::Method::POST => 2,
        http::Method::PUT => 3,
        http::Method::DELETE => 4,
        http::Method::PATCH => 5,
        http::Method::OPTIONS => 6,
        http::Method::CONNECT => 7,
        http::Method::TRACE => 8,
        _ => 9,
    }
}

/// Values of the status label: `1xx`..`5xx`; `none` when no response was
/// sent (the client went away).
pub const STATUS_CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "none"];

/// Index into [`STATUS_CLASSES`].
pub fn status_index(status: u16) -> usize {
    match status {
        100..=599 => usize::from(status / 100) - 1,
        _ => 5,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_and_method_classes() {
        for (status, class) in [
            (0, "none"),
            (99, "none"),
            (100, "1xx"),
            (204, "2xx"),
            (399, "3xx"),
            (404, "4xx"),
            (599, "5xx"),
            (600, "none"),
        ] {
            assert_eq!(STATUS_CLASSES[status_index(status)], class, "{status}");
        }
        assert_eq!(METHOD_CLASSES[method_index(&http::Method::GET)], "GET");
        assert_eq!(METHOD_CLASSES[method_index(&http::Method::TRACE)], "TRACE");
        assert_eq!(
            METHOD_CLASSES[method_index(&http::Method::from_bytes(b"PURGE").unwrap())],
            "other"
        );
    }

    /// docs/metrics.md says it lists every name: each one defined here has
    /// a row there.
    #[test]
    fn every_metric_name_is_documented() {
        let docs = include_str!("../../../docs/metrics.md");
        let source = include_str!("names.rs");
        let names: Vec<&str> = source
            .split('"')
            .filter(|s| {
                s.len() > "meshgate_".len() && s.starts_with("meshgate_") && !s.contains(' ')
            })
            .collect();
        assert!(names.len() > 30, "{names:?}");
        for name in names {
            assert!(
                docs.contains(&format!("| `{name}` |")),
                "{name} has no row in docs/metrics.md"
            );
        }
    }
}
