//! The two HTTP/1.1 drivers side by side: the same random request
//! sequences sent through a gateway on `http1_engine = "fast"` and one on
//! `"pingora"`, each with its own recording upstream. What each client
//! sees (status line and fields byte for byte but `Date`; the body as
//! framed; whether the connection stays), what each upstream is sent
//! (byte for byte), and the access-log lines must be the same.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshgate::http1::chunked::Decoder;
use meshgate::http1::response::{self, Framing};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::Gateway;

/// An upstream that answers by the request's path and records every
/// request it is sent, as bytes.
struct Recorder {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl Recorder {
    async fn start() -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                tokio::spawn(serve_upstream(conn, record.clone()));
            }
        });
        Recorder { addr, seen }
    }

    fn take(&self) -> Vec<Vec<u8>> {
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

/// Read one request (head and body) from `conn`, after `buf`'s bytes.
async fn read_request(conn: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(Vec<u8>, String)> {
    loop {
        let mut fields = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut fields);
        if let Ok(httparse::Status::Complete(len)) = req.parse(buf) {
            let path = req.path.unwrap_or("/").to_string();
            let length = req
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| {
                    std::str::from_utf8(h.value)
                        .ok()?
                        .trim()
                        .parse::<usize>()
                        .ok()
                });
            let chunked = req.headers.iter().any(|h| {
                h.name.eq_ignore_ascii_case("transfer-encoding")
                    && h.value.eq_ignore_ascii_case(b"chunked")
            });
            let mut end = len + length.unwrap_or(0);
            if chunked {
                let mut d = Decoder::default();
                loop {
                    let used = d.decode(&buf[len..], |_| {}).ok()?;
                    if d.is_done() {
                        end = len + used;
                        break;
                    }
                    if !more(conn, buf).await {
                        return None;
                    }
                    // Decode again from the body's start with the new bytes.
                    d = Decoder::default();
                }
            }
            while buf.len() < end {
                if !more(conn, buf).await {
                    return None;
                }
            }
            let whole: Vec<u8> = buf.drain(..end).collect();
            return Some((whole, path));
        }
        if !more(conn, buf).await {
            return None;
        }
    }
}

async fn more(conn: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 8192];
    match conn.read(&mut chunk).await {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            true
        }
    }
}

fn body_of(n: usize) -> Vec<u8> {
    (0..n).map(|i| b'a' + (i % 26) as u8).collect()
}

/// The answers, by the path's first segment (and a size after it).
async fn serve_upstream(mut conn: TcpStream, seen: Arc<Mutex<Vec<Vec<u8>>>>) {
    let mut buf = Vec::new();
    while let Some((request, path)) = read_request(&mut conn, &mut buf).await {
        seen.lock().unwrap().push(request);
        let mut parts = path.trim_start_matches('/').split(['/', '?']);
        let kind = parts.next().unwrap_or("");
        let n: usize = parts.next().and_then(|s| s.parse().ok()).unwrap_or(5);
        let (head, body, close): (String, Vec<u8>, bool) = match kind {
            "chunked" => {
                let b = body_of(n);
                let half = n / 2;
                let mut wire = Vec::new();
                for piece in [&b[..half], &b[half..]] {
                    if !piece.is_empty() {
                        wire.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
                        wire.extend_from_slice(piece);
                        wire.extend_from_slice(b"\r\n");
                    }
                }
                wire.extend_from_slice(b"0\r\nX-Trailer: t\r\n\r\n");
                (
                    "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/plain\r\n"
                        .into(),
                    wire,
                    false,
                )
            }
            "close" => (
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n".into(),
                body_of(n),
                true,
            ),
            "204" => ("HTTP/1.1 204 No Content\r\nX-A: 1\r\n".into(), Vec::new(), false),
            "304" => (
                "HTTP/1.1 304 Not Modified\r\nETag: \"e\"\r\nContent-Length: 9\r\n".into(),
                Vec::new(),
                false,
            ),
            "status" => (
                format!("HTTP/1.1 {n} Whatever\r\nContent-Length: 2\r\n"),
                b"st".to_vec(),
                false,
            ),
            "early" => {
                let _ = conn
                    .write_all(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n")
                    .await;
                (
                    "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n".into(),
                    b"early".to_vec(),
                    false,
                )
            }
            "fields" => (
                "HTTP/1.1 200 Fine\r\nset-cookie: a=1\r\nX-Mixed-Case: 1\r\nSet-Cookie: b=2\r\nConnection: x-drop, keep-alive\r\nX-Drop: 1\r\nKeep-Alive: timeout=5\r\nDate: Mon, 01 Jan 2024 00:00:00 GMT\r\nServer: rec\r\nX-Fold: one\r\n two\r\nX-Tight:v\r\nX-Spaced:  s \t\r\nContent-Length: 3, 3\r\n"
                    .into(),
                b"abc".to_vec(),
                false,
            ),
            "http10" => (
                "HTTP/1.0 200 OK\r\nContent-Length: 4\r\n".into(),
                b"ten!".to_vec(),
                true,
            ),
            "http10close" => ("HTTP/1.0 200 OK\r\n".into(), body_of(n), true),
            "bad" => ("HTTP/1.1 abc\r\n".into(), Vec::new(), true),
            _ => (
                format!("HTTP/1.1 200 OK\r\nContent-Length: {n}\r\nX-Up: 1\r\n"),
                body_of(n),
                false,
            ),
        };
        let mut out = head.into_bytes();
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&body);
        if conn.write_all(&out).await.is_err() || close {
            return;
        }
    }
}

