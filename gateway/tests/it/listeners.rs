//! Listeners a reload adds, removes and moves: without a restart, and
//! without touching the connections of the listeners that stay.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::client::get;
use crate::support::{free_port, Gateway};

fn fresh_addr() -> SocketAddr {
    format!("127.0.0.1:{}", free_port()).parse().unwrap()
}

/// `[listeners.NAME] bind = ADDR` for each (`@LISTEN@` is the harness's
/// address), and a route answering `body`.
fn config(listeners: &[(&str, &str)], body: &str) -> String {
    let mut c = String::from("[admin]\nlisten = \"@ADMIN@\"\n");
    for (name, addr) in listeners {
        c.push_str(&format!("[listeners.{name}]\nbind = \"{addr}\"\n"));
    }
    c.push_str(&format!("[routes.r]\nrespond = {{ body = \"{body}\" }}\n"));
    c
}

/// One request on a kept-alive connection; the body, or `None` when the
/// gateway closed the connection.
pub async fn on_connection(stream: &mut TcpStream, path: &str) -> Option<String> {
    let req = format!("GET {path} HTTP/1.1\r\nhost: test\r\n\r\n");
    stream.write_all(req.as_bytes()).await.ok()?;
    read_response(stream).await
}

/// One response with a `content-length` body, read from `stream`.
pub async fn read_response(stream: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                let n = stream.read(&mut chunk).await.ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            return Some(String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).into_owned());
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Wait until nothing accepts connections on `addr`.
async fn closed(addr: SocketAddr, gw: &Gateway) {
    let start = Instant::now();
    while TcpStream::connect(addr).await.is_ok() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{addr} still accepts: {}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_add_remove_and_move_listeners() {
    let gw = Gateway::start(&config(&[("public", "@LISTEN@")], "one")).await;
    let mut kept = TcpStream::connect(gw.listen).await.unwrap();
    assert_eq!(on_connection(&mut kept, "/").await.as_deref(), Some("one"));

    // Added: bound and answering once the reload is done.
    let extra = fresh_addr();
    let two = config(
        &[("public", "@LISTEN@"), ("extra", &extra.to_string())],
        "two",
    );
    let r = gw.reload_now(&two).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(get(extra, "/", &[]).await.unwrap().text(), "two");
    // The connection to the listener that stays goes on.
    assert_eq!(on_connection(&mut kept, "/").await.as_deref(), Some("two"));
    let mut on_extra = TcpStream::connect(extra).await.unwrap();
    assert_eq!(
        on_connection(&mut on_extra, "/").await.as_deref(),
        Some("two")
    );
    let metrics = get(gw.admin, "/metrics", &[]).await.unwrap().text();
    assert!(
        metrics.contains(
            r#"meshgate_downstream_connections_active{direction="ingress",listener="extra"} 1"#
        ),
        "{metrics}"
    );

    // A port in use: the reload is refused, naming the listener, and the
    // old config keeps serving.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap().to_string();
    let r = gw
        .reload_now(&config(
            &[
                ("public", "@LISTEN@"),
                ("extra", &extra.to_string()),
                ("busy", &taken_addr),
            ],
            "three",
        ))
        .await;
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(
        r.text()
            .contains(&format!("cannot bind listener `busy` on {taken_addr}")),
        "{}",
        r.text()
    );
    assert_eq!(get(gw.listen, "/", &[]).await.unwrap().text(), "two");
    drop(taken);

    // Removed: it accepts nothing more, and its idle connection is closed.
    let r = gw
        .reload_now(&config(&[("public", "@LISTEN@")], "four"))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    closed(extra, &gw).await;
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), on_extra.read_to_end(&mut rest)).await;
    assert!(matches!(read, Ok(Ok(0))), "{read:?} {rest:?}");
    assert_eq!(on_connection(&mut kept, "/").await.as_deref(), Some("four"));

    // Moved: the new address answers, the old one is closed, and a
    // connection made to the old one drains.
    let moved = fresh_addr();
    let r = gw
        .reload_now(&config(&[("public", &moved.to_string())], "five"))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(get(moved, "/", &[]).await.unwrap().text(), "five");
    closed(gw.listen, &gw).await;
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), kept.read_to_end(&mut rest)).await;
    assert!(matches!(read, Ok(Ok(0))), "{read:?} {rest:?}");
    assert!(gw.log().contains("listener `public` on"), "{}", gw.log());
}
