//! Responses the gateway writes itself: direct responses, redirects, and
//! JSON error bodies, through either driver ([`Client`]).

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, StatusCode};
use pingora::http::ResponseHeader;
use pingora::{Error, ErrorSource, ErrorType, Result};

use super::client::Client;
use super::ctx::{Failure, RequestCtx};
use crate::config::model::HeaderRewrite;

/// Write a complete response: status, headers, body (omitted for HEAD).
pub async fn send(
    session: &mut impl Client,
    status: StatusCode,
    headers: &[(header::HeaderName, HeaderValue)],
    body: Bytes,
    request_id: &str,
    rewrite: Option<&HeaderRewrite>,
) -> Result<()> {
    let mut resp = ResponseHeader::build(status, Some(headers.len() + 3))?;
    for (name, value) in headers {
        match super::headers::wire_name(name) {
            Some(spelled) => resp.insert_header(spelled, value.clone())?,
            None => resp.insert_header(name.clone(), value.clone())?,
        };
    }
    // RFC 9110 §8.6: no Content-Length on 1xx and 204; a 304 would describe another representation.
    if !(status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED)
    {
        resp.insert_header(header::CONTENT_LENGTH, body.len())?;
    }
    if let Ok(id) = HeaderValue::from_str(request_id) {
        resp.insert_header("X-Request-Id", id)?;
    }
    if let Some(rw) = rewrite {
        super::headers::rewrite(&mut resp, rw);
    }
    session.discard_small_body().await;
    let head_only = *session.method() == Method::HEAD;
    let empty = head_only || body.is_empty();
    session.write_head(Box::new(resp), empty).await?;
    if !empty {
        session.write_body(body, true).await?;
    }
    Ok(())
}

/// `{"error": "...", "kind": "...", "status": N, "route": "...", "request_id": "..."}`
pub fn error_body(failure: Failure, ctx: &RequestCtx) -> Bytes {
    let mut body = serde_json::json!({
        "error": failure.message(),
        "kind": failure.kind(),
        "status": failure.status(),
        "route": ctx.route_name(),
        "request_id": ctx.request_id,
    });
    if let (Failure::UpstreamOverloaded, Some(limit)) = (failure, ctx.overflow) {
        body["limit"] = limit.as_str().into();
        body["upstream"] = ctx.upstream_name().into();
    }
    Bytes::from(body.to_string())
}

/// An answer the gateway gives instead of an upstream's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// A JSON error of the failure's status.
    Error(Failure),
    /// An authorization policy denied the request (403 naming it).
    Forbidden { policy: String },
    /// A rate-limit policy refused it (429 with `Retry-After`).
    RateLimited { policy: String, retry_after: u64 },
    /// A global rate limit could not reach Redis under `on_error = "deny"`.
    RateLimitUnavailable { policy: String },
}

impl From<Failure> for Refusal {
    fn from(f: Failure) -> Self {
        Refusal::Error(f)
    }
}

impl Refusal {
    pub fn failure(&self) -> Failure {
        match self {
            Refusal::Error(f) => *f,
            Refusal::Forbidden { .. } => Failure::Forbidden,
            Refusal::RateLimited { .. } => Failure::RateLimited,
            Refusal::RateLimitUnavailable { .. } => Failure::RateLimitUnavailable,
        }
    }
}

/// Answer with `refusal`, and note it for the log and metrics: the one way
/// a stage refuses a request. `Ok(true)`: the request is answered (what
/// `request_filter` returns).
pub async fn refuse(
    session: &mut impl Client,
    ctx: &mut RequestCtx,
    refusal: Refusal,
) -> Result<bool> {
    ctx.failure = Some(refusal.failure());
    match refusal {
        Refusal::Error(failure) => send_error(session, failure, ctx).await?,
        Refusal::Forbidden { policy } => send_forbidden(session, ctx, &policy).await?,
        Refusal::RateLimited {
            policy,
            retry_after,
        } => send_rate_limited(session, ctx, &policy, retry_after).await?,
        Refusal::RateLimitUnavailable { policy } => {
            send_rate_limit_unavailable(session, ctx, &policy).await?
        }
    }
    Ok(true)
}

