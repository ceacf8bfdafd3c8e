//! Before a TLS listener's handshake: the ClientHello must arrive whole
//! within the listener's `handshake_timeout`, and plain HTTP sent to the
//! port gets an answer that says so.
//!
//! Pingora runs this between accepting a connection and BoringSSL's
//! handshake (its pre-TLS callback), so the bytes read here are put back
//! for BoringSSL to read again. Pingora's own bound on the whole
//! handshake is 60 s; a client that sends nothing, or its ClientHello a
//! byte at a time, is closed at `handshake_timeout` instead.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::listeners::PreTlsProcess;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::GetSocketDigest;
use pingora::{Error, ErrorType, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::runtime::Runtime;
use crate::telemetry::metrics::metrics;

/// A TLS record's header: type, version, length.
const RECORD_HEADER: usize = 5;
const HANDSHAKE_RECORD: u8 = 0x16;
/// The longest record TLS allows (2^14 bytes, with room for expansion).
const MAX_RECORD: usize = 16384 + 2048;
/// How long the answer to plain HTTP may take, and how much of the request
/// is read so that closing does not reset the connection before the
/// client reads the answer.
const PLAIN_HTTP_WRITE: Duration = Duration::from_secs(1);
const PLAIN_HTTP_DRAIN: usize = 16 * 1024;

pub struct ClientHelloDeadline {
    pub runtime: Arc<ArcSwap<Runtime>>,
}

/// What the first bytes of a TLS connection are.
#[derive(Debug, PartialEq, Eq)]
enum First {
    /// A handshake record of this many bytes after its header.
    Handshake(usize),
    /// An HTTP request line (a method in capitals, then a space).
    PlainHttp,
    /// Anything else: BoringSSL refuses it.
    Other,
}

fn classify(header: &[u8; RECORD_HEADER]) -> First {
    if header[0] == HANDSHAKE_RECORD {
        return First::Handshake(usize::from(u16::from_be_bytes([header[3], header[4]])));
    }
    // "GET /", "POST ", "HEAD ", "PUT /", "DELET", "OPTIO", "PATCH", ...
    let word_end = header
        .iter()
        .position(|&b| b == b' ')
        .unwrap_or(RECORD_HEADER);
    if word_end > 0 && header[..word_end].iter().all(u8::is_ascii_uppercase) {
        First::PlainHttp
    } else {
        First::Other
    }
}

#[async_trait]
impl PreTlsProcess for ClientHelloDeadline {
    async fn process(&self, stream: &mut L4Stream) -> Result<()> {
        let (timeout, listener) = {
            let rt = self.runtime.load();
            let local = stream
                .get_socket_digest()
                .and_then(|d| d.local_addr().and_then(|a| a.as_inet()).copied());
            let index = rt.listener_for(local);
            let limits = index
                .and_then(|i| rt.config.listeners.get(i))
                .map(|l| l.limits)
                .unwrap_or_default();
            let name = index
                .and_then(|i| rt.listeners.get(i))
                .map_or(String::new(), |l| l.name.clone());
            (limits.handshake_timeout, name)
        };
        let count = |reason: &str| {
            metrics()
                .tls_handshake_errors
                .with_label_values(&[&listener, reason])
                .inc();
        };
        let read = async {
            let mut header = [0u8; RECORD_HEADER];
            stream.read_exact(&mut header).await?;
            let first = classify(&header);
            let mut hello = Vec::new();
            if let First::Handshake(len) = first {
                hello = vec![0u8; len.min(MAX_RECORD)];
                stream.read_exact(&mut hello).await?;
            }
            Ok::<_, std::io::Error>((header, first, hello))
        };
        let (header, first, hello) = match pingora::time::timeout(timeout, read).await {
            Ok(Ok(read)) => read,
            // Gone before its ClientHello: nothing to count, as for a
            // client that hangs up mid-handshake.
            Ok(Err(e)) => {
                return Err(Error::because(
                    ErrorType::ReadError,
                    "before the ClientHello",
                    e,
                ))
            }
            Err(_) => {
                count("timeout");
                return Error::e_explain(
                    ErrorType::ReadTimedout,
                    "no ClientHello within handshake_timeout",
                );
            }
        };
        if first == First::PlainHttp {
            count("plain_http");
            answer_plain_http(stream).await;
            return Error::e_explain(
                ErrorType::InvalidHTTPHeader,
                "plain HTTP request sent to a TLS listener",
            );
        }
        let mut seen = header.to_vec();
        seen.extend_from_slice(&hello);
        stream.rewind(&seen);
        Ok(())
    }
}

/// `400`, as NGINX answers plain HTTP on an HTTPS port, then read a little
/// of the request so that the close does not reset the answer away.
async fn answer_plain_http(stream: &mut L4Stream) {
    let body = r#"{"error":"plain HTTP request sent to an HTTPS port","status":400,"route":null}"#;
    let answer = format!(
        "HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let exchange = async {
        stream.write_all(answer.as_bytes()).await?;
        stream.flush().await?;
        let mut sink = [0u8; 1024];
        let mut drained = 0;
        while drained < PLAIN_HTTP_DRAIN {
            match stream.read(&mut sink).await? {
                0 => break,
                n => drained += n,
            }
        }
        Ok::<_, std::io::Error>(())
    };
    let _ = pingora::time::timeout(PLAIN_HTTP_WRITE, exchange).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_five_bytes_tell_tls_from_http() {
        assert_eq!(
            classify(&[0x16, 0x03, 0x01, 0x02, 0x00]),
            First::Handshake(512)
        );
        for http in [
            b"GET /", b"POST ", b"HEAD ", b"PUT /", b"DELET", b"OPTIO", b"PATCH",
        ] {
            assert_eq!(classify(http), First::PlainHttp, "{http:?}");
        }
        for other in [b"get /", b"\x00\x01\x02\x03\x04", b" GET ", b"SSH-2"] {
            assert_eq!(classify(other), First::Other, "{other:?}");
        }
    }
}
