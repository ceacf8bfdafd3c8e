//! Egress tunnels at L4, before Pingora's HTTP handling: on an `egress`
//! listener a connection that opens with `CONNECT ` or a TLS record is served
//! here ([`sniff`]); anything else goes on to the HTTP proxy.
//!
//! Pingora 0.9 cannot end a CONNECT tunnel itself (it answers 405, or with
//! `allow_connect_method_proxying` forwards the CONNECT request upstream), so
//! meshgate reads the CONNECT head, decides, answers, and relays bytes.
//! Either way the bytes relayed are the client's own TLS: meshgate reads the
//! ClientHello's SNI and refuses a tunnel whose SNI is missing, not allowed,
//! or (after CONNECT) another host than the one CONNECT named.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pingora::protocols::Stream;
use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::model::Egress;
use crate::config::model::DEFAULT_HANDSHAKE_TIMEOUT;
use crate::egress::resolve::ResolveError;
use crate::egress::MAX_HELLO_BYTES;
use crate::egress::{bytes_needed, normalize_host, parse_client_hello, record, split_authority};
use crate::egress::{Denial, Hello, Mode};
use crate::runtime::Runtime;
use crate::telemetry::metrics::{metrics, GaugeGuard};

/// Longest CONNECT request head read.
const MAX_CONNECT_HEAD: usize = 8 * 1024;
/// How long a client may take to send its CONNECT head (its ClientHello
/// has its listener's `handshake_timeout`).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const RELAY_BUFFER: usize = 16 * 1024;
/// Addresses of one name tried per tunnel, at most.
const MAX_DIALS: usize = 3;

/// On an `egress` listener, serve `session` as a tunnel if its first bytes
/// are a `CONNECT` or a TLS ClientHello; `Some(session)` back when it is
/// anything else (to be served as HTTP), `None` when it was a tunnel or
/// the client left.
pub async fn sniff(rt: Arc<Runtime>, listener: usize, mut session: Stream) -> Option<Stream> {
    if rt.egress_for(listener).is_none() || session.get_ssl_digest().is_some() {
        return Some(session);
    }
    let idle = rt.config.listeners[listener].limits.idle_timeout;
    // Every HTTP request and TLS record is longer than this.
    let mut first = [0u8; 8];
    match tokio::time::timeout(idle, session.try_peek(&mut first)).await {
        Ok(Ok(true)) => {}
        Ok(Ok(false)) => return Some(session),
        // Closed or silent before sending anything.
        _ => return None,
    }
    let mode = match first {
        [0x16, ..] => Mode::Sni,
        _ if &first == b"CONNECT " => Mode::Connect,
        _ => return Some(session),
    };
    let client = session
        .get_socket_digest()
        .and_then(|d| d.peer_addr().map(|a| a.to_string()))
        .unwrap_or_default();
    let tunnel = Tunnel {
        listener: rt.listeners[listener].name.clone(),
        client,
        mode,
        rt,
    };
    // Boxed: a tunnel's state is large, and without the box every
    // connection (most are not tunnels) would hold room for it while it
    // idles.
    match mode {
        Mode::Connect => Box::pin(tunnel.connect(session)).await,
        _ => Box::pin(tunnel.passthrough(session)).await,
    }
    None
}

/// One tunnel being set up.
struct Tunnel {
    rt: Arc<Runtime>,
    listener: String,
    client: String,
    mode: Mode,
}

