//! The Prometheus registry and every metric family, created once per process.
//! Label values come from config ids and small fixed sets only, so the number
//! of series is bounded by the config.

use std::sync::OnceLock;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use super::names::{self, label::*};

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub request_bytes: IntCounterVec,
    pub response_bytes: IntCounterVec,
    pub in_flight: IntGaugeVec,
    pub connections_active: IntGaugeVec,
    pub no_route: IntCounterVec,
    pub rejected: IntCounterVec,
    pub goaways: IntCounterVec,
    pub client_resets: IntCounterVec,
    pub connections_evicted: IntCounterVec,
    pub overload_active: IntGauge,
    pub overload_shed: IntCounterVec,
    pub http1_lane: IntCounterVec,
    pub upstream_requests: IntCounterVec,
    pub upstream_duration: HistogramVec,
    pub upstream_connect_duration: HistogramVec,
    pub upstream_connections: IntCounterVec,
    pub upstream_errors: IntCounterVec,
    pub upstream_retries: IntCounterVec,
    pub upstream_ejections: IntCounterVec,
    pub upstream_budget_exhausted: IntCounterVec,
    pub upstream_overflow: IntCounterVec,
    pub upstream_hedges: IntCounterVec,
    pub upstream_pending: IntGaugeVec,
    pub upstream_concurrency_limit: IntGaugeVec,
    pub upstream_endpoints: IntGaugeVec,
    pub upstream_health_checks: IntCounterVec,
    pub discovery_refreshes: IntCounterVec,
    pub rate_limit_decisions: IntCounterVec,
    pub rate_limit_keys: IntGaugeVec,
    pub rate_limit_backend_duration: Histogram,
    pub rate_limit_backend_errors: IntCounterVec,
    pub authz_decisions: IntCounterVec,
    pub egress_decisions: IntCounterVec,
    pub egress_tunnels_active: IntGaugeVec,
    pub egress_tunnel_bytes: IntCounterVec,
    pub tls_cert_expiry: IntGaugeVec,
    pub tls_cert_reloads: IntCounterVec,
    pub tls_handshake_errors: IntCounterVec,
    pub config_generation: IntGauge,
    pub config_last_load: IntGauge,
    pub config_reloads: IntCounterVec,
    pub access_log_dropped: IntCounter,
    pub trace_spans_exported: IntCounter,
    pub trace_spans_dropped: IntCounter,
    pub trace_export_errors: IntCounter,
    pub build_info: IntGaugeVec,
}

#[allow(
    clippy::expect_used,
    reason = "definitions and names are constants, checked by every test that starts a gateway"
)]
fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("metric definition is valid");
    r.register(Box::new(c.clone()))
        .expect("metric names are unique");
    c
}

#[allow(
    clippy::expect_used,
    reason = "definitions and names are constants, checked by every test that starts a gateway"
)]
fn gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("metric definition is valid");
    r.register(Box::new(g.clone()))
        .expect("metric names are unique");
    g
}

#[allow(
    clippy::expect_used,
    reason = "definitions and names are constants, checked by every test that starts a gateway"
)]
fn histogram(r: &Registry, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    let opts = HistogramOpts::new(name, help).buckets(names::LATENCY_BUCKETS.to_vec());
    let h = HistogramVec::new(opts, labels).expect("metric definition is valid");
    r.register(Box::new(h.clone()))
        .expect("metric names are unique");
    h
}

