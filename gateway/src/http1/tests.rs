//! Differential test: random requests, read by the lane's parser and by
//! Pingora's HTTP/1 server session from the same bytes. Whatever the lane
//! accepts, Pingora must read the same way: method, target, version,
//! fields, keep-alive, and the body (its bytes, or that it is malformed or
//! cut short).

use std::io::Cursor;

use pingora::protocols::http::v1::server::HttpSession;

use super::chunked::Decoder;
use super::request::{parse, Framing, Parse, MAX_HEADERS};

/// What a reader made of a request.
#[derive(Debug, PartialEq, Eq)]
struct Read {
    method: String,
    target: Vec<u8>,
    minor: u8,
    /// Lower-case names with their values, sorted (Pingora's map groups a
    /// name's lines).
    fields: Vec<(String, Vec<u8>)>,
    keep_alive: bool,
    /// The body, or that it was malformed or cut short.
    body: Result<Vec<u8>, ()>,
}

async fn pingora_reads(wire: &[u8]) -> Option<Read> {
    let mut s = HttpSession::new(Box::new(Cursor::new(wire.to_vec())));
    if !matches!(s.read_request().await, Ok(Some(_))) {
        return None;
    }
    let req = s.req_header();
    let mut fields: Vec<(String, Vec<u8>)> = req
        .headers
        .iter()
        .map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec()))
        .collect();
    fields.sort();
    let mut read = Read {
        method: req.method.as_str().to_string(),
        target: req.raw_path().to_vec(),
        minor: match req.version {
            http::Version::HTTP_10 => 0,
            http::Version::HTTP_11 => 1,
            _ => 9,
        },
        fields,
        keep_alive: s.will_keepalive(),
        body: Ok(Vec::new()),
    };
    let mut body = Vec::new();
    read.body = loop {
        match s.read_body_bytes().await {
            Ok(Some(b)) => body.extend_from_slice(&b),
            Ok(None) => break Ok(body),
            Err(_) => break Err(()),
        }
    };
    Some(read)
}

/// The lane's reading, or `None` when it leaves the head to Pingora.
/// `step`: the body is fed to the decoder this many bytes at a time.
fn lane_reads(wire: &[u8], step: usize) -> Option<Read> {
    let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let Parse::Complete(head) = parse(wire, &mut storage) else {
        return None;
    };
    let mut fields: Vec<(String, Vec<u8>)> = head
        .headers
        .iter()
        .map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec()))
        .collect();
    fields.sort();
    let rest = &wire[head.len..];
    let body = match head.framing {
        Framing::Empty => Ok(Vec::new()),
        Framing::Length(n) => usize::try_from(n)
            .ok()
            .and_then(|n| rest.get(..n))
            .map(<[u8]>::to_vec)
            .ok_or(()),
        Framing::Chunked => decode_chunked(rest, step).0,
    };
    Some(Read {
        method: head.method.to_string(),
        target: head.target.as_bytes().to_vec(),
        minor: head.minor,
        fields,
        keep_alive: head.keep_alive,
        body,
    })
}

/// A chunked body at the start of `rest`, fed to the decoder `step` bytes
/// at a time: the body (an error when malformed or cut short) and the
/// bytes it took.
fn decode_chunked(rest: &[u8], step: usize) -> (Result<Vec<u8>, ()>, usize) {
    let mut d = Decoder::default();
    let mut body = Vec::new();
    let mut used = 0;
    while used < rest.len() && !d.is_done() {
        let end = (used + step).min(rest.len());
        match d.decode(&rest[used..end], |b| body.extend_from_slice(b)) {
            Ok(n) => used += n,
            Err(_) => return (Err(()), used),
        }
    }
    if d.is_done() {
        (Ok(body), used)
    } else {
        (Err(()), used)
    }
}

/// Random requests, mostly plausible, with the forms smuggling and
/// framing bugs live in.
struct Gen(fastrand::Rng);

