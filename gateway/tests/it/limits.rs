//! Limits against hostile or careless clients: URI length, header count and
//! bytes, body size per route, connections per listener, idle keep-alive.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::client::{get, send};
use crate::support::upstream::echo;
use crate::support::{metric, Gateway, HEAD};

fn rejected(text: &str, reason: &str) -> f64 {
    metric(
        text,
        &format!("meshgate_downstream_rejected_total{{listener=\"public\",reason=\"{reason}\"}}"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_heads_get_414_and_431() {
    let gw = Gateway::start(&format!(
        "{}\nlimits = {{ max_uri_bytes = 200, max_request_headers = 10, max_request_header_bytes = 2000 }}\n[routes.r]\npath_prefix = \"/\"\nrespond = {{ body = \"ok\" }}\n",
        HEAD.trim_end()
    ))
    .await;
    let long = format!("/{}", "a".repeat(300));
    let r = get(gw.listen, &long, &[]).await.unwrap();
    assert_eq!(r.status, 414);
    assert_eq!(r.json()["error"], "URI too long");

    let many: Vec<(String, String)> = (0..12).map(|i| (format!("x-h{i}"), "v".into())).collect();
    let many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let r = get(gw.listen, "/", &many).await.unwrap();
    assert_eq!(r.status, 431);
    assert_eq!(r.json()["error"], "request header fields too large");

    let big = "b".repeat(2500);
    let r = get(gw.listen, "/", &[("x-big", big.as_str())])
        .await
        .unwrap();
    assert_eq!(r.status, 431);

    // Within the limits: fine, on HTTP/1.1 and h2c alike.
    assert_eq!(
        get(gw.listen, "/short", &[("x-a", "b")])
            .await
            .unwrap()
            .status,
        200
    );
    let h2 = send(gw.listen, Method::GET, &long, &[], Bytes::new(), true)
        .await
        .unwrap();
    assert_eq!(h2.status, 414);
    // An HTTP/2 head past the limit is refused by the h2 layer as it is
    // decoded, not after.
    let huge = "h".repeat(4000);
    let h2 = send(
        gw.listen,
        Method::GET,
        "/",
        &[("x-big", huge.as_str())],
        Bytes::new(),
        true,
    )
    .await
    .unwrap();
    assert_eq!(h2.status, 431);

    let text = get(gw.admin, "/metrics", &[]).await.unwrap().text();
    assert_eq!(rejected(&text, "uri_length"), 2.0);
    assert_eq!(rejected(&text, "header_count"), 1.0);
    // The HTTP/2 one never reached the proxy's count.
    assert_eq!(rejected(&text, "header_bytes"), 1.0);
}

/// What the gateway sends on `s` until it closes (within 5 s), as text.
async fn rest_of(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// A gateway whose one route, to `app`, takes bodies of up to 1,000 bytes.
async fn upload_gateway(app: &crate::support::upstream::Upstream) -> Gateway {
    Gateway::start(&format!(
        "{}\n[routes.upload]\npath_prefix = \"/\"\nupstream = \"app\"\nmax_body_bytes = 1000\n[upstreams.app]\nendpoints = [\"{}\"]\n",
        HEAD.trim_end(),
        app.addr
    ))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_the_route_limit_get_413() {
    let app = echo("app").await;
    let gw = upload_gateway(&app).await;
    let ok = send(
        gw.listen,
        Method::POST,
        "/",
        &[],
        Bytes::from(vec![1u8; 1000]),
        false,
    )
    .await
    .unwrap();
    assert_eq!(ok.status, 200);
    assert_eq!(ok.json()["body_len"], 1000);
    let before = app.connections();

    // Declared too large: refused before the upstream is contacted.
    let r = send(
        gw.listen,
        Method::POST,
        "/",
        &[],
        Bytes::from(vec![1u8; 1001]),
        false,
    )
    .await
    .unwrap();
    assert_eq!(r.status, 413);
    assert_eq!(r.json()["error"], "request body too large");
    assert_eq!(app.connections(), before);

    // Streamed without a length (HTTP/2 here): counted as it arrives.
    let r = send(
        gw.listen,
        Method::POST,
        "/",
        &[],
        Bytes::from(vec![1u8; 5000]),
        true,
    )
    .await
    .unwrap();
    assert_eq!(r.status, 413, "{}", r.text());

    // Chunked over HTTP/1.1, raw.
    let mut s = TcpStream::connect(gw.listen).await.unwrap();
    let chunk = "x".repeat(800);
    s.write_all(
        format!(
            "POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n320\r\n{chunk}\r\n320\r\n{chunk}\r\n0\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let out = rest_of(&mut s).await;
    assert!(out.starts_with("HTTP/1.1 413"), "{out}");

    // Chunked with `Expect: 100-continue` (as curl sends a large upload):
    // the upstream's `100 Continue` is relayed, and the client, which then
    // sends the body, still gets the final 413 (not a closed connection).
    let mut s = TcpStream::connect(gw.listen).await.unwrap();
    s.write_all(
        b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n",
    )
    .await
    .unwrap();
    let mut interim = Vec::new();
    while !interim.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut byte))
            .await
            .expect("an interim answer")
            .unwrap();
        assert_eq!(n, 1, "closed after {:?}", String::from_utf8_lossy(&interim));
        interim.push(byte[0]);
    }
    assert!(
        interim.starts_with(b"HTTP/1.1 100 Continue\r\n"),
        "{}",
        String::from_utf8_lossy(&interim)
    );
    s.write_all(format!("320\r\n{chunk}\r\n320\r\n{chunk}\r\n0\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let out = rest_of(&mut s).await;
    assert!(out.starts_with("HTTP/1.1 413"), "{out}");
    assert!(out.contains("request body too large"), "{out}");

    let text = get(gw.admin, "/metrics", &[]).await.unwrap().text();
    assert_eq!(rejected(&text, "body_size"), 4.0);
}

/// A client that sends its whole upload before it reads (as curl does)
/// gets to send it all and then reads the 413: the gateway closes with a
/// lingering close, not a reset that fails the client's send.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_over_the_limit_is_sent_whole_and_then_answered() {
    let app = echo("app").await;
    let gw = upload_gateway(&app).await;
    const BODY: usize = 16 << 20;
    let chunk = vec![b'x'; 64 * 1024];
    for chunked in [false, true] {
        let s = TcpStream::connect(gw.listen).await.unwrap();
        let (mut from, mut to) = s.into_split();
        let framing = if chunked {
            "Transfer-Encoding: chunked".to_string()
        } else {
            format!("Content-Length: {BODY}")
        };
        let head = format!("POST / HTTP/1.1\r\nHost: t\r\n{framing}\r\n\r\n");
        let piece = if chunked {
            [format!("{:x}\r\n", chunk.len()).as_bytes(), &chunk, b"\r\n"].concat()
        } else {
            chunk.clone()
        };
        let sending = async {
            to.write_all(head.as_bytes()).await?;
            for _ in 0..BODY / chunk.len() {
                to.write_all(&piece).await?;
            }
            if chunked {
                to.write_all(b"0\r\n\r\n").await?;
            }
            Ok::<_, std::io::Error>(())
        };
        let sent = tokio::time::timeout(Duration::from_secs(20), sending)
            .await
            .expect("the upload ends");
        assert!(
            sent.is_ok(),
            "chunked {chunked}: the upload failed: {sent:?}"
        );
        let mut out = Vec::new();
        let end = tokio::time::timeout(Duration::from_secs(5), from.read_to_end(&mut out))
            .await
            .expect("the gateway closes");
        let out = String::from_utf8_lossy(&out);
        assert!(out.starts_with("HTTP/1.1 413"), "chunked {chunked}: {out}");
        assert!(end.is_ok(), "chunked {chunked}: {end:?} after {out}");
    }
}

/// A full listener makes room by closing the connection that has waited
/// longest for a request; when every connection is busy it accepts nothing
/// more: a new client waits (it is not reset) until one ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_listener_makes_room_or_makes_new_clients_wait() {
    let gw = Gateway::start(&format!(
        "{}\nlimits = {{ max_connections = 2 }}\n[routes.r]\npath_prefix = \"/\"\nrespond = {{ body = \"ok\" }}\n",
        HEAD.trim_end()
    ))
    .await;
    let active = r#"meshgate_downstream_connections_active{direction="ingress",listener="public"}"#;
    // One client is served and keeps its connection, idle; another is busy
    // sending a head.
    let mut idle = TcpStream::connect(gw.listen).await.unwrap();
    idle.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_ok(&mut idle).await, "ok");
    let mut busy = TcpStream::connect(gw.listen).await.unwrap();
    busy.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nX-Slow: ")
        .await
        .unwrap();
    gw.wait_for_metric(active, 2.0, Duration::from_secs(5))
        .await;
    // A third client: the idle one is closed to make room.
    assert_eq!(get(gw.listen, "/", &[]).await.unwrap().status, 200);
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), idle.read_to_end(&mut rest))
        .await
        .expect("the idle connection is closed")
        .unwrap();
    let text = get(gw.admin, "/metrics", &[]).await.unwrap().text();
    assert_eq!(
        metric(
            &text,
            r#"meshgate_downstream_connections_evicted_total{listener="public"}"#
        ),
        1.0,
        "{text}"
    );

    // The third client's connection has ended once only the busy one is
    // counted: else it could still hold the slot busy2 is to take, and
    // `waiting` would get busy2's.
    let start = std::time::Instant::now();
    loop {
        let text = get(gw.admin, "/metrics", &[]).await.unwrap().text();
        if metric(&text, active) == 1.0 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "{text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Both slots busy: a new client is accepted by the kernel but gets no
    // answer, nor a reset, until a busy one ends.
    let mut busy2 = TcpStream::connect(gw.listen).await.unwrap();
    busy2
        .write_all(b"GET / HTTP/1.1\r\nHost: t\r\nX-Slow: ")
        .await
        .unwrap();
    gw.wait_for_metric(active, 2.0, Duration::from_secs(5))
        .await;
    let mut waiting = TcpStream::connect(gw.listen).await.unwrap();
    waiting
        .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    // Waiting is the behaviour under test.
    let early = tokio::time::timeout(Duration::from_millis(500), waiting.read(&mut buf)).await;
    assert!(
        early.is_err(),
        "answered or closed while the listener was full: {early:?}"
    );
    gw.wait_for_metric(
        r#"meshgate_downstream_rejected_total{listener="public",reason="connection_limit"}"#,
        1.0,
        Duration::from_secs(5),
    )
    .await;
    drop(busy);
    assert_eq!(read_ok(&mut waiting).await, "ok");
    drop(busy2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_are_closed_after_idle_timeout() {
    let gw = Gateway::start(&format!(
        "{}\nlimits = {{ idle_timeout = \"1s\" }}\n[routes.r]\npath_prefix = \"/\"\nrespond = {{ body = \"ok\" }}\n",
        HEAD.trim_end()
    ))
    .await;
    let mut s = TcpStream::connect(gw.listen).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nX-Pad: 0123456789\r\n\r\n")
        .await
        .unwrap();
    let start = Instant::now();
    let mut out = Vec::new();
    // The response arrives, then the server closes the idle connection.
    let done = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    assert!(done.is_ok(), "idle connection still open after 10s");
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(
        start.elapsed() >= Duration::from_millis(900),
        "closed too early"
    );

    // A new connection that never sends a request is idle too.
    let mut silent = TcpStream::connect(gw.listen).await.unwrap();
    let start = Instant::now();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), silent.read_to_end(&mut out))
        .await
        .expect("a silent connection still open after 10s")
        .unwrap();
    assert!(out.is_empty(), "{}", String::from_utf8_lossy(&out));
    assert!(
        start.elapsed() >= Duration::from_millis(900),
        "closed too early"
    );
}

/// Read one 200 answer off a kept-alive connection (framed by
/// Content-Length); its body.
async fn read_ok(s: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let complete = |got: &[u8]| {
        let end = got.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
        let head = String::from_utf8_lossy(&got[..end]).to_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map_or(0, |v| v.trim().parse().unwrap());
        (got.len() >= end + length).then_some(end)
    };
    let end = loop {
        if let Some(end) = complete(&got) {
            break end;
        }
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("an answer")
            .unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    };
    let text = String::from_utf8_lossy(&got).to_string();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    text[end..].to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_request_on_a_kept_alive_connection_may_arrive_in_pieces() {
    // Between requests the connection waits outside Pingora, on the first
    // byte of the next one; the rest of the request must still be read.
    let app = echo("app").await;
    let gw = Gateway::start(&format!(
        "{}\n[routes.r]\npath_prefix = \"/\"\nupstream = \"app\"\n[upstreams.app]\nendpoints = [\"{}\"]\n",
        HEAD.trim_end(),
        app.addr
    ))
    .await;
    let mut s = TcpStream::connect(gw.listen).await.unwrap();
    s.write_all(b"GET /one HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    assert!(read_ok(&mut s).await.contains("/one"));
    for piece in [&b"G"[..], b"ET /two HTTP/1.1\r\nHo", b"st: a\r\n", b"\r\n"] {
        s.write_all(piece).await.unwrap();
        // The pauses are the client's behaviour under test.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(read_ok(&mut s).await.contains("/two"));
    // Head and body in separate writes.
    s.write_all(b"POST /three HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    s.write_all(b"hello").await.unwrap();
    let body = read_ok(&mut s).await;
    assert!(body.contains("/three") && body.contains("hello"), "{body}");
    // A head larger than one read-ahead.
    let pad = "a".repeat(9000);
    s.write_all(format!("GET /four HTTP/1.1\r\nHost: a\r\nX-Pad: {pad}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let body = read_ok(&mut s).await;
    assert!(body.contains("/four") && body.contains(&pad), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_shorter_than_the_http2_preface_is_answered() {
    // Plain listeners also take HTTP/2 with prior knowledge; telling the two
    // apart must not wait for 24 bytes that an 18-byte request never sends.
    let gw = Gateway::start(&format!(
        "{}\n[routes.r]\npath_prefix = \"/\"\nrespond = {{ body = \"ok\" }}\n",
        HEAD.trim_end()
    ))
    .await;
    // Also those that start like the preface (`PRI`) does.
    for request in [
        &b"GET / HTTP/1.0\r\n\r\n"[..],
        b"PUT / HTTP/1.0\r\n\r\n",
        b"POST / HTTP/1.0\r\n\r\n",
    ] {
        let mut s = TcpStream::connect(gw.listen).await.unwrap();
        s.write_all(request).await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
            .await
            .expect("no answer to a short request")
            .unwrap();
        let out = String::from_utf8_lossy(&out);
        assert!(
            out.starts_with("HTTP/1.1 200") && out.ends_with("ok"),
            "{out}"
        );
    }
    // And HTTP/2 with prior knowledge still works on the same listener.
    let r = send(gw.listen, Method::GET, "/", &[], Bytes::new(), true)
        .await
        .unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "ok"));
}

/// Write `first`, then one more header byte every `every` until the server
/// closes the connection; how long that took (`None`: still open after 10 s).
async fn dribble(addr: std::net::SocketAddr, first: &[u8], every: Duration) -> Option<Duration> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let start = Instant::now();
    s.write_all(first).await.unwrap();
    let mut buf = [0u8; 256];
    while start.elapsed() < Duration::from_secs(10) {
        // The dribble interval is the client's behaviour under test.
        match tokio::time::timeout(every, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(start.elapsed()),
            Ok(Ok(_)) => {}
            Err(_) => {
                if s.write_all(b"x").await.is_err() {
                    return Some(start.elapsed());
                }
            }
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_request_heads_are_cut_at_header_read_timeout() {
    let gw = Gateway::start(&format!(
        "{}\nlimits = {{ header_read_timeout = \"1s\" }}\n[routes.r]\npath_prefix = \"/\"\nrespond = {{ body = \"ok\" }}\n",
        HEAD.trim_end()
    ))
    .await;
    // A header byte every 200 ms: every read is quick, the head never ends.
    let took = dribble(
        gw.listen,
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: ",
        Duration::from_millis(200),
    )
    .await
    .expect("a dribbling client must be cut off");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "{took:?}"
    );
    // Fewer bytes than the HTTP/2 preface, then nothing: cut off as well.
    let took = dribble(gw.listen, b"GET /", Duration::from_secs(20))
        .await
        .expect("a client stuck before 24 bytes must be cut off");
    assert!(took < Duration::from_secs(5), "{took:?}");
    let text = get(gw.admin, "/metrics", &[]).await.unwrap().text();
    assert_eq!(rejected(&text, "header_timeout"), 2.0, "{text}");

    // A prompt client is not affected, and its kept-alive connection may
    // idle past the head deadline (idle_timeout governs that wait).
    let mut s = TcpStream::connect(gw.listen).await.unwrap();
    for _ in 0..2 {
        s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(read_ok(&mut s).await, "ok");
        tokio::time::sleep(Duration::from_millis(1200)).await;
    }
}

/// The resident memory of process `pid`, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status");
    kib * 1024
}

/// A head is refused as soon as it passes its limits, before it ends and
/// before the client stops sending: the answer comes while the client still
/// writes, and nothing past the limit is buffered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_past_its_limits_is_answered_before_it_ends() {
    let gw = Gateway::start(&format!(
        "{}\nlimits = {{ max_request_header_bytes = 8192, max_uri_bytes = 1024 }}\n[routes.r]\npath_prefix = \"/\"\nrespond = {{ body = \"ok\" }}\n",
        HEAD.trim_end()
    ))
    .await;
    for (start, status, error) in [
        (
            "GET / HTTP/1.1\r\nHost: a\r\nX-Big: ".to_string(),
            "431",
            "request header fields too large",
        ),
        (format!("GET /{}", "u".repeat(100)), "414", "URI too long"),
    ] {
        let mut s = TcpStream::connect(gw.listen).await.unwrap();
        s.write_all(start.as_bytes()).await.unwrap();
        // Keep sending a head that never ends; read what comes back.
        let filler = vec![b'x'; 1024];
        let mut sent = start.len();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            assert!(sent < 1024 * 1024, "no answer after {sent} bytes");
            if s.write_all(&filler).await.is_err() {
                break;
            }
            sent += filler.len();
            if let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_millis(20), s.read(&mut buf)).await
            {
                got.extend_from_slice(&buf[..n]);
            }
        }
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
        got.extend_from_slice(&rest);
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with(&format!("HTTP/1.1 {status}")), "{text}");
        assert!(text.contains(error), "{text}");
        assert!(text.to_lowercase().contains("connection: close"), "{text}");
        assert!(
            sent <= 8192 + 64 * 1024,
            "the answer came only after {sent} bytes"
        );
    }
    let text = get(gw.admin, "/metrics", &[]).await.unwrap().text();
    assert_eq!(rejected(&text, "header_bytes"), 1.0, "{text}");
    assert_eq!(rejected(&text, "uri_length"), 1.0, "{text}");
}

/// Not only a connection's first head: each later one must be complete
/// within header_read_timeout too, however it dribbles in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_head_on_a_kept_alive_connection_has_the_header_deadline() {
    let gw = Gateway::start(&format!(
        "{}\nlimits = {{ header_read_timeout = \"1s\", idle_timeout = \"30s\" }}\n[routes.r]\npath_prefix = \"/\"\nrespond = {{ body = \"ok\" }}\n",
        HEAD.trim_end()
    ))
    .await;
    let mut s = TcpStream::connect(gw.listen).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_ok(&mut s).await, "ok");
    // Idle for longer than the head deadline: idle_timeout governs that.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: ")
        .await
        .unwrap();
    let start = Instant::now();
    let mut buf = [0u8; 256];
    loop {
        // One byte every 200 ms: each read is prompt, the head never ends.
        match tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => panic!("unexpected answer: {}", String::from_utf8_lossy(&buf[..n])),
            Err(_) => {
                if s.write_all(b"x").await.is_err() {
                    break;
                }
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "a dribbled head outlived its deadline"
        );
    }
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "{took:?}"
    );
    let text = get(gw.admin, "/metrics", &[]).await.unwrap().text();
    assert_eq!(rejected(&text, "header_timeout"), 1.0, "{text}");
}

/// Unfinished heads of all connections share `max_pending_head_bytes`:
/// past it the oldest are cut (`408`), memory stays near it (60 heads of
/// 256 KiB would hold 15 MiB), and a client that sends its head at once is
/// served throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_heads_share_a_memory_budget_and_the_oldest_are_cut() {
    const HEADS: usize = 60;
    const BUDGET: u64 = 2 * 1024 * 1024;
    let gw = Gateway::start(&format!(
        "[gateway]\nmax_pending_head_bytes = {BUDGET}\nworkers = 1\n{}\nlimits = {{ max_request_header_bytes = 1048576, header_read_timeout = \"60s\", idle_timeout = \"60s\" }}\n[routes.r]\npath_prefix = \"/\"\nrespond = {{ body = \"ok\" }}\n",
        HEAD.trim_end()
    ))
    .await;
    assert_eq!(get(gw.listen, "/", &[]).await.unwrap().status, 200);
    let before = rss(gw.pid());
    let mut held = Vec::new();
    let pad = vec![b'p'; 256 * 1024];
    for _ in 0..HEADS {
        let mut s = TcpStream::connect(gw.listen).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\nX-Pad: ")
            .await
            .unwrap();
        // A cut connection may refuse the rest.
        let _ = s.write_all(&pad).await;
        held.push(s);
        // A prompt client is served all along.
        assert_eq!(get(gw.listen, "/", &[]).await.unwrap().status, 200);
    }
    let text = gw
        .wait_for_metric(
            r#"meshgate_downstream_rejected_total{listener="public",reason="head_budget"}"#,
            (HEADS / 2) as f64,
            Duration::from_secs(10),
        )
        .await;
    let cut = rejected(&text, "head_budget");
    assert!(cut < HEADS as f64, "every head was cut: {text}");
    // The first heads sent are the ones cut, each told so with a 408.
    let mut answers = Vec::new();
    for s in held.iter_mut().take(4) {
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got)).await;
        answers.push(String::from_utf8_lossy(&got).into_owned());
    }
    for a in &answers {
        assert!(a.starts_with("HTTP/1.1 408"), "{answers:?}");
        assert!(a.contains("max_pending_head_bytes"), "{a}");
    }
    // Within a few times the budget (the connections themselves, and the
    // allocator's per-thread caches): far below the 15 MiB the heads held.
    let grew = rss(gw.pid()).saturating_sub(before);
    assert!(
        grew <= 3 * BUDGET,
        "RSS grew by {grew} bytes with a budget of {BUDGET}"
    );
    assert_eq!(get(gw.listen, "/", &[]).await.unwrap().status, 200);
}