impl Metrics {
    #[allow(
        clippy::expect_used,
        reason = "definitions and names are constants, checked by every test that starts a gateway"
    )]
    fn new() -> Self {
        let r = Registry::new();
        let scalar_gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("metric definition is valid");
            r.register(Box::new(g.clone()))
                .expect("metric names are unique");
            g
        };
        let scalar_counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("metric definition is valid");
            r.register(Box::new(c.clone()))
                .expect("metric names are unique");
            c
        };
        let access_log_dropped = scalar_counter(
            names::ACCESS_LOG_DROPPED_TOTAL,
            "Access log lines dropped because the writer could not keep up.",
        );
        Metrics {
            requests: counter(&r, names::DOWNSTREAM_REQUESTS_TOTAL, "Requests received, by listener, route, method and response status class.", &[LISTENER, ROUTE, METHOD, STATUS_CLASS]),
            request_duration: histogram(&r, names::DOWNSTREAM_REQUEST_DURATION_SECONDS, "Time from request arrival to the last response byte sent.", &[LISTENER, ROUTE, STATUS_CLASS]),
            request_bytes: counter(&r, names::DOWNSTREAM_REQUEST_BYTES_TOTAL, "Request body bytes received from clients.", &[LISTENER, ROUTE]),
            response_bytes: counter(&r, names::DOWNSTREAM_RESPONSE_BYTES_TOTAL, "Response body bytes sent to clients.", &[LISTENER, ROUTE]),
            in_flight: gauge(&r, names::DOWNSTREAM_REQUESTS_IN_FLIGHT, "Requests being served now.", &[LISTENER]),
            connections_active: gauge(&r, names::DOWNSTREAM_CONNECTIONS_ACTIVE, "Open client connections.", &[LISTENER, DIRECTION]),
            rejected: counter(&r, names::DOWNSTREAM_REJECTED_TOTAL, "Requests and connections refused by a listener or route limit, by reason: header_bytes, header_count, uri_length, body_size, connection_limit, header_timeout, head_budget, body_timeout, malformed.", &[LISTENER, REASON]),
            goaways: counter(&r, names::DOWNSTREAM_GOAWAYS_TOTAL, "GOAWAY frames sent to HTTP/2 clients, by reason: idle, max_requests, reset_flood, frame_flood, malformed, shutdown.", &[LISTENER, REASON]),
            client_resets: counter(&r, names::DOWNSTREAM_CLIENT_RESETS_TOTAL, "HTTP/2 streams the client cancelled (RST_STREAM) before their response was complete.", &[LISTENER]),
            connections_evicted: counter(&r, names::DOWNSTREAM_CONNECTIONS_EVICTED_TOTAL, "Connections waiting for a request closed to make room for a new one on a full listener (max_connections).", &[LISTENER]),
            overload_active: scalar_gauge(names::OVERLOAD_ACTIVE, "1 while resident memory is over gateway.overload.memory and load is shed, else 0."),
            overload_shed: counter(&r, names::OVERLOAD_SHED_TOTAL, "Connections refused and requests answered 503 while overloaded, by kind (connection, request).", &[KIND]),
            http1_lane: counter(&r, names::HTTP1_LANE_REQUESTS_TOTAL, "With gateway.http1_engine = \"fast\" (the default): HTTP/1.1 request heads the fast lane served (driver `fast`) or handed to Pingora's driver (driver `pingora`, with why).", &[DRIVER, REASON]),
            no_route: counter(&r, names::NO_ROUTE_TOTAL, "Requests no route matched (answered 404).", &[LISTENER]),
            upstream_requests: counter(&r, names::UPSTREAM_REQUESTS_TOTAL, "Requests forwarded to an upstream, by upstream response status class (`none`: no response).", &[UPSTREAM, STATUS_CLASS]),
            upstream_duration: histogram(&r, names::UPSTREAM_REQUEST_DURATION_SECONDS, "Time from choosing an endpoint to the end of the upstream response, retries included.", &[UPSTREAM]),
            upstream_connect_duration: histogram(&r, names::UPSTREAM_CONNECT_DURATION_SECONDS, "Time to open a new upstream connection.", &[UPSTREAM]),
            upstream_connections: counter(&r, names::UPSTREAM_CONNECTIONS_TOTAL, "Upstream connections used per request: reused from the pool or newly opened.", &[UPSTREAM, REUSED]),
            upstream_errors: counter(&r, names::UPSTREAM_ERRORS_TOTAL, "Upstream failures by kind: connect, timeout, reset, tls, protocol, other.", &[UPSTREAM, KIND]),
            upstream_retries: counter(&r, names::UPSTREAM_RETRIES_TOTAL, "Attempts after a request's first, by why the one before failed: connect_failure, reset, timeout, a status (500, 502, 503, 504, 5xx), or stale_connection (a pooled connection the endpoint had closed).", &[UPSTREAM, REASON]),
            upstream_overflow: counter(&r, names::UPSTREAM_OVERFLOW_TOTAL, "Requests refused with 503 upstream_overloaded by an upstream's limits: max_requests or max_connections (waited queue_timeout in vain) or max_pending (the line was full); or by its adaptive limit: concurrency.", &[UPSTREAM, LIMIT]),
            upstream_concurrency_limit: gauge(&r, names::UPSTREAM_CONCURRENCY_LIMIT, "The in-flight limit of an upstream with concurrency = \"adaptive\", counted at each scrape.", &[UPSTREAM]),
            upstream_pending: gauge(&r, names::UPSTREAM_PENDING, "Requests waiting for one of an upstream's max_requests, counted at each scrape.", &[UPSTREAM]),
            upstream_hedges: counter(&r, names::UPSTREAM_HEDGES_TOTAL, "Hedges sent (a route's `hedge`: the request also went to another endpoint when the first had no response head in time), by whether the hedge's response was the one the client got (won=true) or not.", &[UPSTREAM, WON]),
            upstream_budget_exhausted: counter(&r, names::UPSTREAM_RETRY_BUDGET_EXHAUSTED_TOTAL, "Failed attempts that retries would have tried again, but the upstream's retry_budget was spent: the failure went to the client.", &[UPSTREAM]),
            upstream_ejections: counter(&r, names::UPSTREAM_EJECTIONS_TOTAL, "Endpoints ejected by outlier detection after failing again and again.", &[UPSTREAM]),
            upstream_endpoints: gauge(&r, names::UPSTREAM_ENDPOINTS, "Endpoints of each upstream by state: healthy, ejected (outlier detection), slow_start, unhealthy (health checks).", &[UPSTREAM, STATE]),
            upstream_health_checks: counter(&r, names::UPSTREAM_HEALTH_CHECKS_TOTAL, "Active health checks by result (success, failure).", &[UPSTREAM, RESULT]),
            discovery_refreshes: counter(&r, names::DISCOVERY_REFRESHES_TOTAL, "DNS and SRV discovery refreshes by result (success; failure: a name failed or had no address, and kept its last endpoints).", &[UPSTREAM, RESULT]),
            rate_limit_decisions: counter(&r, names::RATE_LIMIT_DECISIONS_TOTAL, "Rate-limit decisions by policy and outcome (allowed, limited, shadow_limited, backend_error).", &[POLICY, OUTCOME]),
            rate_limit_keys: gauge(&r, names::RATE_LIMIT_KEYS, "Keys a policy tracks now (idle keys are evicted every 10s); for a global policy, keys with a cached decision.", &[POLICY]),
            rate_limit_backend_duration: histogram(&r, names::RATE_LIMIT_BACKEND_DURATION_SECONDS, "Time of each answered Redis call made for global rate limits.", &[]).with_label_values(&[] as &[&str]),
            rate_limit_backend_errors: counter(&r, names::RATE_LIMIT_BACKEND_ERRORS_TOTAL, "Redis calls for global rate limits that failed, by kind: timeout, unavailable (skipped while Redis keeps failing), error.", &[KIND]),
            authz_decisions: counter(&r, names::AUTHZ_DECISIONS_TOTAL, "Authorization decisions by policy and outcome (allowed, denied, shadow_denied).", &[POLICY, OUTCOME]),
            egress_decisions: counter(&r, names::EGRESS_DECISIONS_TOTAL, "Egress destinations asked for on egress listeners, by mode (http, connect, sni), destination (host:port; capped, then `other`), outcome (allowed, denied) and reason.", &[LISTENER, MODE, DESTINATION, OUTCOME, REASON]),
            egress_tunnels_active: gauge(&r, names::EGRESS_TUNNELS_ACTIVE, "Egress tunnels (CONNECT and SNI passthrough) open now.", &[LISTENER, MODE]),
            egress_tunnel_bytes: counter(&r, names::EGRESS_TUNNEL_BYTES_TOTAL, "Bytes relayed through egress tunnels, by direction (sent: to the destination; received: from it).", &[LISTENER, MODE, DIRECTION]),
            tls_cert_expiry: gauge(&r, names::TLS_CERT_EXPIRY_TIMESTAMP_SECONDS, "Unix time the certificate chain served under each [certs] name expires (the earliest notAfter in it).", &[CERT]),
            tls_cert_reloads: counter(&r, names::TLS_CERT_RELOADS_TOTAL, "Certificate files reloaded after a change, by result (success; failure: the previous certificate stays).", &[CERT, RESULT]),
            tls_handshake_errors: counter(&r, names::TLS_HANDSHAKE_ERRORS_TOTAL, "Failed TLS handshakes on a listener, by the fatal alert meshgate sent (or peer_* for one the client sent).", &[LISTENER, REASON]),
            config_generation: scalar_gauge(names::CONFIG_GENERATION, "Generation of the config in use: 1 at start, +1 per successful reload."),
            config_last_load: scalar_gauge(names::CONFIG_LAST_LOAD_TIMESTAMP_SECONDS, "Unix time the config in use was loaded."),
            config_reloads: counter(&r, names::CONFIG_RELOADS_TOTAL, "Reload attempts by result (success, failure).", &[RESULT]),
            access_log_dropped,
            trace_spans_exported: scalar_counter(names::TRACE_SPANS_EXPORTED_TOTAL, "Spans accepted by the OTLP collector."),
            trace_spans_dropped: scalar_counter(names::TRACE_SPANS_DROPPED_TOTAL, "Spans dropped: export queue full, or the collector refused or was unreachable."),
            trace_export_errors: scalar_counter(names::TRACE_EXPORT_ERRORS_TOTAL, "Failed OTLP export requests."),
            build_info: gauge(&r, names::BUILD_INFO, "Always 1; labels carry the version and the hash of the config in use.", &[VERSION, CONFIG_HASH]),
            registry: r,
        }
    }

    /// Series with fixed label sets exist from the start, so dashboards and
    /// alerts see a 0 instead of no data.
    fn init_known_series(&self) {
        for result in ["success", "failure"] {
            self.config_reloads.with_label_values(&[result]);
        }
        for kind in names::RATE_LIMIT_BACKEND_ERROR_KINDS {
            self.rate_limit_backend_errors.with_label_values(&[kind]);
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            log::error!("cannot encode metrics: {e}");
        }
        out
    }

    /// Record that a config is now in use.
    pub fn config_loaded(&self, generation: u64, config_hash: &str) {
        self.config_generation.set(generation as i64);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        self.config_last_load.set(now);
        self.build_info.reset();
        self.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), config_hash])
            .set(1);
    }
}