impl Tunnel {
    #[allow(
        clippy::expect_used,
        reason = "`sniff` builds a Tunnel only when [egress] is set"
    )]
    fn egress(&self) -> &Egress {
        self.rt
            .config
            .egress
            .as_ref()
            .expect("a tunnel exists only with [egress]")
    }

    fn allow(&self, destination: &str) {
        record(&self.listener, self.mode, &self.client, destination, None);
    }

    fn deny(&self, destination: &str, denial: Denial) {
        record(
            &self.listener,
            self.mode,
            &self.client,
            destination,
            Some(denial),
        );
    }

    /// Deny, then answer the CONNECT with `status` and `message`
    /// (`shown`: the destination the answer names).
    async fn refuse(
        &self,
        client: &mut Stream,
        destination: &str,
        denial: Denial,
        status: u16,
        message: &str,
        shown: Option<&str>,
    ) {
        self.deny(destination, denial);
        let _ = respond(client, status, message, shown).await;
    }

    /// `CONNECT host:port`, then the client's TLS to that same host.
    async fn connect(&self, mut client: Stream) {
        let (head, rest) = match read_connect_head(&mut client).await {
            Head::Complete(head, rest) => (head, rest),
            Head::TooLarge => {
                let message = "the CONNECT head is over 8 KiB";
                return self
                    .refuse(&mut client, "-", Denial::Malformed, 431, message, None)
                    .await;
            }
            // The client left or stayed silent.
            Head::Gone => return,
        };
        let target = match parse_connect(&head) {
            Ok(t) => t,
            Err(ConnectHeadError::NotConnect) => {
                let _ = respond(&mut client, 405, "only CONNECT is served here", None).await;
                return;
            }
            Err(ConnectHeadError::Malformed) => {
                let message = Denial::Malformed.explain();
                return self
                    .refuse(&mut client, "-", Denial::Malformed, 400, message, None)
                    .await;
            }
        };
        let Some((raw_host, Some(port))) = split_authority(&target) else {
            let message = "CONNECT needs host:port";
            return self
                .refuse(&mut client, "-", Denial::Malformed, 400, message, None)
                .await;
        };
        let (host, dest) = match self.egress().admit(raw_host, port) {
            Ok(admitted) => admitted,
            Err((dest, d)) => {
                let status = if d == Denial::Malformed { 400 } else { 403 };
                // A name that is not one is shown as sent; others normalized.
                let shown = if matches!(d, Denial::Host | Denial::Port) {
                    &dest
                } else {
                    &target
                };
                return self
                    .refuse(&mut client, &dest, d, status, d.explain(), Some(shown))
                    .await;
            }
        };
        let upstream = match self.dial(&host, port).await {
            Ok(u) => u,
            Err(DialError::Denied) => {
                let (d, message) = (Denial::Address, Denial::Address.explain());
                return self
                    .refuse(&mut client, &dest, d, 403, message, Some(&dest))
                    .await;
            }
            Err(DialError::Failed(why)) => {
                log::warn!(target: "meshgate::egress", "egress tunnel to {dest:?} failed: {why}");
                let _ = respond(
                    &mut client,
                    502,
                    "cannot reach the destination",
                    Some(&dest),
                )
                .await;
                return;
            }
        };
        let established = async {
            client
                .write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
                .await?;
            client.flush().await
        };
        if established.await.is_err() {
            return;
        }
        let Some(hello) = self.read_hello(&mut client, rest, &dest).await else {
            return;
        };
        match hello.1 {
            Some(ref sni) if *sni == host => {}
            Some(ref sni) => {
                log::warn!(target: "meshgate::egress", "egress tunnel: CONNECT {dest:?} but the ClientHello names \"{sni:.253}\"");
                return self.deny(&dest, Denial::SniMismatch);
            }
            None => return self.deny(&dest, Denial::NoSni),
        }
        self.allow(&dest);
        self.relay(client, upstream, hello.0, &dest).await;
    }

    /// A bare ClientHello: to its SNI host, on `passthrough_port`.
    async fn passthrough(&self, mut client: Stream) {
        let port = self.egress().passthrough_port;
        let Some((bytes, sni)) = self.read_hello(&mut client, Vec::new(), "-").await else {
            return;
        };
        let Some(sni) = sni else {
            return self.deny("-", Denial::NoSni);
        };
        let (host, dest) = match self.egress().admit(&sni, port) {
            Ok(admitted) => admitted,
            Err((dest, d)) => return self.deny(&dest, d),
        };
        let upstream = match self.dial(&host, port).await {
            Ok(u) => u,
            Err(DialError::Denied) => return self.deny(&dest, Denial::Address),
            Err(DialError::Failed(why)) => {
                log::warn!(target: "meshgate::egress", "egress passthrough to {dest:?} failed: {why}");
                return;
            }
        };
        self.allow(&dest);
        self.relay(client, upstream, bytes, &dest).await;
    }

    /// The ClientHello's bytes and its server name (normalized when it is a
    /// host name at all); `None` when the tunnel was refused or the client left.
    async fn read_hello(
        &self,
        client: &mut Stream,
        mut buf: Vec<u8>,
        dest: &str,
    ) -> Option<(Vec<u8>, Option<String>)> {
        let timeout = self
            .rt
            .config
            .listeners
            .iter()
            .find(|l| l.name == self.listener)
            .map_or(DEFAULT_HANDSHAKE_TIMEOUT, |l| l.limits.handshake_timeout);
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Parse only once a record is complete, not after every read.
            if buf.len() >= bytes_needed(&buf) {
                match parse_client_hello(&buf) {
                    Hello::Complete(sni) => {
                        let sni = sni.map(|s| normalize_host(&s).unwrap_or(s));
                        return Some((buf, sni));
                    }
                    Hello::Invalid => {
                        self.deny(dest, Denial::NotTls);
                        return None;
                    }
                    Hello::NeedMore => {}
                }
            }
            if buf.len() >= MAX_HELLO_BYTES {
                self.deny(dest, Denial::NotTls);
                return None;
            }
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout_at(deadline, client.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                _ => return None,
            }
        }
    }

    /// Connect to `host` (resolved, pinned or looked up) on `port`, trying
    /// each address in turn within `connect_timeout` each.
    async fn dial(&self, host: &str, port: u16) -> Result<TcpStream, DialError> {
        let resolver = self
            .rt
            .egress_resolver
            .as_ref()
            .ok_or_else(|| DialError::Failed("no resolver".into()))?;
        let addrs = match resolver.resolve(host, port).await {
            Ok(a) => a,
            Err(ResolveError::Denied { .. }) => return Err(DialError::Denied),
            Err(e) => return Err(DialError::Failed(e.to_string())),
        };
        let timeout = self.egress().connect_timeout;
        let mut last = String::from("no addresses");
        for addr in addrs.into_iter().take(MAX_DIALS) {
            match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
                Ok(Ok(s)) => {
                    let _ = s.set_nodelay(true);
                    return Ok(s);
                }
                Ok(Err(e)) => last = format!("{addr}: {e}"),
                Err(_) => last = format!("{addr}: connect timed out after {timeout:?}"),
            }
        }
        Err(DialError::Failed(last))
    }

    async fn relay(&self, client: Stream, upstream: TcpStream, hello: Vec<u8>, dest: &str) {
        let m = metrics();
        let _open = GaugeGuard::new(
            m.egress_tunnels_active
                .with_label_values(&[self.listener.as_str(), self.mode.as_str()]),
        );
        let counter = |direction: &str| {
            m.egress_tunnel_bytes.with_label_values(&[
                self.listener.as_str(),
                self.mode.as_str(),
                direction,
            ])
        };
        let (sent, received) = (counter("sent"), counter("received"));
        let started = Instant::now();
        let idle = self.egress().tunnel_idle_timeout;
        let mut upstream = upstream;
        match tokio::time::timeout(idle, upstream.write_all(&hello)).await {
            Ok(Ok(())) => {}
            _ => return,
        }
        sent.inc_by(hello.len() as u64);
        let (up, down, end) = relay(client, upstream, idle, &sent, &received).await;
        log::info!(
            target: "meshgate::egress",
            "egress tunnel closed: listener={} mode={} client={} destination={dest:?} sent={} received={} duration_ms={} end={end}",
            self.listener,
            self.mode.as_str(),
            self.client,
            up + hello.len() as u64,
            down,
            started.elapsed().as_millis()
        );
    }
}

