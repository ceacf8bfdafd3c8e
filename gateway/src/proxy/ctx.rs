//! Per-request state carried between proxy phases.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::runtime::Runtime;

/// Why a request failed, as the gateway sees it; shown in the error body and log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    NoRoute,
    NoListener,
    Timeout,
    UpstreamUnreachable,
    UpstreamError,
    BadRequest,
    Internal,
    RateLimited,
    RateLimitUnavailable,
    Forbidden,
    /// The connection's client certificate is not trusted by the client
    /// CAs a reload installed since its handshake.
    ClientCertUntrusted,
    HeadersTooLarge,
    UriTooLong,
    BodyTooLarge,
    /// The request body did not arrive in time: a read waited past
    /// `body_read_timeout`, or the route's `timeout` passed during it.
    BodyTimeout,
    /// Memory is over `gateway.overload.memory`: new requests are shed.
    Overloaded,
    EgressDenied,
    /// The upstream has no endpoint to send to (discovery found none yet).
    NoEndpoints,
    /// An upstream's `limits` refused the request (`overflow` says which).
    UpstreamOverloaded,
}

impl Failure {
    pub fn status(self) -> u16 {
        match self {
            Failure::NoRoute => 404,
            // A connection whose listener a reload removed: it drains.
            Failure::NoListener => 503,
            Failure::Internal => 500,
            Failure::Timeout => 504,
            Failure::UpstreamUnreachable | Failure::UpstreamError => 502,
            Failure::BadRequest => 400,
            Failure::RateLimited => 429,
            Failure::RateLimitUnavailable => 503,
            Failure::Forbidden | Failure::EgressDenied | Failure::ClientCertUntrusted => 403,
            Failure::HeadersTooLarge => 431,
            Failure::UriTooLong => 414,
            Failure::BodyTooLarge => 413,
            Failure::BodyTimeout => 408,
            Failure::Overloaded | Failure::NoEndpoints | Failure::UpstreamOverloaded => 503,
        }
    }

    /// The error's kind in JSON bodies and logs: stable, for machines.
    pub fn kind(self) -> &'static str {
        match self {
            Failure::NoRoute => "no_route",
            Failure::NoListener => "no_listener",
            Failure::Timeout => "timeout",
            Failure::UpstreamUnreachable => "upstream_unreachable",
            Failure::UpstreamError => "upstream_error",
            Failure::BadRequest => "bad_request",
            Failure::Internal => "internal",
            Failure::RateLimited => "rate_limited",
            Failure::RateLimitUnavailable => "rate_limit_unavailable",
            Failure::Forbidden => "forbidden",
            Failure::ClientCertUntrusted => "client_cert_untrusted",
            Failure::HeadersTooLarge => "headers_too_large",
            Failure::UriTooLong => "uri_too_long",
            Failure::BodyTooLarge => "body_too_large",
            Failure::BodyTimeout => "body_timeout",
            Failure::Overloaded => "overloaded",
            Failure::EgressDenied => "egress_denied",
            Failure::NoEndpoints => "no_endpoints",
            Failure::UpstreamOverloaded => "upstream_overloaded",
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            Failure::NoRoute => "no route matches this request",
            Failure::NoListener => "this connection's listener was removed by a reload; connect again",
            Failure::Timeout => "upstream timed out",
            Failure::UpstreamUnreachable => "upstream unreachable",
            Failure::UpstreamError => "upstream failed to answer",
            Failure::BadRequest => "malformed request",
            Failure::RateLimited => "rate limited",
            Failure::RateLimitUnavailable => "rate limit store unavailable",
            Failure::Forbidden => "forbidden",
            Failure::ClientCertUntrusted => {
                "client certificate not accepted since a reload changed client_ca or client_auth; reconnect"
            }
            Failure::HeadersTooLarge => "request header fields too large",
            Failure::UriTooLong => "URI too long",
            Failure::BodyTooLarge => "request body too large",
            Failure::BodyTimeout => "request body not received in time",
            Failure::Overloaded => "overloaded",
            Failure::EgressDenied => "egress destination not allowed",
            Failure::Internal => "internal gateway error",
            Failure::NoEndpoints => "the upstream has no endpoints (yet)",
            Failure::UpstreamOverloaded => "the upstream has as many requests as its limits allow",
        }
    }
}

