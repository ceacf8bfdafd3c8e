//! Test PKI and a real TLS client, both on BoringSSL (the `boring` crate
//! meshgate itself uses): CAs and leaf certificates made per test, with DNS
//! and URI (SPIFFE) SANs, ECDSA or RSA keys, expired or not.

#![allow(
    unsafe_code,
    reason = "TLS clients set what the boring crate has no safe call for"
)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use boring::asn1::Asn1Time;
use boring::bn::{BigNum, MsbOption};
use boring::ec::{EcGroup, EcKey};
use boring::hash::MessageDigest;
use boring::nid::Nid;
use boring::pkey::{PKey, Private};
use boring::rsa::Rsa;
use boring::ssl::{
    SslConnector, SslMethod, SslSession, SslSessionCacheMode, SslSignatureAlgorithm, SslVerifyMode,
    SslVersion,
};
use boring::x509::extension::{
    BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAlternativeName,
};
use boring::x509::store::X509StoreBuilder;
use boring::x509::{X509NameBuilder, X509};
use bytes::Bytes;
use foreign_types::ForeignType;
use http::Request;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use pingora::tls::tokio_ssl::SslStream;
use tokio::net::TcpStream;

use super::client::{Error, Resp};

fn ec_key() -> PKey<Private> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
    PKey::from_ec_key(EcKey::generate(&group).unwrap()).unwrap()
}

fn rsa_key() -> PKey<Private> {
    PKey::from_rsa(Rsa::generate(2048).unwrap()).unwrap()
}

fn serial() -> boring::asn1::Asn1Integer {
    let mut bn = BigNum::new().unwrap();
    bn.rand(64, MsbOption::MAYBE_ZERO, false).unwrap();
    bn.to_asn1_integer().unwrap()
}

fn name(cn: &str) -> boring::x509::X509Name {
    let mut b = X509NameBuilder::new().unwrap();
    b.append_entry_by_nid(Nid::COMMONNAME, cn).unwrap();
    b.build()
}

/// A certificate and its key, in PEM.
#[derive(Clone)]
pub struct Pem {
    pub cert: String,
    pub key: String,
}

impl Pem {
    /// Write `NAME.pem` and `NAME.key` into `dir`; their paths.
    pub fn write(&self, dir: &Path, file: &str) -> (PathBuf, PathBuf) {
        let cert = dir.join(format!("{file}.pem"));
        let key = dir.join(format!("{file}.key"));
        std::fs::write(&cert, &self.cert).unwrap();
        std::fs::write(&key, &self.key).unwrap();
        (cert, key)
    }
}

/// What a leaf certificate carries.
#[derive(Default)]
pub struct Leaf<'a> {
    pub dns: &'a [&'a str],
    pub uris: &'a [&'a str],
    pub rsa: bool,
    pub expired: bool,
    /// Days until `notAfter` (unless `expired`); `None`: 10.
    pub valid_days: Option<u32>,
    /// Days until `notBefore`; `None`: valid from now.
    pub starts_in_days: Option<u32>,
}

pub struct Ca {
    cert: X509,
    key: PKey<Private>,
}

impl Ca {
    /// A self-signed root.
    pub fn new(cn: &str) -> Ca {
        Ca::signed_by(cn, None, false)
    }

    /// An intermediate CA issued by this one.
    pub fn intermediate(&self, cn: &str) -> Ca {
        Ca::signed_by(cn, Some(self), false)
    }

    /// An intermediate CA issued by this one that expired yesterday.
    pub fn expired_intermediate(&self, cn: &str) -> Ca {
        Ca::signed_by(cn, Some(self), true)
    }

    fn signed_by(cn: &str, issuer: Option<&Ca>, expired: bool) -> Ca {
        let key = ec_key();
        let mut b = X509::builder().unwrap();
        b.set_version(2).unwrap();
        b.set_serial_number(&serial()).unwrap();
        b.set_subject_name(&name(cn)).unwrap();
        match issuer {
            Some(i) => b.set_issuer_name(i.cert.subject_name()).unwrap(),
            None => b.set_issuer_name(&name(cn)).unwrap(),
        }
        b.set_pubkey(&key).unwrap();
        let (from, to) = if expired {
            (unix_now() - 30 * 86_400, unix_now() - 86_400)
        } else {
            (unix_now(), unix_now() + 30 * 86_400)
        };
        b.set_not_before(&Asn1Time::from_unix(from).unwrap())
            .unwrap();
        b.set_not_after(&Asn1Time::from_unix(to).unwrap()).unwrap();
        b.append_extension(&BasicConstraints::new().critical().ca().build().unwrap())
            .unwrap();
        b.append_extension(
            &KeyUsage::new()
                .critical()
                .key_cert_sign()
                .crl_sign()
                .build()
                .unwrap(),
        )
        .unwrap();
        b.sign(issuer.map_or(&key, |i| &i.key), MessageDigest::sha256())
            .unwrap();
        Ca {
            cert: b.build(),
            key,
        }
    }