/// A head longer than the first read's buffer is read on into memory of
/// its own, in counted steps, and reaches the upstream whole, byte for
/// byte, whether it came at once or in pieces.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_head_reaches_the_upstream_whole() {
    let live = echo("live").await;
    let gw = Gateway::start(&format!(
        "{}\nlimits = {{ max_request_header_bytes = 262144 }}\n[routes.r]\nupstream = \"live\"\n[upstreams.live]\nendpoints = [\"{}\"]\n",
        HEAD.trim_end(),
        live.addr
    ))
    .await;
    // 100 KiB of values that vary, so that a piece lost, repeated or out
    // of place shows.
    let value: String = (0..100 * 1024)
        .map(|i| char::from(b'a' + (i * 7 % 26) as u8))
        .collect();
    let head = format!(
        "GET /long HTTP/1.1\r\nHost: a\r\nX-Long: {value}\r\nX-After: end\r\nConnection: close\r\n\r\n"
    );
    for piece in [head.len(), 7 * 1024, 1000] {
        let mut s = TcpStream::connect(gw.listen).await.unwrap();
        for part in head.as_bytes().chunks(piece) {
            s.write_all(part).await.unwrap();
        }
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got))
            .await
            .expect("answered")
            .unwrap();
        let text = String::from_utf8_lossy(&got);
        assert!(
            text.starts_with("HTTP/1.1 200"),
            "{}",
            &text[..text.len().min(300)]
        );
        let body = &text[text.find("\r\n\r\n").unwrap() + 4..];
        let j: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(j["headers"]["x-long"], value.as_str(), "pieces of {piece}");
        assert_eq!(j["headers"]["x-after"], "end");
    }
}

