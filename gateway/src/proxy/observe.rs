//! Turning a finished request into metrics and an access-log line. Called
//! from the proxy's phases; all label values are config ids or fixed sets.

use std::time::{Instant, SystemTime};

use super::client::Client;
use pingora::protocols::tls::SslDigest;
use pingora::protocols::SocketDigest;
use pingora::{Error, ErrorType};

use super::ctx::{Failure, RequestCtx};
use crate::endpoints::Outcome;
use crate::runtime::Runtime;
use crate::telemetry::access_log::{self, Entry};
use crate::telemetry::metrics::metrics;
use crate::telemetry::metrics::RouteSeries;
use crate::telemetry::names::{method_index, status_index, NO_ROUTE};

/// The `none` status class: no response came.
const NO_STATUS: usize = crate::telemetry::names::STATUS_CLASSES.len() - 1;

/// Kind label for an upstream failure.
pub fn upstream_error_kind(e: &Error) -> &'static str {
    use ErrorType::*;
    match e.etype() {
        ConnectTimedout | ReadTimedout | WriteTimedout | TLSHandshakeTimedout => "timeout",
        ConnectRefused | ConnectNoRoute | ConnectError | BindError | SocketError
        | ConnectProxyFailure => "connect",
        TLSHandshakeFailure | InvalidCert | HandshakeError | TLSWantX509Lookup => "tls",
        ConnectionClosed | ReadError | WriteError => "reset",
        InvalidHTTPHeader | H1Error | H2Error | H2Downgrade | InvalidH2 => "protocol",
        _ => "other",
    }
}

/// Record a failed attempt: a connection that could not be made, or an
/// exchange that broke after connecting. Called once per attempt.
pub fn attempt_failed(ctx: &RequestCtx, e: &Error) {
    if let Some(u) = ctx.upstream_name() {
        metrics()
            .upstream_errors
            .with_label_values(&[u, upstream_error_kind(e)])
            .inc();
    }
}

/// Tell the endpoint of the current attempt how it went (outlier
/// detection), once per attempt. Egress destinations have no record.
pub fn attempt_outcome(ctx: &mut RequestCtx, outcome: Outcome) {
    if ctx.outcome_reported || ctx.egress.is_some() {
        return;
    }
    ctx.outcome_reported = true;
    let pool = ctx
        .runtime
        .as_ref()
        .zip(ctx.upstream)
        .and_then(|(rt, u)| rt.upstreams.get(u));
    let rtt = ctx.connect_started.map(|t| t.elapsed()).unwrap_or_default();
    if let (Some(pool), Some(members), Some(&endpoint)) = (pool, &ctx.members, ctx.tried.last()) {
        pool.report(members, endpoint, outcome, rtt);
        // Adaptive concurrency learns from the time of every exchange (a
        // refused connection's instant failure says nothing of load).
        if let Some(adaptive) = pool.adaptive.as_ref().filter(|_| ctx.connected) {
            adaptive.sample(rtt, Instant::now());
        }
    }
}

/// Record a connection to an upstream, new or from the pool.
pub fn connected(ctx: &mut RequestCtx, reused: bool) {
    ctx.connected = true;
    let (Some(u), Some(series)) = (ctx.upstream_name(), ctx.upstream_series()) else {
        return;
    };
    let m = metrics();
    series.connections(reused).inc();
    if !reused {
        if let Some(start) = ctx.connect_started {
            m.upstream_connect_duration
                .with_label_values(&[u])
                .observe(start.elapsed().as_secs_f64());
        }
    }
}

/// Bookkeeping for each attempt at endpoint index `endpoint` (at `addr`),
/// whichever driver makes it: timers, the retry count and reason.
pub fn attempt_started(ctx: &mut RequestCtx, endpoint: usize, addr: Option<std::net::SocketAddr>) {
    let now = Instant::now();
    if ctx.tried.is_empty() {
        ctx.upstream_started = Some(now);
    } else {
        if let Some(series) = ctx.upstream_series() {
            series.retries(ctx.next_attempt_reason).inc();
        }
        ctx.retried.push((ctx.endpoint, ctx.next_attempt_reason));
    }
    // Unless a decision says otherwise, a further attempt is a retry of a
    // pooled connection the endpoint had closed.
    ctx.next_attempt_reason = "stale_connection";
    ctx.tried.push(endpoint);
    ctx.connect_started = Some(now);
    ctx.connected = false;
    ctx.upstream_status = None;
    ctx.outcome_reported = false;
    ctx.endpoint = addr;
}