/// What a client saw of one response.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    /// Status line and fields, `Date` masked.
    head: String,
    body: Vec<u8>,
    /// The connection ended after it.
    closed: bool,
}

/// Read one final response (after any 1xx, kept in `head`) from `conn`.
async fn read_response(conn: &mut TcpStream, buf: &mut Vec<u8>, head_req: bool) -> Option<Seen> {
    let mut heads = String::new();
    loop {
        let parsed = {
            let mut fields = [httparse::EMPTY_HEADER; response::MAX_FIELDS];
            match response::parse(buf, &mut fields) {
                response::Parse::Complete(h) => Some((h.len, h.framing(head_req).ok()?, h.status)),
                response::Parse::Partial => None,
                response::Parse::Invalid(_) => return None,
            }
        };
        let Some((len, framing, _status)) = parsed else {
            if !more(conn, buf).await {
                return None;
            }
            continue;
        };
        let text = String::from_utf8_lossy(&buf[..len]).to_string();
        for line in text.split("\r\n") {
            let lower = line.to_ascii_lowercase();
            if lower.starts_with("date:") {
                heads.push_str("Date: <masked>\r\n");
            } else if lower.starts_with("ratelimit") {
                // The seconds to a refill depend on when each gateway was asked.
                let kept: String = line.split(";t=").next().unwrap_or(line).into();
                heads.push_str(&kept);
                heads.push_str("\r\n");
            } else {
                heads.push_str(line);
                heads.push_str("\r\n");
            }
        }
        buf.drain(..len);
        let body = match framing {
            Framing::Interim => continue,
            Framing::Empty => Vec::new(),
            Framing::Length(n) => {
                while buf.len() < n as usize {
                    if !more(conn, buf).await {
                        return None;
                    }
                }
                buf.drain(..n as usize).collect()
            }
            Framing::Chunked => {
                let mut d = Decoder::default();
                let mut body = Vec::new();
                loop {
                    let used = d.decode(buf, |p| body.extend_from_slice(p)).ok()?;
                    buf.drain(..used);
                    if d.is_done() {
                        break;
                    }
                    if !more(conn, buf).await {
                        return None;
                    }
                }
                body
            }
            Framing::UntilClose => {
                while more(conn, buf).await {}
                std::mem::take(buf)
            }
        };
        // The answer says whether its connection ends.
        let closed = framing == Framing::UntilClose
            || heads
                .to_ascii_lowercase()
                .contains("\r\nconnection: close\r\n");
        return Some(Seen {
            head: heads,
            body,
            closed,
        });
    }
}

/// A random request: its bytes, whether it is a HEAD, and whether it is
/// sent as a pipelined pair with the next.
struct Req {
    wire: Vec<u8>,
    head: bool,
}