/// HTTP/2 frames written by hand, for clients no library would be.
mod frames {
    pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    pub const ENHANCE_YOUR_CALM: u32 = 0xb;

    pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    pub fn settings() -> Vec<u8> {
        frame(0x4, 0, 0, &[])
    }

    pub fn ping(n: u64) -> Vec<u8> {
        frame(0x6, 0, 0, &n.to_be_bytes())
    }

    /// `GET /` on `stream`, the whole request in one HEADERS frame
    /// (HPACK: :method GET, :scheme http, :path /, :authority a).
    pub fn get(stream: u32) -> Vec<u8> {
        frame(
            0x1,
            0x1 | 0x4,
            stream,
            &[0x82, 0x86, 0x84, 0x41, 0x01, b'a'],
        )
    }

    /// RST_STREAM with CANCEL.
    pub fn cancel(stream: u32) -> Vec<u8> {
        frame(0x3, 0, stream, &8u32.to_be_bytes())
    }

    /// The error code of the first GOAWAY in what the server sent.
    pub fn goaway(mut bytes: &[u8]) -> Option<u32> {
        while bytes.len() >= 9 {
            let len = (usize::from(bytes[0]) << 16)
                | (usize::from(bytes[1]) << 8)
                | usize::from(bytes[2]);
            let kind = bytes[3];
            let payload = bytes.get(9..9 + len)?;
            if kind == 0x7 && len >= 8 {
                return Some(u32::from_be_bytes([
                    payload[4], payload[5], payload[6], payload[7],
                ]));
            }
            bytes = &bytes[9 + len..];
        }
        None
    }
}

