//! A request head, parsed and framed, or handed back for Pingora's parser.

/// Header fields a head may have in the lane; more goes to Pingora (whose
/// listener limit, `max_request_headers`, then applies as before).
pub const MAX_HEADERS: usize = 128;

/// How the request's body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body: neither `Content-Length` nor `Transfer-Encoding`.
    Empty,
    /// `Content-Length` bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// A plain request head: slices of the buffer it was read into.
#[derive(Debug)]
pub struct Head<'h, 'b> {
    pub method: &'b str,
    /// The request target as sent (origin-form: it starts with `/`).
    pub target: &'b str,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor: u8,
    pub headers: &'h [httparse::Header<'b>],
    /// The head's bytes, its final empty line included: the body (or the
    /// next request) starts here.
    pub len: usize,
    pub framing: Framing,
    /// Whether the client lets the connection carry another request
    /// (HTTP/1.1 unless `Connection: close`; HTTP/1.0 only with
    /// `Connection: keep-alive`).
    pub keep_alive: bool,
}

/// What the bytes so far are.
#[derive(Debug)]
pub enum Parse<'h, 'b> {
    Complete(Head<'h, 'b>),
    /// Not a whole head yet.
    Partial,
    /// Not for the lane: Pingora's parser reads it (and refuses it, or
    /// reads a form the lane leaves alone), as it would without the lane.
    Fallback(&'static str),
}

/// Parse the head at the start of `buf`, its fields into `fields`.
pub fn parse<'h, 'b>(buf: &'b [u8], fields: &'h mut [httparse::Header<'b>]) -> Parse<'h, 'b> {
    let mut req = httparse::Request::new(fields);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parse::Partial,
        Err(httparse::Error::TooManyHeaders) => return Parse::Fallback("too many fields"),
        // Pingora escapes some bytes in a request line httparse refuses,
        // and answers the rest.
        Err(_) => return Parse::Fallback("not a plain head"),
    };
    let (Some(method), Some(target), Some(minor)) = (req.method, req.path, req.version) else {
        return Parse::Fallback("incomplete request line");
    };
    if minor > 1 {
        return Parse::Fallback("version");
    }
    if !is_plain_target(target) {
        return Parse::Fallback("request target");
    }
    let headers: &'h [httparse::Header<'b>] = req.headers;
    let mut length = None;
    let mut chunked = false;
    let mut hosts = 0;
    let mut connection = None;
    for h in headers {
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length") {
            if length.is_some() {
                return Parse::Fallback("Content-Length lines");
            }
            match digits(h.value) {
                Some(n) => length = Some(n),
                None => return Parse::Fallback("Content-Length value"),
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            if chunked || !h.value.eq_ignore_ascii_case(b"chunked") {
                return Parse::Fallback("Transfer-Encoding");
            }
            chunked = true;
        } else if name.eq_ignore_ascii_case(b"host") {
            hosts += 1;
            if hosts > 1 || h.value.contains(&b'@') {
                return Parse::Fallback("Host");
            }
        } else if name.eq_ignore_ascii_case(b"connection") {
            if connection.is_some() {
                return Parse::Fallback("Connection lines");
            }
            connection = Some(if h.value.eq_ignore_ascii_case(b"close") {
                false
            } else if h.value.eq_ignore_ascii_case(b"keep-alive") {
                true
            } else {
                return Parse::Fallback("Connection value");
            });
        } else if name.eq_ignore_ascii_case(b"upgrade") || name.eq_ignore_ascii_case(b"expect") {
            return Parse::Fallback("upgrade or expectation");
        }
    }
    let framing = match (chunked, length) {
        (true, Some(_)) => return Parse::Fallback("Transfer-Encoding with Content-Length"),
        (true, None) if minor == 0 => return Parse::Fallback("Transfer-Encoding in HTTP/1.0"),
        (true, None) => Framing::Chunked,
        (false, Some(n)) => Framing::Length(n),
        (false, None) => Framing::Empty,
    };
    Parse::Complete(Head {
        method,
        target,
        minor,
        headers,
        len,
        framing,
        keep_alive: connection.unwrap_or(minor == 1),
    })
}

