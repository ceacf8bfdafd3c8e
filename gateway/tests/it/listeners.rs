//! Listeners a reload adds, removes and moves: without a restart, and
//! without touching the connections of the listeners that stay.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::client::get;
use crate::support::upstream::{echo, websocket_echo};
use crate::support::{free_port, signal, Gateway, Upgrading};

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
async fn on_connection(stream: &mut TcpStream, path: &str) -> Option<String> {
    request(stream, path).await.map(|(body, _)| body)
}

/// One request on a kept-alive connection: the body and whether the
/// answer ends the connection (`connection: close`); `None` when the
/// connection closed first.
async fn request(stream: &mut TcpStream, path: &str) -> Option<(String, bool)> {
    let req = format!("GET {path} HTTP/1.1\r\nhost: test\r\n\r\n");
    stream.write_all(req.as_bytes()).await.ok()?;
    read_response(stream).await
}

/// One response with a `content-length` body, read from `stream`, and
/// whether it says `connection: close`.
async fn read_response(stream: &mut TcpStream) -> Option<(String, bool)> {
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
            let close = head
                .lines()
                .any(|l| l.starts_with("connection:") && l.contains("close"));
            let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).into_owned();
            return Some((body, close));
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Whether a read to the end found the connection closed by the gateway
/// without a byte of answer: an end, or a reset (the close met bytes the
/// client had sent).
fn closed_unanswered(
    read: &Result<std::io::Result<usize>, tokio::time::error::Elapsed>,
    rest: &[u8],
) -> bool {
    rest.is_empty()
        && match read {
            Ok(Ok(0)) => true,
            Ok(Err(e)) => e.kind() == std::io::ErrorKind::ConnectionReset,
            _ => false,
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
    // The report names what changed.
    assert_eq!(
        r.json()["listeners"],
        serde_json::json!([format!("listener `extra` added on {extra}")])
    );
    assert_eq!(get(extra, "/", &[]).await.unwrap().text(), "two");
    // The connection to the listener that stays goes on.
    assert_eq!(on_connection(&mut kept, "/").await.as_deref(), Some("two"));
    let mut on_extra = TcpStream::connect(extra).await.unwrap();
    assert_eq!(
        on_connection(&mut on_extra, "/").await.as_deref(),
        Some("two")
    );
    // (The answered `get` connection may still be closing: wait for it.)
    gw.wait_for_metric_line(
        r#"meshgate_downstream_connections_active{direction="ingress",listener="extra"} 1"#,
        Duration::from_secs(5),
    )
    .await;

    // Moved to the wildcard address of its own port: the old socket still
    // accepts while the new one binds, so the reload is refused, saying so.
    let wildcard = format!("0.0.0.0:{}", gw.listen.port());
    let r = gw
        .reload_now(&config(
            &[("public", &wildcard), ("extra", &extra.to_string())],
            "x",
        ))
        .await;
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(
        r.text().contains("listener `public` still accepts on"),
        "{}",
        r.text()
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

    // Removed: it accepts nothing more, and its idle connection is closed,
    // as is one whose next head was still arriving (as at shutdown).
    let mut arriving = TcpStream::connect(extra).await.unwrap();
    assert_eq!(
        on_connection(&mut arriving, "/").await.as_deref(),
        Some("two")
    );
    arriving.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
    let r = gw
        .reload_now(&config(&[("public", "@LISTEN@")], "four"))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json()["listeners"],
        serde_json::json!([format!(
            "listener `extra` removed from {extra}; its connections drain"
        )])
    );
    closed(extra, &gw).await;
    for conn in [&mut on_extra, &mut arriving] {
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut rest)).await;
        assert!(closed_unanswered(&read, &rest), "{read:?} {rest:?}");
    }
    assert_eq!(on_connection(&mut kept, "/").await.as_deref(), Some("four"));

    // Moved: the new address answers, the old one is closed, and a
    // connection made to the old one drains. One accepted there that had
    // not sent its request yet is served it (by the moved listener, found
    // by name), then closed.
    let mut fresh = TcpStream::connect(gw.listen).await.unwrap();
    gw.wait_for_metric(
        r#"meshgate_downstream_connections_active{direction="ingress",listener="public"}"#,
        2.0,
        Duration::from_secs(5),
    )
    .await;
    let moved = fresh_addr();
    let r = gw
        .reload_now(&config(&[("public", &moved.to_string())], "five"))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json()["listeners"],
        serde_json::json!([format!(
            "listener `public` moved from {} to {moved}",
            gw.listen
        )])
    );
    assert_eq!(get(moved, "/", &[]).await.unwrap().text(), "five");
    closed(gw.listen, &gw).await;
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), kept.read_to_end(&mut rest)).await;
    assert!(closed_unanswered(&read, &rest), "{read:?} {rest:?}");
    assert_eq!(
        request(&mut fresh, "/").await,
        Some(("five".to_string(), true)),
        "{}",
        gw.log()
    );
    gw.wait_for_log(Duration::from_secs(5), |log| {
        log.contains("listener `public` on")
    })
    .await;
}

