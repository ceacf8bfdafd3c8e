//! Real upstream servers for tests, each on an ephemeral loopback port and
//! stopped when dropped.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;

pub struct Upstream {
    pub addr: SocketAddr,
    /// Connections accepted so far (to see upstream keep-alive reuse).
    pub connections: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Upstream {
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An address where nothing listens, and nothing will: the port stays
/// bound (never listening, so connections to it are refused) for the rest
/// of the test run, where a port merely found free could be handed to
/// another test's server.
pub fn dead_addr() -> SocketAddr {
    let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
    socket
        .bind("127.0.0.1:0".parse().unwrap())
        .expect("bind an ephemeral port");
    let addr = socket.local_addr().expect("its address");
    std::mem::forget(socket);
    addr
}

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).boxed()
}

/// HTTP/1.1 and h2c (prior knowledge) echo server named `name`.
///
/// - any path: 200 with JSON {name, method, path, version, headers, body}
/// - `/delay/MS`: the same after MS milliseconds
/// - `/status/CODE`: answers CODE
/// - `/trailers`: a body followed by `grpc-status: 0` trailers (HTTP/2 only)
/// - `/bytes/N`: N bytes, byte i = i mod 251
/// - `/drip/N/MS`: N chunks of 64 KiB, one every MS milliseconds (a long
///   download), with its `content-length`
///
/// Request bodies are reported as `body` (up to 4 KiB), `body_len` and `body_sum`.
pub async fn echo(name: &str) -> Upstream {
    let name: Arc<str> = name.into();
    serve(move |stream| {
        let name = name.clone();
        async move {
            let svc = service_fn(move |req| handle(name.clone(), req));
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                .await;
        }
    })
    .await
}

async fn handle(name: Arc<str>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    if let Some(ms) = path
        .strip_prefix("/delay/")
        .and_then(|s| s.parse::<u64>().ok())
    {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if let Some(code) = path
        .strip_prefix("/status/")
        .and_then(|s| s.parse::<u16>().ok())
    {
        return Ok(Response::builder().status(code).body(full("")).unwrap());
    }
    if let Some(n) = path
        .strip_prefix("/bytes/")
        .and_then(|s| s.parse::<usize>().ok())
    {
        let body: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
        return Ok(Response::builder().body(full(body)).unwrap());
    }
    if let Some((n, ms)) = path.strip_prefix("/drip/").and_then(|s| {
        let (n, ms) = s.split_once('/')?;
        Some((n.parse::<usize>().ok()?, ms.parse::<u64>().ok()?))
    }) {
        const CHUNK: usize = 64 * 1024;
        let chunks = futures_util::stream::unfold(0usize, move |i| async move {
            if i == n {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(ms)).await;
            let frame = Frame::data(Bytes::from(vec![(i % 251) as u8; CHUNK]));
            Some((Ok::<_, Infallible>(frame), i + 1))
        });
        return Ok(Response::builder()
            .header("content-length", n * CHUNK)
            .body(BodyExt::boxed(StreamBody::new(chunks)))
            .unwrap());
    }
    if path == "/trailers" {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        trailers.insert("grpc-message", "ok".parse().unwrap());
        let frames = vec![
            Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"\x00\x00\x00\x00\x02hi"))),
            Ok(Frame::trailers(trailers)),
        ];
        let body = BodyExt::boxed(StreamBody::new(futures_util::stream::iter(frames)));
        return Ok(Response::builder()
            .header("content-type", "application/grpc")
            .body(body)
            .unwrap());
    }
    let method = req.method().to_string();
    let version = format!("{:?}", req.version());
    let full_path = req
        .uri()
        .path_and_query()
        .map_or("/".to_string(), |p| p.to_string());
    let mut headers = serde_json::Map::new();
    for (k, v) in req.headers() {
        let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
        match headers.get_mut(k.as_str()) {
            Some(serde_json::Value::String(prev)) => {
                prev.push_str(", ");
                prev.push_str(&v);
            }
            _ => {
                headers.insert(k.to_string(), v.into());
            }
        }
    }
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let json = serde_json::json!({
        "name": &*name,
        "method": method,
        "path": full_path,
        "version": version,
        "headers": headers,
        "body": if body.len() <= 4096 { String::from_utf8_lossy(&body).into_owned() } else { String::new() },
        "body_len": body.len(),
        "body_sum": body.iter().map(|b| u64::from(*b)).sum::<u64>(),
    });
    Ok(Response::builder()
        .header("content-type", "application/json")
        .header("x-upstream", &*name)
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "must-not-pass")
        .header("keep-alive", "timeout=30")
        .body(full(json.to_string()))
        .unwrap())
}

