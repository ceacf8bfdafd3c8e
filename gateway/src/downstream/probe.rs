//! What Pingora carries from one request to the next on a connection, read
//! where it has no getter: the start of a pipelined request, for the log
//! line of a head Pingora then refuses ([`carried_head`]).

use pingora::apps::HttpPersistentSettings;

/// The start of a request head, copied before Pingora takes the bytes: the
/// request line of a refused head, for its log line.
pub(super) struct FirstLine {
    bytes: [u8; FirstLine::MAX],
    len: usize,
}

impl FirstLine {
    /// Enough for a method and a path to tell what a client sent.
    const MAX: usize = 128;

    pub(super) fn clear(&mut self) {
        self.len = 0;
    }

    pub(super) fn fill(&mut self, head: &[u8]) {
        self.len = head.len().min(Self::MAX);
        self.bytes[..self.len].copy_from_slice(&head[..self.len]);
    }

    pub(super) fn bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    /// Only line ends: what a client may send before a request.
    pub(super) fn is_blank(&self) -> bool {
        self.len > 0 && self.bytes().iter().all(|b| matches!(b, b'\r' | b'\n'))
    }
}

impl Default for FirstLine {
    fn default() -> Self {
        FirstLine {
            bytes: [0; FirstLine::MAX],
            len: 0,
        }
    }
}

/// Whether Pingora carried the start of a pipelined request over in
/// `settings`; if so, that start goes into `line` (for the log line of a
/// head Pingora then refuses).
///
/// `HttpPersistentSettings` has no getter for those bytes, only its derived
/// `Debug`, which names each field before its value. The probe reads that
/// output up to the value of `pipelined_prefix`; when there is one, it reads
/// on through enough of its escaped bytes for a [`FirstLine`], then stops,
/// so nothing is formatted past that. A unit test holds the probe to
/// Pingora's output. `None` if the output has no such field (Pingora
/// changed it).
pub(super) fn carried_head(
    settings: &HttpPersistentSettings,
    line: &mut FirstLine,
) -> Option<bool> {
    use std::fmt::Write;

    /// Escaped text enough for `FirstLine::MAX` bytes (`\xNN` is four).
    const ESCAPED: usize = 4 * FirstLine::MAX + 8;

    #[derive(Default)]
    struct Probe {
        at_field: bool,
        found: Option<bool>,
        /// The value's `Debug` text once it is known to be `Some`.
        escaped: String,
    }
    impl Write for Probe {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            match self.found {
                None if !self.at_field => {
                    self.at_field = s == "pipelined_prefix";
                    Ok(())
                }
                None if s == ": " => Ok(()),
                None => {
                    let some = s.starts_with("Some");
                    self.found = Some(some);
                    // Stop formatting once the answer is known.
                    if some {
                        Ok(())
                    } else {
                        Err(std::fmt::Error)
                    }
                }
                Some(_) => {
                    self.escaped.push_str(s);
                    if self.escaped.len() < ESCAPED {
                        Ok(())
                    } else {
                        Err(std::fmt::Error)
                    }
                }
            }
        }
    }
    let mut probe = Probe::default();
    let _ = write!(probe, "{settings:?}");
    let carries = probe.found?;
    if carries {
        unescape(&probe.escaped, line);
    }
    Some(carries)
}

/// Into `line`, the bytes of `bytes`' `Debug` text (`(b"GET /\r\n...")`),
/// up to [`FirstLine::MAX`]; none if the text is not in that form.
fn unescape(escaped: &str, line: &mut FirstLine) {
    line.len = 0;
    let Some((_, rest)) = escaped.split_once("b\"") else {
        return;
    };
    let mut chars = rest.bytes();
    while line.len < FirstLine::MAX {
        let byte = match chars.next() {
            None | Some(b'"') => break,
            Some(b'\\') => match chars.next() {
                Some(b'n') => b'\n',
                Some(b'r') => b'\r',
                Some(b't') => b'\t',
                Some(b'0') => 0,
                Some(b'x') => {
                    let hex = [chars.next().unwrap_or(0), chars.next().unwrap_or(0)];
                    match std::str::from_utf8(&hex)
                        .ok()
                        .and_then(|h| u8::from_str_radix(h, 16).ok())
                    {
                        Some(b) => b,
                        None => break,
                    }
                }
                Some(other) => other,
                None => break,
            },
            Some(b) => b,
        };
        line.bytes[line.len] = byte;
        line.len += 1;
    }
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;
    use pingora::protocols::http::ServerSession;
    use pingora::protocols::Stream;

    use super::*;

    #[tokio::test]
    async fn the_probe_sees_a_carried_request_and_only_that() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let stream: Stream = Box::new(pingora::protocols::l4::stream::Stream::from(tcp));
        let mut session = ServerSession::new_http1(stream);
        session.set_keepalive(Some(60));
        session.set_keepalive_reuses_remaining(Some(7));
        session.set_pipelining_enabled(true);
        let mut settings = HttpPersistentSettings::for_session(&session);
        settings.set_user_context(Box::new(3u8));
        let head = |settings: &HttpPersistentSettings| {
            let mut line = FirstLine::default();
            carried_head(settings, &mut line).map(|carries| carries.then(|| line.bytes().to_vec()))
        };
        assert_eq!(head(&settings), Some(None));
        // Bytes that spell the field's name do not fool it.
        settings.set_pipelined_prefix(BytesMut::from(&b"pipelined_prefix: None"[..]));
        assert_eq!(
            head(&settings),
            Some(Some(b"pipelined_prefix: None".to_vec()))
        );
        assert_eq!(
            head(&HttpPersistentSettings::for_session(&session)),
            Some(None)
        );
        // Every kind of byte comes back as it was, up to FirstLine::MAX.
        let mut all: Vec<u8> = (0..=255u8).collect();
        all.extend_from_slice(b"\"\\\r\n\t\0");
        let mut settings = HttpPersistentSettings::for_session(&session);
        settings.set_pipelined_prefix(BytesMut::from(&all[..]));
        assert_eq!(head(&settings), Some(Some(all[..FirstLine::MAX].to_vec())));
        let mut settings = HttpPersistentSettings::for_session(&session);
        let tail = &all[200..];
        settings.set_pipelined_prefix(BytesMut::from(tail));
        assert_eq!(head(&settings), Some(Some(tail.to_vec())));
    }
}
