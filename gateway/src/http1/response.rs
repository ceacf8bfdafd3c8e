//! An upstream's response head, read as Pingora's HTTP/1 client reads it:
//! the lane has sent the request by then, so there is no handing back, and
//! every upstream answer must be framed the same in both lanes (the
//! differential test in `tests` holds it to that).

/// How the response's body is delimited (RFC 9112 §6.3, as Pingora's
/// client decides it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// A 1xx other than 101: the final response follows.
    Interim,
    /// No body: `HEAD`, 204, 304.
    Empty,
    Length(u64),
    Chunked,
    /// Until the upstream closes (and the connection is not reused).
    UntilClose,
}

/// A response head: slices of the buffer it was read into.
#[derive(Debug)]
pub struct Head<'h, 'b> {
    pub status: u16,
    pub reason: Option<&'b str>,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor: u8,
    pub headers: &'h [httparse::Header<'b>],
    /// The head's bytes: the body starts here.
    pub len: usize,
}

#[derive(Debug)]
pub enum Parse<'h, 'b> {
    Complete(Head<'h, 'b>),
    Partial,
    /// Not an HTTP/1 response head (502).
    Invalid(&'static str),
}

/// Parse the response head at the start of `buf`, with the leniency
/// Pingora's client has for upstreams (spaces after a field name, folded
/// field lines).
pub fn parse<'h, 'b>(buf: &'b [u8], fields: &'h mut [httparse::Header<'b>]) -> Parse<'h, 'b> {
    let mut resp = httparse::Response::new(fields);
    let mut config = httparse::ParserConfig::default();
    config.allow_spaces_after_header_name_in_responses(true);
    config.allow_obsolete_multiline_headers_in_responses(true);
    let len = match config.parse_response(&mut resp, buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parse::Partial,
        Err(httparse::Error::TooManyHeaders) => return Parse::Invalid("too many fields"),
        Err(_) => return Parse::Invalid("not an HTTP/1 response head"),
    };
    let (Some(status), Some(minor)) = (resp.code, resp.version) else {
        return Parse::Invalid("incomplete status line");
    };
    if !(100..=999).contains(&status) {
        return Parse::Invalid("status code");
    }
    Parse::Complete(Head {
        status,
        reason: resp.reason,
        minor,
        headers: resp.headers,
        len,
    })
}

impl Head<'_, '_> {
    /// The reason phrase the status line had, or the status code's own
    /// when it had none.
    pub fn reason_phrase(&self) -> Option<&str> {
        reason_phrase(self.reason, self.status)
    }

    fn lines<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'s [u8]> + 's {
        self.headers
            .iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    }

    /// Whether `Transfer-Encoding` is present (it overrides
    /// `Content-Length`, which is then dropped).
    pub fn has_transfer_encoding(&self) -> bool {
        self.lines("transfer-encoding").next().is_some()
    }

    /// Whether the last coding of the last `Transfer-Encoding` line is
    /// `chunked`.
    fn is_chunked(&self) -> bool {
        self.lines("transfer-encoding").last().is_some_and(|v| {
            let last = v.rsplit(|&b| b == b',').next().unwrap_or(v);
            last.trim_ascii().eq_ignore_ascii_case(b"chunked")
        })
    }

    /// `Content-Length` reconciled over its lines and lists (identical
    /// values collapse); `Err` when present but ambiguous or invalid.
    fn content_length(&self) -> Result<Option<u64>, &'static str> {
        let mut length = None;
        let mut present = false;
        for line in self.lines("content-length") {
            present = true;
            if !line
                .iter()
                .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
            {
                return Err("invalid Content-Length");
            }
            for v in line.split(|&b| b == b',') {
                let n = from_digits(v.trim_ascii()).ok_or("invalid Content-Length")?;
                match length {
                    None => length = Some(n),
                    Some(prev) if prev != n => return Err("conflicting Content-Length"),
                    Some(_) => {}
                }
            }
        }
        match length {
            None if present => Err("invalid Content-Length"),
            l => Ok(l),
        }
    }

    /// How the body is delimited, for a request that was (`head`) or was
    /// not a `HEAD`; `Err` for an invalid `Content-Length` (502).
    pub fn framing(&self, head: bool) -> Result<Framing, &'static str> {
        let te = self.has_transfer_encoding();
        // Validated before the body is looked at, as Pingora does.
        let length = if te { None } else { self.content_length()? };
        match self.status {
            101 => {}
            100..=199 => return Ok(Framing::Interim),
            204 | 304 => return Ok(Framing::Empty),
            _ => {}
        }
        if head {
            return Ok(Framing::Empty);
        }
        if te && self.is_chunked() {
            return Ok(Framing::Chunked);
        }
        match length {
            Some(n) => Ok(Framing::Length(n)),
            None => Ok(Framing::UntilClose),
        }
    }

