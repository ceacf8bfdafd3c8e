//! Access logs: one line per request, JSON or text, to stdout or a file.
//! The proxy only formats the line and hands it to a bounded queue; a
//! dedicated thread writes, so a slow disk or pipe never holds a request.
//! Lines that do not fit in the queue are dropped and counted.

use std::io::Write;
use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use super::metrics::metrics;

/// Lines buffered between the proxy and the writer thread.
const QUEUE_LINES: usize = 65_536;
/// How often the writer wakes to drain the queue. It sleeps rather than
/// blocking on the queue, so sending a line never wakes a thread: a wake-up
/// per request costs more CPU than formatting the line.
const DRAIN_INTERVAL: Duration = Duration::from_millis(50);

pub use crate::config::model::AccessLogFormat as Format;

/// Where lines go: standard output, or a file (appended to).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sink {
    Stdout,
    File(PathBuf),
}

impl Sink {
    /// Where `[telemetry]` sends the access log.
    pub fn of(telemetry: &crate::config::model::Telemetry) -> Self {
        telemetry
            .access_log_file
            .clone()
            .map_or(Sink::Stdout, Sink::File)
    }
}

/// One request, as logged. Field names are documented in docs/observability.md.
#[derive(Debug, Serialize)]
pub struct Entry<'a> {
    pub timestamp: String,
    pub request_id: &'a str,
    pub trace_id: &'a str,
    pub listener: &'a str,
    pub direction: &'a str,
    pub route: &'a str,
    pub upstream: &'a str,
    pub endpoint: String,
    /// Attempts made at endpoints (0: none, e.g. a direct response).
    pub attempts: usize,
    /// Each attempt before the last, as `ENDPOINT/REASON` (why it was
    /// tried again: `connect_failure`, `reset`, `timeout`, a status,
    /// `stale_connection`), joined by `,`.
    pub retries: String,
    /// Hedges sent (a route's `hedge`): attempts that raced the first.
    pub hedged: u32,
    pub method: &'a str,
    pub host: &'a str,
    pub path: &'a str,
    pub protocol: &'a str,
    pub status: u16,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub duration_ms: f64,
    pub upstream_duration_ms: Option<f64>,
    pub client: String,
    pub user_agent: &'a str,
    pub error: &'a str,
    /// The rate-limit policy that refused the request, or `unavailable:NAME`,
    /// or `shadow:NAME,...` / `backend_error:NAME,...` joined by `;`
    /// (docs/observability.md).
    pub rate_limit: &'a str,
    /// The client certificate's identity (mTLS), empty without one.
    pub peer_identity: &'a str,
    /// The client connection's TLS version and cipher, and the server name
    /// it asked for; empty on plain connections (and `sni` without one).
    pub tls_version: &'a str,
    pub tls_cipher: &'a str,
    pub sni: &'a str,
    /// Authorization: `denied:NAME`, `shadow_denied:NAME,...`, or empty.
    pub authz: &'a str,
}

/// A client-supplied value for the text format: whitespace, quotes,
/// backslashes and control bytes become `_`, so a value can never end its
/// field and pose as another (`host=x peer_identity=...`).
fn clean(s: &str) -> std::borrow::Cow<'_, str> {
    let bad = |c: char| c.is_whitespace() || c.is_control() || c == '"' || c == '\\';
    if s.contains(bad) {
        s.replace(bad, "_").into()
    } else {
        s.into()
    }
}