    pub fn pem(&self) -> String {
        String::from_utf8(self.cert.to_pem().unwrap()).unwrap()
    }

    /// Write the CA certificate to `dir/FILE.pem`.
    pub fn write(&self, dir: &Path, file: &str) -> PathBuf {
        let path = dir.join(format!("{file}.pem"));
        std::fs::write(&path, self.pem()).unwrap();
        path
    }

    /// A leaf for servers and clients alike (both extended key usages).
    pub fn issue(&self, leaf: Leaf<'_>) -> Pem {
        let key = if leaf.rsa { rsa_key() } else { ec_key() };
        let cn = leaf.dns.first().or(leaf.uris.first()).unwrap_or(&"leaf");
        let mut b = X509::builder().unwrap();
        b.set_version(2).unwrap();
        b.set_serial_number(&serial()).unwrap();
        b.set_subject_name(&name(cn)).unwrap();
        b.set_issuer_name(self.cert.subject_name()).unwrap();
        b.set_pubkey(&key).unwrap();
        let (from, to) = if leaf.expired {
            (
                Asn1Time::from_unix(unix_now() - 10 * 86_400).unwrap(),
                Asn1Time::from_unix(unix_now() - 86_400).unwrap(),
            )
        } else {
            (
                Asn1Time::days_from_now(leaf.starts_in_days.unwrap_or(0)).unwrap(),
                Asn1Time::days_from_now(leaf.valid_days.unwrap_or(10)).unwrap(),
            )
        };
        b.set_not_before(&from).unwrap();
        b.set_not_after(&to).unwrap();
        let mut san = SubjectAlternativeName::new();
        for d in leaf.dns {
            san.dns(d);
        }
        for u in leaf.uris {
            san.uri(u);
        }
        if !leaf.dns.is_empty() || !leaf.uris.is_empty() {
            let ext = san
                .build(&b.x509v3_context(Some(&self.cert), None))
                .unwrap();
            b.append_extension(&ext).unwrap();
        }
        b.append_extension(
            &ExtendedKeyUsage::new()
                .server_auth()
                .client_auth()
                .build()
                .unwrap(),
        )
        .unwrap();
        b.sign(&self.key, MessageDigest::sha256()).unwrap();
        Pem {
            cert: String::from_utf8(b.build().to_pem().unwrap()).unwrap(),
            key: String::from_utf8(key.private_key_to_pem_pkcs8().unwrap()).unwrap(),
        }
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// How a test client connects.
pub struct ClientTls<'a> {
    /// Server name sent and verified; `None`: no SNI.
    pub sni: Option<&'a str>,
    /// Trusted CA (PEM).
    pub ca: &'a str,
    /// Client certificate to present.
    pub client: Option<&'a Pem>,
    /// Offer h2 (and use it if chosen) instead of http/1.1 only.
    pub h2: bool,
    pub max_version: Option<SslVersion>,
    /// TLS 1.3 suites offered, in this order (IANA ids, e.g. 0x1301);
    /// `None`: the library's.
    pub tls13_suites: Option<&'a [u16]>,
    /// A session (ticket) to resume.
    pub resume: Option<&'a SslSession>,
    /// Where the sessions (tickets) the server sends are put.
    pub tickets: Option<Arc<Mutex<Vec<SslSession>>>>,
    /// The signature algorithms the client accepts from the server;
    /// `None`: the library's.
    pub verify_algorithms: Option<&'a [SslSignatureAlgorithm]>,
    /// A server name sent as these bytes, which need not be UTF-8 (with
    /// `sni: None`; the certificate's name is then not checked).
    pub raw_sni: Option<&'a [u8]>,
}

impl<'a> ClientTls<'a> {
    /// HTTP/1.1 only, no client certificate, the library's TLS versions.
    pub fn new(ca: &'a str, sni: Option<&'a str>) -> Self {
        ClientTls {
            sni,
            ca,
            client: None,
            h2: false,
            max_version: None,
            tls13_suites: None,
            resume: None,
            tickets: None,
            verify_algorithms: None,
            raw_sni: None,
        }
    }
}

/// What the handshake produced, besides the response.
#[derive(Debug)]
pub struct TlsInfo {
    pub version: String,
    pub alpn: Option<String>,
    /// DNS SANs of the certificate the server presented.
    pub server_names: Vec<String>,
    /// The cipher suite's standard name (`TLS_AES_128_GCM_SHA256`).
    pub cipher: String,
    /// Whether the handshake resumed `ClientTls::resume`.
    pub resumed: bool,
}

/// Handshake with `addr`; the stream and what was negotiated.
pub async fn connect(
    addr: SocketAddr,
    opts: &ClientTls<'_>,
) -> Result<(SslStream<TcpStream>, TlsInfo), Error> {
    connect_over(TcpStream::connect(addr).await?, opts).await
}

/// Handshake over an open connection (a CONNECT tunnel, say).
pub async fn connect_over(
    tcp: TcpStream,
    opts: &ClientTls<'_>,
) -> Result<(SslStream<TcpStream>, TlsInfo), Error> {
    let mut b = SslConnector::builder(SslMethod::tls())?;
    let mut store = X509StoreBuilder::new()?;
    for ca in X509::stack_from_pem(opts.ca.as_bytes())? {
        store.add_cert(ca)?;
    }
    b.set_verify_cert_store(store.build())?;
    b.set_verify(SslVerifyMode::PEER);
    if let Some(c) = opts.client {
        for (i, cert) in X509::stack_from_pem(c.cert.as_bytes())?
            .into_iter()
            .enumerate()
        {
            if i == 0 {
                b.set_certificate(&cert)?;
            } else {
                b.add_extra_chain_cert(cert)?;
            }
        }
        b.set_private_key(&*PKey::private_key_from_pem(c.key.as_bytes())?)?;
    }
    b.set_alpn_protos(if opts.h2 {
        b"\x02h2\x08http/1.1"
    } else {
        b"\x08http/1.1"
    })?;
    if let Some(v) = opts.max_version {
        b.set_max_proto_version(Some(v))?;
    }
    if let Some(suites) = opts.tls13_suites {
        // SAFETY: a valid SSL_CTX owned by the builder; BoringSSL copies the
        // list. (`boring` does not wrap this call.)
        let ok = unsafe {
            boring_sys::SSL_CTX_set1_tls13_ciphers(
                b.as_ptr(),
                suites.as_ptr(),
                std::ptr::null(),
                suites.len(),
            )
        };
        assert_eq!(ok, 1, "SSL_CTX_set1_tls13_ciphers({suites:x?})");
    }
    if let Some(algorithms) = opts.verify_algorithms {
        b.set_verify_algorithm_prefs(algorithms)?;
    }
    if let Some(tickets) = &opts.tickets {
        let tickets = tickets.clone();
        b.set_session_cache_mode(SslSessionCacheMode::CLIENT);
        b.set_new_session_callback(move |_, session| tickets.lock().unwrap().push(session));
    }
    let connector = b.build();
    let mut config = connector.configure()?;
    let ssl = match opts.sni {
        Some(sni) => config.into_ssl(sni)?,
        None => {
            config.set_use_server_name_indication(false);
            config.set_verify_hostname(false);
            config.into_ssl("unused")?
        }
    };
    let mut ssl = ssl;
    if let Some(name) = opts.raw_sni {
        let name = std::ffi::CString::new(name)?;
        // SAFETY: a valid SSL and a NUL-terminated name, which BoringSSL
        // copies. (`boring` takes names as `&str` only.)
        let ok = unsafe { boring_sys::SSL_set_tlsext_host_name(ssl.as_ptr(), name.as_ptr()) };
        assert_eq!(ok, 1, "SSL_set_tlsext_host_name");
    }
    if let Some(session) = opts.resume {
        // SAFETY: the session comes from a connection to the same server
        // with the same client settings, as `set_session` requires.
        unsafe { ssl.set_session(session)? };
    }
    let mut stream = SslStream::new(ssl, tcp)?;
    Pin::new(&mut stream).connect().await?;
    let ssl = stream.ssl();
    let info = TlsInfo {
        version: ssl.version_str().to_string(),
        alpn: ssl
            .selected_alpn_protocol()
            .map(|p| String::from_utf8_lossy(p).into_owned()),
        server_names: ssl
            .peer_certificate()
            .and_then(|c| c.subject_alt_names())
            .map(|n| {
                n.iter()
                    .filter_map(|g| g.dnsname().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default(),
        cipher: ssl
            .current_cipher()
            .and_then(|c| c.standard_name())
            .unwrap_or_default()
            .to_string(),
        resumed: ssl.session_reused(),
    };
    Ok((stream, info))
}

/// One GET over TLS, HTTP/2 when the server chose it.
pub async fn get(
    addr: SocketAddr,
    opts: &ClientTls<'_>,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(Resp, TlsInfo), Error> {
    let (stream, info) = connect(addr, opts).await?;
    let h2 = info.alpn.as_deref() == Some("h2");
    let authority = opts.sni.unwrap_or("localhost");
    let mut builder = Request::builder().uri(format!("https://{authority}{path}"));
    if !h2 {
        builder = Request::builder().uri(path).header("host", authority);
    }
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    let req = builder.body(Full::new(Bytes::new()))?;
    let resp = super::client::exchange(TokioIo::new(stream), h2, req).await?;
    Ok((resp, info))
}
