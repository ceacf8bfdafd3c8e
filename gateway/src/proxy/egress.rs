//! Plain-HTTP egress: a request on an `egress` listener that no route
//! matched goes to the host it names, if `[egress.allow]` lets it, over TLS
//! that meshgate originates and verifies.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::StatusCode;
use pingora::http::RequestHeader;
use pingora::protocols::ALPN;
use pingora::proxy::Session;
use pingora::upstreams::peer::HttpPeer;
use pingora::Result;

use super::ctx::{Failure, RequestCtx};
use super::headers::Fields;
use super::respond;
use crate::config::model::Egress;
use crate::egress::resolve::ResolveError;
use crate::egress::{record, split_authority, Denial, Mode, Target};
use crate::runtime::Runtime;

/// The `upstream` label and log value of egress requests (not a valid
/// upstream name, so it cannot collide with one).
use crate::telemetry::names::EGRESS_UPSTREAM;
/// Port TLS is originated to when the request names none: the client spoke
/// plain HTTP to meshgate, the destination gets HTTPS.
/// Addresses of one name tried for a request, at most.
const MAX_ATTEMPTS: usize = 3;

/// Record the decision on `dest` (see [`crate::egress::record`]).
fn record_for(session: &Session, ctx: &RequestCtx, dest: &str, denial: Option<Denial>) {
    // Who asked is only written on the audit line of a refusal.
    let client = denial
        .and(session.client_addr())
        .map(|a| a.to_string())
        .unwrap_or_default();
    let listener = ctx.listener_name().unwrap_or("");
    record(listener, Mode::Http, &client, dest, denial);
}

/// Decide where this request goes. `Ok(true)`: answered here (refused or
/// unreachable); `Ok(false)`: `ctx.egress` is set and the proxy goes on.
pub async fn route(
    rt: &Runtime,
    egress: &Egress,
    session: &mut Session,
    ctx: &mut RequestCtx,
) -> Result<bool> {
    let authority = super::request_host(session.req_header()).unwrap_or("");
    let Some((raw_host, port)) = split_authority(authority) else {
        return refuse(session, ctx, "-", Denial::Malformed).await;
    };
    let port = port.unwrap_or(crate::egress::DEFAULT_PORT);
    let (host, dest) = match egress.admit(raw_host, port) {
        Ok(admitted) => admitted,
        Err((dest, d)) => return refuse(session, ctx, &dest, d).await,
    };
    let Some(resolver) = rt.egress_resolver.as_ref() else {
        ctx.failure = Some(Failure::Internal);
        respond::send_error(session, Failure::Internal, ctx).await?;
        return Ok(true);
    };
    let addrs = match resolver.resolve(&host, port).await {
        Ok(a) => a,
        Err(ResolveError::Denied { .. }) => {
            return refuse(session, ctx, &dest, Denial::Address).await;
        }
        Err(e) => {
            log::warn!(target: "meshgate::egress", "egress request_id={} to {dest:?}: {e}", ctx.request_id);
            record_for(session, ctx, &dest, None);
            ctx.failure = Some(Failure::UpstreamUnreachable);
            respond::send_error(session, Failure::UpstreamUnreachable, ctx).await?;
            return Ok(true);
        }
    };
    record_for(session, ctx, &dest, None);
    ctx.deadline = ctx.started.checked_add(egress.timeout);
    ctx.egress = Some(Arc::new(Target { host, port, addrs }));
    Ok(false)
}

/// Audit, count and answer a refused destination: 400 for what is not a
/// destination at all, else 403.
async fn refuse(
    session: &mut Session,
    ctx: &mut RequestCtx,
    dest: &str,
    denial: Denial,
) -> Result<bool> {
    record_for(session, ctx, dest, Some(denial));
    let failure = if denial == Denial::Malformed {
        Failure::BadRequest
    } else {
        Failure::EgressDenied
    };
    ctx.failure = Some(failure);
    let body = serde_json::json!({
        "error": failure.message(),
        "status": failure.status(),
        "destination": dest,
        "reason": denial.explain(),
        "request_id": ctx.request_id,
    });
    let status = StatusCode::from_u16(failure.status()).unwrap_or(StatusCode::FORBIDDEN);
    respond::send(
        session,
        status,
        &[(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        Bytes::from(body.to_string()),
        &ctx.request_id,
        None,
    )
    .await?;
    Ok(true)
}

/// How many connection attempts a request gets: one per address, capped.
pub fn attempts(target: &Target) -> usize {
    target.addrs.len().clamp(1, MAX_ATTEMPTS)
}

/// The peer for attempt `attempt` (0-based): TLS to the next address, with
/// the destination's name as SNI and as the name its certificate must carry.
pub fn peer(
    target: &Target,
    egress: &Egress,
    material: &crate::config::Material,
    attempt: usize,
    remaining: Duration,
) -> Option<HttpPeer> {
    let addr = *target.addrs.get(attempt % target.addrs.len().max(1))?;
    let mut peer = HttpPeer::new(addr, true, target.host.clone());
    peer.options.verify_cert = true;
    peer.options.verify_hostname = true;
    peer.options.alpn = ALPN::H1;
    peer.options.connection_timeout = Some(egress.connect_timeout.min(remaining));
    peer.options.read_timeout = Some(remaining);
    peer.options.write_timeout = Some(remaining.min(egress.timeout));
    if let Some(ca) = &egress.ca {
        peer.options.ca = Some(Arc::new(material.ca(ca).to_vec().into_boxed_slice()));
    }
    // Pooled connections are keyed by address and SNI; the trust they were
    // verified against must be part of the key too.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    std::hash::Hash::hash(&EGRESS_UPSTREAM, &mut h);
    if let Some(ca) = &egress.ca {
        std::hash::Hash::hash(&ca.fingerprint, &mut h);
    }
    peer.group_key = std::hash::Hasher::finish(&h);
    Some(peer)
}

/// The request as the destination gets it: origin-form target, its own
/// `Host`, no proxy credentials. meshgate adds no forwarding headers here:
/// the destination is outside and need not learn about this machine.
pub fn upstream_request(upstream: &mut RequestHeader, target: &Target) -> Result<()> {
    if upstream.uri.authority().is_some() {
        let pq = upstream
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        if let Ok(uri) = pq.parse::<http::Uri>() {
            upstream.set_uri(uri);
        }
    }
    upstream.insert_header(header::HOST, target.host_header())?;
    for name in [
        header::PROXY_AUTHORIZATION,
        header::HeaderName::from_static("proxy-connection"),
        super::headers::X_MESHGATE_PEER_IDENTITY,
    ] {
        Fields::remove(upstream, &name);
    }
    super::headers::single_content_length(upstream);
    Ok(())
}