/// The process-wide metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        let m = Metrics::new();
        m.init_known_series();
        m
    })
}

/// The `destination` label for `value` (`host:port`): itself while fewer
/// than [`names::MAX_DESTINATIONS`] distinct values were seen for its
/// outcome, else `other`. Allowed and denied destinations have separate
/// budgets, so a client probing junk names cannot push the allowed ones out;
/// what is not a plain `host:port` is `-`.
pub fn destination_label(value: &str, denied: bool) -> String {
    use std::collections::HashSet;
    use std::sync::Mutex;
    static SEEN: OnceLock<[Mutex<HashSet<String>>; 2]> = OnceLock::new();
    let plain = value.len() <= 260
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:[]".contains(&b));
    if !plain || value.is_empty() {
        return "-".to_string();
    }
    let sets = SEEN.get_or_init(Default::default);
    let Ok(mut seen) = sets[usize::from(denied)].lock() else {
        return names::OTHER_DESTINATION.to_string();
    };
    if seen.contains(value) {
        return value.to_string();
    }
    if seen.len() >= names::MAX_DESTINATIONS {
        return names::OTHER_DESTINATION.to_string();
    }
    seen.insert(value.to_string());
    value.to_string()
}

/// Increments a gauge now and decrements it when dropped, however the scope
/// ends (return, error, panic, cancelled task).
/// One route's request series on one listener, each looked up on first
/// use and then kept: recording a request then hashes no label values.
/// Held by the runtime, so a reload starts a fresh set.
pub struct RouteSeries {
    listener: Box<str>,
    route: Box<str>,
    requests: [[OnceLock<IntCounter>; names::STATUS_CLASSES.len()]; names::METHOD_CLASSES.len()],
    duration: [OnceLock<Histogram>; names::STATUS_CLASSES.len()],
    /// (request body bytes, response body bytes)
    bytes: OnceLock<(IntCounter, IntCounter)>,
}

