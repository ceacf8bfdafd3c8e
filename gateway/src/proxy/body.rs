//! The request body stage: its size limit, its read deadline, and the
//! small bodies read whole before an upstream is chosen.

use std::time::Duration;

use bytes::Bytes;
use http::header;
use pingora::proxy::Session;
use pingora::{Error, ErrorType, Result};

use super::ctx::{Failure, RequestCtx};

/// How long the next read of the request body may wait: the listener's
/// `body_read_timeout`, or what is left of the route's deadline if less.
pub(super) fn set_read_deadline(session: &mut Session, ctx: &RequestCtx) {
    let wait = ctx
        .body_read_timeout
        .min(ctx.remaining())
        .max(Duration::from_millis(1));
    session.set_read_timeout(Some(wait));
}

/// Read a small body of declared length whole, before an upstream is
/// chosen (the route's `buffer_request_body`): a slow client then holds no
/// upstream connection while it sends. Pingora replays it to the upstream.
pub(super) async fn buffer(session: &mut Session, ctx: &mut RequestCtx) -> Result<()> {
    // A client waiting for 100 Continue would wait for us; its body is
    // streamed as it comes.
    if session.req_header().headers.contains_key(header::EXPECT) {
        return Ok(());
    }
    session.enable_retry_buffering();
    loop {
        set_read_deadline(session, ctx);
        match session.read_request_body().await {
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(e) => {
                if *e.etype() == ErrorType::ReadTimedout {
                    ctx.failure = Some(Failure::BodyTimeout);
                }
                return Err(e);
            }
        }
    }
    ctx.body_buffered = true;
    Ok(())
}

/// Count a chunk of a body as it streams (a declared length was checked
/// before routing): over the route's `max_body_bytes` it is refused with
/// 413, and past the route's deadline with 408.
pub(super) fn count(
    session: &mut Session,
    chunk: Option<&Bytes>,
    end_of_stream: bool,
    ctx: &mut RequestCtx,
) -> Result<()> {
    if ctx.upgraded {
        // A WebSocket's bytes are not a request body.
        return Ok(());
    }
    ctx.body_seen += chunk.map_or(0, |b| b.len() as u64);
    // The route's deadline covers the upload too: the next read waits
    // no longer than what is left of it. Not a WebSocket's: its
    // connection outlives the deadline once upgraded.
    if !ctx.body_buffered && !ctx.websocket {
        if ctx.remaining().is_zero() && !end_of_stream {
            ctx.failure = Some(Failure::BodyTimeout);
            session.set_keepalive(None);
            return Error::e_explain(
                ErrorType::ReadTimedout,
                "the route's timeout passed while the request body was arriving",
            );
        }
        set_read_deadline(session, ctx);
    }
    let limit = ctx
        .runtime
        .as_ref()
        .zip(ctx.route)
        .map_or(u64::MAX, |(rt, r)| rt.route(r).max_body_bytes);
    if ctx.body_seen > limit {
        super::count_rejection(ctx, "body_size");
        ctx.failure = Some(Failure::BodyTooLarge);
        session.set_keepalive(None);
        return Error::e_explain(
            ErrorType::HTTPStatus(413),
            "request body over the route's max_body_bytes",
        );
    }
    Ok(())
}