fn request(rng: &mut fastrand::Rng, i: usize) -> Req {
    const PATHS: [&str; 16] = [
        "/cl/5",
        "/cl/0",
        "/cl/40000",
        "/chunked/30",
        "/chunked/0",
        "/close/70",
        "/204",
        "/304",
        "/status/503",
        "/status/404",
        "/early",
        "/fields",
        "/http10",
        "/strip/cl/7?q=1",
        "/direct",
        "/a/../cl/3",
    ];
    let methods = [
        "GET", "GET", "GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS",
    ];
    let method = methods[rng.usize(..methods.len())];
    let path = PATHS[rng.usize(..PATHS.len())];
    // Rarer: an answer that is not HTTP (502, the connection closed).
    let path = if rng.u8(..40) == 0 { "/bad" } else { path };
    // A route with an authorization policy and a rate limit, now and then.
    let path = if rng.u8(..8) == 0 {
        "/guarded/cl/4"
    } else {
        path
    };
    let http10 = rng.u8(..20) == 0;
    let mut wire = format!(
        "{method} {path} HTTP/1.{}\r\nHost: example.test\r\nX-Request-Id: rid-{i}\r\n",
        if http10 { 0 } else { 1 }
    );
    let extras: [&str; 10] = [
        "Accept: */*\r\n",
        "user-agent: t/1\r\n",
        "X-Custom: a\r\n",
        "x-custom: b\r\n",
        "Cookie: a=1\r\n",
        "cookie: b=2\r\n",
        "X-Forwarded-For: 10.0.0.9\r\n",
        "Forwarded: for=10.0.0.9\r\n",
        "Content-Type: text/plain\r\n",
        "Connection: keep-alive\r\n",
    ];
    for _ in 0..rng.usize(0..5) {
        wire.push_str(extras[rng.usize(..extras.len())]);
    }
    if rng.u8(..25) == 0 {
        wire.push_str("Connection: close\r\n");
    }
    let mut wire = wire.into_bytes();
    if matches!(method, "POST" | "PUT") {
        // Now and then more than a first read holds.
        let len = if rng.u8(..6) == 0 {
            rng.usize(3000..40_000)
        } else {
            rng.usize(0..3000)
        };
        let body = body_of(len);
        if rng.u8(..5) == 0 && !http10 {
            wire.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
            if !body.is_empty() {
                wire.extend_from_slice(format!("{:x}\r\n", body.len()).as_bytes());
                wire.extend_from_slice(&body);
                wire.extend_from_slice(b"\r\n");
            }
            wire.extend_from_slice(b"0\r\n\r\n");
        } else {
            wire.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
            wire.extend_from_slice(&body);
        }
    } else {
        wire.extend_from_slice(b"\r\n");
    }
    Req {
        wire,
        head: method == "HEAD",
    }
}

fn config(upstream: SocketAddr, engine: &str) -> String {
    format!(
        r#"[gateway]
http1_engine = "{engine}"
[telemetry]
access_log = "json"
access_log_file = "access.log"
[admin]
listen = "@ADMIN@"
[listeners.public]
bind = "@LISTEN@"
[upstreams.app]
endpoints = ["{upstream}"]
read_timeout = "2s"
[routes.direct]
path = "/direct"
respond = {{ body = "direct" }}
[routes.strip]
path = "/strip/"
upstream = "app"
strip_prefix = "/strip"
request_headers = {{ set = {{ "X-Route" = "strip" }}, remove = ["cookie"] }}
response_headers = {{ add = {{ "X-Served-By" = "meshgate" }} }}
[routes.guarded]
path_prefix = "/guarded/"
upstream = "app"
policies = ["no_delete"]
rate_limits = ["few"]
[policies.no_delete]
deny = [{{ methods = ["DELETE"] }}]
default = "allow"
[rate_limits.few]
key = "route"
rate = 1
per = "1h"
burst = 1000
[routes.all]
upstream = "app"
timeout = "5s"
"#
    )
}

/// One client connection to a gateway, opened again after a close.
struct Client {
    addr: SocketAddr,
    conn: Option<TcpStream>,
    buf: Vec<u8>,
}

impl Client {
    /// Send `reqs` in one write (more than one: pipelined) and read the
    /// answers, up to the one that ends the connection.
    async fn exchange(&mut self, reqs: &[Req]) -> Vec<Option<Seen>> {
        if self.conn.is_none() {
            self.conn = Some(TcpStream::connect(self.addr).await.unwrap());
            self.buf.clear();
        }
        let wire: Vec<u8> = reqs.iter().flat_map(|r| r.wire.clone()).collect();
        let mut answers = Vec::new();
        let Some(conn) = self.conn.as_mut() else {
            return answers;
        };
        if conn.write_all(&wire).await.is_err() {
            self.conn = None;
            return answers;
        }
        for req in reqs {
            let seen = read_response(conn, &mut self.buf, req.head).await;
            let ended = seen.as_ref().is_none_or(|s| s.closed);
            answers.push(seen);
            if ended {
                self.conn = None;
                break;
            }
        }
        answers
    }
}