pub async fn send_error(
    session: &mut impl Client,
    failure: Failure,
    ctx: &RequestCtx,
) -> Result<()> {
    if matches!(
        failure,
        Failure::BadRequest
            | Failure::HeadersTooLarge
            | Failure::UriTooLong
            | Failure::BodyTooLarge
            | Failure::BodyTimeout
    ) {
        // After a malformed request the connection's framing cannot be trusted.
        session.close_after();
    }
    if matches!(failure, Failure::ClientCertUntrusted | Failure::Overloaded) {
        // The client reconnects: to a handshake that decides afresh, or
        // (overloaded) to where its balancer sends it.
        session.close_after();
    }
    let status =
        StatusCode::from_u16(failure.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let json = HeaderValue::from_static("application/json");
    let rewrite = ctx.response_rewrite();
    send(
        session,
        status,
        &[(header::CONTENT_TYPE, json)],
        error_body(failure, ctx),
        &ctx.request_id,
        rewrite,
    )
    .await
}

/// Classify a pingora error that ended a request. `None`: the client is gone,
/// nothing to write.
pub fn classify(e: &Error, ctx: &RequestCtx) -> Option<Failure> {
    if let Some(f) = ctx.failure {
        return Some(f);
    }
    use ErrorType::*;
    match (e.esource(), e.etype()) {
        (_, HTTPStatus(504)) => Some(Failure::Timeout),
        (_, HTTPStatus(400)) => Some(Failure::BadRequest),
        (_, HTTPStatus(_)) => Some(Failure::Internal),
        (
            ErrorSource::Upstream,
            ConnectTimedout | ReadTimedout | WriteTimedout | TLSHandshakeTimedout,
        ) => Some(Failure::Timeout),
        (
            ErrorSource::Upstream,
            ConnectRefused | ConnectNoRoute | ConnectError | BindError | SocketError
            | TLSHandshakeFailure | InvalidCert | HandshakeError,
        ) => Some(Failure::UpstreamUnreachable),
        (ErrorSource::Upstream, _) => Some(Failure::UpstreamError),
        // A client too slow with its body (body_read_timeout): told so,
        // if no answer has begun.
        (ErrorSource::Downstream, ReadTimedout) if !ctx.upgraded => Some(Failure::BodyTimeout),
        (
            ErrorSource::Downstream,
            ReadError | WriteError | ConnectionClosed | ReadTimedout | WriteTimedout,
        ) => None,
        (ErrorSource::Downstream, _) => Some(Failure::BadRequest),
        (
            ErrorSource::Internal | ErrorSource::Unset,
            ConnectTimedout | ReadTimedout | WriteTimedout,
        ) => Some(Failure::Timeout),
        (ErrorSource::Internal | ErrorSource::Unset, _) => Some(Failure::Internal),
    }
}

/// 429 with `Retry-After`, the `RateLimit` fields and a JSON body naming the policy.
pub async fn send_rate_limited(
    session: &mut impl Client,
    ctx: &RequestCtx,
    policy: &str,
    retry_after: u64,
) -> Result<()> {
    let body = serde_json::json!({
        "error": Failure::RateLimited.message(),
        "kind": Failure::RateLimited.kind(),
        "status": 429,
        "policy": policy,
        "retry_after_seconds": retry_after,
        "route": ctx.route_name(),
        "request_id": ctx.request_id,
    });
    let mut hdrs = vec![
        (
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        ),
        (header::RETRY_AFTER, HeaderValue::from(retry_after)),
    ];
    hdrs.extend(rate_limit_headers(ctx));
    let rewrite = ctx.response_rewrite();
    send(
        session,
        StatusCode::TOO_MANY_REQUESTS,
        &hdrs,
        Bytes::from(body.to_string()),
        &ctx.request_id,
        rewrite,
    )
    .await
}

/// 503 for a global limit that cannot reach Redis under `on_error = "deny"`.
/// `Retry-After: 1`: Redis is given a second to come back.
pub async fn send_rate_limit_unavailable(
    session: &mut impl Client,
    ctx: &RequestCtx,
    policy: &str,
) -> Result<()> {
    let retry = (header::RETRY_AFTER, HeaderValue::from_static("1"));
    send_policy_error(
        session,
        ctx,
        Failure::RateLimitUnavailable,
        policy,
        Some(retry),
    )
    .await
}

/// 403 with a JSON body naming the policy that denied the request.
pub async fn send_forbidden(
    session: &mut impl Client,
    ctx: &RequestCtx,
    policy: &str,
) -> Result<()> {
    send_policy_error(session, ctx, Failure::Forbidden, policy, None).await
}

/// A JSON error naming the policy that caused it.
async fn send_policy_error(
    session: &mut impl Client,
    ctx: &RequestCtx,
    failure: Failure,
    policy: &str,
    extra: Option<(header::HeaderName, HeaderValue)>,
) -> Result<()> {
    let body = serde_json::json!({
        "error": failure.message(),
        "kind": failure.kind(),
        "status": failure.status(),
        "policy": policy,
        "route": ctx.route_name(),
        "request_id": ctx.request_id,
    });
    let mut hdrs = vec![(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    )];
    hdrs.extend(extra);
    let status =
        StatusCode::from_u16(failure.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    send(
        session,
        status,
        &hdrs,
        Bytes::from(body.to_string()),
        &ctx.request_id,
        ctx.response_rewrite(),
    )
    .await
}

/// The `RateLimit-Policy` / `RateLimit` pair for this request, if any.
pub fn rate_limit_headers(ctx: &RequestCtx) -> Vec<(header::HeaderName, HeaderValue)> {
    let Some((policy, limit)) = &ctx.rate_limit_headers else {
        return Vec::new();
    };
    [
        (super::headers::RATELIMIT_POLICY, policy),
        (super::headers::RATELIMIT, limit),
    ]
    .into_iter()
    .filter_map(|(n, v)| HeaderValue::from_str(v).ok().map(|v| (n, v)))
    .collect()
}