impl RouteSeries {
    pub fn new(listener: &str, route: &str) -> Self {
        RouteSeries {
            listener: listener.into(),
            route: route.into(),
            requests: std::array::from_fn(|_| std::array::from_fn(|_| OnceLock::new())),
            duration: std::array::from_fn(|_| OnceLock::new()),
            bytes: OnceLock::new(),
        }
    }

    /// `meshgate_requests_total` for a method and status class index.
    pub fn requests(&self, method: usize, status: usize) -> &IntCounter {
        self.requests[method][status].get_or_init(|| {
            metrics().requests.with_label_values(&[
                &*self.listener,
                &*self.route,
                names::METHOD_CLASSES[method],
                names::STATUS_CLASSES[status],
            ])
        })
    }

    pub fn duration(&self, status: usize) -> &Histogram {
        self.duration[status].get_or_init(|| {
            metrics().request_duration.with_label_values(&[
                &*self.listener,
                &*self.route,
                names::STATUS_CLASSES[status],
            ])
        })
    }

    pub fn bytes(&self) -> &(IntCounter, IntCounter) {
        self.bytes.get_or_init(|| {
            let m = metrics();
            let labels = [&*self.listener, &*self.route];
            (
                m.request_bytes.with_label_values(&labels),
                m.response_bytes.with_label_values(&labels),
            )
        })
    }
}

