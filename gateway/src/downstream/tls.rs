//! TLS termination on a listener: BoringSSL with Mozilla's "intermediate"
//! settings (TLS 1.2 and 1.3, ECDHE + AEAD ciphers), the certificate chosen
//! per handshake by SNI from the listener's `[certs]`, optional client
//! certificates checked against `client_ca`, and every fatal alert counted
//! ([`crate::tls::alerts`]).
//!
//! Session resumption: BoringSSL issues session tickets by default and
//! rotates their encryption key itself (no key is configured, so none can
//! leak from a file); the in-memory session cache serves clients without
//! tickets.

#![allow(
    unsafe_code,
    reason = "calls BoringSSL's C API where the boring crate has no safe wrapper"
)]

use std::any::Any;
use std::sync::Arc;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use boring::ssl::{SslVerifyMode, SslVersion};
use boring::stack::Stack;
use boring::x509::store::X509StoreBuilder;
use boring::x509::X509;
use pingora::listeners::tls::TlsSettings;
use pingora::listeners::TlsAccept;
use pingora::protocols::tls::TlsRef;
use pingora::protocols::ALPN;

use crate::config::model::{Alpn, ClientAuth, Listener, ListenerTls, TlsVersion};
use crate::runtime::Runtime;
use crate::tls::{CertKeyPair, PeerCert, TlsConnection};

#[derive(Debug, thiserror::Error)]
#[error("TLS set-up of listener `{listener}` failed: {reason}")]
pub struct ListenerTlsError {
    listener: String,
    reason: String,
}

/// Per-handshake callbacks of one listener.
struct Callbacks {
    listener: String,
    runtime: Arc<ArcSwap<Runtime>>,
    /// The client CA bundle (its fingerprint) and `client_auth` the TLS
    /// context was built with: a reload that changes them is applied to
    /// each handshake instead.
    started_with: Option<(Vec<u8>, ClientAuth)>,
}

impl Callbacks {
    /// The listener's TLS settings in the config `rt` holds.
    fn tls<'a>(&self, rt: &'a Runtime) -> Option<&'a ListenerTls> {
        rt.config
            .listeners
            .iter()
            .find(|l| l.name == self.listener)?
            .tls
            .as_ref()
    }

    /// The fingerprint of the listener's client CAs in the running config.
    fn current_fingerprint(&self) -> Option<Vec<u8>> {
        let rt = self.runtime.load();
        Some(self.tls(&rt)?.client_ca.as_ref()?.fingerprint.clone())
    }
}

#[async_trait]
impl TlsAccept for Callbacks {
    async fn certificate_callback(&self, ssl: &mut TlsRef) {
        let rt = self.runtime.load();
        let tls = self.tls(&rt);
        let candidates: Vec<Arc<CertKeyPair>> = tls.map_or_else(Vec::new, |tls| {
            tls.certs
                .iter()
                .filter_map(|name| rt.certs.get(name).map(|slot| slot.get()))
                .collect()
        });
        let sni = ssl
            .servername(boring::ssl::NameType::HOST_NAME)
            .map(str::to_string);
        let mut offered = 0;
        for pair in crate::runtime::certs::select(&candidates, sni.as_deref()) {
            let added = match pair.credential() {
                Ok(credential) => credential.offer(ssl).map_err(|e| e.to_string()),
                Err(reason) => Err(reason.to_string()),
            };
            match added {
                Ok(()) => offered += 1,
                Err(e) => log::error!(
                    "listener `{}`: cannot use certificate for {:?}: {e}",
                    self.listener,
                    pair.names
                ),
            }
        }
        if offered == 0 {
            // No certificate: the handshake fails with an alert, counted below.
            log::error!("listener `{}` has no certificate to serve", self.listener);
        }
        if let (Some(ca), Some(tls), Some((fingerprint, auth))) = (
            tls.and_then(|t| t.client_ca.as_ref()),
            tls,
            &self.started_with,
        ) {
            if ca.fingerprint != *fingerprint || tls.client_auth != *auth {
                let checked =
                    check_clients(ssl, &rt.material.ca(ca), tls.client_auth).and_then(|()| {
                        ssl.set_ex_data(checked_with_index()?, ca.fingerprint.clone());
                        Ok(())
                    });
                if let Err(e) = checked {
                    // Without the reloaded CAs, the handshake is refused
                    // (no CA to trust) rather than checked against the old
                    // ones; and should even that fail, the connection is
                    // marked as checked against no known bundle, so its
                    // first request checks it again.
                    ssl.set_verify(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT);
                    let _ = X509StoreBuilder::new()
                        .and_then(|empty| ssl.set_verify_cert_store(empty.build()));
                    if let Ok(i) = checked_with_index() {
                        ssl.set_ex_data(i, Vec::new());
                    }
                    log::error!(
                        "listener `{}`: cannot use client_ca {}: {e}",
                        self.listener,
                        ca.path.display()
                    );
                }
            }
        }
    }

