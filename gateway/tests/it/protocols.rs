//! Protocols through the gateway: h2c downstream, WebSocket upgrades, HTTP/2
//! trailers (gRPC), and upstream keep-alive pooling.

use crate::support::client::{get, send};
use crate::support::upstream::{echo, websocket_echo};
use crate::support::{Gateway, HEAD};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::Method;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_through_the_gateway() {
    let ws = websocket_echo().await;
    let config = format!(
        r#"{HEAD}
[routes.ws]
path = "/ws"
upstream = "ws"
timeout = "1s"
[upstreams.ws]
endpoints = ["{}"]
read_timeout = "5s"
"#,
        ws.addr
    );
    let gw = Gateway::start(&config).await;
    let (mut socket, resp) = tokio_tungstenite::connect_async(format!("ws://{}/ws", gw.listen))
        .await
        .expect("websocket handshake through the gateway");
    assert_eq!(resp.status(), 101);
    for i in 0..5 {
        let text = format!("hello {i}");
        socket.send(Message::text(text.clone())).await.unwrap();
        let back = socket.next().await.unwrap().unwrap();
        assert_eq!(back.into_text().unwrap().as_str(), text);
    }
    // The route timeout (1s) must not cut an upgraded connection.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    socket.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    assert_eq!(
        socket.next().await.unwrap().unwrap().into_data().as_ref(),
        &[1, 2, 3]
    );
    socket.close(None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_style_trailers_pass_through_h2c() {
    let up = echo("grpc").await;
    let config = format!(
        r#"{HEAD}
[routes.grpc]
upstream = "grpc"
[upstreams.grpc]
endpoints = ["{}"]
protocol = "h2c"
"#,
        up.addr
    );
    let gw = Gateway::start(&config).await;
    let r = send(
        gw.listen,
        Method::POST,
        "/trailers",
        &[("content-type", "application/grpc"), ("te", "trailers")],
        Bytes::from_static(b"\0\0\0\0\0"),
        true,
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body.as_ref(), b"\x00\x00\x00\x00\x02hi");
    let trailers = r.trailers.expect("trailers must reach the client");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["grpc-message"], "ok");
    // The upstream really saw HTTP/2.
    let r = send(gw.listen, Method::GET, "/echo", &[], Bytes::new(), true)
        .await
        .unwrap();
    assert_eq!(r.json()["version"], "HTTP/2.0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_downstream_to_http1_upstream_with_a_body() {
    let up = echo("h1").await;
    let config = format!(
        r#"{HEAD}
[routes.r]
upstream = "h1"
[upstreams.h1]
endpoints = ["{}"]
"#,
        up.addr
    );
    let gw = Gateway::start(&config).await;
    let r = send(
        gw.listen,
        Method::POST,
        "/upload",
        &[
            ("content-type", "text/plain"),
            // HTTP/2 clients send each cookie as its own field.
            ("cookie", "session=abc"),
            ("cookie", "csrf=xyz"),
        ],
        Bytes::from_static(b"payload"),
        true,
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    let j = r.json();
    assert_eq!(j["version"], "HTTP/1.1");
    assert_eq!(j["body"], "payload");
    assert_eq!(j["method"], "POST");
    // One `Cookie` line for HTTP/1.1 (RFC 9113 §8.2.3); the echo would
    // show two lines joined with ", ".
    assert_eq!(j["headers"]["cookie"], "session=abc; csrf=xyz");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_pooled() {
    let up = echo("pooled").await;
    let config = format!(
        r#"{HEAD}
[routes.r]
upstream = "pooled"
[upstreams.pooled]
endpoints = ["{}"]
idle_timeout = "30s"
"#,
        up.addr
    );
    let gw = Gateway::start(&config).await;
    // Each request opens a new downstream connection; upstream ones are reused.
    for _ in 0..50 {
        assert_eq!(get(gw.listen, "/", &[]).await.unwrap().status, 200);
    }
    let opened = up.connections();
    assert!(
        opened <= 4,
        "50 sequential requests opened {opened} upstream connections"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_stream_both_ways_over_h1_and_h2c() {
    let up = echo("big").await;
    let config = format!(
        r#"{HEAD}
[routes.r]
upstream = "big"
[upstreams.big]
endpoints = ["{}"]
"#,
        up.addr
    );
    let gw = Gateway::start(&config).await;
    const N: usize = 3 * 1024 * 1024 + 7;
    let upload: Vec<u8> = (0..N).map(|i| (i % 253) as u8).collect();
    let sum: u64 = upload.iter().map(|b| u64::from(*b)).sum();
    for h2c in [false, true] {
        let r = send(
            gw.listen,
            Method::POST,
            "/upload",
            &[],
            Bytes::from(upload.clone()),
            h2c,
        )
        .await
        .unwrap();
        assert_eq!(r.status, 200, "h2c={h2c}");
        let j = r.json();
        assert_eq!(j["body_len"].as_u64(), Some(N as u64), "h2c={h2c}");
        assert_eq!(j["body_sum"].as_u64(), Some(sum), "h2c={h2c}");

        let r = send(
            gw.listen,
            Method::GET,
            &format!("/bytes/{N}"),
            &[],
            Bytes::new(),
            h2c,
        )
        .await
        .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.body.len(), N, "h2c={h2c}");
        assert!(
            r.body
                .iter()
                .enumerate()
                .all(|(i, b)| *b == (i % 251) as u8),
            "download corrupted (h2c={h2c})"
        );
    }
}

/// Read `n` HTTP/1.1 responses (each with a `content-length`) from `s`:
/// (status, body) in order, or fewer when the connection closes first or
/// nothing comes for five seconds.
async fn responses(s: &mut tokio::net::TcpStream, n: usize) -> Vec<(u16, String)> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let mut out = Vec::new();
    while out.len() < n {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let status = head[9..12].parse().unwrap();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .map_or(0, |v| v.trim().parse().unwrap());
            if buf.len() >= end + 4 + len {
                let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).into_owned();
                buf.drain(..end + 4 + len);
                out.push((status, body));
                continue;
            }
        }
        let mut chunk = [0u8; 8192];
        match tokio::time::timeout(std::time::Duration::from_secs(5), s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => break,
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order() {
    use tokio::io::AsyncWriteExt;
    let up = echo("p").await;
    let config = format!(
        "{HEAD}\n[routes.r]\nupstream = \"p\"\n[upstreams.p]\nendpoints = [\"{}\"]\n",
        up.addr
    );
    let gw = Gateway::start(&config).await;
    let mut s = tokio::net::TcpStream::connect(gw.listen).await.unwrap();
    // Three requests in one write, one with a body; the first is slow, so
    // the fourth arrives while it is still with the upstream.
    s.write_all(
        b"GET /delay/300 HTTP/1.1\r\nHost: a\r\n\r\n\
          POST /two HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello\
          GET /status/404 HTTP/1.1\r\nHost: a\r\n\r\n",
    )
    .await
    .unwrap();
    // Once the first is with the upstream.
    while up.connections() == 0 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    s.write_all(b"GET /four HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let got = responses(&mut s, 4).await;
    let summary: Vec<_> = got
        .iter()
        .map(|(status, body)| {
            let path = serde_json::from_str::<serde_json::Value>(body)
                .ok()
                .and_then(|j| Some(format!("{} {}", j["path"].as_str()?, j["body"].as_str()?)))
                .unwrap_or_else(|| body.clone());
            (*status, path)
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (200, "/delay/300 ".to_string()),
            (200, "/two hello".to_string()),
            (404, String::new()),
            (200, "/four ".to_string()),
        ]
    );
    // The connection is still good for a request after the pipeline.
    s.write_all(b"GET /five HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\nGET /six HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let got = responses(&mut s, 2).await;
    // `Connection: close` ends the pipeline: what came after it is not served.
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(got[0].1.contains("\"/five\""), "{got:?}");

    // Also when `close` is on a second `Connection` line (one list, RFC 9110 §5.3).
    let mut s = tokio::net::TcpStream::connect(gw.listen).await.unwrap();
    s.write_all(b"GET /seven HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\nConnection: close\r\n\r\nGET /eight HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let got = responses(&mut s, 2).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(got[0].1.contains("\"/seven\""), "{got:?}");
}