enum DialError {
    /// Every address is in `deny_networks`.
    Denied,
    Failed(String),
}

#[derive(Debug, PartialEq, Eq)]
enum ConnectHeadError {
    NotConnect,
    Malformed,
}

#[derive(Debug, PartialEq, Eq)]
enum Head {
    /// The head, and any bytes after it.
    Complete(Vec<u8>, Vec<u8>),
    TooLarge,
    /// Closed, or silent past the deadline.
    Gone,
}

/// Read up to the end of the request head.
async fn read_connect_head<S: AsyncRead + Unpin>(client: &mut S) -> Head {
    let deadline = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT;
    let mut buf = Vec::with_capacity(512);
    let mut searched = 0;
    loop {
        // Only the new bytes (and the 3 before them) can complete the head.
        if let Some(end) = buf[searched..].windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(searched + end + 4);
            return Head::Complete(buf, rest);
        }
        searched = buf.len().saturating_sub(3);
        if buf.len() > MAX_CONNECT_HEAD {
            return Head::TooLarge;
        }
        let mut chunk = [0u8; 1024];
        match tokio::time::timeout_at(deadline, client.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return Head::Gone,
        }
    }
}

/// The target of a `CONNECT host:port HTTP/1.x` head.
fn parse_connect(head: &[u8]) -> Result<String, ConnectHeadError> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err(ConnectHeadError::Malformed),
    }
    if req.method != Some("CONNECT") {
        return Err(ConnectHeadError::NotConnect);
    }
    // A body on CONNECT has no defined meaning (RFC 9110 §9.3.6).
    let framed = req.headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("content-length")
            || h.name.eq_ignore_ascii_case("transfer-encoding")
    });
    match req.path {
        Some(target) if !framed => Ok(target.to_string()),
        _ => Err(ConnectHeadError::Malformed),
    }
}