    async fn handshake_complete_callback(
        &self,
        ssl: &TlsRef,
    ) -> Option<Arc<dyn Any + Send + Sync>> {
        // As sent: a name that is not UTF-8 is still worth logging.
        let sni = ssl
            .servername_raw(boring::ssl::NameType::HOST_NAME)
            .map(|name| String::from_utf8_lossy(name).into_owned());
        let peer = ssl.peer_certificate().map(|leaf| self.peer_cert(ssl, leaf));
        Some(Arc::new(TlsConnection { sni, peer }))
    }
}

impl Callbacks {
    /// The client certificate `leaf` a handshake verified, with what it was
    /// checked against.
    fn peer_cert(&self, ssl: &TlsRef, leaf: boring::x509::X509) -> PeerCert {
        let chain = ssl
            .peer_cert_chain()
            .map(|c| c.iter().map(|x| x.to_owned()).collect())
            .unwrap_or_default();
        // The bundle this handshake was checked against: the one the
        // certificate callback gave it; else the context's own, which the
        // callback leaves in place only while the running config still has
        // it. Otherwise (a reload in between) none is claimed, and the
        // first request checks the certificate against the bundle then.
        let verified_with = checked_with_index()
            .ok()
            .and_then(|i| ssl.ex_data(i).cloned())
            .or_else(|| {
                let (started, _) = self.started_with.as_ref()?;
                (self.current_fingerprint().as_ref() == Some(started)).then(|| started.clone())
            })
            .unwrap_or_default();
        PeerCert::new(leaf, chain, verified_with)
    }
}