/// Everything recorded once the request is over.
pub fn finished(session: &impl Client, e: Option<&Error>, ctx: &RequestCtx) {
    let m = metrics();
    let status = session.status_written().unwrap_or(0);
    let listener = ctx.listener_name().unwrap_or("");
    let route = ctx.route_name().unwrap_or(NO_ROUTE);
    let method = session.method();
    let elapsed = ctx.started.elapsed();
    let (bytes_in, bytes_out) = (session.body_bytes_read(), session.body_bytes_sent());
    let cached = ctx
        .runtime
        .as_ref()
        .zip(ctx.listener.zip(ctx.route))
        .and_then(|(rt, (l, r))| rt.route_series(l, r));
    // No route (or no listener): rare; its series are looked up each time.
    let unrouted;
    let series = match cached {
        Some(s) => s,
        None => {
            unrouted = RouteSeries::new(listener, route);
            &unrouted
        }
    };
    let class = status_index(status);
    series.requests(method_index(method), class).inc();
    series.duration(class).observe(elapsed.as_secs_f64());
    let (bytes_in_total, bytes_out_total) = series.bytes();
    bytes_in_total.inc_by(bytes_in);
    bytes_out_total.inc_by(bytes_out);
    if ctx.failure == Some(super::ctx::Failure::NoRoute) {
        m.no_route.with_label_values(&[listener]).inc();
    }

    let upstream = ctx.upstream_name().zip(ctx.upstream_series());
    let upstream_elapsed = ctx
        .upstream_started
        .map(|s| Instant::now().saturating_duration_since(s));
    if let (Some((_, series)), Some(d)) = (upstream, upstream_elapsed) {
        let class = ctx.upstream_status.map_or(NO_STATUS, status_index);
        // Failed attempts are counted as they fail (`attempt_failed`).
        series.requests(class).inc();
        series.duration().observe(d.as_secs_f64());
    }

    let Some(rt) = ctx.runtime.as_ref() else {
        return;
    };
    let format = rt.config.telemetry.access_log;
    if format == access_log::Format::Off {
        return;
    }
    let host = session.host();
    let error = match (ctx.failure, e) {
        (Some(f), _) => f.message().to_string(),
        (None, Some(e)) => e.etype().as_str().to_string(),
        (None, None) => String::new(),
    };
    // Formatted here, not per request: with the access log off it is never needed.
    let trace_id = ctx
        .server_cx
        .as_ref()
        .map(crate::telemetry::tracing::trace_id)
        .unwrap_or_default();
    let (tls_version, tls_cipher, sni) = tls_fields(session.tls());
    let entry = Entry {
        timestamp: access_log::timestamp(SystemTime::now() - elapsed),
        request_id: &ctx.request_id,
        trace_id: &trace_id,
        listener,
        direction: ctx.direction().unwrap_or(""),
        route,
        upstream: upstream.map_or("", |(u, _)| u),
        endpoint: ctx.endpoint.map(|a| a.to_string()).unwrap_or_default(),
        attempts: ctx.tried.len(),
        retries: ctx
            .retried
            .iter()
            .map(|(at, why)| format!("{}/{why}", at.map_or("-".to_string(), |a| a.to_string())))
            .collect::<Vec<_>>()
            .join(","),
        hedged: ctx.hedges,
        method: method.as_str(),
        host,
        path: session.path(),
        protocol: version_str(session.version()),
        status,
        bytes_in,
        bytes_out,
        duration_ms: millis(elapsed),
        upstream_duration_ms: upstream_elapsed.map(millis),
        client: session.client_text(),
        user_agent: session.user_agent(),
        error: &error,
        rate_limit: &ctx.rate_limit_note,
        peer_identity: ctx.peer_identity.as_deref().unwrap_or(""),
        authz: &ctx.authz_note,
        tls_version,
        tls_cipher,
        sni,
    };
    if let Some(line) = entry.format(format) {
        access_log::submit(line);
    }
}

