//! Telling where an HTTP/1 request head ends, and whether it is still
//! within its listener's limits, as its bytes arrive: so that a head is
//! refused as soon as it passes `max_request_header_bytes` (or its request
//! line `max_uri_bytes`), never buffered beyond them, and reaches Pingora
//! only when it is complete.

/// What a head's bytes so far say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Only empty lines so far (RFC 9112 §2.2 lets a client send some
    /// before a request); not a head yet.
    Blank,
    /// A head, not complete yet.
    Partial,
    /// A complete head, ending before this offset.
    Complete(usize),
    /// The request line alone is past the URI limit (`414`).
    UriTooLong,
    /// The head is past the header-bytes limit (`431`).
    TooLarge,
}

/// The limits a head is read under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadLimits {
    /// Request line and fields, as on the wire.
    pub max_bytes: usize,
    /// The request target.
    pub max_uri_bytes: usize,
}

/// Room on a request line for what is not the target: method, spaces and
/// the protocol. A line this much over `max_uri_bytes` has a target over it
/// whatever its method; shorter ones are for the proxy's exact count.
const LINE_SLACK: usize = 64;

/// Where the head in `buf` stands. `scanned` is how far an earlier call
/// looked (0 at first); pass back the value it leaves, so that each byte is
/// searched about once however the head arrives.
pub fn progress(buf: &[u8], limits: HeadLimits, scanned: &mut usize) -> Progress {
    let Some(start) = buf.iter().position(|&b| b != b'\r' && b != b'\n') else {
        return Progress::Blank;
    };
    let head = &buf[start..];
    let line = memchr::memchr(b'\n', head).unwrap_or(head.len());
    if line > limits.max_uri_bytes + LINE_SLACK {
        return Progress::UriTooLong;
    }
    // A line end followed by an empty line ("\n\n" or "\n\r\n") ends it;
    // restart a little before the last search's end, which may have cut
    // such a pair in two.
    let from = scanned.saturating_sub(start).saturating_sub(2);
    *scanned = buf.len();
    for lf in memchr::memchr_iter(b'\n', &head[from..]).map(|i| from + i) {
        let end = match &head[lf + 1..] {
            [b'\n', ..] => lf + 2,
            [b'\r', b'\n', ..] => lf + 3,
            _ => continue,
        };
        return if end > limits.max_bytes {
            Progress::TooLarge
        } else {
            Progress::Complete(start + end)
        };
    }
    if head.len() > limits.max_bytes {
        Progress::TooLarge
    } else {
        Progress::Partial
    }
}

/// [`progress`] for a head that arrives in pieces kept apart (so that a
/// slow head's memory comes in equal chunks the allocator reuses, not in
/// doubling copies): fed each piece in turn, it carries what it needs.
#[derive(Debug, Clone, Copy)]
pub struct HeadScan {
    state: Scan,
    limits: HeadLimits,
    /// Bytes of the head so far, leading empty lines excluded.
    bytes: usize,
    /// Bytes of the request line, its line feed excluded, once it ended.
    line: Option<usize>,
}

/// Where the scan is, byte by byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scan {
    /// Before the request line: only empty lines so far.
    Start,
    /// Inside a line.
    InLine,
    /// Just after a line feed: another one ends the head.
    LineStart,
    /// After a line feed and a carriage return.
    LineStartCr,
}

impl HeadScan {
    pub fn new(limits: HeadLimits) -> Self {
        HeadScan {
            state: Scan::Start,
            limits,
            bytes: 0,
            line: None,
        }
    }