/// 1 to 18 ASCII digits (no sign, no list): what every client sends.
fn digits(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 18 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(v.iter().fold(0, |n, d| n * 10 + u64::from(d - b'0')))
}

/// Origin-form with only the characters RFC 3986 allows unescaped in a
/// path and query: what the URI parser reads exactly as sent.
fn is_plain_target(t: &str) -> bool {
    t.starts_with('/')
        && t.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'/' | b'?'
                        | b'-'
                        | b'.'
                        | b'_'
                        | b'~'
                        | b'%'
                        | b'!'
                        | b'$'
                        | b'&'
                        | b'\''
                        | b'('
                        | b')'
                        | b'*'
                        | b'+'
                        | b','
                        | b';'
                        | b'='
                        | b':'
                        | b'@'
                )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> Result<(Framing, bool, usize), String> {
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        match parse(text.as_bytes(), &mut fields) {
            Parse::Complete(h) => Ok((h.framing, h.keep_alive, h.len)),
            Parse::Partial => Err("partial".into()),
            Parse::Fallback(why) => Err(why.into()),
        }
    }

    #[test]
    fn plain_heads_are_framed() {
        let get = "GET /a?b=c HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(head(get), Ok((Framing::Empty, true, get.len())));
        let post = "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\n\r\nbody";
        assert_eq!(head(post), Ok((Framing::Length(12), true, post.len() - 4)));
        let chunked = "POST / HTTP/1.1\r\nHost: x\r\ntransfer-encoding: Chunked\r\n\r\n";
        assert_eq!(head(chunked).map(|h| h.0), Ok(Framing::Chunked));
        let close = "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
        assert_eq!(head(close).map(|h| h.1), Ok(false));
        let old = "GET / HTTP/1.0\r\n\r\n";
        assert_eq!(head(old).map(|h| h.1), Ok(false));
        let old_kept = "GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n";
        assert_eq!(head(old_kept).map(|h| h.1), Ok(true));
        assert_eq!(head("GET / HTTP/1.1\r\nHost: x\r\n"), Err("partial".into()));
    }

    #[test]
    fn anything_unusual_goes_to_pingora() {
        for (text, why) in [
            (
                "GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
                "Content-Length lines",
            ),
            (
                "GET / HTTP/1.1\r\nContent-Length: 1, 1\r\n\r\n",
                "Content-Length value",
            ),
            (
                "GET / HTTP/1.1\r\nContent-Length: +1\r\n\r\n",
                "Content-Length value",
            ),
            (
                "GET / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                "Transfer-Encoding",
            ),
            (
                "GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
                "Transfer-Encoding with Content-Length",
            ),
            (
                "GET / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
                "Transfer-Encoding in HTTP/1.0",
            ),
            ("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "Host"),
            (
                "GET / HTTP/1.1\r\nConnection: keep-alive, Upgrade\r\n\r\n",
                "Connection value",
            ),
            (
                "GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
                "upgrade or expectation",
            ),
            (
                "PUT / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
                "upgrade or expectation",
            ),
            ("GET http://a/ HTTP/1.1\r\n\r\n", "request target"),
            ("GET /a|b HTTP/1.1\r\n\r\n", "request target"),
            ("GET / HTTP/1.1\r\nBad Name: x\r\n\r\n", "not a plain head"),
        ] {
            assert_eq!(head(text), Err(why.into()), "{text:?}");
        }
        let many = format!(
            "GET / HTTP/1.1\r\n{}\r\n",
            "a: b\r\n".repeat(MAX_HEADERS + 1)
        );
        assert_eq!(head(&many), Err("too many fields".into()));
    }
}
