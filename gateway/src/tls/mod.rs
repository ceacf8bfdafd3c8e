//! TLS material and identities: loading certificate chains and keys, the
//! names a certificate serves, peer identities (SPIFFE URI SAN or DNS SAN)
//! and the patterns that match them.
//!
//! The listener side (SNI selection, client auth) is in
//! [`crate::downstream::tls`], its count of failed handshakes in
//! [`alerts`], its TLS 1.3 cipher order in [`ciphers`] and the BoringSSL
//! form of a certificate it serves in [`credential`]; the files behind
//! `[certs]` are held by [`crate::runtime::certs`].

#![allow(
    unsafe_code,
    reason = "calls BoringSSL's C API where the boring crate has no safe wrapper"
)]

pub mod alerts;
pub mod ciphers;
pub mod credential;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use boring::asn1::Asn1Time;
use boring::pkey::{PKey, Private};
use boring::x509::{X509Ref, X509};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path} is not a PEM certificate chain: {reason}")]
    BadCertificate { path: PathBuf, reason: String },
    #[error("{path} is not a PEM private key: {reason}")]
    BadKey { path: PathBuf, reason: String },
    #[error("the key in {key} does not belong to the certificate in {cert}")]
    Mismatch { cert: PathBuf, key: PathBuf },
}

/// A certificate chain (leaf first) and its private key, checked to match.
#[derive(Clone)]
pub struct CertKeyPair {
    pub chain: Vec<X509>,
    pub key: PKey<Private>,
    /// Names the leaf serves, lower-case: DNS SANs, or the CN when there are none.
    pub names: Vec<String>,
    /// The earliest `notAfter` in the chain (the leaf's, unless an
    /// intermediate expires first), Unix seconds.
    pub not_after: i64,
    /// The same pair for pingora's upstream client certificates, made once.
    cert_key: Arc<pingora::utils::tls::CertKey>,
    /// The same pair for listeners, made once; why BoringSSL refused it
    /// (reported per handshake, as it was before credentials).
    credential: Result<Arc<credential::Credential>, String>,
}