/// Write `frames` after the preface (the server's own SETTINGS are
/// acknowledged too), then read until the server closes.
async fn h2_exchange(addr: std::net::SocketAddr, frames: &[Vec<u8>]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut out = frames::PREFACE.to_vec();
    out.extend(frames::settings());
    out.extend(frames::frame(0x4, 0x1, 0, &[]));
    for f in frames {
        out.extend_from_slice(f);
    }
    // The server may close before all of it is written.
    let _ = s.write_all(&out).await;
    // Read until the server closes, answering its PINGs as a client does
    // (a graceful GOAWAY waits for one).
    let mut got = Vec::new();
    let mut parsed = 0;
    let mut buf = [0u8; 16 * 1024];
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let n = match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => n,
            _ => break,
        };
        got.extend_from_slice(&buf[..n]);
        while got.len() >= parsed + 9 {
            let h = &got[parsed..parsed + 9];
            let len = (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
            if got.len() < parsed + 9 + len {
                break;
            }
            if h[3] == 0x6 && h[4] & 0x1 == 0 {
                let payload = got[parsed + 9..parsed + 9 + len].to_vec();
                let _ = s.write_all(&frames::frame(0x6, 0x1, 0, &payload)).await;
            }
            parsed += 9 + len;
        }
    }
    got
}