/// How a request head that never reached the proxy ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadEnd {
    /// Pingora refused it (`400` for a head it cannot parse, `405` for a
    /// `CONNECT`), or the client stopped sending it (logged as `400`, as
    /// NGINX logs it, though nothing was sent).
    Refused,
    /// `header_read_timeout` (or `idle_timeout` between two of its reads)
    /// ended it (`408`, nothing sent).
    TimedOut,
    /// Cut to keep unfinished heads within `max_pending_head_bytes`
    /// (`408`, sent).
    Cut,
    /// Past `max_request_header_bytes` before it ended (`431`).
    TooLarge,
    /// A request line past `max_uri_bytes` before it ended (`414`).
    UriTooLong,
    /// The gateway stopped before Pingora read it (nothing sent).
    Shutdown,
}

impl HeadEnd {
    /// The status logged (and, for those the loop answers, sent), what the
    /// access log's `error` says, and the `rejected` reason counted.
    pub fn describe(self, method: &[u8]) -> (u16, &'static str, Option<&'static str>) {
        match self {
            HeadEnd::TimedOut => (
                408,
                "request head not complete within header_read_timeout",
                Some("header_timeout"),
            ),
            HeadEnd::Cut => (
                408,
                "request head cut: unfinished heads over max_pending_head_bytes",
                Some("head_budget"),
            ),
            HeadEnd::TooLarge => (
                431,
                Failure::HeadersTooLarge.message(),
                Some("header_bytes"),
            ),
            HeadEnd::UriTooLong => (414, Failure::UriTooLong.message(), Some("uri_length")),
            HeadEnd::Shutdown => (0, "gateway stopped before the request head was read", None),
            HeadEnd::Refused if method == b"CONNECT" => {
                (405, "CONNECT is not served on this connection", None)
            }
            HeadEnd::Refused => (
                400,
                "malformed or incomplete request head",
                Some("malformed"),
            ),
        }
    }
}

/// A request head that never reached the proxy, logged and counted. `line`
/// is the start of what the client sent, when the loop saw it;
/// `request_id` the one its answer carried, if any.
pub fn refused(
    rt: &Runtime,
    listener: Option<usize>,
    digest: Option<&SocketDigest>,
    tls: Option<&SslDigest>,
    line: &[u8],
    end: HeadEnd,
    request_id: &str,
) {
    let request_line = line.split(|&b| b == b'\n').next().unwrap_or_default();
    let request_line = request_line.strip_suffix(b"\r").unwrap_or(request_line);
    let mut parts = request_line.split(|&b| b == b' ');
    let method = parts.next().unwrap_or_default();
    let target = parts.next().unwrap_or_default();
    // Without the query, as every line's `path`.
    let target = target.split(|&b| b == b'?').next().unwrap_or_default();
    let protocol = match parts.next() {
        Some(b"HTTP/1.0") => "HTTP/1.0",
        Some(b"HTTP/1.1") => "HTTP/1.1",
        _ => "",
    };
    let (status, error, reason) = end.describe(method);

    let listener = listener.and_then(|i| rt.listeners.get(i));
    let name = listener.map_or("", |l| l.name.as_str());
    let m = metrics();
    let method_class = http::Method::from_bytes(method)
        .map_or(crate::telemetry::names::METHOD_CLASSES.len() - 1, |m| {
            method_index(&m)
        });
    RouteSeries::new(name, NO_ROUTE)
        .requests(method_class, status_index(status))
        .inc();
    if let Some(reason) = reason {
        m.rejected.with_label_values(&[name, reason]).inc();
    }

    let format = rt.config.telemetry.access_log;
    if format == access_log::Format::Off {
        return;
    }
    let (tls_version, tls_cipher, sni) = tls_fields(tls);
    let method = String::from_utf8_lossy(method);
    let target = String::from_utf8_lossy(target);
    let entry = Entry {
        timestamp: access_log::timestamp(SystemTime::now()),
        request_id,
        trace_id: "",
        listener: name,
        direction: listener.map_or("", |l| l.direction.as_str()),
        route: NO_ROUTE,
        upstream: "",
        endpoint: String::new(),
        attempts: 0,
        retries: String::new(),
        hedged: 0,
        method: &method,
        host: "",
        path: &target,
        protocol,
        status,
        bytes_in: 0,
        bytes_out: 0,
        duration_ms: 0.0,
        upstream_duration_ms: None,
        client: digest
            .and_then(|d| d.peer_addr())
            .map(|a| a.to_string())
            .unwrap_or_default(),
        user_agent: "",
        error,
        rate_limit: "",
        peer_identity: "",
        authz: "",
        tls_version,
        tls_cipher,
        sni,
    };
    if let Some(line) = entry.format(format) {
        access_log::submit(line);
    }
}

