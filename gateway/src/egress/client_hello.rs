//! The server name (SNI) of a TLS ClientHello, read without terminating TLS.
//! The handshake message is parsed by `tls-parser`; record framing and the
//! extension block are walked here, strictly: meshgate must read the same
//! server name the destination will, so anything a lenient parser could
//! read two ways (duplicate extensions, trailing bytes) is refused.

use std::collections::HashSet;

use tls_parser::{TlsMessage, TlsMessageHandshake};

/// TLS record content type `handshake`.
const HANDSHAKE: u8 = 22;
/// Handshake message type `client_hello`.
const CLIENT_HELLO: u8 = 1;
/// Largest record payload a ClientHello may come in (RFC 8446 §5.1).
const MAX_RECORD: usize = 16 * 1024;
/// More than any real ClientHello (post-quantum key shares included).
pub const MAX_HELLO_BYTES: usize = 64 * 1024;
/// Records one ClientHello may span; real clients use one, rarely two.
const MAX_RECORDS: usize = 8;
/// Extension type `server_name`, and its `host_name` entry type.
const SERVER_NAME: u16 = 0;
const HOST_NAME: u8 = 0;

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
    for _ in 0..MAX_RECORDS {
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
    Hello::Invalid
}

/// How many bytes `buf` must hold before [`parse_client_hello`] can get
/// further: the end of the first incomplete record (or its header), or all
/// of `buf` when it ends on a record boundary. Lets a reader parse once per
/// record instead of once per read.
pub fn bytes_needed(buf: &[u8]) -> usize {
    let mut at = 0;
    for _ in 0..MAX_RECORDS {
        let Some(header) = buf.get(at..at + 5) else {
            return if at > 0 && at == buf.len() {
                at
            } else {
                at + 5
            };
        };
        let end = at + 5 + usize::from(u16::from_be_bytes([header[3], header[4]]));
        if end > buf.len() {
            return end;
        }
        at = end;
    }
    buf.len()
}

fn server_name(message: &[u8]) -> Hello {
    let Ok((rest, TlsMessage::Handshake(TlsMessageHandshake::ClientHello(hello)))) =
        tls_parser::parse_tls_message_handshake(message)
    else {
        return Hello::Invalid;
    };
    if !rest.is_empty() {
        return Hello::Invalid;
    }
    match hello.ext {
        None => Hello::Complete(None),
        Some(ext) => match extensions_server_name(ext) {
            Some(name) => Hello::Complete(name),
            None => Hello::Invalid,
        },
    }
}

/// The `host_name` of the extension block, `Some(None)` without one; `None`
/// when the block is not exactly a sequence of distinct extensions, or the
/// server_name extension is not exactly one host name.
fn extensions_server_name(mut block: &[u8]) -> Option<Option<String>> {
    let mut seen = HashSet::new();
    let mut name = None;
    while !block.is_empty() {
        let (kind, len) = (u16_at(block, 0)?, usize::from(u16_at(block, 2)?));
        let data = block.get(4..4 + len)?;
        if !seen.insert(kind) {
            return None;
        }
        if kind == SERVER_NAME {
            name = Some(host_name(data)?);
        }
        block = &block[4 + len..];
    }
    Some(name)
}

/// ServerNameList holding exactly one `host_name`, lower-cased.
fn host_name(data: &[u8]) -> Option<String> {
    let list = data.get(2..)?;
    if usize::from(u16_at(data, 0)?) != list.len() {
        return None;
    }
    let (kind, len) = (*list.first()?, usize::from(u16_at(list, 1)?));
    if kind != HOST_NAME || list.len() != 3 + len || len == 0 {
        return None;
    }
    let name = std::str::from_utf8(&list[3..]).ok()?;
    name.is_ascii().then(|| name.to_ascii_lowercase())
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
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

    /// A minimal ClientHello record with `extensions` as its extension block.
    fn synthetic(extensions: &[u8]) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7; 32]); // random
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one cipher suite
        body.extend_from_slice(&[1, 0]); // null compression
        body.extend_from_slice(&(extensions.len() as u16).to_be_bytes());
        body.extend_from_slice(extensions);
        let mut msg = vec![CLIENT_HELLO, 0];
        msg.extend_from_slice(&(body.len() as u16).to_be_bytes());
        msg.extend_from_slice(&body);
        let mut rec = vec![HANDSHAKE, 3, 1];
        rec.extend_from_slice(&(msg.len() as u16).to_be_bytes());
        rec.extend_from_slice(&msg);
        rec
    }

    /// A server_name extension with these (type, name) entries.
    fn sni_ext(entries: &[(u8, &[u8])]) -> Vec<u8> {
        let mut list = Vec::new();
        for (kind, name) in entries {
            list.push(*kind);
            list.extend_from_slice(&(name.len() as u16).to_be_bytes());
            list.extend_from_slice(name);
        }
        let mut data = (list.len() as u16).to_be_bytes().to_vec();
        data.extend_from_slice(&list);
        let mut ext = vec![0, 0];
        ext.extend_from_slice(&(data.len() as u16).to_be_bytes());
        ext.extend_from_slice(&data);
        ext
    }

    #[test]
    fn ambiguous_server_names_are_refused() {
        let one = sni_ext(&[(0, b"api.example.com")]);
        assert_eq!(
            parse_client_hello(&synthetic(&one)),
            Hello::Complete(Some("api.example.com".into()))
        );
        // Two server_name extensions.
        let two = [one.clone(), sni_ext(&[(0, b"evil.example.com")])].concat();
        assert_eq!(parse_client_hello(&synthetic(&two)), Hello::Invalid);
        // Two names in one.
        let pair = sni_ext(&[(0, b"api.example.com"), (0, b"evil.example.com")]);
        assert_eq!(parse_client_hello(&synthetic(&pair)), Hello::Invalid);
        // A malformed extension first, hiding what follows from a lenient parser.
        let hidden = [vec![0, 0x10, 0xff, 0xff], one.clone()].concat();
        assert_eq!(parse_client_hello(&synthetic(&hidden)), Hello::Invalid);
        // Trailing bytes after the extensions.
        let trailing = [one.clone(), vec![0]].concat();
        assert_eq!(parse_client_hello(&synthetic(&trailing)), Hello::Invalid);
        // Not ASCII, empty, or another name type.
        for bad in [
            sni_ext(&[(0, "bücher.example".as_bytes())]),
            sni_ext(&[(0, b"")]),
            sni_ext(&[(1, b"api.example.com")]),
        ] {
            assert_eq!(parse_client_hello(&synthetic(&bad)), Hello::Invalid);
        }
        // No extensions at all: no server name.
        assert_eq!(parse_client_hello(&synthetic(&[])), Hello::Complete(None));
    }

    #[test]
    fn too_many_records_are_refused_and_reads_wait_for_whole_records() {
        let hello = client_hello(Some("api.example.com"));
        let body = &hello[5..];
        let mut split = Vec::new();
        for part in body.chunks(8) {
            split.extend_from_slice(&[HANDSHAKE, 3, 1]);
            split.extend_from_slice(&(part.len() as u16).to_be_bytes());
            split.extend_from_slice(part);
        }
        assert_eq!(parse_client_hello(&split), Hello::Invalid);
        assert_eq!(bytes_needed(&[]), 5);
        assert_eq!(bytes_needed(&hello[..3]), 5);
        assert_eq!(bytes_needed(&hello[..10]), hello.len());
        assert_eq!(bytes_needed(&hello), hello.len());
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