/// A short JSON answer to a CONNECT, then the connection closes.
async fn respond<S: AsyncWrite + Unpin>(
    client: &mut S,
    status: u16,
    message: &str,
    destination: Option<&str>,
) -> std::io::Result<()> {
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    let body = serde_json::json!({
        "error": message,
        "status": status,
        "destination": destination,
    })
    .to_string();
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    client.write_all(head.as_bytes()).await?;
    client.write_all(body.as_bytes()).await?;
    client.flush().await
}

/// Copy both ways until both sides have finished, either fails, or nothing
/// moved for `idle`. Bytes sent and received, and why it ended. The two
/// directions run independently: a side that stops reading stalls only the
/// direction towards it.
async fn relay<C, U>(
    client: C,
    upstream: U,
    idle: Duration,
    sent: &IntCounter,
    received: &IntCounter,
) -> (u64, u64, &'static str)
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut ur, mut uw) = tokio::io::split(upstream);
    let started = tokio::time::Instant::now();
    // Milliseconds since `started` of the last byte moved either way.
    let last = AtomicU64::new(0);
    let (up_total, down_total) = (AtomicU64::new(0), AtomicU64::new(0));
    let both = async {
        tokio::try_join!(
            copy_half(&mut cr, &mut uw, sent, &up_total, &last, started),
            copy_half(&mut ur, &mut cw, received, &down_total, &last, started),
        )
    };
    let watchdog = async {
        loop {
            let quiet = started
                .elapsed()
                .saturating_sub(Duration::from_millis(last.load(Ordering::Relaxed)));
            if quiet >= idle {
                return;
            }
            tokio::time::sleep(idle - quiet).await;
        }
    };
    let end = tokio::select! {
        r = both => if r.is_ok() { "closed" } else { "error" },
        _ = watchdog => "idle",
    };
    (
        up_total.load(Ordering::Relaxed),
        down_total.load(Ordering::Relaxed),
        end,
    )
}