pub struct RequestCtx {
    /// The config snapshot this request uses from start to end.
    pub runtime: Option<Arc<Runtime>>,
    pub listener: Option<usize>,
    pub route: Option<usize>,
    pub upstream: Option<usize>,
    /// Endpoint indexes already tried, so a retry goes elsewhere.
    pub tried: smallvec::SmallVec<[usize; 4]>,
    pub request_id: super::headers::RequestId,
    pub started: Instant,
    /// The route's whole-request deadline.
    pub deadline: Option<Instant>,
    pub failure: Option<Failure>,
    /// `fail_to_proxy` wrote its error answer whole: the connection ends
    /// with a lingering close.
    pub error_answered: bool,
    /// Counts this request in the in-flight gauge until the context drops.
    pub in_flight: Option<crate::telemetry::metrics::GaugeGuard>,
    /// First endpoint choice: start of the upstream exchange.
    pub upstream_started: Option<Instant>,
    /// Start of the current connection attempt.
    pub connect_started: Option<Instant>,
    /// A connection to the upstream was established (or reused).
    pub connected: bool,
    pub endpoint: Option<std::net::SocketAddr>,
    pub upstream_status: Option<u16>,
    /// The current attempt's outcome was reported to its endpoint's record.
    pub outcome_reported: bool,
    /// Counts this request in its endpoint's in-flight requests (the
    /// balancer's load) until the next attempt or the request's end.
    pub at_endpoint: Option<crate::endpoints::set::InFlight>,
    /// The request's place among its upstream's `max_requests`.
    pub upstream_permit: Option<crate::resilience::limit::Permit>,
    /// The current attempt's connection under `max_connections`.
    pub connection_claim: Option<crate::resilience::limit::Claim>,
    /// Its place under the upstream's adaptive concurrency limit.
    pub adaptive_slot: Option<crate::resilience::adaptive::Slot>,
    /// The limit that refused it (`upstream_overloaded`).
    pub overflow: Option<crate::resilience::limit::Overflow>,
    /// Retries the route's `retries` policy granted so far.
    pub policy_retries: u32,
    /// The wait before the next attempt (`retries.backoff`).
    pub backoff: Duration,
    /// Why the next attempt is made (`meshgate_upstream_retries_total`).
    pub next_attempt_reason: &'static str,
    /// Each attempt that was tried again: its endpoint and why (access log).
    pub retried: Vec<(Option<std::net::SocketAddr>, &'static str)>,
    /// Hedges sent for this request (a route's `hedge`).
    pub hedges: u32,
    /// An answer's status was retried (decided when it arrived).
    pub retry_reason: Option<crate::resilience::Reason>,
    /// The upstream's endpoints as they were at the first attempt: every
    /// attempt and report of the request uses the same set.
    pub members: Option<Arc<crate::runtime::upstream::Members>>,
    /// The client asked for a WebSocket upgrade.
    pub websocket: bool,
    /// The upstream accepted it (101): the route deadline no longer applies.
    pub upgraded: bool,
    /// The client cancelled its HTTP/2 stream before it was forwarded
    /// (counted against its connection then).
    pub client_cancelled: bool,
    /// Tracing (when on): the server span, the current attempt's client span.
    pub server_cx: Option<opentelemetry::Context>,
    pub client_cx: Option<opentelemetry::Context>,
    /// `RateLimit-Policy` and `RateLimit` values to send with the response.
    pub rate_limit_headers: Option<(String, String)>,
    /// The policy that limited (or, in shadow mode, would have), for the access log.
    pub rate_limit_note: String,
    /// The connection came over TLS.
    pub tls: bool,
    /// The identity the client proved with its certificate (mTLS).
    pub peer_identity: Option<String>,
    /// Authorization: `denied:NAME` or `shadow_denied:NAME,...`, for logs and spans.
    pub authz_note: String,
    /// Request body bytes seen so far, against the route's `max_body_bytes`.
    pub body_seen: u64,
    /// The listener's `body_read_timeout`, for each read of the body.
    pub body_read_timeout: std::time::Duration,
    /// The body was read whole before forwarding (`buffer_request_body`).
    pub body_buffered: bool,
    /// An allowed egress destination (egress listener, no route matched).
    pub egress: Option<Arc<crate::egress::Target>>,
}

impl RequestCtx {
    /// Give back what the request holds upstream and counts in flight (its
    /// permit, connection claim, concurrency slot, place at its endpoint,
    /// the in-flight gauge), as dropping the context would: for a request
    /// that is over while its connection still closes.
    pub fn let_go(&mut self) {
        self.upstream_permit = None;
        self.connection_claim = None;
        self.adaptive_slot = None;
        self.at_endpoint = None;
        self.in_flight = None;
    }