    /// Whether the connection may be reused after this response, its body
    /// read whole: `request_close` when the request said
    /// `Connection: close`; `overread` when bytes came after the body.
    pub fn keep_alive(&self, framing: Framing, request_close: bool, overread: bool) -> bool {
        if self.status == 101 || framing == Framing::UntilClose || overread {
            return false;
        }
        if self.minor == 0 && self.has_transfer_encoding() {
            return false;
        }
        if request_close {
            return false;
        }
        // The first `Connection` line, as Pingora reads it.
        match self.lines("connection").next().map(connection_keep_alive) {
            Some(Some(keep)) => keep,
            _ => self.minor == 1,
        }
    }
}

/// The reason phrase a status line had (`reason`), or `status`'s own when
/// it had none.
pub fn reason_phrase(reason: Option<&str>, status: u16) -> Option<&str> {
    reason.or_else(|| {
        http::StatusCode::from_u16(status)
            .ok()
            .and_then(|s| s.canonical_reason())
    })
}

/// What a `Connection` value says of keep-alive: `keep-alive` alone, or a
/// list with `close` in it; `None` otherwise.
fn connection_keep_alive(v: &[u8]) -> Option<bool> {
    if v.eq_ignore_ascii_case(b"close") {
        return Some(false);
    }
    if v.eq_ignore_ascii_case(b"keep-alive") {
        return Some(true);
    }
    let text = std::str::from_utf8(v).unwrap_or("");
    text.split(',')
        .map(str::trim)
        .any(|t| t.eq_ignore_ascii_case("close"))
        .then_some(false)
}

/// A field value as it is passed on: obs-folds collapsed to one space and
/// stray CR, LF and NUL made spaces (RFC 9112 §5.2, RFC 9110 §5.5), by
/// Pingora's own function, so both lanes pass on the same bytes. Borrowed
/// when there is nothing to change (nearly always).
pub fn field_value(raw: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    if raw.iter().any(|b| matches!(b, b'\r' | b'\n' | b'\0')) {
        std::borrow::Cow::Owned(
            pingora::http::header_value_from_slice(raw)
                .as_bytes()
                .to_vec(),
        )
    } else {
        std::borrow::Cow::Borrowed(raw)
    }
}

fn from_digits(b: &[u8]) -> Option<u64> {
    if b.is_empty() {
        return None;
    }
    b.iter().try_fold(0u64, |n, &d| {
        d.is_ascii_digit()
            .then(|| n.checked_mul(10)?.checked_add(u64::from(d - b'0')))
            .flatten()
    })
}

/// Fields a response head may have (as many as Pingora's client takes).
pub const MAX_FIELDS: usize = 256;

#[cfg(test)]
mod tests {
    use super::*;

    fn framing(text: &str, head: bool) -> Result<Framing, &'static str> {
        let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
        match parse(text.as_bytes(), &mut fields) {
            Parse::Complete(h) => h.framing(head),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn responses_are_framed_as_rfc_9112_says() {
        let ok = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n";
        assert_eq!(framing(ok, false), Ok(Framing::Length(5)));
        assert_eq!(framing(ok, true), Ok(Framing::Empty));
        let chunked =
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 5\r\n\r\n";
        assert_eq!(framing(chunked, false), Ok(Framing::Chunked));
        let close = "HTTP/1.1 200 OK\r\n\r\n";
        assert_eq!(framing(close, false), Ok(Framing::UntilClose));
        assert_eq!(
            framing("HTTP/1.1 204 No Content\r\n\r\n", false),
            Ok(Framing::Empty)
        );
        assert_eq!(
            framing("HTTP/1.1 103 Early Hints\r\n\r\n", false),
            Ok(Framing::Interim)
        );
        let same = "HTTP/1.1 200 OK\r\nContent-Length: 3, 3\r\nContent-Length: 3\r\n\r\n";
        assert_eq!(framing(same, false), Ok(Framing::Length(3)));
        let conflict = "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n";
        assert!(framing(conflict, false).is_err());
        assert!(framing("HTTP/1.1 200 OK\r\nContent-Length: +3\r\n\r\n", false).is_err());
    }
}