/// The access log's `tls_version`, `tls_cipher` and `sni` of a connection;
/// empty on a plain one.
fn tls_fields(tls: Option<&SslDigest>) -> (&str, &str, &str) {
    let Some(tls) = tls else {
        return ("", "", "");
    };
    let sni = tls
        .extension
        .get::<crate::tls::TlsConnection>()
        .and_then(|c| c.sni.as_deref());
    (&tls.version, &tls.cipher, sni.unwrap_or(""))
}

/// Milliseconds with microsecond precision.
fn millis(d: std::time::Duration) -> f64 {
    d.as_micros() as f64 / 1000.0
}

fn version_str(v: http::Version) -> &'static str {
    match v {
        http::Version::HTTP_09 => "HTTP/0.9",
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_11 => "HTTP/1.1",
        http::Version::HTTP_2 => "HTTP/2",
        http::Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/?",
    }
}

/// The process log's lines for a request: with `RUST_LOG=meshgate=debug`
/// one per request, whatever the access log's setting; a warning for what
/// an operator must look at.
pub fn process_log(session: &impl Client, e: Option<&Error>, ctx: &RequestCtx) {
    // `RUST_LOG=meshgate=debug`: one line per request, whatever the
    // access log's setting.
    if log::log_enabled!(log::Level::Debug) {
        log::debug!(
            "request {} duration_ms={:.3}",
            Named(session, ctx),
            ctx.started.elapsed().as_secs_f64() * 1000.0
        );
    }
    // Client errors (404, 400) are visible in metrics and the access log;
    // the log proper carries what an operator must look at.
    // A client that hung up is its own business; log what failed on the
    // gateway's or the upstream's side.
    // A Redis outage under on_error = "deny" is logged once by the rate
    // limiter, not once per refused request; an upstream's limits refuse
    // at the request rate too (counted in meshgate_upstream_overflow_total).
    // A failure meshgate classified decides by its status (a 413 the
    // body filter raised is the client's); an unclassified error by
    // where it came from.
    let log_it = match ctx.failure {
        Some(f) => {
            f.status() >= 500
                && f != Failure::RateLimitUnavailable
                && f != Failure::UpstreamOverloaded
        }
        None => e.is_some_and(|e| *e.esource() != pingora::ErrorSource::Downstream),
    };
    if log_it {
        log::warn!(
            "request failed: {} reason={} error={}",
            Named(session, ctx),
            ctx.failure.map_or("-", |f| f.message()),
            e.map_or_else(|| "-".to_string(), |e| e.to_string())
        );
    }
}

/// What both of a request's process-log lines name it by.
struct Named<'a, C>(&'a C, &'a RequestCtx);

impl<C: Client> std::fmt::Display for Named<'_, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Named(session, ctx) = self;
        write!(
            f,
            "request_id={} listener={} route={} upstream={} method={} path={} status={}",
            ctx.request_id,
            ctx.listener_name().unwrap_or("-"),
            ctx.route_name().unwrap_or("-"),
            ctx.upstream_name().unwrap_or("-"),
            session.method(),
            session.path(),
            session.status_written().unwrap_or(0),
        )
    }
}