/// One upstream's series, looked up on first use (see [`RouteSeries`]).
pub struct UpstreamSeries {
    upstream: Box<str>,
    /// By status class index, `none` last.
    requests: [OnceLock<IntCounter>; names::STATUS_CLASSES.len()],
    duration: OnceLock<Histogram>,
    /// New, reused.
    connections: [OnceLock<IntCounter>; 2],
    ejections: OnceLock<IntCounter>,
    budget_exhausted: OnceLock<IntCounter>,
    /// Failed, passed.
    health_checks: [OnceLock<IntCounter>; 2],
    /// Failed, succeeded.
    refreshes: [OnceLock<IntCounter>; 2],
}

impl UpstreamSeries {
    pub fn new(upstream: &str) -> Self {
        UpstreamSeries {
            upstream: upstream.into(),
            requests: std::array::from_fn(|_| OnceLock::new()),
            duration: OnceLock::new(),
            connections: std::array::from_fn(|_| OnceLock::new()),
            ejections: OnceLock::new(),
            budget_exhausted: OnceLock::new(),
            health_checks: std::array::from_fn(|_| OnceLock::new()),
            refreshes: std::array::from_fn(|_| OnceLock::new()),
        }
    }

    pub fn discovery_refresh(&self, ok: bool) -> &IntCounter {
        self.refreshes[usize::from(ok)].get_or_init(|| {
            metrics()
                .discovery_refreshes
                .with_label_values(&[&*self.upstream, if ok { "success" } else { "failure" }])
        })
    }