/// Access-log lines without what differs between two runs (times, the
/// client's and the endpoint's ports).
fn log_entries(gw: &Gateway, want: usize) -> Vec<serde_json::Value> {
    let path = gw.config_path.parent().unwrap().join("access.log");
    let start = std::time::Instant::now();
    loop {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let lines = crate::support::json_lines(&text);
        if lines.len() >= want || start.elapsed() > Duration::from_secs(10) {
            return lines
                .into_iter()
                .map(|mut v| {
                    for k in [
                        "timestamp",
                        "duration_ms",
                        "upstream_duration_ms",
                        "client",
                        "endpoint",
                        "retries",
                    ] {
                        v.as_object_mut().unwrap().remove(k);
                    }
                    v
                })
                .collect();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Random sequences through both drivers: the same answers, the same
/// upstream requests, the same access-log lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_drivers_answer_alike() {
    let (up_fast, up_pingora) = (Recorder::start().await, Recorder::start().await);
    let fast = Gateway::start(&config(up_fast.addr, "fast")).await;
    let pingora = Gateway::start(&config(up_pingora.addr, "pingora")).await;
    let mut a = Client {
        addr: fast.listen,
        conn: None,
        buf: Vec::new(),
    };
    let mut b = Client {
        addr: pingora.listen,
        conn: None,
        buf: Vec::new(),
    };
    let mut rng = fastrand::Rng::with_seed(0x6c61_6e65);
    let requests = 300;
    let mut answered = 0;
    let mut i = 0;
    while i < requests {
        // Now and then two requests in one write (pipelined).
        let batch: Vec<Req> = (0..if rng.u8(..10) == 0 { 2 } else { 1 })
            .map(|k| request(&mut rng, i + k))
            .collect();
        i += batch.len();
        let (seen_a, seen_b) = (a.exchange(&batch).await, b.exchange(&batch).await);
        let what: String = batch
            .iter()
            .map(|r| String::from_utf8_lossy(&r.wire[..r.wire.len().min(300)]).to_string())
            .collect();
        assert_eq!(seen_a, seen_b, "request {i}:\n{what}");
        answered += seen_a.iter().filter(|s| s.is_some()).count();
        assert_eq!(
            up_fast.take(),
            up_pingora.take(),
            "the upstreams were sent different requests for request {i}:\n{what}"
        );
    }
    let served = fast
        .wait_for_metric(
            "meshgate_http1_lane_requests_total{driver=\"fast\"",
            100.0,
            Duration::from_secs(5),
        )
        .await;
    assert!(
        crate::support::metric(
            &served,
            "meshgate_http1_lane_requests_total{driver=\"fast\",reason=\"\"}"
        ) >= 100.0,
        "the fast lane served too few of them:\n{served}"
    );
    let (log_a, log_b) = (
        log_entries(&fast, answered),
        log_entries(&pingora, answered),
    );
    assert_eq!(log_a.len(), log_b.len());
    for (i, (x, y)) in log_a.iter().zip(&log_b).enumerate() {
        assert_eq!(x, y, "access-log line {i}");
    }
}

/// A body longer than the first read holds, sent in one write: the rest
/// has arrived by the time the head is planned, and the lane serves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_the_first_read_did_not_hold_is_served_by_the_lane() {
    let up = Recorder::start().await;
    let gw = Gateway::start(&config(up.addr, "fast")).await;
    let body = body_of(20_000);
    let mut wire = format!(
        "POST /cl/3 HTTP/1.1\r\nHost: example.test\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    wire.extend_from_slice(&body);
    let mut client = Client {
        addr: gw.listen,
        conn: None,
        buf: Vec::new(),
    };
    let seen = client.exchange(&[Req { wire, head: false }]).await;
    let seen = seen[0].as_ref().expect("an answer");
    assert!(seen.head.starts_with("HTTP/1.1 200"), "{}", seen.head);
    let sent = up.take();
    assert_eq!(sent.len(), 1);
    assert!(sent[0].ends_with(&body), "the upstream got the whole body");
    let metrics = gw
        .wait_for_metric(
            "meshgate_http1_lane_requests_total{driver=\"fast\"",
            1.0,
            Duration::from_secs(5),
        )
        .await;
    assert_eq!(
        crate::support::metric(
            &metrics,
            "meshgate_http1_lane_requests_total{driver=\"fast\",reason=\"\"}"
        ),
        1.0,
        "{metrics}"
    );
}
