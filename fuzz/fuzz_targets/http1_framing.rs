//! The fast lane's HTTP/1.1 framing on arbitrary bytes: the first byte
//! says how the body is split into reads, the rest is the wire. Parsing a
//! head and decoding its body must never panic, a head never claims more
//! bytes than it was given, and a chunked body decodes to the same bytes
//! (or the same error) however its reads are split.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshgate::http1::chunked::{ChunkError, Decoder};
use meshgate::http1::request::{parse, Framing, Parse, MAX_HEADERS};

/// The body and where it ended (`None`: not yet), or that it is malformed.
fn decode(body: &[u8], step: usize) -> Result<(Vec<u8>, Option<usize>), ChunkError> {
    let mut d = Decoder::default();
    let mut out = Vec::new();
    let mut at = 0;
    while at < body.len() && !d.is_done() {
        let end = (at + step).min(body.len());
        let used = d.decode(&body[at..end], |b| out.extend_from_slice(b))?;
        assert!(used <= end - at);
        at += used;
    }
    assert!(out.len() <= body.len());
    Ok((out, d.is_done().then_some(at)))
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, wire)) = data.split_first() else {
        return;
    };
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let Parse::Complete(head) = parse(wire, &mut fields) else {
        return;
    };
    assert!(head.len <= wire.len());
    assert!(head.minor <= 1);
    assert!(head.target.starts_with('/'));
    if head.framing == Framing::Chunked {
        let body = &wire[head.len..];
        let whole = decode(body, body.len().max(1));
        let split = decode(body, usize::from(split % 16) + 1);
        // The same outcome, but for the limit on a chunk-size line still
        // unfinished after a read (as Pingora's reader has it).
        match (&whole, &split) {
            (Ok(a), Ok(b)) => assert_eq!(a, b),
            (Err(a), Err(b)) if a == b => {}
            (_, Err(ChunkError::SizeLineTooLong)) => {}
            _ => panic!("whole {whole:?} vs split {split:?}"),
        }
    }
});