    pub fn health_check(&self, passed: bool) -> &IntCounter {
        self.health_checks[usize::from(passed)].get_or_init(|| {
            metrics()
                .upstream_health_checks
                .with_label_values(&[&*self.upstream, if passed { "success" } else { "failure" }])
        })
    }

    pub fn budget_exhausted(&self) -> &IntCounter {
        self.budget_exhausted.get_or_init(|| {
            metrics()
                .upstream_budget_exhausted
                .with_label_values(&[&self.upstream])
        })
    }

    /// `meshgate_upstream_overflow_total` for `limit`.
    pub fn overflow(&self, limit: &str) -> IntCounter {
        metrics()
            .upstream_overflow
            .with_label_values(&[&*self.upstream, limit])
    }

    pub fn set_concurrency_limit(&self, n: u32) {
        metrics()
            .upstream_concurrency_limit
            .with_label_values(&[&self.upstream])
            .set(i64::from(n));
    }

    pub fn set_pending(&self, n: usize) {
        metrics()
            .upstream_pending
            .with_label_values(&[&self.upstream])
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// `meshgate_upstream_hedges_total`: a hedge that `won` or not.
    pub fn hedges(&self, won: bool) -> IntCounter {
        metrics()
            .upstream_hedges
            .with_label_values(&[&*self.upstream, if won { "true" } else { "false" }])
    }

    /// `meshgate_upstream_retries_total` for `reason`.
    pub fn retries(&self, reason: &str) -> IntCounter {
        metrics()
            .upstream_retries
            .with_label_values(&[&*self.upstream, reason])
    }

    pub fn ejections(&self) -> &IntCounter {
        self.ejections.get_or_init(|| {
            metrics()
                .upstream_ejections
                .with_label_values(&[&self.upstream])
        })
    }

    /// `meshgate_upstream_endpoints`: how many endpoints are in each of
    /// `names::ENDPOINT_STATES`, in that order.
    pub fn set_endpoints(&self, counts: [usize; names::ENDPOINT_STATES.len()]) {
        for (state, n) in names::ENDPOINT_STATES.iter().zip(counts) {
            metrics()
                .upstream_endpoints
                .with_label_values(&[&*self.upstream, state])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    /// Drop the series of an upstream the config no longer has.
    pub fn forget(upstream: &str) {
        let _ = metrics().upstream_pending.remove_label_values(&[upstream]);
        let _ = metrics()
            .upstream_concurrency_limit
            .remove_label_values(&[upstream]);
        for state in names::ENDPOINT_STATES {
            let _ = metrics()
                .upstream_endpoints
                .remove_label_values(&[upstream, state]);
        }
    }

    pub fn requests(&self, status: usize) -> &IntCounter {
        self.requests[status].get_or_init(|| {
            metrics()
                .upstream_requests
                .with_label_values(&[&*self.upstream, names::STATUS_CLASSES[status]])
        })
    }

    pub fn duration(&self) -> &Histogram {
        self.duration.get_or_init(|| {
            metrics()
                .upstream_duration
                .with_label_values(&[&self.upstream])
        })
    }

    pub fn connections(&self, reused: bool) -> &IntCounter {
        self.connections[usize::from(reused)].get_or_init(|| {
            metrics()
                .upstream_connections
                .with_label_values(&[&*self.upstream, if reused { "true" } else { "false" }])
        })
    }
}

pub struct GaugeGuard(IntGauge);

impl GaugeGuard {
    pub fn new(gauge: IntGauge) -> Self {
        gauge.inc();
        GaugeGuard(gauge)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}
