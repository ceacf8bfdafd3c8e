//! Buffers kept per worker thread between requests, so that the HTTP/1.1
//! path allocates no buffer per request: a request's buffer goes back
//! when the request is over (once nothing else holds part of it), and
//! the next request on the thread takes it, its allocation reclaimed.
//!
//! Only buffers of ordinary size are kept ([`MAX_KEPT`]): one grown by a
//! large head or body is freed as before. An idle connection holds none.

use std::cell::Cell;

use bytes::{Bytes, BytesMut};

/// What a buffer is for: one kept of each, per thread.
#[derive(Clone, Copy)]
pub enum Use {
    /// A request head as read from the client.
    Head,
    /// The request as sent upstream.
    Request,
    /// An upstream's answer as read.
    Response,
    /// A response head written to the client.
    Out,
}

/// The largest buffer kept.
pub const MAX_KEPT: usize = 64 * 1024;

thread_local! {
    static KEPT: [Cell<Option<BytesMut>>; 4] =
        const { [const { Cell::new(None) }; 4] };
}

/// An empty buffer for `what` with room for `capacity` bytes: the one kept,
/// when there is one.
pub fn take(what: Use, capacity: usize) -> BytesMut {
    match KEPT.with(|k| k[what as usize].take()) {
        Some(mut buf) => {
            buf.clear();
            // Reclaims the whole allocation when nothing else shares it.
            buf.reserve(capacity);
            buf
        }
        None => BytesMut::with_capacity(capacity),
    }
}

/// Keep `buf` for the next request of its `what` on this thread.
pub fn give(what: Use, buf: BytesMut) {
    if buf.capacity() <= MAX_KEPT {
        KEPT.with(|k| k[what as usize].set(Some(buf)));
    }
}

/// Keep the buffer behind `bytes`, if `bytes` is its only holder.
pub fn give_bytes(what: Use, bytes: Bytes) {
    if let Ok(buf) = bytes.try_into_mut() {
        give(what, buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_given_back_is_taken_again_with_its_allocation() {
        let mut buf = take(Use::Response, 1024);
        buf.extend_from_slice(b"HTTP/1.1 200 OK\r\n\r\nbody");
        let head = buf.split_to(19).freeze();
        let at = head.as_ptr();
        give(Use::Response, buf);
        drop(head);
        let again = take(Use::Response, 1024);
        assert!(again.is_empty());
        assert_eq!(again.as_ptr(), at, "the same allocation, from its start");

        // Still shared when taken: a new one, the other left alone.
        let mut buf = again;
        buf.extend_from_slice(b"abc");
        let held = buf.split().freeze();
        give(Use::Response, buf);
        let other = take(Use::Response, 1024);
        assert_ne!(other.as_ptr(), held.as_ptr());
        assert_eq!(&held[..], b"abc");

        // Too large to keep.
        give(Use::Out, BytesMut::with_capacity(MAX_KEPT + 1));
        assert!(take(Use::Out, 0).capacity() < MAX_KEPT);
    }
}