impl Gen {
    fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
        from[self.0.usize(..from.len())]
    }

    fn chance(&mut self, percent: u32) -> bool {
        self.0.u32(..100) < percent
    }

    fn request(&mut self) -> Vec<u8> {
        let eol = if self.chance(3) { "\n" } else { "\r\n" };
        let method = self.pick(&[
            "GET", "POST", "PUT", "HEAD", "DELETE", "PATCH", "get", "OPTIONS",
        ]);
        let target = if self.chance(70) {
            self.pick(&["/", "/a/b?c=d&e=f", "/x%20y", "/a;b=c", "/~u/(x)"])
        } else {
            self.pick(&["/a|b", "http://h/x", "*", "/%zz", "/a\"b", "/{x}"])
        };
        let version = self.pick(&[
            "HTTP/1.1", "HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.2",
        ]);
        let mut head = format!("{method} {target} {version}{eol}");
        let mut chunked = false;
        let mut length = None;
        for _ in 0..self.0.usize(..6) {
            let field = match self.0.u32(..12) {
                0 => format!(
                    "Host: {}",
                    self.pick(&["a.test", "a.test:8080", "u@a.test", "[::1]:1", ""])
                ),
                1 => {
                    let n = self.0.usize(..40);
                    length = Some(n);
                    let v = match self.0.u32(..16) {
                        0 => format!("+{n}"),
                        1 => format!("{n}, {n}"),
                        2 => format!("0{n}"),
                        3 => format!("{n}x"),
                        4 => "-1".to_string(),
                        _ => n.to_string(),
                    };
                    format!("Content-Length: {v}")
                }
                2 => {
                    chunked = true;
                    let v = if self.chance(75) {
                        self.pick(&["chunked", "Chunked", "CHUNKED"])
                    } else {
                        self.pick(&["gzip, chunked", "chunked, gzip", "identity", "chunked,", ""])
                    };
                    format!("Transfer-Encoding: {v}")
                }
                3 if self.chance(50) => format!(
                    "Connection: {}",
                    self.pick(&[
                        "close",
                        "keep-alive",
                        "Keep-Alive",
                        "close, keep-alive",
                        "upgrade",
                        "x"
                    ])
                ),
                4 if self.chance(20) => "Expect: 100-continue".to_string(),
                5 if self.chance(20) => "Upgrade: websocket".to_string(),
                6 => format!("X-Tab: a\tb{}", if self.chance(20) { "\u{e9}" } else { "" }),
                7 => format!(
                    "{}: v",
                    self.pick(&["X-A", "x-a", "Bad Name", "X-B:", "Set-Cookie"])
                ),
                _ => format!("X-N{}: {}", self.0.u8(..), self.0.u32(..)),
            };
            head.push_str(&field);
            head.push_str(eol);
        }
        head.push_str(eol);
        let mut wire = head.into_bytes();
        if chunked {
            wire.extend(self.chunked_body());
        } else if let Some(n) = length {
            let n = if self.chance(10) { n / 2 } else { n };
            wire.extend((0..n).map(|i| b'a' + (i % 26) as u8));
        }
        if self.chance(30) {
            wire.extend_from_slice(b"GET /next HTTP/1.1\r\nHost: a.test\r\n\r\n");
        }
        wire
    }

    fn chunked_body(&mut self) -> Vec<u8> {
        let mut b = Vec::new();
        for _ in 0..self.0.usize(..4) {
            let n = self.0.usize(1..300);
            let size = match self.0.u32(..10) {
                0 => format!("{n:X}"),
                1 => format!("00{n:x}"),
                2 => format!("{n:x};ext=\"v\""),
                3 => format!("{n:x} "),
                4 => "g".to_string(),
                _ => format!("{n:x}"),
            };
            b.extend_from_slice(size.as_bytes());
            b.extend_from_slice(if self.chance(5) { b"\n" } else { b"\r\n" });
            b.extend((0..n).map(|i| b'0' + (i % 10) as u8));
            b.extend_from_slice(match self.0.u32(..20) {
                0 => b"\n",
                1 => b"X\r\n",
                _ => b"\r\n",
            });
        }
        if self.chance(90) {
            b.extend_from_slice(b"0\r\n");
            match self.0.u32(..6) {
                0 => b.extend_from_slice(b"X-Sum: 1\r\nX-More: 2\r\n\r\n"),
                1 => b.extend_from_slice(b"X-Bad: 1\n\r\n"),
                2 => {}
                _ => b.extend_from_slice(b"\r\n"),
            }
        }
        b
    }
}