fn upstream_attempts(text: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with("meshgate_upstream_connections_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// HTTP/2 Rapid Reset, each stream cancelled in the same write as its
/// request: the h2 layer refuses the flood (GOAWAY ENHANCE_YOUR_CALM) and
/// none of it reaches the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_streams_cancelled_at_once_are_not_forwarded_and_a_flood_is_stopped() {
    let app = echo("app").await;
    let gw = Gateway::start(&format!(
        "{}\n[routes.r]\npath_prefix = \"/\"\nupstream = \"app\"\n[upstreams.app]\nendpoints = [\"{}\"]\n",
        HEAD.trim_end(),
        app.addr
    ))
    .await;
    let flood: Vec<Vec<u8>> = (0..300u32)
        .map(|i| [frames::get(2 * i + 1), frames::cancel(2 * i + 1)].concat())
        .collect();
    let got = h2_exchange(gw.listen, &flood).await;
    assert_eq!(
        frames::goaway(&got),
        Some(frames::ENHANCE_YOUR_CALM),
        "no GOAWAY ENHANCE_YOUR_CALM in {} bytes",
        got.len()
    );
    let text = gw
        .wait_for_metric(
            r#"meshgate_downstream_goaways_total{listener="public",reason="reset_flood"}"#,
            1.0,
            Duration::from_secs(5),
        )
        .await;
    assert_eq!(upstream_attempts(&text), 0.0, "{text}");
    // A well-behaved HTTP/2 client is served.
    let r = send(gw.listen, Method::GET, "/ok", &[], Bytes::new(), true)
        .await
        .unwrap();
    assert_eq!(r.status, 200);
}

/// Streams the client cancels once they are being served count against
/// their connection: past RESET_BURST (100) in a short while, GOAWAY
/// ENHANCE_YOUR_CALM. Each cancel is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_clients_cancelling_served_streams_too_fast_are_stopped() {
    let app = echo("app").await;
    let gw = Gateway::start(&format!(
        "{}\n[routes.r]\npath_prefix = \"/\"\nupstream = \"app\"\n[upstreams.app]\nendpoints = [\"{}\"]\n",
        HEAD.trim_end(),
        app.addr
    ))
    .await;
    let mut s = TcpStream::connect(gw.listen).await.unwrap();
    let mut start = frames::PREFACE.to_vec();
    start.extend(frames::settings());
    start.extend(frames::frame(0x4, 0x1, 0, &[]));
    s.write_all(&start).await.unwrap();
    // GET /delay/300 (:path as a literal), then its cancel once it is
    // surely being served.
    let slow = |stream: u32| {
        let mut block = vec![0x82, 0x86, 0x44, 10];
        block.extend_from_slice(b"/delay/300");
        block.extend_from_slice(&[0x41, 0x01, b'a']);
        frames::frame(0x1, 0x1 | 0x4, stream, &block)
    };
    let (mut reader, mut writer) = s.into_split();
    let reading = tokio::spawn(async move {
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(20), reader.read_to_end(&mut got)).await;
        got
    });
    for wave in 0..3u32 {
        let streams: Vec<u32> = (0..50u32).map(|i| 2 * (wave * 50 + i) + 1).collect();
        for &id in &streams {
            if writer.write_all(&slow(id)).await.is_err() {
                break;
            }
        }
        // Half the upstream's 300 ms: served by then even on a busy machine.
        tokio::time::sleep(Duration::from_millis(150)).await;
        for &id in &streams {
            if writer.write_all(&frames::cancel(id)).await.is_err() {
                break;
            }
        }
    }
    let got = reading.await.unwrap();
    assert_eq!(frames::goaway(&got), Some(frames::ENHANCE_YOUR_CALM));
    let text = gw
        .wait_for_metric(
            r#"meshgate_downstream_goaways_total{listener="public",reason="reset_flood"}"#,
            1.0,
            Duration::from_secs(5),
        )
        .await;
    let resets = metric(
        &text,
        r#"meshgate_downstream_client_resets_total{listener="public"}"#,
    );
    assert!(resets > 100.0, "{text}");
}