impl Entry<'_> {
    fn text(&self) -> String {
        let dash = |s: &str| {
            if s.is_empty() {
                "-".to_string()
            } else {
                clean(s).into_owned()
            }
        };
        format!(
            "{ts} {client} \"{method} {path} {proto}\" {status} {bytes_out} {dur:.3}ms host={host} listener={listener} direction={direction} route={route} upstream={upstream} endpoint={endpoint} attempts={attempts} retries={retries} hedged={hedged} upstream_ms={ums} bytes_in={bytes_in} request_id={rid} trace_id={tid} ua=\"{ua}\" error=\"{err}\" rate_limit={rl} peer_identity={pid} authz={az} tls_version={tv} tls_cipher={tc} sni={sni}",
            ts = self.timestamp,
            client = dash(&self.client),
            method = clean(self.method),
            path = dash(self.path),
            proto = self.protocol,
            status = self.status,
            bytes_out = self.bytes_out,
            dur = self.duration_ms,
            host = dash(self.host),
            listener = dash(self.listener),
            direction = dash(self.direction),
            route = dash(self.route),
            upstream = dash(self.upstream),
            endpoint = dash(&self.endpoint),
            attempts = self.attempts,
            retries = dash(&self.retries),
            hedged = self.hedged,
            ums = self.upstream_duration_ms.map_or("-".to_string(), |d| format!("{d:.3}")),
            bytes_in = self.bytes_in,
            rid = dash(self.request_id),
            tid = dash(self.trace_id),
            ua = clean(self.user_agent),
            err = self.error,
            rl = dash(self.rate_limit),
            pid = dash(self.peer_identity),
            az = dash(self.authz),
            tv = dash(self.tls_version),
            tc = dash(self.tls_cipher),
            sni = dash(self.sni),
        )
    }

    pub fn format(&self, format: Format) -> Option<String> {
        match format {
            Format::Off => None,
            Format::Text => Some(self.text()),
            Format::Json => serde_json::to_string(self).ok(),
        }
    }
}

pub fn timestamp(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

enum Line {
    Text(String),
    /// Write out everything queued so far, then acknowledge.
    Flush(SyncSender<()>),
}

struct Writer {
    tx: SyncSender<Line>,
    sink: Sink,
}

static WRITER: OnceLock<Writer> = OnceLock::new();

/// Start the writer thread for `sink`. Once per process; later calls with
/// another sink are refused (the caller reports that a restart is needed).
pub fn init(sink: &Sink) -> std::io::Result<()> {
    if let Some(w) = WRITER.get() {
        return if &w.sink == sink {
            Ok(())
        } else {
            Err(std::io::Error::other(
                "the access log destination changes only on restart",
            ))
        };
    }
    let out: Box<dyn Write + Send> = match sink {
        Sink::Stdout => Box::new(std::io::stdout()),
        Sink::File(path) => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?,
        ),
    };
    let (tx, rx) = sync_channel(QUEUE_LINES);
    std::thread::Builder::new()
        .name("access-log".into())
        .spawn(move || write_loop(rx, out))?;
    let _ = WRITER.set(Writer {
        tx,
        sink: sink.clone(),
    });
    Ok(())
}

/// Queue a line; never blocks.
pub fn submit(line: String) {
    let Some(w) = WRITER.get() else { return };
    match w.tx.try_send(Line::Text(line)) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
            metrics().access_log_dropped.inc()
        }
    }
}

/// Write out what is queued, waiting at most `timeout` (at shutdown).
pub fn flush(timeout: Duration) {
    let Some(w) = WRITER.get() else { return };
    let (ack_tx, ack_rx) = sync_channel(1);
    let deadline = std::time::Instant::now() + timeout;
    let mut message = Line::Flush(ack_tx);
    loop {
        match w.tx.try_send(message) {
            Ok(()) => break,
            Err(TrySendError::Full(m)) if std::time::Instant::now() < deadline => {
                message = m;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => return,
        }
    }
    let _ = ack_rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()));
}