#[tokio::test]
async fn the_lane_reads_what_it_accepts_as_pingora_does() {
    let mut gen = Gen(fastrand::Rng::with_seed(0x6d65_7368));
    let (mut accepted, mut with_body, mut malformed) = (0, 0, 0);
    const CASES: usize = 50_000;
    for case in 0..CASES {
        let wire = gen.request();
        let step = 1 + case % 17;
        let Some(lane) = lane_reads(&wire, step) else {
            continue;
        };
        accepted += 1;
        with_body += usize::from(lane.body.as_ref().is_ok_and(|b| !b.is_empty()));
        malformed += usize::from(lane.body.is_err());
        let pingora = pingora_reads(&wire).await;
        assert_eq!(
            Some(&lane),
            pingora.as_ref(),
            "case {case}: {:?}",
            String::from_utf8_lossy(&wire)
        );
    }
    // Not vacuous: the lane takes a good share, bodies and broken bodies
    // among them.
    assert!(accepted > CASES / 5, "{accepted}");
    assert!(with_body > CASES / 50, "{with_body}");
    assert!(malformed > CASES / 100, "{malformed}");
}

/// What a client made of an upstream's response (after any 1xx).
#[derive(Debug, PartialEq, Eq)]
struct Answer {
    status: u16,
    reason: Option<String>,
    minor: u8,
    fields: Vec<(String, Vec<u8>)>,
    /// The body, or that it was malformed or cut short.
    body: Result<Vec<u8>, ()>,
    /// Whether the connection goes back to the pool (its body read whole).
    reusable: Option<bool>,
}

/// Pingora's HTTP/1 client: it sends a `GET` (or `HEAD`), with
/// `Connection: close` when `close`, and reads `wire` as the answer.
async fn pingora_answer(wire: &[u8], head: bool, close: bool) -> Option<Answer> {
    use pingora::protocols::http::v1::client::HttpSession as Client;
    use tokio::io::AsyncWriteExt;
    let (ours, mut theirs) = tokio::io::duplex(1 << 20);
    theirs.write_all(wire).await.ok()?;
    let mut s = Client::new(Box::new(ours));
    let mut req =
        pingora::http::RequestHeader::build(if head { "HEAD" } else { "GET" }, b"/", None).ok()?;
    if close {
        req.insert_header("connection", "close").ok()?;
    }
    s.write_request_header(Box::new(req)).await.ok()?;
    // The upstream is done: what it sent is read, then the end.
    drop(theirs);
    loop {
        s.read_response().await.ok()?;
        let status = s.resp_header()?.status.as_u16();
        if !(100..200).contains(&status) || status == 101 {
            break;
        }
    }
    let resp = s.resp_header()?;
    let mut fields: Vec<(String, Vec<u8>)> = resp
        .headers
        .iter()
        .map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec()))
        .collect();
    fields.sort();
    let mut answer = Answer {
        status: resp.status.as_u16(),
        reason: resp.get_reason_phrase().map(str::to_string),
        minor: match resp.version {
            http::Version::HTTP_10 => 0,
            _ => 1,
        },
        fields,
        body: Ok(Vec::new()),
        reusable: None,
    };
    let mut body = Vec::new();
    answer.body = loop {
        match s.read_body_bytes().await {
            Ok(Some(b)) => body.extend_from_slice(&b),
            Ok(None) => break Ok(body),
            Err(_) => break Err(()),
        }
    };
    if answer.body.is_ok() {
        s.respect_keepalive();
        answer.reusable = Some(s.will_keepalive());
    }
    Some(answer)
}

/// The lane's reading of the same answer; `None` where it is refused.
fn lane_answer(wire: &[u8], head: bool, close: bool, step: usize) -> Option<Answer> {
    use super::response::{parse as parse_response, Framing as R, Parse as P, MAX_FIELDS};
    let mut at = 0;
    loop {
        let mut storage = [httparse::EMPTY_HEADER; MAX_FIELDS];
        let P::Complete(h) = parse_response(&wire[at..], &mut storage) else {
            return None;
        };
        let framing = h.framing(head).ok()?;
        if framing == R::Interim {
            at += h.len;
            continue;
        }
        // Content-Length is dropped when Transfer-Encoding is there.
        let te = h.has_transfer_encoding();
        let mut fields: Vec<(String, Vec<u8>)> = h
            .headers
            .iter()
            .filter(|f| !(te && f.name.eq_ignore_ascii_case("content-length")))
            .map(|f| {
                let value = super::response::field_value(f.value).into_owned();
                (f.name.to_ascii_lowercase(), value)
            })
            .collect();
        fields.sort();
        let rest = &wire[at + h.len..];
        let (body, used) = match framing {
            R::Interim | R::Empty => (Ok(Vec::new()), 0),
            R::UntilClose => (Ok(rest.to_vec()), rest.len()),
            R::Length(n) => match usize::try_from(n).ok().and_then(|n| rest.get(..n)) {
                Some(b) => (Ok(b.to_vec()), b.len()),
                None => (Err(()), rest.len()),
            },
            R::Chunked => decode_chunked(rest, step),
        };
        let reusable = body
            .is_ok()
            .then(|| h.keep_alive(framing, close, used < rest.len()));
        return Some(Answer {
            status: h.status,
            reason: h.reason_phrase().map(str::to_string),
            minor: h.minor,
            fields,
            body,
            reusable,
        });
    }
}