impl std::fmt::Debug for CertKeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertKeyPair")
            .field("names", &self.names)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl CertKeyPair {
    pub fn load(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let chain = load_certs(cert)?;
        let key_pem = read(key)?;
        let pkey = PKey::private_key_from_pem(&key_pem).map_err(|e| TlsError::BadKey {
            path: key.to_path_buf(),
            reason: first_reason(&e),
        })?;
        let leaf = &chain[0];
        let matches = leaf
            .public_key()
            .map(|public| public.public_eq(&pkey))
            .unwrap_or(false);
        if !matches {
            return Err(TlsError::Mismatch {
                cert: cert.to_path_buf(),
                key: key.to_path_buf(),
            });
        }
        Ok(Self::new(chain, pkey))
    }

    /// From a chain (leaf first) and its key, already known to match.
    pub fn new(chain: Vec<X509>, key: PKey<Private>) -> Self {
        let leaf = &chain[0];
        CertKeyPair {
            names: served_names(leaf),
            not_after: not_after_unix(&chain),
            cert_key: Arc::new(pingora::utils::tls::CertKey::new(
                chain.clone(),
                key.clone(),
            )),
            credential: credential::Credential::new(&chain, &key)
                .map(Arc::new)
                .map_err(|e| first_reason(&e)),
            chain,
            key,
        }
    }

    pub fn leaf(&self) -> &X509 {
        &self.chain[0]
    }

    /// For a listener to serve.
    pub fn credential(&self) -> Result<&credential::Credential, &str> {
        self.credential.as_deref().map_err(String::as_str)
    }

    /// For pingora's upstream client certificates.
    pub fn cert_key(&self) -> Arc<pingora::utils::tls::CertKey> {
        self.cert_key.clone()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Every certificate in a PEM file (a chain or a CA bundle), in file order.
pub fn load_certs(path: &Path) -> Result<Vec<X509>, TlsError> {
    let pem = read(path)?;
    if !pem.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    let certs = X509::stack_from_pem(&pem).map_err(|e| TlsError::BadCertificate {
        path: path.to_path_buf(),
        reason: first_reason(&e),
    })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// A BoringSSL call's return: 1 is success; otherwise the reason is on the
/// thread's error stack (for the calls `boring` does not wrap).
pub(crate) fn ffi_result(ret: std::os::raw::c_int) -> Result<(), boring::error::ErrorStack> {
    if ret == 1 {
        Ok(())
    } else {
        Err(boring::error::ErrorStack::get())
    }
}

fn first_reason(e: &boring::error::ErrorStack) -> String {
    e.errors()
        .first()
        .and_then(|e| e.reason().map(str::to_string))
        .unwrap_or_else(|| "unreadable".to_string())
}

/// The DNS names a certificate serves; the CN only when it has no DNS SAN
/// (as browsers and BoringSSL's own host check do).
pub fn served_names(cert: &X509Ref) -> Vec<String> {
    let sans: Vec<String> = cert
        .subject_alt_names()
        .map(|names| {
            names
                .iter()
                .filter_map(|n| n.dnsname().map(str::to_ascii_lowercase))
                .collect()
        })
        .unwrap_or_default();
    if !sans.is_empty() {
        return sans;
    }
    cert.subject_name()
        .entries_by_nid(boring::nid::Nid::COMMONNAME)
        .filter_map(|e| e.data().as_utf8().ok().map(|s| s.to_ascii_lowercase()))
        .collect()
}

fn unix(t: &boring::asn1::Asn1TimeRef) -> i64 {
    Asn1Time::from_unix(0)
        .ok()
        .and_then(|epoch| epoch.diff(t).ok())
        .map_or(0, |d| i64::from(d.days) * 86_400 + i64::from(d.secs))
}

/// The earliest `notAfter` in a chain: when clients start refusing it.
fn not_after_unix(chain: &[X509]) -> i64 {
    chain.iter().map(|c| unix(c.not_after())).min().unwrap_or(0)
}

/// A certificate this close to its `notAfter` is reported.
pub const EXPIRY_WARNING_SECS: i64 = 7 * 86_400;

/// The certificate's common name, to tell chain members apart in messages.
fn common_name(cert: &X509Ref) -> String {
    cert.subject_name()
        .entries_by_nid(boring::nid::Nid::COMMONNAME)
        .find_map(|e| e.data().as_utf8().ok().map(|s| s.to_string()))
        .unwrap_or_else(|| "(no CN)".to_string())
}

/// Why clients would refuse `cert` at `now` (Unix seconds), or soon.
fn validity_problem(cert: &X509Ref, now: i64) -> Option<String> {
    let span = |secs: i64| {
        let (days, hours) = (secs / 86_400, secs % 86_400 / 3_600);
        let plural = |n: i64, unit: &str| format!("{n} {unit}{}", if n == 1 { "" } else { "s" });
        match (days, hours) {
            (0, 0) => "less than an hour".to_string(),
            (0, h) => plural(h, "hour"),
            (d, 0) => plural(d, "day"),
            (d, h) => format!("{} {}", plural(d, "day"), plural(h, "hour")),
        }
    };
    let date = |t: i64| {
        humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(t.max(0).unsigned_abs()),
        )
    };
    let (not_before, not_after) = (unix(cert.not_before()), unix(cert.not_after()));
    if not_after <= now {
        Some(format!(
            "expired {} ago ({}); clients that check it refuse it: install a renewed certificate",
            span(now - not_after),
            date(not_after)
        ))
    } else if not_before > now {
        Some(format!(
            "is not valid until {} ({} from now); clients that check it refuse it until then",
            date(not_before),
            span(not_before - now)
        ))
    } else if not_after - now <= EXPIRY_WARNING_SECS {
        Some(format!(
            "expires in {} ({}): renew it",
            span(not_after - now),
            date(not_after)
        ))
    } else {
        None
    }
}

fn unix_now(now: std::time::SystemTime) -> i64 {
    now.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Warnings for a served chain (`what` names its config entry, `path` its
/// file): each certificate in it, leaf or intermediate.
pub fn chain_warnings(
    what: &str,
    path: &Path,
    chain: &[X509],
    now: std::time::SystemTime,
) -> Vec<String> {
    let now = unix_now(now);
    chain
        .iter()
        .enumerate()
        .filter_map(|(i, cert)| {
            let problem = validity_problem(cert, now)?;
            let which = if i == 0 {
                "the certificate".to_string()
            } else {
                format!("its intermediate `{}`", common_name(cert))
            };
            Some(format!(
                "{}: warning: {what}: {which} {problem}",
                path.display()
            ))
        })
        .collect()
}

/// Warnings for a CA bundle; `client_ca` bundles are also checked for
/// certificates that are no CA.
pub fn bundle_warnings(
    what: &str,
    path: &Path,
    certs: &[X509],
    client_ca: bool,
    now: std::time::SystemTime,
) -> Vec<String> {
    let now = unix_now(now);
    let mut out = Vec::new();
    for cert in certs {
        let name = common_name(cert);
        if let Some(problem) = validity_problem(cert, now) {
            out.push(format!(
                "{}: warning: {what}: CA `{name}` {problem}",
                path.display()
            ));
        }
        // SAFETY: a valid certificate; BoringSSL caches its parsed
        // extensions inside it, under its own lock.
        if client_ca
            && unsafe { boring_sys::X509_check_ca(foreign_types::ForeignType::as_ptr(cert)) } == 0
        {
            out.push(format!(
                "{}: warning: {what}: `{name}` is not a CA certificate, so it issues no client certificates: only a client presenting this very certificate is accepted (give the CA that issued it)",
                path.display()
            ));
        }
    }
    out
}

/// A peer's identity from its certificate: the first URI SAN (a SPIFFE ID
/// such as `spiffe://prod.example/ns/web/sa/frontend`), else the first DNS SAN.
pub fn identity_of(cert: &X509Ref) -> Option<String> {
    let names = cert.subject_alt_names()?;
    // A wildcard SAN names a set of hosts, not one workload: never an identity.
    let usable = |s: &str| !s.contains('*');
    names
        .iter()
        .find_map(|n| n.uri().filter(|u| usable(u)).map(str::to_string))
        .or_else(|| {
            names
                .iter()
                .find_map(|n| n.dnsname().filter(|d| usable(d)).map(str::to_string))
        })
}

/// Every identity a certificate carries (URI and DNS SANs), for matching an
/// upstream against `verify`.
pub fn identities_of(cert: &X509Ref) -> Vec<String> {
    cert.subject_alt_names()
        .map(|names| {
            names
                .iter()
                .filter_map(|n| n.uri().or_else(|| n.dnsname()).map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// What a client's TLS handshake settled that the requests on the
/// connection need: attached to the connection by the handshake callback.
pub struct TlsConnection {
    /// The server name the client asked for (SNI), if it sent one.
    pub sni: Option<String>,
    /// The client certificate, on an mTLS listener that got one.
    pub peer: Option<PeerCert>,
}

/// A client certificate a listener verified.
pub struct PeerCert {
    /// The identity it proves: the first URI SAN, else the first DNS SAN.
    pub identity: Option<String>,
    leaf: X509,
    /// The intermediates the client sent.
    chain: Vec<X509>,
    /// The client CA bundle (its fingerprint) the handshake checked it against.
    verified_with: Vec<u8>,
    /// The last check against a bundle reloaded since: its fingerprint, and
    /// whether the certificate is trusted by it.
    rechecked: std::sync::Mutex<Option<(Vec<u8>, bool)>>,
}

impl PeerCert {
    pub fn new(leaf: X509, chain: Vec<X509>, verified_with: Vec<u8>) -> Self {
        PeerCert {
            identity: identity_of(&leaf),
            leaf,
            chain,
            verified_with,
            rechecked: std::sync::Mutex::new(None),
        }
    }

    /// Whether the listener's client CAs, `ca` as the running config has
    /// them, still trust this certificate. A connection outlives reloads:
    /// after one that changed the CAs (one removed as compromised, say) its
    /// certificate is checked again, once per bundle, as a new handshake
    /// would check it.
    pub fn trusted_by(&self, fingerprint: &[u8], cas: &[X509]) -> bool {
        if fingerprint == self.verified_with.as_slice() {
            return true;
        }
        let mut cache = self
            .rechecked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((seen, trusted)) = cache.as_ref() {
            if seen.as_slice() == fingerprint {
                return *trusted;
            }
        }
        let trusted = self.verify(cas).unwrap_or(false);
        *cache = Some((fingerprint.to_vec(), trusted));
        trusted
    }

    fn verify(&self, cas: &[X509]) -> Result<bool, boring::error::ErrorStack> {
        let store = trust_store(cas)?;
        let mut chain = boring::stack::Stack::new()?;
        for cert in &self.chain {
            chain.push(cert.clone())?;
        }
        let mut context = boring::x509::X509StoreContext::new()?;
        context.init(&store, &self.leaf, &chain, |c| {
            // As a handshake checks a client (BoringSSL's own call): for
            // client authentication. SAFETY: `c` is an initialised context
            // and the name a static C string.
            ffi_result(unsafe {
                boring_sys::X509_STORE_CTX_set_default(
                    foreign_types::ForeignTypeRef::as_ptr(c),
                    c"ssl_client".as_ptr(),
                )
            })?;
            c.verify_cert()
        })
    }
}

/// The CAs of `ca`, as BoringSSL checks client certificates against them.
/// Each one is a trust anchor, root or not: a bundle may name the
/// intermediate that issues client certificates, and trust only those.
pub(crate) fn trust_store(
    cas: &[X509],
) -> Result<boring::x509::store::X509Store, boring::error::ErrorStack> {
    let mut store = boring::x509::store::X509StoreBuilder::new()?;
    for cert in cas {
        store.add_cert(cert.clone())?;
    }
    store.set_flags(boring::x509::verify::X509VerifyFlags::PARTIAL_CHAIN);
    Ok(store.build())
}