/// SETTINGS and PING floods: every frame would be answered, so each kind
/// has a budget; past it, GOAWAY ENHANCE_YOUR_CALM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_ping_and_settings_floods_get_enhance_your_calm() {
    let gw = Gateway::start(&format!(
        "{}\n[routes.r]\npath_prefix = \"/\"\nrespond = {{ body = \"ok\" }}\n",
        HEAD.trim_end()
    ))
    .await;
    let pings: Vec<Vec<u8>> = (0..500).map(frames::ping).collect();
    let got = h2_exchange(gw.listen, &pings).await;
    assert_eq!(frames::goaway(&got), Some(frames::ENHANCE_YOUR_CALM));
    let settings: Vec<Vec<u8>> = (0..200).map(|_| frames::settings()).collect();
    let got = h2_exchange(gw.listen, &settings).await;
    assert_eq!(frames::goaway(&got), Some(frames::ENHANCE_YOUR_CALM));
    let text = get(gw.admin, "/metrics", &[]).await.unwrap().text();
    assert_eq!(
        metric(
            &text,
            r#"meshgate_downstream_goaways_total{listener="public",reason="frame_flood"}"#
        ),
        2.0,
        "{text}"
    );
    // A few pings are any client's right.
    let pings: Vec<Vec<u8>> = (0..10).map(frames::ping).collect();
    let mut s = TcpStream::connect(gw.listen).await.unwrap();
    let mut out = frames::PREFACE.to_vec();
    out.extend(frames::settings());
    for p in &pings {
        out.extend_from_slice(p);
    }
    s.write_all(&out).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(frames::goaway(&buf[..n]).is_none());
}

