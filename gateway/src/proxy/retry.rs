//! The retry stage: a failed attempt goes to `resilience::decide` with
//! what the request is and how it failed; a retry's wait and reason are
//! left on the context for the next attempt. The attempt loop itself is
//! Pingora's (an error marked to retry runs `upstream_peer` again).

use std::time::Instant;

use pingora::proxy::Session;
use pingora::{Error, ErrorType};

use super::ctx::RequestCtx;
use crate::resilience::{self, Reason, Verdict};

/// Why an exchange that broke after connecting failed, as `retries.on`
/// names it; `None` for what no policy retries (a protocol error).
pub fn reason_of(e: &Error) -> Option<Reason> {
    use ErrorType::*;
    match e.etype() {
        ReadTimedout | WriteTimedout => Some(Reason::Timeout),
        ConnectionClosed | ReadError | WriteError | H2Error => Some(Reason::Reset),
        _ => None,
    }
}

/// Whether an attempt that could not connect is tried again:
/// `connect_retries` first, as many as it says and outside any budget;
/// then the route's `retries` (with `connect-failure`).
pub fn after_connect_failure(
    session: &Session,
    ctx: &mut RequestCtx,
    connect_retries: usize,
) -> bool {
    after_connect_failure_for(&sent(session), ctx, connect_retries)
}

/// [`after_connect_failure`], for whichever driver sent `sent`.
pub fn after_connect_failure_for(
    sent: &Sent<'_>,
    ctx: &mut RequestCtx,
    connect_retries: usize,
) -> bool {
    if ctx.tried.len() <= connect_retries && !ctx.remaining().is_zero() {
        ctx.next_attempt_reason = Reason::ConnectFailure.label();
        // It counts toward the route's `retries.attempts`.
        ctx.policy_retries += 1;
        return true;
    }
    decide_for(sent, ctx, Reason::ConnectFailure)
}

/// What a driver knows of its request when an attempt fails.
pub struct Sent<'a> {
    pub method: &'a http::Method,
    /// The body's declared length, if any.
    pub declared: Option<u64>,
    /// Part of the body is no longer held, so it cannot be sent again.
    pub body_truncated: bool,
    /// The client has been sent a response head already.
    pub response_started: bool,
}

/// Whether the attempt that failed for `reason` is tried again. Counts an
/// exhausted budget; on a retry, leaves its wait in `ctx.backoff`.
pub fn decide(session: &Session, ctx: &mut RequestCtx, reason: Reason) -> bool {
    decide_for(&sent(session), ctx, reason)
}

/// What Pingora's session has sent of its request.
fn sent(session: &Session) -> Sent<'_> {
    let head = session.req_header();
    Sent {
        method: &head.method,
        declared: super::headers::declared_length(head),
        body_truncated: session.as_ref().retry_buffer_truncated(),
        response_started: session.response_written().is_some(),
    }
}

/// [`decide`], for whichever driver sent `sent`.
pub fn decide_for(sent: &Sent<'_>, ctx: &mut RequestCtx, reason: Reason) -> bool {
    if ctx.egress.is_some() {
        return false;
    }
    let Some(rt) = ctx.runtime.clone() else {
        return false;
    };
    let policy = ctx
        .route
        .map(|r| rt.route(r))
        .and_then(|r| r.retries.as_ref());
    let pool = ctx.upstream.and_then(|u| rt.upstreams.get(u));
    let req = resilience::Request {
        method: sent.method,
        body_bytes: ctx.body_seen.max(sent.declared.unwrap_or(0)),
        body_truncated: sent.body_truncated,
        response_started: sent.response_started,
        upgrade: ctx.websocket,
        remaining: ctx.remaining(),
    };
    let budget = pool.and_then(|p| p.budget.as_deref());
    match resilience::decide(
        policy,
        budget,
        reason,
        ctx.policy_retries,
        &req,
        Instant::now(),
    ) {
        Verdict::Retry { wait } => {
            ctx.policy_retries += 1;
            ctx.backoff = wait;
            ctx.next_attempt_reason = reason.label();
            true
        }
        Verdict::BudgetExhausted => {
            if let Some(p) = pool {
                p.series.budget_exhausted().inc();
            }
            log::debug!(
                "request_id={} not retried ({}): the retry budget of upstream `{}` is spent",
                ctx.request_id,
                reason.label(),
                pool.map_or("-", |p| p.name.as_str())
            );
            false
        }
        Verdict::GiveUp(why) => {
            log::debug!(
                "request_id={} not retried ({}): {why}",
                ctx.request_id,
                reason.label()
            );
            false
        }
    }
}
