//! A chunked body (RFC 9112 §7.1) decoded as its bytes arrive, accepting
//! and refusing what Pingora's body reader does: the same chunk-size
//! parser (httparse), CRLF after each chunk's data, trailer lines ending in
//! CRLF up to the empty line, the same limits.

/// Longest chunk-size line (extensions included) before it is refused.
pub const MAX_SIZE_LINE: usize = 8 * 1024;
/// Most bytes of trailer fields.
pub const MAX_TRAILERS: usize = 64 * 1024;

const CR: u8 = b'\r';
const LF: u8 = b'\n';

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    #[error("invalid chunk size line")]
    Size,
    #[error("chunk size line (extensions) over {MAX_SIZE_LINE} bytes")]
    SizeLineTooLong,
    #[error("chunk data not followed by CRLF")]
    DataEnd,
    #[error("trailer fields over {MAX_TRAILERS} bytes")]
    TrailersTooLong,
    #[error("trailer line not ended by CRLF")]
    TrailerEnd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At a chunk-size line (`line` holds a part of it that came earlier).
    Size,
    /// In a chunk's data, this many bytes left.
    Data(u64),
    /// After a chunk's data: its CR (`false`) or LF (`true`) next.
    DataEnd(bool),
    /// After the last chunk: how much of the final CRLF CRLF is read (the
    /// last chunk's own line end counts as the first two).
    Trailers(u8),
    Done,
}

/// One chunked body's decoding state.
#[derive(Debug)]
pub struct Decoder {
    state: State,
    /// The start of a chunk-size line that did not come whole.
    line: Vec<u8>,
    trailers: usize,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder {
            state: State::Size,
            line: Vec::new(),
            trailers: 0,
        }
    }
}

impl Decoder {
    /// Whether the body has ended (its final empty line read).
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Decode from `input`, handing each piece of body data to `data`. The
    /// bytes consumed: all of `input` until the body ends, then only up to
    /// its end (the rest is the next request's).
    pub fn decode(
        &mut self,
        input: &[u8],
        mut data: impl FnMut(&[u8]),
    ) -> Result<usize, ChunkError> {
        let mut at = 0;
        while at < input.len() {
            let rest = &input[at..];
            match self.state {
                State::Done => break,
                State::Size => at += self.size_line(rest)?,
                State::Data(left) => {
                    let n = rest.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    data(&rest[..n]);
                    at += n;
                    let left = left - n as u64;
                    self.state = if left == 0 {
                        State::DataEnd(false)
                    } else {
                        State::Data(left)
                    };
                }
                State::DataEnd(cr_seen) => {
                    let want = if cr_seen { LF } else { CR };
                    if rest[0] != want {
                        return Err(ChunkError::DataEnd);
                    }
                    at += 1;
                    self.state = if cr_seen {
                        State::Size
                    } else {
                        State::DataEnd(true)
                    };
                }
                State::Trailers(end_read) => at += self.trailers(rest, end_read)?,
            }
        }
        Ok(at)
    }

    /// Read (part of) a chunk-size line; the bytes of `rest` used.
    fn size_line(&mut self, rest: &[u8]) -> Result<usize, ChunkError> {
        let joined;
        let (line, earlier) = if self.line.is_empty() {
            (rest, 0)
        } else {
            let earlier = self.line.len();
            joined = [self.line.as_slice(), rest].concat();
            (joined.as_slice(), earlier)
        };
        match httparse::parse_chunk_size(line) {
            Ok(httparse::Status::Complete((end, size))) => {
                self.line.clear();
                self.state = match size {
                    0 => State::Trailers(2),
                    n => State::Data(n),
                };
                Ok(end - earlier)
            }
            Ok(httparse::Status::Partial) => {
                if line.len() > MAX_SIZE_LINE {
                    return Err(ChunkError::SizeLineTooLong);
                }
                self.line.extend_from_slice(rest);
                Ok(rest.len())
            }
            Err(_) => Err(ChunkError::Size),
        }
    }

    /// Read trailer bytes up to the final CRLF CRLF; the bytes of `rest`
    /// used.
    fn trailers(&mut self, rest: &[u8], mut end_read: u8) -> Result<usize, ChunkError> {
        for (i, &b) in rest.iter().enumerate() {
            if end_read.is_multiple_of(2) {
                if b == CR {
                    end_read += 1;
                } else if b == LF {
                    return Err(ChunkError::TrailerEnd);
                } else {
                    // A trailer line's text: the CRLFs read so far were
                    // the end of the line before it.
                    self.trailers += usize::from(end_read) + 1;
                    end_read = 0;
                    if self.trailers > MAX_TRAILERS {
                        return Err(ChunkError::TrailersTooLong);
                    }
                }
            } else if b == LF {
                end_read += 1;
                if end_read == 4 {
                    self.state = State::Done;
                    return Ok(i + 1);
                }
            } else {
                return Err(ChunkError::TrailerEnd);
            }
        }
        self.state = State::Trailers(end_read);
        Ok(rest.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decode `wire` fed `step` bytes at a time: the body, and where it ended.
    fn decode(wire: &[u8], step: usize) -> Result<(Vec<u8>, Option<usize>), ChunkError> {
        let mut d = Decoder::default();
        let mut body = Vec::new();
        let mut at = 0;
        while at < wire.len() && !d.is_done() {
            let end = (at + step).min(wire.len());
            at += d.decode(&wire[at..end], |b| body.extend_from_slice(b))?;
        }
        Ok((body, d.is_done().then_some(at)))
    }

    #[test]
    fn bodies_decode_however_they_are_split() {
        let wire = b"5;ext=1\r\nhello\r\n1\r\n \r\n6\r\nworld!\r\n0\r\nX-Sum: 1\r\n\r\nGET /next";
        for step in [1, 2, 3, 7, wire.len()] {
            assert_eq!(
                decode(wire, step),
                Ok((b"hello world!".to_vec(), Some(wire.len() - 9))),
                "step {step}"
            );
        }
        assert_eq!(decode(b"0\r\n\r\n", 1), Ok((vec![], Some(5))));
        // Unfinished: no end yet.
        assert_eq!(decode(b"3\r\nabc\r\n", 2), Ok((b"abc".to_vec(), None)));
    }

    #[test]
    fn malformed_bodies_are_refused() {
        assert_eq!(decode(b"x\r\n", 1), Err(ChunkError::Size));
        assert_eq!(decode(b"3\r\nabcX", 1), Err(ChunkError::DataEnd));
        assert_eq!(decode(b"3\r\nabc\rX", 1), Err(ChunkError::DataEnd));
        assert_eq!(decode(b"0\r\nX: y\n\r\n", 1), Err(ChunkError::TrailerEnd));
        assert_eq!(decode(b"0\r\n\n", 1), Err(ChunkError::TrailerEnd));
        // Refused once more than the limit has come without the line's end.
        let long_ext = format!("1;{}\r\n", "e".repeat(MAX_SIZE_LINE + 600));
        assert_eq!(
            decode(long_ext.as_bytes(), 512),
            Err(ChunkError::SizeLineTooLong)
        );
        let long_trailer = format!("0\r\nX: {}\r\n\r\n", "t".repeat(MAX_TRAILERS));
        assert_eq!(
            decode(long_trailer.as_bytes(), 4096),
            Err(ChunkError::TrailersTooLong)
        );
    }
}