/// What the clients of the soak test saw.
#[derive(Default)]
struct Seen {
    /// Answers, by client.
    answered: [AtomicUsize; 4],
    /// Requests sent again on a new connection because the gateway closed
    /// the one they were on before reading them (only as a process drains
    /// after an upgrade: HTTP/1.1 clients resend an idempotent request
    /// then, RFC 9112 §9.3.1; HTTP/2 ones a stream a GOAWAY refused).
    resent: AtomicUsize,
    /// WebSocket messages echoed.
    echoed: AtomicUsize,
    failures: std::sync::Mutex<Vec<String>>,
    /// The body `/v` answered last, per client.
    last: std::sync::Mutex<[String; 3]>,
}

const KEEPALIVE: usize = 0;
const NEW_CONNECTION: usize = 1;
const H2C: usize = 2;
const WEBSOCKET: usize = 3;

impl Seen {
    fn fail(&self, what: String) {
        self.failures.lock().unwrap().push(what);
    }

    fn answer(&self, client: usize, body: &str) {
        self.answered[client].fetch_add(1, Ordering::Relaxed);
        self.last.lock().unwrap()[client] = body.to_string();
    }

    fn last(&self, client: usize) -> String {
        self.last.lock().unwrap()[client].clone()
    }

    fn failures(&self) -> Vec<String> {
        self.failures.lock().unwrap().clone()
    }
}