/// An HTTP/2 connection with nothing open for idle_timeout gets a GOAWAY
/// (NO_ERROR) before it closes; one that served max_requests_per_connection
/// streams gets one too, and HTTP/1 says `Connection: close` on the last.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_connections_end_with_a_goaway_when_idle_or_used_up() {
    let gw = Gateway::start(&format!(
        "{}\nlimits = {{ idle_timeout = \"1s\", max_requests_per_connection = 3 }}\n[routes.r]\npath_prefix = \"/\"\nrespond = {{ body = \"ok\" }}\n",
        HEAD.trim_end()
    ))
    .await;
    let start = Instant::now();
    let got = h2_exchange(gw.listen, &[frames::get(1)]).await;
    let took = start.elapsed();
    assert_eq!(frames::goaway(&got), Some(0), "an idle close says NO_ERROR");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "{took:?}"
    );
    // Three streams, then GOAWAY, and the connection ends without idling.
    let start = Instant::now();
    let got = h2_exchange(gw.listen, &[frames::get(1), frames::get(3), frames::get(5)]).await;
    assert_eq!(frames::goaway(&got), Some(0));
    assert!(
        start.elapsed() < Duration::from_millis(900),
        "{:?}",
        start.elapsed()
    );
    let text = get(gw.admin, "/metrics", &[]).await.unwrap().text();
    let reason = |r: &str| {
        metric(
            &text,
            &format!("meshgate_downstream_goaways_total{{listener=\"public\",reason=\"{r}\"}}"),
        )
    };
    assert_eq!(reason("idle"), 1.0, "{text}");
    assert_eq!(reason("max_requests"), 1.0, "{text}");
    // HTTP/1: the third answer closes.
    let mut s = TcpStream::connect(gw.listen).await.unwrap();
    for i in 1..=3 {
        s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !String::from_utf8_lossy(&got).ends_with("ok") {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0);
            got.extend_from_slice(&buf[..n]);
        }
        let head = String::from_utf8_lossy(&got).to_lowercase();
        assert_eq!(
            head.contains("connection: close"),
            i == 3,
            "answer {i}: {head}"
        );
    }
}

/// A stream the client cancels while it waits (here on a frozen Redis for
/// its rate limit) is not forwarded when the wait ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_stream_cancelled_while_it_waits_is_never_forwarded() {
    let app = echo("app").await;
    let redis = crate::support::redis::RedisServer::start().await;
    let gw = Gateway::start(&format!(
        "{}\n[redis]\nurl = \"{}\"\ntimeout = \"1s\"\non_error = \"allow\"\n[rate_limits.g]\nkey = \"route\"\nrate = 1000\nscope = \"global\"\n[routes.r]\npath_prefix = \"/\"\nrate_limits = [\"g\"]\nupstream = \"app\"\n[upstreams.app]\nendpoints = [\"{}\"]\n",
        HEAD.trim_end(),
        redis.url(),
        app.addr
    ))
    .await;
    redis.pause();
    let mut s = TcpStream::connect(gw.listen).await.unwrap();
    let mut start = frames::PREFACE.to_vec();
    start.extend(frames::settings());
    start.extend(frames::frame(0x4, 0x1, 0, &[]));
    start.extend(frames::get(1));
    s.write_all(&start).await.unwrap();
    // The request now waits on Redis; the client gives up.
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.write_all(&frames::cancel(1)).await.unwrap();
    let text = gw
        .wait_for_metric(
            r#"meshgate_downstream_client_resets_total{listener="public"}"#,
            1.0,
            Duration::from_secs(5),
        )
        .await;
    redis.resume();
    assert_eq!(upstream_attempts(&text), 0.0, "{text}");
    // Once Redis answers again, requests are forwarded as ever.
    let r = send(gw.listen, Method::GET, "/ok", &[], Bytes::new(), true)
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let text = get(gw.admin, "/metrics", &[]).await.unwrap().text();
    assert_eq!(upstream_attempts(&text), 1.0, "{text}");
}

/// Send `head`, then `body` a piece at a time every `every`; what the
/// gateway answered, and when (from the head).
async fn trickle(
    addr: std::net::SocketAddr,
    head: &[u8],
    body: &[u8],
    piece: usize,
    every: Duration,
) -> (String, Duration) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let start = Instant::now();
    s.write_all(head).await.unwrap();
    let (mut reader, mut writer) = s.into_split();
    let body = body.to_vec();
    let writing = tokio::spawn(async move {
        for chunk in body.chunks(piece) {
            // The client's pace is what the test is about.
            tokio::time::sleep(every).await;
            if writer.write_all(chunk).await.is_err() {
                return;
            }
        }
        // Hold the connection open; the gateway closes it.
        tokio::time::sleep(Duration::from_secs(30)).await;
    });
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(15), reader.read_to_end(&mut got)).await;
    let took = start.elapsed();
    writing.abort();
    (String::from_utf8_lossy(&got).into_owned(), took)
}