    pub fn new() -> Self {
        RequestCtx {
            runtime: None,
            listener: None,
            route: None,
            upstream: None,
            tried: smallvec::SmallVec::new(),
            request_id: Default::default(),
            started: Instant::now(),
            deadline: None,
            failure: None,
            error_answered: false,
            in_flight: None,
            upstream_started: None,
            connect_started: None,
            connected: false,
            endpoint: None,
            upstream_status: None,
            outcome_reported: false,
            at_endpoint: None,
            members: None,
            upstream_permit: None,
            adaptive_slot: None,
            connection_claim: None,
            overflow: None,
            policy_retries: 0,
            backoff: Duration::ZERO,
            next_attempt_reason: "stale_connection",
            retried: Vec::new(),
            retry_reason: None,
            hedges: 0,
            websocket: false,
            client_cancelled: false,
            body_read_timeout: crate::config::model::DEFAULT_BODY_READ_TIMEOUT,
            body_buffered: false,
            upgraded: false,
            server_cx: None,
            client_cx: None,
            rate_limit_headers: None,
            rate_limit_note: String::new(),
            tls: false,
            peer_identity: None,
            authz_note: String::new(),
            body_seen: 0,
            egress: None,
        }
    }

    pub fn route_name(&self) -> Option<&str> {
        let rt = self.runtime.as_ref()?;
        Some(rt.route(self.route?).name.as_str())
    }

    /// The route's `response_headers` rewrite, once a route is chosen.
    pub fn response_rewrite(&self) -> Option<&crate::config::model::HeaderRewrite> {
        let rt = self.runtime.as_ref()?;
        Some(&rt.route(self.route?).response_headers)
    }

    pub fn upstream_name(&self) -> Option<&str> {
        if self.egress.is_some() {
            return Some(crate::telemetry::names::EGRESS_UPSTREAM);
        }
        let rt = self.runtime.as_ref()?;
        rt.upstreams.get(self.upstream?).map(|u| u.name.as_str())
    }

    /// The series of [`Self::upstream_name`].
    pub fn upstream_series(&self) -> Option<&crate::telemetry::metrics::UpstreamSeries> {
        let rt = self.runtime.as_ref()?;
        if self.egress.is_some() {
            return Some(&rt.egress_series);
        }
        rt.upstreams.get(self.upstream?).map(|u| &u.series)
    }

    pub fn listener_name(&self) -> Option<&str> {
        let rt = self.runtime.as_ref()?;
        rt.listeners.get(self.listener?).map(|l| l.name.as_str())
    }

    pub fn direction(&self) -> Option<&'static str> {
        let rt = self.runtime.as_ref()?;
        rt.listeners
            .get(self.listener?)
            .map(|l| l.direction.as_str())
    }

    /// Time left before the route's deadline (zero when passed).
    pub fn remaining(&self) -> Duration {
        self.deadline.map_or(Duration::MAX, |d| {
            d.saturating_duration_since(Instant::now())
        })
    }
}

impl Default for RequestCtx {
    fn default() -> Self {
        Self::new()
    }
}