fn write_loop(rx: Receiver<Line>, out: Box<dyn Write + Send>) {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
    loop {
        std::thread::sleep(DRAIN_INTERVAL);
        let mut wrote = false;
        loop {
            match rx.try_recv() {
                Ok(Line::Text(line)) => {
                    let _ = out.write_all(line.as_bytes());
                    let _ = out.write_all(b"\n");
                    wrote = true;
                }
                Ok(Line::Flush(ack)) => {
                    let _ = out.flush();
                    let _ = ack.send(());
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    let _ = out.flush();
                    return;
                }
            }
        }
        if wrote {
            let _ = out.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry<'static> {
        Entry {
            timestamp: "2026-11-25T10:00:00.000Z".into(),
            request_id: "rid",
            trace_id: "",
            listener: "public",
            direction: "ingress",
            route: "api",
            upstream: "api",
            endpoint: "127.0.0.1:9001".into(),
            attempts: 2,
            retries: "127.0.0.1:9002/503".into(),
            hedged: 0,
            method: "GET",
            host: "api.example.com",
            path: "/v1/x",
            protocol: "HTTP/1.1",
            status: 200,
            bytes_in: 0,
            bytes_out: 12,
            duration_ms: 1.5,
            upstream_duration_ms: Some(1.0),
            client: "127.0.0.1:5555".into(),
            user_agent: "curl \"x\"",
            error: "",
            rate_limit: "",
            peer_identity: "",
            authz: "",
            tls_version: "TLSv1.3",
            tls_cipher: "TLS_AES_128_GCM_SHA256",
            sni: "api.example.com",
        }
    }

    /// Each field of a line has its row in docs/observability.md.
    #[test]
    fn every_field_is_documented() {
        let docs = include_str!("../../../docs/observability.md");
        let line = entry().format(Format::Json).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        let fields = v.as_object().unwrap();
        assert!(fields.len() > 20, "{line}");
        for key in fields.keys() {
            assert!(
                docs.lines()
                    .any(|l| l.starts_with("| `") && l.contains(&format!("`{key}`"))),
                "access-log field {key} has no row in docs/observability.md"
            );
        }
    }

    #[test]
    fn json_line_has_every_field() {
        let line = entry().format(Format::Json).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        for key in [
            "timestamp",
            "request_id",
            "trace_id",
            "listener",
            "direction",
            "route",
            "upstream",
            "endpoint",
            "attempts",
            "retries",
            "hedged",
            "method",
            "host",
            "path",
            "protocol",
            "status",
            "bytes_in",
            "bytes_out",
            "duration_ms",
            "upstream_duration_ms",
            "client",
            "user_agent",
            "error",
            "tls_version",
            "tls_cipher",
            "sni",
        ] {
            assert!(v.get(key).is_some(), "missing {key} in {line}");
        }
        assert_eq!(v["status"], 200);
    }

    #[test]
    fn text_line_is_one_line_with_dashes_for_empty_fields() {
        let line = entry().format(Format::Text).unwrap();
        assert!(
            line.starts_with(
                "2026-11-25T10:00:00.000Z 127.0.0.1:5555 \"GET /v1/x HTTP/1.1\" 200 12 1.500ms"
            ),
            "{line}"
        );
        assert!(line.contains("trace_id=-"), "{line}");
        assert!(
            line.ends_with(
                "tls_version=TLSv1.3 tls_cipher=TLS_AES_128_GCM_SHA256 sni=api.example.com"
            ),
            "{line}"
        );
        assert!(line.contains("ua=\"curl__x_\""), "{line}");
        assert!(!line.contains('\n'));
        assert!(entry().format(Format::Off).is_none());
        // A head refused before the proxy saw it has no request id.
        let mut refused = entry();
        refused.request_id = "";
        let line = refused.format(Format::Text).unwrap();
        assert!(line.contains(" request_id=- "), "{line}");
    }

    #[test]
    fn client_values_cannot_pose_as_other_text_fields() {
        let mut e = entry();
        e.host = "x peer_identity=spiffe://forged error=\"\"";
        e.user_agent = "evil\" ua=x\terror=\"spoof\\";
        e.path = "/a\"b c";
        let line = e.format(Format::Text).unwrap();
        assert!(
            line.contains("host=x_peer_identity=spiffe://forged_error=__ "),
            "{line}"
        );
        assert!(line.contains("ua=\"evil__ua=x_error=_spoof_\""), "{line}");
        assert!(line.contains("\"GET /a_b_c HTTP/1.1\""), "{line}");
        assert_eq!(line.matches(" peer_identity=").count(), 1, "{line}");
    }
}