    /// Feed the next piece; offsets in `Complete` count from the start of
    /// the first piece.
    pub fn feed(&mut self, piece: &[u8], before: usize) -> Progress {
        for (i, &b) in piece.iter().enumerate() {
            if self.state != Scan::Start {
                self.bytes += 1;
            }
            self.state = match (self.state, b) {
                (Scan::Start, b'\r' | b'\n') => Scan::Start,
                (Scan::Start, _) => {
                    self.bytes = 1;
                    Scan::InLine
                }
                (Scan::InLine, b'\n') => {
                    if self.line.is_none() {
                        self.line = Some(self.bytes - 1);
                        if self.bytes - 1 > self.limits.max_uri_bytes + LINE_SLACK {
                            return Progress::UriTooLong;
                        }
                    }
                    Scan::LineStart
                }
                (Scan::LineStart, b'\r') => Scan::LineStartCr,
                (Scan::LineStart | Scan::LineStartCr, b'\n') => {
                    return if self.bytes > self.limits.max_bytes {
                        Progress::TooLarge
                    } else {
                        Progress::Complete(before + i + 1)
                    };
                }
                _ => Scan::InLine,
            };
        }
        if self.state == Scan::Start {
            Progress::Blank
        } else if self.line.is_none() && self.bytes > self.limits.max_uri_bytes + LINE_SLACK {
            Progress::UriTooLong
        } else if self.bytes > self.limits.max_bytes {
            Progress::TooLarge
        } else {
            Progress::Partial
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: HeadLimits = HeadLimits {
        max_bytes: 200,
        max_uri_bytes: 50,
    };

    /// Feed `parts` one after another into one buffer, as reads would.
    fn feed(parts: &[&[u8]]) -> Progress {
        let mut buf = Vec::new();
        let mut scanned = 0;
        let mut last = Progress::Blank;
        for p in parts {
            buf.extend_from_slice(p);
            last = progress(&buf, LIMITS, &mut scanned);
        }
        last
    }

    #[test]
    fn the_blank_line_ends_the_head_wherever_the_reads_split_it() {
        let head = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        assert_eq!(feed(&[head]), Progress::Complete(head.len()));
        // Split at every byte.
        let parts: Vec<&[u8]> = head.chunks(1).collect();
        assert_eq!(feed(&parts), Progress::Complete(head.len()));
        // Bare LF, and a body after the head.
        assert_eq!(
            feed(&[b"GET / HTTP/1.1\nHost: a\n\nbody"]),
            Progress::Complete(24)
        );
        // Empty lines before the request are no end.
        assert_eq!(feed(&[b"\r\n\r\n\r\n"]), Progress::Blank);
        assert_eq!(feed(&[b"\r\n\r\nGET / HTTP/1.1\r\n"]), Progress::Partial);
        assert_eq!(
            feed(&[b"\r\n", b"GET / HTTP/1.1\r\n", b"\r\n"]),
            Progress::Complete(20)
        );
        // Not yet.
        assert_eq!(feed(&[b"GET / HTTP/1.1\r\nHost: a\r\n"]), Progress::Partial);
        assert_eq!(
            feed(&[b"GET / HTTP/1.1\r\nX: a\r\rb\r\n"]),
            Progress::Partial
        );
        // The HTTP/2 preface holds an empty line too.
        assert!(matches!(
            feed(&[b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"]),
            Progress::Complete(_)
        ));
    }

    /// The piecewise scan agrees with the one over a whole buffer, however
    /// the head is cut into pieces.
    #[test]
    fn the_piecewise_scan_agrees_with_the_whole_one() {
        let heads: Vec<Vec<u8>> = vec![
            b"GET / HTTP/1.1\r\nHost: a\r\n\r\nbody".to_vec(),
            b"\r\n\r\nGET / HTTP/1.1\nHost: a\n\n".to_vec(),
            b"GET / HTTP/1.1\r\nX: a\r\rb\r\n\r\n".to_vec(),
            b"\r\n\r\n".to_vec(),
            format!("GET /{} HTTP/1.1\r\n", "u".repeat(130)).into_bytes(),
            format!("GET / HTTP/1.1\r\nX: {}\r\n", "b".repeat(210)).into_bytes(),
            format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "b".repeat(160)).into_bytes(),
        ];
        for head in &heads {
            let whole = progress(head, LIMITS, &mut 0);
            for size in [1, 2, 3, 7, 64, head.len().max(1)] {
                let mut scan = HeadScan::new(LIMITS);
                let mut last = Progress::Blank;
                let mut before = 0;
                for piece in head.chunks(size) {
                    last = scan.feed(piece, before);
                    before += piece.len();
                    if !matches!(last, Progress::Blank | Progress::Partial) {
                        break;
                    }
                }
                assert_eq!(
                    last,
                    whole,
                    "{:?} in pieces of {size}",
                    String::from_utf8_lossy(head)
                );
            }
        }
    }

    #[test]
    fn a_head_past_its_limits_is_refused_before_it_ends() {
        let long_line = format!("GET /{} HTTP/1.1", "a".repeat(60));
        // Within LINE_SLACK of the limit: the proxy counts it exactly.
        assert_eq!(feed(&[long_line.as_bytes()]), Progress::Partial);
        let longer = format!("GET /{}", "a".repeat(120));
        assert_eq!(feed(&[longer.as_bytes()]), Progress::UriTooLong);
        // Past the header bytes, with no end in sight.
        let big = format!("GET / HTTP/1.1\r\nX-Big: {}", "b".repeat(200));
        assert_eq!(feed(&[big.as_bytes()]), Progress::TooLarge);
        // Or with the end in the same read.
        let big = format!("GET / HTTP/1.1\r\nX-Big: {}\r\n\r\n", "b".repeat(200));
        assert_eq!(feed(&[big.as_bytes()]), Progress::TooLarge);
        // Exactly at the limit is fine.
        let pad = 200 - "GET / HTTP/1.1\r\nX: \r\n\r\n".len();
        let exact = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "c".repeat(pad));
        assert_eq!(exact.len(), 200);
        assert_eq!(feed(&[exact.as_bytes()]), Progress::Complete(200));
    }
}