/// HTTPS (HTTP/1.1) echo server presenting `cert`: answers like [`echo`],
/// with `name` reported as `NAME@SNI` (the server name the client sent, or
/// `-`), so a test sees which name reached the origin.
pub async fn https_echo(name: &str, cert: &super::tls::Pem) -> Upstream {
    use boring::pkey::PKey;
    use boring::ssl::{NameType, SslAcceptor, SslMethod};
    use boring::x509::X509;
    let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls()).unwrap();
    let mut chain = X509::stack_from_pem(cert.cert.as_bytes())
        .unwrap()
        .into_iter();
    b.set_certificate(&chain.next().unwrap()).unwrap();
    for c in chain {
        b.add_extra_chain_cert(c).unwrap();
    }
    b.set_private_key(&*PKey::private_key_from_pem(cert.key.as_bytes()).unwrap())
        .unwrap();
    let acceptor = Arc::new(b.build());
    let name: Arc<str> = name.into();
    serve(move |stream| {
        let (name, acceptor) = (name.clone(), acceptor.clone());
        async move {
            let Ok(ssl) = boring::ssl::Ssl::new(acceptor.context()) else {
                return;
            };
            let Ok(mut tls) = pingora::tls::tokio_ssl::SslStream::new(ssl, stream) else {
                return;
            };
            if std::pin::Pin::new(&mut tls).accept().await.is_err() {
                return;
            }
            let sni = tls
                .ssl()
                .servername(NameType::HOST_NAME)
                .unwrap_or("-")
                .to_string();
            let name: Arc<str> = format!("{name}@{sni}").into();
            let svc = service_fn(move |req| handle(name.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), svc)
                .await;
        }
    })
    .await
}

/// Accept connections on a fresh loopback port and hand each to `handle`
/// on its own task, counting them.
async fn serve<F, Fut>(handle: F) -> Upstream
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    serve_at("127.0.0.1:0".parse().unwrap(), handle)
        .await
        .unwrap()
}

async fn serve_at<F, Fut>(at: SocketAddr, handle: F) -> std::io::Result<Upstream>
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    serve_gated(at, None, handle).await
}

/// [`serve_at`], refusing connections while `refusing()` holds: the
/// listening socket closes, and a socket bound to the same address (not
/// listening) keeps the port, so that no other test's server can take it
/// meanwhile (both use SO_REUSEPORT, which nothing else here does).
async fn serve_gated<F, Fut>(
    at: SocketAddr,
    refusing: Option<Arc<dyn Fn() -> bool + Send + Sync>>,
    handle: F,
) -> std::io::Result<Upstream>
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    fn bound(addr: SocketAddr) -> std::io::Result<tokio::net::TcpSocket> {
        let s = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        s.set_reuseport(true)?;
        s.bind(addr)?;
        Ok(s)
    }
    let listener = bound(at)?.listen(1024)?;
    let addr = listener.local_addr()?;
    let connections = Arc::new(AtomicUsize::new(0));
    let counter = connections.clone();
    let task = tokio::spawn(async move {
        let mut listener = Some(listener);
        let mut _held: Option<tokio::net::TcpSocket> = None;
        loop {
            if refusing.as_ref().is_some_and(|r| r()) {
                if listener.is_some() {
                    // The port stays ours; SYNs get a reset (refused).
                    _held = bound(addr).ok();
                    listener = None;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
            let Some(l) = &listener else {
                listener = bound(addr).and_then(|s| s.listen(1024)).ok();
                if listener.is_some() {
                    _held = None;
                } else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                continue;
            };
            let accepted = if refusing.is_some() {
                // Look at the flag again now and then.
                match tokio::time::timeout(Duration::from_millis(20), l.accept()).await {
                    Ok(r) => r,
                    Err(_) => continue,
                }
            } else {
                l.accept().await
            };
            let Ok((stream, _)) = accepted else {
                return;
            };
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(handle(stream));
        }
    });
    Ok(Upstream {
        addr,
        connections,
        task,
    })
}

/// WebSocket echo server: sends back every text or binary message.
pub async fn websocket_echo() -> Upstream {
    serve(|stream| async move {
        let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
            return;
        };
        while let Some(Ok(msg)) = ws.next().await {
            if msg.is_text() || msg.is_binary() {
                if ws.send(msg).await.is_err() {
                    return;
                }
            } else if msg.is_close() {
                return;
            }
        }
    })
    .await
}

