//! Error statuses and their JSON bodies, retries, timeouts, broken upstreams
//! and hostile input.

use std::time::{Duration, Instant};

use crate::support::client::get;
use crate::support::upstream::{close_mid_response, dead_addr, echo, scripted};
use crate::support::{Gateway, HEAD};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn assert_error_body(r: &crate::support::client::Resp, status: u16, route: Option<&str>) {
    assert_eq!(r.status, status, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    let j = r.json();
    assert!(j["error"].as_str().is_some_and(|e| !e.is_empty()), "{j}");
    assert_eq!(j["route"].as_str(), route, "{j}");
    assert_eq!(j["request_id"].as_str(), r.header("x-request-id"), "{j}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_route_dead_upstream_and_timeout() {
    let slow = echo("slow").await;
    let config = format!(
        r#"{HEAD}
[routes.dead]
path = "/dead"
upstream = "dead"
[routes.slow]
path_prefix = "/delay/"
upstream = "slow"
timeout = "300ms"
[routes.slow_read]
path_prefix = "/slowread/"
strip_prefix = "/slowread"
upstream = "slow_read"
[routes.dead_twice]
path = "/dead-twice"
upstream = "dead_twice"
[routes.small]
path = "/small"
upstream = "slow"
max_body_bytes = 4
[upstreams.dead]
endpoints = ["{}"]
connect_retries = 0
[upstreams.dead_twice]
endpoints = ["{}", "{}"]
connect_retries = 1
[upstreams.slow]
endpoints = ["{}"]
[upstreams.slow_read]
endpoints = ["{}"]
read_timeout = "200ms"
"#,
        dead_addr(),
        dead_addr(),
        dead_addr(),
        slow.addr,
        slow.addr
    );
    let gw = Gateway::start(&config).await;

    let r = get(gw.listen, "/nothing-here", &[]).await.unwrap();
    assert_error_body(&r, 404, None);

    let r = get(gw.listen, "/dead", &[]).await.unwrap();
    assert_error_body(&r, 502, Some("dead"));
    // The connection is not kept after a failed exchange, and says so.
    assert_eq!(r.headers["connection"], "close");

    let started = Instant::now();
    let r = get(gw.listen, "/delay/3000", &[]).await.unwrap();
    assert_error_body(&r, 504, Some("slow"));
    assert_eq!(r.headers["connection"], "close");
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "route timeout not enforced: {:?}",
        started.elapsed()
    );

    let r = get(gw.listen, "/slowread/delay/3000", &[]).await.unwrap();
    assert_error_body(&r, 504, Some("slow_read"));

    // Fast requests on the same routes still work.
    assert_eq!(get(gw.listen, "/delay/1", &[]).await.unwrap().status, 200);

    // A client that hangs up mid-head is not the gateway's error.
    let mut s = tokio::net::TcpStream::connect(gw.listen).await.unwrap();
    s.write_all(b"GET /delay/1 HTTP/1.1\r\nHost: x\r\nX-Pad: 0123456789\r\nHo")
        .await
        .unwrap();
    drop(s);
    assert_eq!(get(gw.listen, "/delay/1", &[]).await.unwrap().status, 200);
    // A failure after a retry: one line too, not one per attempt.
    let r = get(gw.listen, "/dead-twice", &[]).await.unwrap();
    assert_error_body(&r, 502, Some("dead_twice"));
    // A body over max_body_bytes is the client's doing: 413, no warn line,
    // whether its length was declared or found while it streamed.
    let r = crate::support::client::send(
        gw.listen,
        http::Method::POST,
        "/small",
        &[],
        bytes::Bytes::from_static(b"0123456789"),
        false,
    )
    .await
    .unwrap();
    assert_eq!(r.status, 413);
    let streamed = crate::support::read_to_close(
        gw.listen,
        b"POST /small HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\n0\r\n\r\n",
        false,
        Duration::from_secs(5),
    )
    .await
    .0;
    assert!(
        streamed.starts_with(b"HTTP/1.1 413"),
        "{}",
        String::from_utf8_lossy(&streamed)
    );
    // Each failure above has one warn line with its request id; Pingora's
    // own error lines for them (and its line per retried attempt) are not
    // written, nor is any WARN for the 4xx.
    let log = gw.log();
    assert_eq!(log.matches("request failed: ").count(), 4, "{log}");
    assert_eq!(log.matches(" WARN ").count(), 4, "{log}");
    assert!(!log.contains("Fail to proxy"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_failures_retry_on_another_endpoint() {
    let live = echo("live").await;
    let config = format!(
        r#"{HEAD}
[routes.r]
upstream = "mixed"
[upstreams.mixed]
endpoints = ["{}", "{}"]
connect_retries = 1
"#,
        dead_addr(),
        live.addr
    );
    let gw = Gateway::start(&config).await;
    for i in 0..20 {
        let r = get(gw.listen, "/", &[]).await.unwrap();
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_closing_mid_response_cuts_the_response() {
    let broken = close_mid_response().await;
    let live = echo("live").await;
    let config = format!(
        r#"{HEAD}
[routes.broken]
path = "/broken"
upstream = "broken"
[routes.ok]
path = "/ok"
upstream = "live"
[upstreams.broken]
endpoints = ["{}"]
[upstreams.live]
endpoints = ["{}"]
"#,
        broken.addr, live.addr
    );
    let mut gw = Gateway::start(&config).await;
    // Headers went out before the failure, so the client must see a cut body,
    // never a complete-looking response.
    let result = get(gw.listen, "/broken", &[]).await;
    assert!(
        result.is_err(),
        "a truncated body was passed off as complete: {result:?}"
    );
    assert!(gw.alive());
    assert_eq!(get(gw.listen, "/ok", &[]).await.unwrap().status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_http_gets_400_or_close_and_never_kills_the_gateway() {
    let live = echo("live").await;
    let config = format!(
        r#"{HEAD}
[routes.ok]
upstream = "live"
[upstreams.live]
endpoints = ["{}"]
"#,
        live.addr
    );
    let mut gw = Gateway::start(&config).await;
    let inputs: &[&[u8]] = &[
        b"\x00\x01\x02garbage\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
        b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"GET /\xff\xfe HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET / HTTP/1.1\r\nBad Header Name: x\r\n\r\n",
        b"GET / HTTP/9.9\r\nHost: a\r\n\r\n",
        b"GET /no-host-header HTTP/1.1\r\n\r\n",
    ];
    for input in inputs {
        let mut s = tokio::net::TcpStream::connect(gw.listen).await.unwrap();
        s.write_all(input).await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        let text = String::from_utf8_lossy(&out);
        assert!(
            out.is_empty()
                || text.starts_with("HTTP/1.1 4")
                || text.starts_with("HTTP/1.1 200")
                || text.starts_with("HTTP/1.1 5"),
            "unexpected answer to {:?}: {text}",
            String::from_utf8_lossy(input)
        );
        assert!(
            !text.starts_with("HTTP/1.1 5"),
            "a malformed request is the client's fault, not a 5xx: {text}"
        );
        assert!(
            gw.alive(),
            "gateway died on {:?}",
            String::from_utf8_lossy(input)
        );
    }
    // A huge header block is refused, not buffered forever.
    let mut s = tokio::net::TcpStream::connect(gw.listen).await.unwrap();
    let mut big = b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', 1024 * 1024));
    let _ = s.write_all(&big).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    assert!(!String::from_utf8_lossy(&out).starts_with("HTTP/1.1 200"));
    assert!(gw.alive());
    assert_eq!(get(gw.listen, "/", &[]).await.unwrap().status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_requests_finish() {
    // The slow upstream serves only the in-flight request, so that its first
    // connection says the request got there.
    let slow = echo("slow").await;
    let other = echo("other").await;
    let config = format!(
        r#"{HEAD}
[gateway]
shutdown_grace_period = "3s"
[routes.slow]
path_prefix = "/delay/"
upstream = "slow"
[routes.other]
upstream = "other"
[upstreams.slow]
endpoints = ["{}"]
[upstreams.other]
endpoints = ["{}"]
"#,
        slow.addr, other.addr
    );
    let mut gw = Gateway::start(&config).await;
    let listen = gw.listen;
    // A kept-alive connection idle between requests is closed at once.
    let mut idle = tokio::net::TcpStream::connect(listen).await.unwrap();
    idle.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let mut answer = [0u8; 12];
    idle.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"HTTP/1.1 200");
    let in_flight = tokio::spawn(async move { get(listen, "/delay/1000", &[]).await });
    // Signal once the request has reached the upstream.
    let start = Instant::now();
    while slow.connections() == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "request never reached the upstream"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    crate::support::signal(gw.pid(), "TERM");
    let signalled = Instant::now();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), idle.read_to_end(&mut rest))
        .await
        .expect("the idle connection is closed within the grace period")
        .unwrap();
    assert!(signalled.elapsed() < Duration::from_secs(2));
    let r = in_flight
        .await
        .unwrap()
        .expect("in-flight request completes during the drain");
    assert_eq!(r.status, 200);
    let status = gw
        .wait_exit(Duration::from_secs(15))
        .await
        .expect("gateway exits after the grace period");
    assert!(status.success(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_delay_fails_readiness_but_keeps_serving_until_it_ends() {
    let up = echo("up").await;
    let config = format!(
        "[gateway]\nshutdown_delay = \"2s\"\nshutdown_grace_period = \"1s\"\n{HEAD}[routes.r]\nupstream = \"u\"\n[upstreams.u]\nendpoints = [\"{}\"]\n",
        up.addr
    );
    let mut gw = Gateway::start(&config).await;
    let listen = gw.listen;
    assert_eq!(get(gw.admin, "/readyz", &[]).await.unwrap().status, 200);
    // A kept-alive connection, idle when the signal comes.
    let mut kept = tokio::net::TcpStream::connect(listen).await.unwrap();
    kept.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let mut answer = [0u8; 12];
    kept.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"HTTP/1.1 200");

    // An HTTP/2 (h2c) connection, open when the signal comes.
    let (mut h2, h2_conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tokio::net::TcpStream::connect(listen).await.unwrap()),
    )
    .await
    .unwrap();
    let h2_conn = tokio::spawn(h2_conn);
    let request = || {
        http::Request::get(format!("http://{listen}/h2"))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap()
    };
    assert_eq!(h2.send_request(request()).await.unwrap().status(), 200);
    // A request in flight when the signal comes.
    let mut slow = tokio::net::TcpStream::connect(listen).await.unwrap();
    slow.write_all(b"GET /delay/500 HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    gw.wait_for_metric(
        "meshgate_downstream_requests_in_flight{",
        1.0,
        Duration::from_secs(5),
    )
    .await;

    crate::support::signal(gw.pid(), "TERM");
    let signalled = Instant::now();
    let start = Instant::now();
    let ready = loop {
        let r = get(gw.admin, "/readyz", &[]).await.unwrap();
        if r.status != 200 || start.elapsed() > Duration::from_secs(1) {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(ready.status, 503, "{}", ready.text());
    assert!(ready.text().contains("shutting down"), "{}", ready.text());
    // The HTTP/2 connection gets its GOAWAY now, not when the delay ends:
    // the client's connection ends with no stream open.
    tokio::time::timeout(Duration::from_secs(1), h2_conn)
        .await
        .expect("no GOAWAY during the delay")
        .unwrap()
        .unwrap();
    // New connections are still served during the delay.
    let r = get(listen, "/fresh", &[]).await.unwrap();
    assert_eq!(r.status, 200);
    // The kept-alive connection gets its next answer, and is closed after it.
    kept.write_all(b"GET /again HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), kept.read_to_end(&mut rest))
        .await
        .expect("closed after its answer")
        .unwrap();
    let rest = String::from_utf8_lossy(&rest).to_ascii_lowercase();
    assert!(
        rest.contains("connection: close") && rest.contains("/again"),
        "{rest}"
    );
    // The one in flight is answered, and told the connection ends.
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), slow.read_to_end(&mut rest))
        .await
        .expect("closed after its answer")
        .unwrap();
    let rest = String::from_utf8_lossy(&rest).to_ascii_lowercase();
    assert!(
        rest.starts_with("http/1.1 200") && rest.contains("connection: close"),
        "{rest}"
    );
    assert!(
        signalled.elapsed() < Duration::from_secs(2),
        "took the whole delay"
    );
    // Then the listeners close and the process exits.
    let status = gw
        .wait_exit(Duration::from_secs(15))
        .await
        .expect("gateway exits after the delay and the grace period");
    assert!(status.success(), "{status}");
    assert!(
        signalled.elapsed() >= Duration::from_secs(2),
        "the delay was cut short"
    );
    assert!(tokio::net::TcpStream::connect(listen).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unasked_for_101_is_a_bad_gateway_not_a_tunnel() {
    let (up, _) = scripted(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: foo\r\nConnection: upgrade\r\n\r\nraw",
    )
    .await;
    let gw = to_upstream(up.addr, "").await;
    let r = get(gw.listen, "/plain", &[]).await.unwrap();
    assert_error_body(&r, 502, Some("ok"));
    assert!(!r.text().contains("raw"), "{}", r.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_websocket_upgrade_header_does_not_escape_the_route_timeout() {
    let slow = echo("slow").await;
    let config = format!(
        r#"{HEAD}
[routes.slow]
path_prefix = "/delay/"
upstream = "slow"
timeout = "300ms"
[upstreams.slow]
endpoints = ["{}"]
"#,
        slow.addr
    );
    let gw = Gateway::start(&config).await;
    let started = Instant::now();
    let r = get(
        gw.listen,
        "/delay/3000",
        &[("upgrade", "foo"), ("connection", "upgrade")],
    )
    .await
    .unwrap();
    assert_error_body(&r, 504, Some("slow"));
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http11_without_host_is_refused_but_http10_is_fine() {
    let live = echo("live").await;
    let config = format!(
        "{HEAD}\n[routes.ok]\nupstream = \"live\"\n[upstreams.live]\nendpoints = [\"{}\"]\n",
        live.addr
    );
    let gw = Gateway::start(&config).await;
    let exchange = |raw: &'static [u8]| async move {
        let mut s = tokio::net::TcpStream::connect(gw.listen).await.unwrap();
        s.write_all(raw).await.unwrap();
        let mut out = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut out))
            .await
            .unwrap()
            .unwrap();
        String::from_utf8_lossy(&out[..n]).into_owned()
    };
    // Longer than the 24-byte HTTP/2 preface, which h2c detection waits for.
    let r = exchange(b"GET /no-host-header HTTP/1.1\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    assert!(r.contains("\"error\":\"malformed request\""), "{r}");
    let r = exchange(b"GET /no-host-header HTTP/1.0\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.") && r.contains(" 200 "), "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http10_clients_get_bodies_they_can_read() {
    // An upstream answering every request with a chunked body.
    let (up, _) = scripted(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    )
    .await;
    let gw = to_upstream(up.addr, "").await;
    let read_all = |raw: &'static [u8]| async move {
        String::from_utf8_lossy(&read_to_close(gw.listen, raw).await).into_owned()
    };
    // HTTP/1.0 has no chunked coding: the body runs to the close.
    let r = read_all(b"GET /x HTTP/1.0\r\nHost: a\r\n\r\n").await;
    let (head, body) = r.split_once("\r\n\r\n").unwrap();
    assert!(head.contains(" 200 "), "{r}");
    assert!(
        !head.to_ascii_lowercase().contains("transfer-encoding"),
        "{r}"
    );
    assert_eq!(body, "hello world");
    // Also when the client asked to keep the connection.
    let r = read_all(b"GET /x HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n").await;
    assert!(r.ends_with("\r\n\r\nhello world"), "{r}");
    // HTTP/1.1 clients keep chunked framing.
    let r = read_all(b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").await;
    assert!(
        r.to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "{r}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http10_clients_get_no_informational_responses() {
    let (up, _) = scripted(
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    )
    .await;
    let gw = to_upstream(up.addr, "").await;
    let answer = |raw: &'static [u8]| async move {
        let mut s = tokio::net::TcpStream::connect(gw.listen).await.unwrap();
        s.write_all(raw).await.unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while !out.ends_with(b"ok") {
            let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
                .await
                .expect("an answer")
                .unwrap();
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    // The 103 is not an answer an HTTP/1.0 client can read; the 200's
    // length lets the connection stay open.
    let r = answer(b"GET /x HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(!r.contains(" 103 "), "{r}");
    assert!(
        r.to_ascii_lowercase().contains("connection: keep-alive"),
        "{r}"
    );
    // HTTP/1.1 clients get it.
    let r = answer(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 103"), "{r}");
    assert!(r.contains("HTTP/1.1 200"), "{r}");
}

/// A relayed interim answer is not the answer: an upstream that hangs after
/// a `100 Continue` (the body was asked for) or a `103 Early Hints` (a plain
/// GET, which the fast lane serves) still gets the client its 504 at the
/// route timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_final_error_follows_a_relayed_interim_answer() {
    let (up, _) = scripted(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n").await;
    let gw = Gateway::start(&format!(
        "{HEAD}\n[routes.ok]\nupstream = \"u\"\ntimeout = \"400ms\"\n[upstreams.u]\nendpoints = [\"{}\"]\n",
        up.addr
    ))
    .await;
    let r = read_to_close(gw.listen, b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n").await;
    let text = String::from_utf8_lossy(&r);
    assert!(text.starts_with("HTTP/1.1 103 Early Hints\r\n"), "{text}");
    let (_, last) = text.split_once("\r\n\r\n").unwrap();
    assert!(last.starts_with("HTTP/1.1 504 "), "{text}");
    drop(gw);

    let (up, seen) = scripted(b"HTTP/1.1 100 Continue\r\n\r\n").await;
    let gw = Gateway::start(&format!(
        "{HEAD}\n[routes.ok]\nupstream = \"u\"\ntimeout = \"400ms\"\n[upstreams.u]\nendpoints = [\"{}\"]\n",
        up.addr
    ))
    .await;
    let r = read_to_close(
        gw.listen,
        b"POST /x HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\nhello",
    )
    .await;
    let text = String::from_utf8_lossy(&r);
    assert!(text.starts_with("HTTP/1.1 100 Continue\r\n"), "{text}");
    let (_, last) = text.split_once("\r\n\r\n").unwrap();
    assert!(last.starts_with("HTTP/1.1 504 "), "{text}");
    assert!(last.contains("\"kind\":\"timeout\""), "{text}");
    assert!(String::from_utf8_lossy(&seen.lock().unwrap()).ends_with("hello"));
}

/// The gateway answers in its own version (RFC 9110 §6.2), whatever the
/// upstream's: an HTTP/1.0 upstream's answer goes out as HTTP/1.1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http10_upstreams_answer_goes_out_in_the_gateways_version() {
    let (up, _) = scripted(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
    let gw = to_upstream(up.addr, "").await;
    for raw in [
        &b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"[..],
        b"GET /x HTTP/1.0\r\nHost: a\r\n\r\n",
    ] {
        let r = read_to_close(gw.listen, raw).await;
        let text = String::from_utf8_lossy(&r);
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\nok"), "{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http10_clients_of_http2_upstreams_get_bodies_they_can_read() {
    // `/trailers` streams its body: no length for Pingora to pass on.
    let up = echo("h2").await;
    let gw = to_upstream(up.addr, "protocol = \"h2c\"\n").await;
    let read_all = |raw: &'static [u8]| read_to_close(gw.listen, raw);
    for keep in ["", "Connection: keep-alive\r\n"] {
        let raw = format!("GET /trailers HTTP/1.0\r\nHost: a\r\n{keep}\r\n").leak();
        let r = read_all(raw.as_bytes()).await;
        let text = String::from_utf8_lossy(&r);
        let (head, _) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(" 200 "), "{text}");
        assert!(
            !head.to_ascii_lowercase().contains("transfer-encoding"),
            "{text}"
        );
        assert!(r.ends_with(b"\r\n\r\n\x00\x00\x00\x00\x02hi"), "{text}");
    }
    // HTTP/1.1 clients get it chunked.
    let r = read_all(b"GET /trailers HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").await;
    assert!(
        String::from_utf8_lossy(&r)
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "{}",
        String::from_utf8_lossy(&r)
    );
}

/// A gateway whose one route, `ok`, goes to `upstream` (upstream `u`, with
/// `extra` keys).
async fn to_upstream(upstream: std::net::SocketAddr, extra: &str) -> Gateway {
    Gateway::start(&format!(
        "{HEAD}\n[routes.ok]\nupstream = \"u\"\n[upstreams.u]\nendpoints = [\"{upstream}\"]\n{extra}"
    ))
    .await
}

/// Send `raw` on a new connection; everything that comes back until the
/// gateway closes it.
async fn read_to_close(addr: std::net::SocketAddr, raw: &[u8]) -> Vec<u8> {
    let (out, read) = crate::support::read_to_close(addr, raw, false, Duration::from_secs(5)).await;
    read.unwrap();
    out
}