impl Gen {
    fn response(&mut self, head: bool) -> Vec<u8> {
        let eol = if self.chance(3) { "\n" } else { "\r\n" };
        let mut wire = Vec::new();
        if self.chance(10) {
            wire.extend_from_slice(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n");
        }
        let version = self.pick(&["HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/2", "HTTP/1.1"]);
        let status = self.pick(&[
            "200 OK",
            "200 Fine",
            "204 No Content",
            "304 Not Modified",
            "404 Not Found",
            "101 Switching",
            "500",
            "200 ",
            "099 Low",
        ]);
        let mut head_text = format!("{version} {status}{eol}");
        let mut chunked = false;
        let mut length = None;
        for _ in 0..self.0.usize(..6) {
            let field = match self.0.u32(..10) {
                0 | 1 => {
                    let n = self.0.usize(..40);
                    length = Some(n);
                    let v = match self.0.u32(..12) {
                        0 => format!("{n}, {n}"),
                        1 => format!("{n}, {}", n + 1),
                        2 => format!("+{n}"),
                        3 => format!(" {n} "),
                        _ => n.to_string(),
                    };
                    format!("Content-Length: {v}")
                }
                2 => {
                    chunked = true;
                    format!(
                        "Transfer-Encoding: {}",
                        self.pick(&[
                            "chunked",
                            "Chunked",
                            "gzip, chunked",
                            "chunked, gzip",
                            "identity"
                        ])
                    )
                }
                3 => format!(
                    "Connection: {}",
                    self.pick(&[
                        "close",
                        "keep-alive",
                        "Keep-Alive",
                        "keep-alive, x",
                        "x, close",
                        "upgrade"
                    ])
                ),
                4 => format!("X-Fold: a{eol} b"),
                5 => "X-Space : v".to_string(),
                _ => format!("X-R{}: {}", self.0.u8(..), self.0.u32(..)),
            };
            head_text.push_str(&field);
            head_text.push_str(eol);
        }
        head_text.push_str(eol);
        wire.extend_from_slice(head_text.as_bytes());
        if !head {
            if chunked {
                wire.extend(self.chunked_body());
            } else if let Some(n) = length {
                let n = if self.chance(10) { n / 2 } else { n };
                wire.extend((0..n).map(|i| b'a' + (i % 26) as u8));
            } else {
                wire.extend_from_slice(b"until the end");
            }
        }
        if self.chance(10) {
            wire.extend_from_slice(b"extra");
        }
        wire
    }
}

#[tokio::test]
async fn the_lane_reads_every_upstream_answer_as_pingora_does() {
    let mut gen = Gen(fastrand::Rng::with_seed(0x7570_7374));
    let (mut read, mut reused) = (0, 0);
    const CASES: usize = 20_000;
    for case in 0..CASES {
        let head = gen.chance(10);
        let close = gen.chance(10);
        let wire = gen.response(head);
        let lane = lane_answer(&wire, head, close, 1 + case % 13);
        let pingora = pingora_answer(&wire, head, close).await;
        assert_eq!(
            lane,
            pingora,
            "case {case} (HEAD: {head}, close: {close}): {:?}",
            String::from_utf8_lossy(&wire)
        );
        read += usize::from(lane.is_some());
        reused += usize::from(lane.is_some_and(|a| a.reusable == Some(true)));
    }
    assert!(read > CASES / 2, "{read}");
    assert!(reused > CASES / 20, "{reused}");
}
