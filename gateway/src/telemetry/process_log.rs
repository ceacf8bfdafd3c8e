//! The process log (stderr, `RUST_LOG`), with what clients cause kept out of
//! its error level.
//!
//! Pingora logs every failed TLS handshake at error level ("Downstream
//! handshake error from ADDR: ..."), and every client that closes its
//! connection in the middle of a request head ("Fail to proxy: ...
//! Downstream ConnectionClosed ..."): on a public listener scanners and
//! broken clients make that a line per connection, burying the errors an
//! operator has to act on. Handshake failures are counted by reason in
//! `meshgate_tls_handshake_errors_total`, so these lines are logged at debug
//! level instead (`RUST_LOG=debug` shows them, with the client's address),
//! as NGINX and Envoy log them below their default level. Every other line
//! passes as it was.

use log::{Level, Log, Metadata, Record};

/// Installs the logger: `RUST_LOG` filters, `info` by default.
pub fn init() {
    let inner =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).build();
    let max = inner.filter();
    if log::set_boxed_logger(Box::new(Demote { inner })).is_ok() {
        log::set_max_level(max);
    }
}

struct Demote<L> {
    inner: L,
}

impl<L: Log> Log for Demote<L> {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        self.inner.enabled(metadata)
    }

    fn log(&self, record: &Record<'_>) {
        if !client_caused(record) {
            return self.inner.log(record);
        }
        let demoted = Record::builder()
            .level(Level::Debug)
            .target(record.target())
            .args(*record.args())
            .module_path(record.module_path())
            .file(record.file())
            .line(record.line())
            .build();
        if self.inner.enabled(demoted.metadata()) {
            self.inner.log(&demoted);
        }
    }

    fn flush(&self) {
        self.inner.flush()
    }
}

/// Pingora's error lines for a client's failed or abandoned TLS handshake,
/// or a request head it abandoned.
fn client_caused(record: &Record<'_>) -> bool {
    if record.level() != Level::Error {
        return false;
    }
    match record.target() {
        "pingora_core::services::listening" => record
            .args()
            .to_string()
            .starts_with("Downstream handshake"),
        "pingora_proxy" => {
            let line = record.args().to_string();
            line.starts_with("Fail to proxy: Downstream ")
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Records what reaches it, at or above `level`.
    struct Capture {
        level: Level,
        lines: Mutex<Vec<(Level, String)>>,
    }

    impl Log for Capture {
        fn enabled(&self, m: &Metadata<'_>) -> bool {
            m.level() <= self.level
        }
        fn log(&self, r: &Record<'_>) {
            self.lines
                .lock()
                .unwrap()
                .push((r.level(), r.args().to_string()));
        }
        fn flush(&self) {}
    }

    fn send(logger: &Demote<Capture>, level: Level, target: &str, text: &str) {
        logger.log(
            &Record::builder()
                .level(level)
                .target(target)
                .args(format_args!("{text}"))
                .build(),
        );
    }

    #[test]
    fn failed_handshakes_go_to_debug_and_everything_else_stays() {
        const LISTENING: &str = "pingora_core::services::listening";
        for level in [Level::Info, Level::Debug] {
            let logger = Demote {
                inner: Capture {
                    level,
                    lines: Mutex::new(Vec::new()),
                },
            };
            send(
                &logger,
                Level::Error,
                LISTENING,
                "Downstream handshake error from 192.0.2.7:5555: TLSHandshakeFailure",
            );
            send(
                &logger,
                Level::Error,
                LISTENING,
                "Downstream handshake timeout",
            );
            send(
                &logger,
                Level::Error,
                LISTENING,
                "Accept() failed Too many open files",
            );
            send(
                &logger,
                Level::Error,
                "pingora_core::apps",
                "Downstream handshake error: elsewhere",
            );
            let lines = logger.inner.lines.into_inner().unwrap();
            let mut expect = vec![
                (
                    Level::Error,
                    "Accept() failed Too many open files".to_string(),
                ),
                (
                    Level::Error,
                    "Downstream handshake error: elsewhere".to_string(),
                ),
            ];
            if level == Level::Debug {
                expect.insert(
                    0,
                    (
                        Level::Debug,
                        "Downstream handshake error from 192.0.2.7:5555: TLSHandshakeFailure"
                            .to_string(),
                    ),
                );
                expect.insert(
                    1,
                    (Level::Debug, "Downstream handshake timeout".to_string()),
                );
            }
            assert_eq!(lines, expect, "filter at {level}");
        }
    }

    #[test]
    fn abandoned_request_heads_go_to_debug() {
        let logger = Demote {
            inner: Capture {
                level: Level::Info,
                lines: Mutex::new(Vec::new()),
            },
        };
        send(
            &logger,
            Level::Error,
            "pingora_proxy",
            "Fail to proxy: Downstream ConnectionClosed while reading request headers, downstream session type: HTTP/1",
        );
        send(
            &logger,
            Level::Error,
            "pingora_proxy",
            "Fail to proxy: Upstream ConnectTimedout, status: 504",
        );
        let lines = logger.inner.lines.into_inner().unwrap();
        assert_eq!(
            lines,
            vec![(
                Level::Error,
                "Fail to proxy: Upstream ConnectTimedout, status: 504".to_string()
            )]
        );
    }
}
