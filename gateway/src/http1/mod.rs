//! HTTP/1.1 framing for the fast lane (#24): request heads parsed with
//! httparse into the caller's stack array of header slices and framed as
//! RFC 9112 §6 says ([`request`]), upstream response heads framed as
//! Pingora's client frames them ([`response`]), chunked bodies decoded as
//! they arrive ([`chunked`]), and a head's fields kept, edited and written
//! in the order and spelling Pingora's maps give them ([`fields`]).
//!
//! The lane serves plain heads only: anything unusual (an obsolete or
//! ambiguous form, an upgrade, `Expect`, a `Content-Length` list,
//! `Transfer-Encoding` with `Content-Length`, more fields than the array)
//! is handed back as [`request::Parse::Fallback`], for Pingora's parser and
//! its answers, unchanged. Whatever the lane does accept, it must read as
//! Pingora does: the differential test in `tests` sends the same bytes to
//! both and compares the head, the framing, keep-alive and the decoded
//! body.
//!
//! No allocation, no `HeaderMap`: a head is slices of the read buffer, and
//! the buffers themselves are kept per thread between requests ([`spare`]).

pub mod chunked;
pub mod fields;
pub mod request;
pub mod response;
pub mod spare;

#[cfg(test)]
mod tests;