/// HTTP/1.1 keep-alive: one connection for as long as the gateway keeps it.
async fn keepalive_client(addr: SocketAddr, stop: Arc<AtomicBool>, seen: Arc<Seen>) {
    let mut conn: Option<TcpStream> = None;
    while !stop.load(Ordering::Relaxed) {
        let reused = conn.is_some();
        let mut stream = match conn.take() {
            Some(s) => s,
            None => match TcpStream::connect(addr).await {
                Ok(s) => s,
                Err(e) => {
                    seen.fail(format!("keep-alive connect: {e}"));
                    continue;
                }
            },
        };
        match request(&mut stream, "/v").await {
            Some((body, close)) => {
                seen.answer(KEEPALIVE, &body);
                conn = (!close).then_some(stream);
            }
            None if reused => {
                seen.resent.fetch_add(1, Ordering::Relaxed);
            }
            None => seen.fail("keep-alive: closed before an answer on a new connection".into()),
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// A new connection per request: none may be refused.
async fn new_connection_client(addr: SocketAddr, stop: Arc<AtomicBool>, seen: Arc<Seen>) {
    while !stop.load(Ordering::Relaxed) {
        match get(addr, "/v", &[]).await {
            Ok(r) if r.status == 200 => seen.answer(NEW_CONNECTION, &r.text()),
            other => seen.fail(format!("new connection: {other:?}")),
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// h2c streams on one connection for as long as the gateway keeps it.
async fn h2c_client(addr: SocketAddr, stop: Arc<AtomicBool>, seen: Arc<Seen>) {
    use http_body_util::BodyExt;
    let mut sender: Option<
        hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    > = None;
    while !stop.load(Ordering::Relaxed) {
        if sender.is_none() {
            let io = match TcpStream::connect(addr).await {
                Ok(s) => hyper_util::rt::TokioIo::new(s),
                Err(e) => {
                    seen.fail(format!("h2c connect: {e}"));
                    continue;
                }
            };
            match hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                .await
            {
                Ok((s, conn)) => {
                    tokio::spawn(conn);
                    sender = Some(s);
                }
                Err(e) => {
                    seen.fail(format!("h2c handshake: {e}"));
                    continue;
                }
            }
        }
        let Some(s) = sender.as_mut() else { continue };
        if s.ready().await.is_err() {
            // A GOAWAY: the connection takes no new streams; a new one.
            sender = None;
            continue;
        }
        let req = http::Request::get(format!("http://{addr}/v"))
            .body(http_body_util::Empty::new())
            .unwrap();
        match s.send_request(req).await {
            Ok(resp) if resp.status() == 200 => match resp.into_body().collect().await {
                Ok(body) => seen.answer(H2C, &String::from_utf8_lossy(&body.to_bytes())),
                Err(e) => seen.fail(format!("h2c body: {e}")),
            },
            Ok(resp) => seen.fail(format!("h2c status {}", resp.status())),
            // Not processed (a stream above a GOAWAY's last stream, or
            // one the connection closed before sending): a client sends it
            // again on a new connection (RFC 9113 §6.8).
            Err(e) if e.is_canceled() || is_goaway(&e) => {
                seen.resent.fetch_add(1, Ordering::Relaxed);
                sender = None;
            }
            Err(e) => {
                seen.fail(format!("h2c: {e:?}"));
                sender = None;
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Whether `e` is the server's GOAWAY refusing the stream.
fn is_goaway(e: &hyper::Error) -> bool {
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<h2::Error>())
        .is_some_and(h2::Error::is_go_away)
}

/// A WebSocket that exchanges a message every 20 ms until told to stop,
/// then closes itself.
async fn websocket_client(addr: SocketAddr, n: usize, stop: Arc<AtomicBool>, seen: Arc<Seen>) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let (mut socket, _) = match tokio_tungstenite::connect_async(format!("ws://{addr}/ws")).await {
        Ok(s) => s,
        Err(e) => return seen.fail(format!("websocket {n}: {e}")),
    };
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let text = format!("{n}:{i}");
        if let Err(e) = socket.send(Message::text(text.clone())).await {
            return seen.fail(format!("websocket {n} closed: {e}"));
        }
        match tokio::time::timeout(Duration::from_secs(5), socket.next()).await {
            Ok(Some(Ok(m))) if m.to_text().ok() == Some(text.as_str()) => {
                seen.echoed.fetch_add(1, Ordering::Relaxed);
                seen.answered[WEBSOCKET].fetch_add(1, Ordering::Relaxed);
            }
            other => return seen.fail(format!("websocket {n}: {other:?}")),
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = socket.close(None).await;
}

/// A download of `chunks` × 64 KiB, one chunk every `ms`: whether every
/// byte came.
async fn download(addr: SocketAddr, chunks: usize, ms: u64) -> Result<usize, String> {
    let mut stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let req =
        format!("GET /drip/{chunks}/{ms} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n");
    stream
        .write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut all = Vec::new();
    stream
        .read_to_end(&mut all)
        .await
        .map_err(|e| e.to_string())?;
    let end = all
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no head")?;
    let body = &all[end + 4..];
    let want = chunks * 64 * 1024;
    let intact = body
        .chunks(64 * 1024)
        .enumerate()
        .all(|(i, c)| c.iter().all(|b| *b == (i % 251) as u8));
    if body.len() == want && intact {
        Ok(body.len())
    } else {
        Err(format!("{} of {want} bytes (intact: {intact})", body.len()))
    }
}

/// #23's soak: under continuous load (HTTP/1.1 keep-alive, a new connection
/// per request, h2c streams, WebSockets exchanging messages, one long
/// download), 100 reloads alternate two configs that add and remove a
/// listener and change a route, then a binary upgrade hands every socket
/// (the reload-added listener's too) to a new process. Bounded: a few
/// seconds of reloads, the upgrade's 5 s handover, then the clients stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_reloads_and_an_upgrade_under_load() {
    let api = echo("api").await;
    let ws = websocket_echo().await;
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("upgrade.sock");
    let side = fresh_addr();
    let config = |with_side: bool, body: &str| {
        let mut c = format!(
            "[gateway]\nupgrade_socket = \"{}\"\nshutdown_grace_period = \"5s\"\n[admin]\nlisten = \"@ADMIN@\"\n[listeners.public]\nbind = \"@LISTEN@\"\n",
            sock.display()
        );
        if with_side {
            c.push_str(&format!("[listeners.side]\nbind = \"{side}\"\n"));
        }
        c.push_str(&format!(
            "[routes.v]\npath = \"/v\"\nrespond = {{ body = \"{body}\" }}\n[routes.ws]\npath = \"/ws\"\nupstream = \"ws\"\n[routes.api]\npath_prefix = \"/\"\nupstream = \"api\"\n[upstreams.ws]\nendpoints = [\"{}\"]\nread_timeout = \"60s\"\n[upstreams.api]\nendpoints = [\"{}\"]\n",
            ws.addr, api.addr
        ));
        c
    };
    let mut old = Gateway::start(&config(true, "A")).await;
    let public = old.listen;
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Seen::default());
    let mut clients = vec![
        tokio::spawn(keepalive_client(public, stop.clone(), seen.clone())),
        tokio::spawn(new_connection_client(public, stop.clone(), seen.clone())),
        tokio::spawn(h2c_client(public, stop.clone(), seen.clone())),
    ];
    for n in 0..4 {
        clients.push(tokio::spawn(websocket_client(
            public,
            n,
            stop.clone(),
            seen.clone(),
        )));
    }
    // About 10 s: through the reloads and into the upgrade's handover.
    let download = tokio::spawn(download(public, 100, 100));
    tokio::time::sleep(Duration::from_millis(100)).await;

    let started = Instant::now();
    for i in 0..100 {
        let with_side = i % 2 == 1;
        let body = if with_side { "A" } else { "B" };
        let r = old.reload_now(&config(with_side, body)).await;
        assert_eq!(r.status, 200, "reload {i}: {}\n{}", r.text(), old.log());
        if with_side {
            assert_eq!(
                get(side, "/v", &[]).await.unwrap().text(),
                "A",
                "reload {i}"
            );
        } else {
            closed(side, &old).await;
        }
        // Reloads spread over a few seconds of load.
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let reloading = started.elapsed();
    let during_reloads: Vec<usize> = seen
        .answered
        .iter()
        .map(|a| a.load(Ordering::Relaxed))
        .collect();
    assert_eq!(seen.failures(), Vec::<String>::new(), "{}", old.log());
    assert_eq!(
        seen.resent.load(Ordering::Relaxed),
        0,
        "nothing resent while reloading"
    );

    // The binary upgrade, with the last config (the side listener in it).
    old.write_config(&config(true, "C"));
    let new = Upgrading::start(&old.config_path, &sock, dir.path().join("new.log")).await;
    signal(old.pid(), "QUIT");
    // Both processes accept on the same sockets for 5 s; then the old one
    // stops and closes its connections, and every client goes on with the
    // new one.
    let handover = Instant::now();
    let every_client_on_new = || (0..3).all(|c| seen.last(c) == "C");
    while !old.log().contains("Broadcasting graceful shutdown") || !every_client_on_new() {
        assert!(
            handover.elapsed() < Duration::from_secs(20),
            "last answers {:?}\nold: {}\nnew: {}",
            seen.last.lock().unwrap(),
            old.log(),
            new.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let downloaded = tokio::time::timeout(Duration::from_secs(20), download)
        .await
        .expect("the download ends")
        .unwrap();
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let exited = old.wait_exit(Duration::from_secs(20)).await;
    assert!(
        exited.is_some(),
        "the old process did not exit: {}",
        old.log()
    );
    // Only now is every answer the new process's: the old one may accept a
    // last connection from the shared queue as its shutdown is broadcast.
    assert_eq!(
        get(side, "/v", &[]).await.unwrap().text(),
        "C",
        "the reload-added listener was handed over: {}",
        new.log()
    );
    assert_eq!(downloaded, Ok(100 * 64 * 1024), "{}", old.log());
    assert_eq!(
        seen.failures(),
        Vec::<String>::new(),
        "{}\n{}",
        old.log(),
        new.log()
    );
    let answered: Vec<usize> = seen
        .answered
        .iter()
        .map(|a| a.load(Ordering::Relaxed))
        .collect();
    assert!(answered.iter().all(|n| *n > 100), "{answered:?}");
    println!(
        "soak: 100 reloads in {reloading:.1?} (answers meanwhile: keep-alive {}, new connections {}, h2c {}, WebSocket messages {}; none resent, none failed), then an upgrade; answers in all: keep-alive {}, new connections {}, h2c {}, WebSocket messages {} (4 sockets, none closed by the gateway); resent on a new connection as the old process drained (HTTP/1.1 connection closed before the request was read, HTTP/2 stream refused by GOAWAY): {}; failed: 0; download {} bytes intact",
        during_reloads[KEEPALIVE],
        during_reloads[NEW_CONNECTION],
        during_reloads[H2C],
        during_reloads[WEBSOCKET],
        answered[KEEPALIVE],
        answered[NEW_CONNECTION],
        answered[H2C],
        seen.echoed.load(Ordering::Relaxed),
        seen.resent.load(Ordering::Relaxed),
        100 * 64 * 1024,
    );
}