/// A raw HTTP/1 server that records every byte it receives and answers
/// each request head it sees with `answer`, as written (any framing the test
/// needs); connections stay open. What it received is in the returned log.
pub async fn scripted(answer: &'static [u8]) -> (Upstream, Arc<std::sync::Mutex<Vec<u8>>>) {
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    let up = serve(move |mut stream| {
        let log = log.clone();
        async move {
            let mut buf = vec![0u8; 65536];
            let mut pending = Vec::new();
            while let Ok(n) = stream.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                log.lock().unwrap().extend_from_slice(&buf[..n]);
                pending.extend_from_slice(&buf[..n]);
                while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                    pending.drain(..end + 4);
                    let _ = stream.write_all(answer).await;
                }
            }
        }
    })
    .await;
    (up, seen)
}

/// Answers every request with headers promising 100 bytes, sends 7, closes.
pub async fn close_mid_response() -> Upstream {
    serve(|mut stream| async move {
        let mut buf = [0u8; 4096];
        let mut seen = Vec::new();
        while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
        let _ = stream
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
            .await;
        let _ = stream.shutdown().await;
    })
    .await
}

/// What a [`faulty`] upstream does with each request head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Fault {
    /// 200 with its name as the body.
    Good = 0,
    /// 503.
    Unavailable = 1,
    /// Reads the head and never answers.
    Hang = 2,
    /// Resets the connection (RST) after the head.
    Reset = 3,
    /// 200 like `Good`, after 800 ms.
    Slow = 4,
    /// The listening socket is closed: connections are refused.
    Refuse = 5,
    /// Like `Good`, but every fifth request (the 1st, 6th, ...) after
    /// 800 ms: a long tail.
    SlowSometimes = 6,
}

/// An HTTP/1.1 upstream whose behaviour the test changes while it runs,
/// counting the request heads it receives.
pub struct Faulty {
    pub upstream: Upstream,
    mode: Arc<std::sync::atomic::AtomicU8>,
    requests: Arc<AtomicUsize>,
    checks: Arc<AtomicUsize>,
    last_check: Arc<std::sync::Mutex<String>>,
}

impl Faulty {
    pub fn set(&self, fault: Fault) {
        self.mode.store(fault as u8, Ordering::SeqCst);
    }

    /// Request heads received so far, health checks (`GET /healthz`) aside.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// Health checks (`GET /healthz`) received so far.
    pub fn checks(&self) -> usize {
        self.checks.load(Ordering::SeqCst)
    }

    /// The head of the last health check.
    pub fn last_check(&self) -> String {
        self.last_check.lock().unwrap().clone()
    }
}

/// The next request head from `stream` (bodies are not expected), with
/// what came after it left in `pending`; `None` once the client is gone.
pub async fn next_head(
    stream: &mut tokio::net::TcpStream,
    pending: &mut Vec<u8>,
) -> Option<Vec<u8>> {
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            return Some(pending.drain(..end + 4).collect());
        }
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => pending.extend_from_slice(&buf[..n]),
        }
    }
}

/// A gateway config with one route, `api` (every path), to the upstream
/// `api` over `endpoints`; `route` and `upstream` add keys to each.
pub fn api_config(endpoints: &[&Faulty], route: &str, upstream: &str) -> String {
    let list: Vec<String> = endpoints
        .iter()
        .map(|f| format!("\"{}\"", f.upstream.addr))
        .collect();
    format!(
        "{}\n[routes.api]\npath_prefix = \"/\"\nupstream = \"api\"\n{route}\n[upstreams.api]\nendpoints = [{}]\n{upstream}\n",
        super::HEAD,
        list.join(", ")
    )
}

