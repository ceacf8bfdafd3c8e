//! The server name (SNI) of a TLS ClientHello, read without terminating TLS.
//! Record framing is checked here; the handshake message itself is parsed by
//! `tls-parser`.

use tls_parser::{SNIType, TlsExtension, TlsMessage, TlsMessageHandshake};

/// TLS record content type `handshake`.
const HANDSHAKE: u8 = 22;
/// Handshake message type `client_hello`.
const CLIENT_HELLO: u8 = 1;
/// Largest record payload a ClientHello may come in (RFC 8446 §5.1).
const MAX_RECORD: usize = 16 * 1024;
/// More than any real ClientHello (post-quantum key shares included).
pub const MAX_HELLO_BYTES: usize = 64 * 1024;

/// What the bytes read so far hold.
#[derive(Debug, PartialEq, Eq)]
pub enum Hello {
    /// Not enough bytes yet to decide.
    NeedMore,
    /// A complete ClientHello and its server name, lower-cased (`None`: no SNI).
    Complete(Option<String>),
    /// Not a TLS ClientHello, or one meshgate cannot read unambiguously
    /// (two server names, a name that is not text).
    Invalid,
}

/// Read the ClientHello at the start of `buf`, which may span several
/// handshake records.
pub fn parse_client_hello(buf: &[u8]) -> Hello {
    let mut message = Vec::new();
    let mut at = 0;
    loop {
        let Some(header) = buf.get(at..at + 5) else {
            return Hello::NeedMore;
        };
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if header[0] != HANDSHAKE || header[1] != 3 || len == 0 || len > MAX_RECORD {
            return Hello::Invalid;
        }
        let Some(payload) = buf.get(at + 5..at + 5 + len) else {
            return if buf.len() >= MAX_HELLO_BYTES {
                Hello::Invalid
            } else {
                Hello::NeedMore
            };
        };
        message.extend_from_slice(payload);
        at += 5 + len;
        if message[0] != CLIENT_HELLO {
            return Hello::Invalid;
        }
        let Some(size) = message.get(1..4) else {
            continue;
        };
        let total =
            4 + (usize::from(size[0]) << 16 | usize::from(size[1]) << 8 | usize::from(size[2]));
        if total > MAX_HELLO_BYTES {
            return Hello::Invalid;
        }
        if message.len() >= total {
            return server_name(&message[..total]);
        }
    }
}

fn server_name(message: &[u8]) -> Hello {
    let Ok((_, TlsMessage::Handshake(TlsMessageHandshake::ClientHello(hello)))) =
        tls_parser::parse_tls_message_handshake(message)
    else {
        return Hello::Invalid;
    };
    let Some(ext) = hello.ext else {
        return Hello::Complete(None);
    };
    let Ok((_, extensions)) = tls_parser::parse_tls_client_hello_extensions(ext) else {
        return Hello::Invalid;
    };
    let mut names = extensions
        .iter()
        .filter_map(|e| match e {
            TlsExtension::SNI(list) => Some(list),
            _ => None,
        })
        .flatten()
        .filter(|(kind, _)| *kind == SNIType::HostName);
    match (names.next(), names.next()) {
        (None, _) => Hello::Complete(None),
        (Some((_, name)), None) => match std::str::from_utf8(name) {
            Ok(n) if n.is_ascii() => Hello::Complete(Some(n.to_ascii_lowercase())),
            _ => Hello::Invalid,
        },
        // A server could read either one; meshgate will not guess which.
        (Some(_), Some(_)) => Hello::Invalid,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// A transport that keeps what is written and has nothing to read, so a
    /// client handshake stops right after sending its ClientHello.
    #[derive(Default)]
    struct Capture(Vec<u8>);

    impl Read for Capture {
        fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
            Err(std::io::ErrorKind::WouldBlock.into())
        }
    }

    impl Write for Capture {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A real BoringSSL ClientHello, with SNI `sni` or none.
    fn client_hello(sni: Option<&str>) -> Vec<u8> {
        let connector = boring::ssl::SslConnector::builder(boring::ssl::SslMethod::tls())
            .unwrap()
            .build();
        let mut config = connector.configure().unwrap();
        if sni.is_none() {
            config.set_use_server_name_indication(false);
            config.set_verify_hostname(false);
        }
        let ssl = config.into_ssl(sni.unwrap_or("unused")).unwrap();
        let hello = match ssl.connect(Capture::default()) {
            Err(boring::ssl::HandshakeError::WouldBlock(mid)) => mid.get_ref().0.clone(),
            _ => panic!("expected the handshake to wait for the server"),
        };
        assert!(!hello.is_empty());
        hello
    }

    #[test]
    fn reads_the_server_name_of_a_real_client_hello() {
        let hello = client_hello(Some("API.Example.com"));
        assert_eq!(
            parse_client_hello(&hello),
            Hello::Complete(Some("api.example.com".into()))
        );
        assert_eq!(
            parse_client_hello(&client_hello(None)),
            Hello::Complete(None)
        );
    }

    #[test]
    fn waits_for_the_whole_hello_at_any_cut() {
        let hello = client_hello(Some("api.example.com"));
        for cut in 0..hello.len() {
            assert_eq!(
                parse_client_hello(&hello[..cut]),
                Hello::NeedMore,
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn assembles_a_hello_split_over_records() {
        let hello = client_hello(Some("api.example.com"));
        let body = &hello[5..];
        let (a, b) = body.split_at(40);
        let mut split = Vec::new();
        for part in [a, b] {
            split.extend_from_slice(&[HANDSHAKE, 3, 1]);
            split.extend_from_slice(&(part.len() as u16).to_be_bytes());
            split.extend_from_slice(part);
        }
        assert_eq!(
            parse_client_hello(&split),
            Hello::Complete(Some("api.example.com".into()))
        );
    }

    #[test]
    fn refuses_what_is_not_a_client_hello() {
        assert_eq!(
            parse_client_hello(b"GET / HTTP/1.1\r\n\r\n"),
            Hello::Invalid
        );
        // A record header announcing an oversized record.
        assert_eq!(parse_client_hello(&[22, 3, 1, 0xff, 0xff]), Hello::Invalid);
        // An application-data record.
        assert_eq!(parse_client_hello(&[23, 3, 3, 0, 1, 0]), Hello::Invalid);
        // A handshake record holding a ServerHello.
        assert_eq!(
            parse_client_hello(&[22, 3, 3, 0, 4, 2, 0, 0, 0]),
            Hello::Invalid
        );
        // A complete but garbled ClientHello.
        assert_eq!(
            parse_client_hello(&[22, 3, 1, 0, 6, 1, 0, 0, 2, 0xde, 0xad]),
            Hello::Invalid
        );
    }

    #[test]
    fn mutated_hellos_never_panic() {
        let hello = client_hello(Some("api.example.com"));
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..5000 {
            let mut m = hello.clone();
            for _ in 0..rng.usize(1..8) {
                let i = rng.usize(..m.len());
                m[i] = rng.u8(..);
            }
            let cut = rng.usize(..=m.len());
            let _ = parse_client_hello(&m[..cut]);
        }
    }
}