/// One direction: read, write, flush, until end of stream, then pass the
/// end on (half-close).
async fn copy_half<R, W>(
    from: &mut R,
    to: &mut W,
    counter: &IntCounter,
    total: &AtomicU64,
    last: &AtomicU64,
    started: tokio::time::Instant,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; RELAY_BUFFER];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        to.write_all(&buf[..n]).await?;
        to.flush().await?;
        total.fetch_add(n as u64, Ordering::Relaxed);
        counter.inc_by(n as u64);
        last.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_heads() {
        assert_eq!(
            parse_connect(
                b"CONNECT api.example.com:443 HTTP/1.1\r\nHost: api.example.com:443\r\n\r\n"
            ),
            Ok("api.example.com:443".into())
        );
        assert_eq!(
            parse_connect(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
            Err(ConnectHeadError::NotConnect)
        );
        assert_eq!(
            parse_connect(b"CONNECT a.com:443 HTTP/1.1\r\nContent-Length: 5\r\n\r\n"),
            Err(ConnectHeadError::Malformed)
        );
        assert_eq!(
            parse_connect(b"CONNECT a.com:443 HTTP/1.1\r\nBad Header\r\n\r\n"),
            Err(ConnectHeadError::Malformed)
        );
        assert_eq!(
            parse_connect(b"CONNECT a.com:443 HTTP/1.1\r\nX: \0\r\n\r\n"),
            Err(ConnectHeadError::Malformed)
        );
    }

    #[tokio::test]
    async fn connect_heads_are_read_to_their_end_and_no_further() {
        let (mut a, mut b) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            for part in [
                &b"CONNECT a.com:443 HT"[..],
                b"TP/1.1\r\n\r",
                b"\n\x16\x03\x01",
            ] {
                a.write_all(part).await.unwrap();
                tokio::task::yield_now().await;
            }
            a
        });
        let Head::Complete(head, rest) = read_connect_head(&mut b).await else {
            panic!("the head is complete");
        };
        assert_eq!(head, b"CONNECT a.com:443 HTTP/1.1\r\n\r\n");
        let _a = writer.await.unwrap();
        // What follows the head is the start of the ClientHello, kept.
        assert!(rest.is_empty() || rest.starts_with(b"\x16"));
    }

    #[tokio::test]
    async fn an_endless_head_is_dropped() {
        let (mut a, mut b) = tokio::io::duplex(64 * 1024);
        a.write_all(&[b'A'; MAX_CONNECT_HEAD + 2048]).await.unwrap();
        assert_eq!(read_connect_head(&mut b).await, Head::TooLarge);
        drop(a);
        let (a, mut b) = tokio::io::duplex(64);
        drop(a);
        assert_eq!(read_connect_head(&mut b).await, Head::Gone);
    }

    /// Both ends send 4 MiB before reading anything, through small buffers:
    /// a relay that waits on one write while not reading the other side
    /// would deadlock here.
    #[tokio::test]
    async fn the_relay_moves_both_directions_at_once() {
        const SIZE: usize = 4 << 20;
        let (client, client_far) = tokio::io::duplex(8 * 1024);
        let (upstream, upstream_far) = tokio::io::duplex(8 * 1024);
        let counter = || IntCounter::new("x", "x").unwrap();
        let (sent, received) = (counter(), counter());
        let peer = |mut io: tokio::io::DuplexStream, byte: u8| async move {
            let data = vec![byte; SIZE];
            let (mut r, mut w) = tokio::io::split(&mut io);
            let write = async {
                w.write_all(&data).await.unwrap();
                w.shutdown().await.unwrap();
            };
            let read = async {
                let mut got = Vec::new();
                r.read_to_end(&mut got).await.unwrap();
                got
            };
            tokio::join!(write, read).1
        };
        let run = async {
            tokio::join!(
                relay(client, upstream, Duration::from_secs(30), &sent, &received),
                peer(client_far, b'c'),
                peer(upstream_far, b'u'),
            )
        };
        let ((up, down, end), at_client, at_upstream) =
            tokio::time::timeout(Duration::from_secs(60), run)
                .await
                .expect("no deadlock");
        assert_eq!((up as usize, down as usize, end), (SIZE, SIZE, "closed"));
        assert!(at_client.len() == SIZE && at_client.iter().all(|b| *b == b'u'));
        assert!(at_upstream.len() == SIZE && at_upstream.iter().all(|b| *b == b'c'));
        assert_eq!(sent.get() as usize, SIZE);
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_tunnel_ends_after_the_idle_timeout() {
        let (client, _client_far) = tokio::io::duplex(1024);
        let (upstream, _upstream_far) = tokio::io::duplex(1024);
        let c = IntCounter::new("x", "x").unwrap();
        let (_, _, end) = relay(client, upstream, Duration::from_secs(300), &c, &c).await;
        assert_eq!(end, "idle");
    }
}