/// The route's timeout covers the upload too, and a body that stalls is
/// cut at body_read_timeout: `408`, and no upstream waits on it further.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_request_bodies_are_cut_with_408() {
    let app = echo("app").await;
    let gw = Gateway::start(&format!(
        "{}\nlimits = {{ body_read_timeout = \"500ms\" }}\n[routes.r]\npath_prefix = \"/\"\nupstream = \"app\"\ntimeout = \"1500ms\"\n[upstreams.app]\nendpoints = [\"{}\"]\n",
        HEAD.trim_end(),
        app.addr
    ))
    .await;
    let head = b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\n\r\n";
    // A byte every 100 ms: each read is prompt, the route's deadline is not.
    let (answer, took) = trickle(
        gw.listen,
        head,
        &[b'x'; 1000],
        1,
        Duration::from_millis(100),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        answer.contains("request body not received in time"),
        "{answer}"
    );
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_secs(5),
        "{took:?}"
    );
    // Ten bytes, then nothing: cut at body_read_timeout.
    let (answer, took) = trickle(gw.listen, head, &[b'x'; 10], 10, Duration::ZERO).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_millis(1400),
        "{took:?}"
    );
    let text = get(gw.admin, "/metrics", &[]).await.unwrap().text();
    assert_eq!(rejected(&text, "body_timeout"), 2.0, "{text}");
    // A prompt upload is untouched.
    let r = send(
        gw.listen,
        Method::POST,
        "/up",
        &[],
        Bytes::from(vec![b'y'; 5000]),
        false,
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["body_len"], 5000);
}

/// Without max_body_bytes a route takes at most 10 MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_have_a_default_limit() {
    let app = echo("app").await;
    let gw = Gateway::start(&format!(
        "{}\n[routes.r]\npath_prefix = \"/\"\nupstream = \"app\"\n[upstreams.app]\nendpoints = [\"{}\"]\n",
        HEAD.trim_end(),
        app.addr
    ))
    .await;
    let (answer, _) = crate::support::read_to_close(
        gw.listen,
        b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 10485761\r\n\r\n",
        false,
        Duration::from_secs(5),
    )
    .await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert_eq!(app.connections(), 0, "the upstream saw nothing");
}

/// With buffer_request_body, a small body is read whole before an upstream
/// connection is used: a client sending it slowly holds none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_bodies_are_buffered_before_an_upstream_is_chosen() {
    let app = echo("app").await;
    let gw = Gateway::start(&format!(
        "{}\n[routes.r]\npath_prefix = \"/\"\nupstream = \"app\"\nbuffer_request_body = \"16KiB\"\n[upstreams.app]\nendpoints = [\"{}\"]\n",
        HEAD.trim_end(),
        app.addr
    ))
    .await;
    let mut s = TcpStream::connect(gw.listen).await.unwrap();
    s.write_all(b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n01234")
        .await
        .unwrap();
    // Half the body is in; the upstream has not been contacted.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        app.connections(),
        0,
        "an upstream connection waits on a slow client"
    );
    s.write_all(b"56789").await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("body_len") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("an answer")
            .unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("\"body\":\"0123456789\""), "{text}");
    assert_eq!(app.connections(), 1);
}

/// Over `overload.memory`, new connections are refused and new requests on
/// open ones get `503 overloaded`; below it again, all is served as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_overload_sheds_new_connections_and_requests() {
    let config = |overload: &str| {
        format!(
            "[gateway]\n{overload}\n{}\n[routes.r]\npath_prefix = \"/\"\nrespond = {{ body = \"ok\" }}\n",
            HEAD.trim_end()
        )
    };
    let gw = Gateway::start(&config("")).await;
    let mut open = TcpStream::connect(gw.listen).await.unwrap();
    open.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_ok(&mut open).await, "ok");
    // 16 MiB: below what the gateway holds anyway.
    gw.reload(&config("overload = { memory = \"16MiB\" }"));
    gw.wait_for_metric("meshgate_overload_active", 1.0, Duration::from_secs(5))
        .await;
    open.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let got = rest_of(&mut open).await;
    assert!(got.starts_with("HTTP/1.1 503"), "{got}");
    assert!(got.contains("\"error\":\"overloaded\""), "{got}");
    assert!(
        get(gw.listen, "/", &[]).await.is_err(),
        "a new connection is refused"
    );
    let text = get(gw.admin, "/metrics", &[]).await.unwrap().text();
    assert_eq!(
        metric(&text, r#"meshgate_overload_shed_total{kind="request"}"#),
        1.0,
        "{text}"
    );
    assert!(
        metric(&text, r#"meshgate_overload_shed_total{kind="connection"}"#) >= 1.0,
        "{text}"
    );
    gw.wait_for_log(Duration::from_secs(5), |log| {
        log.contains("overload: resident memory")
    })
    .await;
    gw.reload(&config(""));
    let start = Instant::now();
    loop {
        if let Ok(r) = get(gw.listen, "/", &[]).await {
            assert_eq!(r.status, 200);
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "still shedding");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    gw.wait_for_log(Duration::from_secs(5), |log| log.contains("overload over"))
        .await;
}