pub async fn faulty(name: &'static str, fault: Fault) -> Faulty {
    faulty_at(name, fault, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
}

/// A [`faulty`] upstream listening at `at` (another loopback address, or a
/// port taken elsewhere already).
pub async fn faulty_at(
    name: &'static str,
    fault: Fault,
    at: SocketAddr,
) -> std::io::Result<Faulty> {
    let mode = Arc::new(std::sync::atomic::AtomicU8::new(fault as u8));
    let requests = Arc::new(AtomicUsize::new(0));
    let checks = Arc::new(AtomicUsize::new(0));
    let last_check = Arc::new(std::sync::Mutex::new(String::new()));
    let (m, r, c, l) = (
        mode.clone(),
        requests.clone(),
        checks.clone(),
        last_check.clone(),
    );
    let gate = mode.clone();
    let refusing: Arc<dyn Fn() -> bool + Send + Sync> =
        Arc::new(move || gate.load(Ordering::SeqCst) == Fault::Refuse as u8);
    let upstream = serve_gated(at, Some(refusing), move |mut stream| {
        let (mode, requests, checks, last_check) = (m.clone(), r.clone(), c.clone(), l.clone());
        async move {
            let mut buf = [0u8; 4096];
            let mut pending = Vec::new();
            loop {
                let Some(head) = next_head(&mut stream, &mut pending).await else {
                    return;
                };
                let mut nth = 0;
                if head.starts_with(b"GET /healthz ") {
                    // The head first: a count seen means its head is there.
                    *last_check.lock().unwrap() = String::from_utf8_lossy(&head).into_owned();
                    checks.fetch_add(1, Ordering::SeqCst);
                } else {
                    nth = requests.fetch_add(1, Ordering::SeqCst);
                }
                let mode = mode.load(Ordering::SeqCst);
                if mode == Fault::Slow as u8 || (mode == Fault::SlowSometimes as u8 && nth % 5 == 0)
                {
                    tokio::time::sleep(Duration::from_millis(800)).await;
                }
                let answer = match mode {
                    0 | 4 | 6 => format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nx-upstream: {name}\r\n\r\n{name}",
                        name.len()
                    ),
                    1 => "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\n\r\nbusy".into(),
                    2 => {
                        // Hold the connection until the gateway gives up.
                        while !matches!(stream.read(&mut buf).await, Ok(0) | Err(_)) {}
                        return;
                    }
                    _ => {
                        let _ = stream.set_zero_linger();
                        return;
                    }
                };
                if stream.write_all(answer.as_bytes()).await.is_err() {
                    return;
                }
            }
        }
    })
    .await;
    Ok(Faulty {
        upstream: upstream?,
        mode,
        requests,
        checks,
        last_check,
    })
}

/// An h2c gRPC server answering `grpc.health.v1.Health/Check` with
/// SERVING while `serving` holds (NOT_SERVING otherwise), and any other
/// call with `grpc-status` 0 (14, UNAVAILABLE, while not serving).
pub async fn grpc_health(serving: Arc<std::sync::atomic::AtomicBool>) -> Upstream {
    serve(move |stream| {
        let serving = serving.clone();
        async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let serving = serving.clone();
                async move {
                    if req.uri().path() != "/grpc.health.v1.Health/Check" {
                        // Any other call: OK while serving, else UNAVAILABLE
                        // in a trailers-only answer.
                        let code = if serving.load(Ordering::SeqCst) {
                            "0"
                        } else {
                            "14"
                        };
                        return Ok::<_, Infallible>(
                            Response::builder()
                                .header("content-type", "application/grpc")
                                .header("grpc-status", code)
                                .body(full(""))
                                .unwrap(),
                        );
                    }
                    let _ = req.into_body().collect().await;
                    let status = if serving.load(Ordering::SeqCst) { 1 } else { 2 };
                    let mut trailers = HeaderMap::new();
                    trailers.insert("grpc-status", "0".parse().unwrap());
                    let frames = vec![
                        Ok::<_, Infallible>(Frame::data(Bytes::from(vec![
                            0, 0, 0, 0, 2, 8, status,
                        ]))),
                        Ok(Frame::trailers(trailers)),
                    ];
                    let body = BodyExt::boxed(StreamBody::new(futures_util::stream::iter(frames)));
                    Ok(Response::builder()
                        .header("content-type", "application/grpc")
                        .body(body)
                        .unwrap())
                }
            });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        }
    })
    .await
}