/// The TLS settings for `listener` (which has `tls`), with the client CAs
/// `material` holds (a reload builds them before its config is swapped in).
pub fn settings(
    listener: &Listener,
    tls: &ListenerTls,
    runtime: Arc<ArcSwap<Runtime>>,
    material: &crate::config::Material,
) -> Result<TlsSettings, ListenerTlsError> {
    let fail = |reason: String| ListenerTlsError {
        listener: listener.name.clone(),
        reason,
    };
    let callbacks = Callbacks {
        listener: listener.name.clone(),
        runtime,
        started_with: tls
            .client_ca
            .as_ref()
            .map(|ca| (ca.fingerprint.clone(), tls.client_auth)),
    };
    let mut settings =
        TlsSettings::with_callbacks(Box::new(callbacks)).map_err(|e| fail(e.to_string()))?;
    let min = match tls.min_version {
        TlsVersion::V1_2 => SslVersion::TLS1_2,
        TlsVersion::V1_3 => SslVersion::TLS1_3,
    };
    settings
        .set_min_proto_version(Some(min))
        .map_err(|e| fail(e.to_string()))?;
    settings
        .set_max_proto_version(Some(SslVersion::TLS1_3))
        .map_err(|e| fail(e.to_string()))?;
    crate::tls::ciphers::prefer_aes128(&mut settings).map_err(|e| fail(e.to_string()))?;
    // Session resumption must not cross listeners with different client
    // auth. The context holds at most 32 bytes, names can be longer: a hash.
    let sid_ctx = boring::hash::hash(
        boring::hash::MessageDigest::sha256(),
        format!("meshgate:{}", listener.name).as_bytes(),
    )
    .map_err(|e| fail(e.to_string()))?;
    settings
        .set_session_id_context(&sid_ctx)
        .map_err(|e| fail(e.to_string()))?;
    settings.set_alpn(match tls.alpn {
        Alpn::H2H1 => ALPN::H2H1,
        Alpn::H1 => ALPN::H1,
        Alpn::H2 => ALPN::H2,
    });
    if let Some(ca) = &tls.client_ca {
        let cas = material.ca(ca);
        let store = crate::tls::trust_store(&cas)
            .map_err(|e| fail(format!("client_ca {}: {e}", ca.path.display())))?;
        for cert in cas.iter() {
            settings
                .add_client_ca(cert)
                .map_err(|e| fail(format!("client_ca {}: {e}", ca.path.display())))?;
        }
        settings.set_cert_store(store);
        // A resumed session skips the certificate check: a client whose
        // certificate expired (or whose CA was dropped) could go on for days
        // on tickets. With client certificates, every connection is checked.
        settings.set_options(boring::ssl::SslOptions::NO_TICKET);
        settings.set_session_cache_mode(boring::ssl::SslSessionCacheMode::OFF);
        settings.set_verify(verify_mode(tls.client_auth));
    } else if tls.session_tickets == 0 {
        // None in TLS 1.2 either; its clients can still resume by session id.
        settings.set_options(boring::ssl::SslOptions::NO_TICKET);
    } else {
        // TLS 1.3's count (TLS 1.2 sends one). SAFETY: the builder owns a
        // valid SSL_CTX; the count was checked against BoringSSL's maximum.
        crate::tls::ffi_result(unsafe {
            boring_sys::SSL_CTX_set_num_tickets(settings.as_ptr(), tls.session_tickets.into())
        })
        .map_err(|e| fail(e.to_string()))?;
    }
    crate::tls::alerts::count(&mut settings, &listener.name).map_err(|e| fail(e.to_string()))?;
    Ok(settings)
}

fn verify_mode(auth: ClientAuth) -> SslVerifyMode {
    match auth {
        ClientAuth::Require => SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT,
        ClientAuth::Optional => SslVerifyMode::PEER,
    }
}

/// Check this handshake's client certificate against `ca` and `auth`, as
/// reloaded since the listener's TLS context was built: the CAs trusted,
/// the CA names sent in the certificate request, and whether a certificate
/// is required. (A listener with `client_ca` resumes no sessions, so every
/// connection after the reload is checked this way.)
fn check_clients(
    ssl: &mut TlsRef,
    cas: &[X509],
    auth: ClientAuth,
) -> Result<(), boring::error::ErrorStack> {
    ssl.set_verify_cert_store(crate::tls::trust_store(cas)?)?;
    let mut names = Stack::new()?;
    for cert in cas {
        names.push(boring::x509::X509Name::from_der(
            &cert.subject_name().to_der()?,
        )?)?;
    }
    ssl.set_client_ca_list(names);
    ssl.set_verify(verify_mode(auth));
    Ok(())
}

/// Where a handshake keeps the fingerprint of the client CAs its certificate
/// callback gave it, when they differ from the context's.
fn checked_with_index(
) -> Result<boring::ex_data::Index<boring::ssl::Ssl, Vec<u8>>, boring::error::ErrorStack> {
    static INDEX: std::sync::OnceLock<boring::ex_data::Index<boring::ssl::Ssl, Vec<u8>>> =
        std::sync::OnceLock::new();
    if let Some(i) = INDEX.get() {
        return Ok(*i);
    }
    let i = boring::ssl::Ssl::new_ex_index()?;
    Ok(*INDEX.get_or_init(|| i))
}
