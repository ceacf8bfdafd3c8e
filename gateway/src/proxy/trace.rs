//! Span bookkeeping for the proxy phases: one server span per request, one
//! client span per upstream attempt. Every function is a no-op when tracing
//! is off.

use opentelemetry::trace::TraceContextExt;
use opentelemetry::KeyValue;
use pingora::http::RequestHeader;
use pingora::proxy::Session;
use pingora::Error;

use super::ctx::RequestCtx;
use super::headers::Fields;
use crate::telemetry::tracing::{self, Tracing};

/// Start the server span once the listener is known.
pub fn start_server(t: &Tracing, session: &Session, ctx: &mut RequestCtx) {
    let req = session.req_header();
    let cx = t.server_span(req, || server_attributes(session, ctx));
    ctx.server_cx = Some(cx);
}

fn server_attributes(session: &Session, ctx: &RequestCtx) -> Vec<KeyValue> {
    let req = session.req_header();
    let mut attrs = vec![
        KeyValue::new("http.request.method", req.method.as_str().to_string()),
        KeyValue::new("url.path", req.uri.path().to_string()),
        KeyValue::new("url.scheme", if ctx.tls { "https" } else { "http" }),
        KeyValue::new(
            "network.protocol.version",
            if req.version == http::Version::HTTP_2 {
                "2"
            } else {
                "1.1"
            },
        ),
        KeyValue::new(
            "meshgate.listener",
            ctx.listener_name().unwrap_or("").to_string(),
        ),
        KeyValue::new(
            "meshgate.direction",
            ctx.direction().unwrap_or("").to_string(),
        ),
        KeyValue::new("meshgate.request_id", ctx.request_id.to_string()),
    ];
    if let Some(id) = &ctx.peer_identity {
        attrs.push(KeyValue::new("meshgate.peer.identity", id.clone()));
    }
    if let Some(authority) =
        super::request_host(req).and_then(|h| h.parse::<http::uri::Authority>().ok())
    {
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        attrs.push(KeyValue::new("server.address", host.to_string()));
        if let Some(port) = authority.port_u16() {
            attrs.push(KeyValue::new("server.port", i64::from(port)));
        }
    }
    if let Some(peer) = session.client_addr().and_then(|a| a.as_inet()) {
        attrs.push(KeyValue::new(
            "network.peer.address",
            peer.ip().to_canonical().to_string(),
        ));
        attrs.push(KeyValue::new("network.peer.port", i64::from(peer.port())));
    }
    if let Some(ua) = req
        .headers
        .get(http::header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
    {
        attrs.push(KeyValue::new("user_agent.original", ua.to_string()));
    }
    attrs
}

/// Name the server span after the route (`GET api`), per the HTTP conventions.
pub fn routed(ctx: &RequestCtx, method: &http::Method) {
    let (Some(cx), Some(route)) = (&ctx.server_cx, ctx.route_name()) else {
        return;
    };
    let span = cx.span();
    // Unsampled spans (most, at a low ratio) keep nothing: skip the strings.
    if !span.is_recording() {
        return;
    }
    span.update_name(format!("{method} {route}"));
    span.set_attribute(KeyValue::new("meshgate.route", route.to_string()));
}

/// Start a client span for an upstream attempt, ending the previous one.
pub fn start_attempt(t: &Tracing, req: &RequestHeader, ctx: &mut RequestCtx) {
    let Some(server) = ctx.server_cx.clone() else {
        return;
    };
    if let Some(prev) = ctx.client_cx.take() {
        tracing::end(&prev, None, Some("retried"), 400);
    }
    let cx = t.client_span(&server, &req.method, || client_attributes(req, ctx));
    ctx.client_cx = Some(cx);
}

/// A client span for one of several attempts in flight at once (a hedged
/// request): nothing else is ended, the caller ends it ([`end_attempt`]).
pub fn attempt_span(
    t: &Tracing,
    req: &RequestHeader,
    ctx: &RequestCtx,
) -> Option<opentelemetry::Context> {
    let server = ctx.server_cx.as_ref()?;
    Some(t.client_span(server, &req.method, || client_attributes(req, ctx)))
}

/// End an attempt's span: with the status it got, or why it ended.
pub fn end_attempt(cx: Option<opentelemetry::Context>, status: Option<u16>, why: Option<&str>) {
    if let Some(cx) = cx {
        tracing::end(&cx, status, why, 400);
    }
}

fn client_attributes(req: &RequestHeader, ctx: &RequestCtx) -> Vec<KeyValue> {
    let mut attrs = vec![
        KeyValue::new("http.request.method", req.method.as_str().to_string()),
        KeyValue::new(
            "meshgate.upstream",
            ctx.upstream_name().unwrap_or("").to_string(),
        ),
        KeyValue::new("meshgate.route", ctx.route_name().unwrap_or("").to_string()),
        KeyValue::new(
            "http.request.resend_count",
            (ctx.tried.len() as i64 - 1).max(0),
        ),
    ];
    if let Some(ep) = ctx.endpoint {
        attrs.push(KeyValue::new("server.address", ep.ip().to_string()));
        attrs.push(KeyValue::new("server.port", i64::from(ep.port())));
        attrs.push(KeyValue::new("network.peer.address", ep.ip().to_string()));
    }
    attrs
}

/// A connection attempt failed: close its span as an error.
pub fn attempt_failed(ctx: &mut RequestCtx, e: &Error) {
    if let Some(cx) = ctx.client_cx.take() {
        tracing::end(&cx, None, Some(super::observe::upstream_error_kind(e)), 400);
    }
}

/// Put the client span's context on the upstream request.
pub fn inject(ctx: &RequestCtx, upstream: &mut impl Fields) {
    let Some(cx) = &ctx.client_cx else {
        return;
    };
    for (name, wire, value) in tracing::trace_fields(cx) {
        // Inserting replaces a client's value.
        match value {
            Some(v) => upstream.set(name, wire, v),
            None => upstream.remove(name),
        }
    }
}

/// Close what is still open when the request ends.
pub fn finish(session: &Session, e: Option<&Error>, ctx: &mut RequestCtx) {
    if let Some(cx) = ctx.client_cx.take() {
        let err = e
            .filter(|e| *e.esource() == pingora::ErrorSource::Upstream)
            .map(super::observe::upstream_error_kind);
        tracing::end(&cx, ctx.upstream_status, err, 400);
    }
    if let Some(cx) = ctx.server_cx.take() {
        if !cx.span().is_recording() {
            cx.span().end();
            return;
        }
        if !ctx.authz_note.is_empty() {
            cx.span()
                .set_attribute(KeyValue::new("meshgate.authz", ctx.authz_note.clone()));
        }
        if !ctx.rate_limit_note.is_empty() {
            cx.span().set_attribute(KeyValue::new(
                "meshgate.rate_limit",
                ctx.rate_limit_note.clone(),
            ));
        }
        let status = session.response_written().map(|r| r.status.as_u16());
        let err = ctx
            .failure
            .filter(|f| f.status() >= 500)
            .map(|f| f.message());
        // Server spans: only 5xx are errors (4xx are the client's).
        tracing::end(&cx, status, err, 500);
    }
}
