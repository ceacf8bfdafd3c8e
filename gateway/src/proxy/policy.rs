//! The policy stage: a route's authorization policies, then its rate
//! limits; at most one refusal, and what the access log notes of both.

use std::net::IpAddr;

use pingora::http::RequestHeader;

use super::ctx::RequestCtx;
use super::respond::Refusal;
use crate::ratelimit;
use crate::runtime::Runtime;

/// Check `route`'s policies for `req` from `peer` (the connection's client
/// address): authorization first (a denial is a 403), then rate limits.
pub async fn check(
    rt: &Runtime,
    listener: usize,
    route: usize,
    req: &RequestHeader,
    peer: Option<IpAddr>,
    ctx: &mut RequestCtx,
) -> Option<Refusal> {
    if let Some(policy) = authorize(rt, listener, route, req, peer, ctx) {
        return Some(Refusal::Forbidden { policy });
    }
    limit(rt, listener, route, req, peer, ctx).await
}

/// The client IP that rules and `client_ip` limits see: the peer, or the
/// forwarded client when the peer is a trusted proxy.
pub(super) fn effective_client_ip(
    rt: &Runtime,
    listener: usize,
    req: &RequestHeader,
    peer: Option<IpAddr>,
) -> Option<IpAddr> {
    let trusted = trusted_proxies(rt, listener);
    peer.map(|ip| ratelimit::client_ip::client_ip(ip, &req.headers, trusted))
}

/// The peers whose `x-forwarded-for` the listener believes.
fn trusted_proxies(rt: &Runtime, listener: usize) -> &[ipnet::IpNet] {
    rt.config
        .listeners
        .get(listener)
        .map_or(&[][..], |l| &l.trusted_proxies[..])
}

/// Run the route's authorization policies; `Some(policy)` when one denies.
fn authorize(
    rt: &Runtime,
    listener: usize,
    route: usize,
    req: &RequestHeader,
    peer: Option<IpAddr>,
    ctx: &mut RequestCtx,
) -> Option<String> {
    let indexes = &rt.routes.get(route)?.authz;
    if indexes.is_empty() {
        return None;
    }
    let trusted = trusted_proxies(rt, listener);
    let subject = crate::authz::Subject {
        identity: ctx.peer_identity.as_deref(),
        source: peer
            .and_then(|ip| ratelimit::client_ip::client_ip_known(ip, &req.headers, trusted)),
        method: &req.method,
        path: req.uri.path(),
        headers: &req.headers,
    };
    let verdict = crate::authz::check(
        indexes.iter().filter_map(|i| rt.config.policies.get(*i)),
        &subject,
    );
    if let Some(policy) = verdict.denied {
        ctx.authz_note = format!("denied:{policy}");
        return Some(policy);
    }
    if !verdict.shadow_denied.is_empty() {
        ctx.authz_note = format!("shadow_denied:{}", verdict.shadow_denied.join(","));
        log::debug!(
            "request_id={} would be denied by {}",
            ctx.request_id,
            verdict.shadow_denied.join(",")
        );
    }
    None
}

/// Run the route's rate-limit policies; `Some` when one refuses the request.
async fn limit(
    rt: &Runtime,
    listener: usize,
    route: usize,
    req: &RequestHeader,
    peer: Option<IpAddr>,
    ctx: &mut RequestCtx,
) -> Option<Refusal> {
    let limits = &rt.routes.get(route)?.limits;
    if limits.is_empty() {
        return None;
    }
    let inputs = ratelimit::KeyInputs {
        client_ip: effective_client_ip(rt, listener, req, peer),
        headers: &req.headers,
        route: &rt.route(route).name,
        identity: ctx.peer_identity.as_deref(),
    };
    let verdict = ratelimit::check(limits, &inputs, rt.redis.as_deref()).await;
    ctx.rate_limit_headers = verdict.headers;
    if let Some(policy) = verdict.unavailable {
        ctx.rate_limit_note = format!("unavailable:{policy}");
        return Some(Refusal::RateLimitUnavailable { policy });
    }
    match verdict.limited {
        Some((policy, retry_after)) => {
            ctx.rate_limit_note = policy.clone();
            Some(Refusal::RateLimited {
                policy,
                retry_after: ratelimit::ceil_secs(retry_after).max(1),
            })
        }
        None => {
            let mut notes = Vec::new();
            if !verdict.shadow_limited.is_empty() {
                notes.push(format!("shadow:{}", verdict.shadow_limited.join(",")));
                log::debug!(
                    "request_id={} would be limited by {}",
                    ctx.request_id,
                    verdict.shadow_limited.join(",")
                );
            }
            if !verdict.backend_errors.is_empty() {
                notes.push(format!(
                    "backend_error:{}",
                    verdict.backend_errors.join(",")
                ));
            }
            // No spaces: the text log keeps `key=value` fields.
            ctx.rate_limit_note = notes.join(";");
            None
        }
    }
}
