//! The forward stage: the request an upstream is sent, from the client's
//! (a route's `strip_prefix`, the forwarding fields, the rewrites, the
//! trace context), in the header case the gateway keeps.

use std::net::IpAddr;

use http::header::{self, HeaderValue};
use pingora::http::RequestHeader;
use pingora::{Error, ErrorType, Result};

use super::ctx::RequestCtx;
use super::{headers, trace};
use crate::config::model::{Action, HeaderCase};
use crate::runtime::Runtime;

/// Edit `upstream` (a copy of `client_req`) for the request's route;
/// `client` is the connection's client address.
pub fn upstream_request(
    ctx: &RequestCtx,
    client_req: &RequestHeader,
    client: Option<IpAddr>,
    upstream: &mut RequestHeader,
) -> Result<()> {
    let Some(rt) = ctx.runtime.as_ref() else {
        return Ok(());
    };
    let Some(route) = ctx.route.map(|r| rt.route(r)) else {
        return Ok(());
    };
    let Action::Forward(fwd) = &route.action else {
        return Ok(());
    };
    if let Some(prefix) = &fwd.strip_prefix {
        let pq = upstream.uri.path_and_query().map_or("/", |p| p.as_str());
        if let Some(new) = headers::strip_prefix(pq, prefix) {
            let uri = new.parse::<http::Uri>().map_err(|e| {
                Error::because(ErrorType::InternalError, "rewritten path is not a URI", e)
            })?;
            upstream.set_uri(uri);
        }
    }
    let forward_identity = ctx
        .listener
        .and_then(|l| rt.config.listeners.get(l))
        .and_then(|l| l.tls.as_ref())
        .is_some_and(|t| t.forward_identity);
    let identity = match (forward_identity, &ctx.peer_identity) {
        (true, Some(id)) => Some(HeaderValue::from_str(id).map_err(|e| {
            Error::because(
                ErrorType::InternalError,
                "peer identity is not a header value",
                e,
            )
        })?),
        _ => None,
    };
    let host = request_host_value(client_req);
    let upstream_host = if host.is_none() {
        upstream_authority(rt, ctx)
    } else {
        None
    };
    let edits = headers::Forwarding {
        client,
        scheme: if ctx.tls { "https" } else { "http" },
        host,
        identity,
        request_id: ctx.request_id.header_value(),
        rewrite: &fwd.request_headers,
        upstream_host,
    };
    match rt.config.gateway.header_case {
        HeaderCase::Preserve => {
            edits.apply(upstream);
            trace::inject(ctx, upstream);
        }
        HeaderCase::Lowercase => headers::edit_plain_request(upstream, edits.room(), |fields| {
            edits.apply(fields);
            trace::inject(ctx, fields);
        }),
    }
    Ok(())
}

/// [`request_host`] as a header value; the client's `Host` is shared, not copied.
fn request_host_value(req: &RequestHeader) -> Option<HeaderValue> {
    match req.uri.authority() {
        Some(a) => HeaderValue::from_str(a.as_str()).ok(),
        None => req
            .headers
            .get(header::HOST)
            .filter(|h| h.to_str().is_ok())
            .cloned(),
    }
}

/// The upstream's TLS server name, else the endpoint's address: the `Host`
/// of a request whose client sent none (NGINX sends its upstream's name).
fn upstream_authority(rt: &Runtime, ctx: &RequestCtx) -> Option<HeaderValue> {
    let sni = ctx
        .upstream
        .and_then(|u| rt.config.upstreams.get(u))
        .and_then(|u| u.tls.as_ref())
        .map(|t| t.sni.as_str())
        .filter(|s| !s.is_empty());
    match sni {
        Some(name) => HeaderValue::from_str(name).ok(),
        None => HeaderValue::from_str(&ctx.endpoint?.to_string()).ok(),
    }
}
