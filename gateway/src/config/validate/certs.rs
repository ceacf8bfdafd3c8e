//! `[certs.NAME]` and CA bundles: the files are read here, to report what
//! is wrong with them where they are named; what they hold goes to the
//! [`Material`](super::super::material::Material) beside the model.

use super::*;

impl Validator {
    pub(super) fn cert(&mut self, name: Spanned<String>, c: RawCert) -> Option<CertFiles> {
        let (cert_path, key_path) = (self.path(&c.cert), self.path(&c.key));
        let pair = self.cert_pair(&c.cert, &c.key, &cert_path, &key_path)?;
        self.material.add_cert(name.get_ref(), pair);
        Some(CertFiles {
            name: name.into_inner(),
            cert_path,
            key_path,
        })
    }

    /// Load a cert/key pair, pointing any problem at the key that names the
    /// file at fault.
    pub(super) fn cert_pair(
        &mut self,
        cert: &Spanned<String>,
        key: &Spanned<String>,
        cert_path: &Path,
        key_path: &Path,
    ) -> Option<Arc<crate::tls::CertKeyPair>> {
        use crate::tls::TlsError;
        match crate::tls::CertKeyPair::load(cert_path, key_path) {
            Ok(pair) => Some(Arc::new(pair)),
            Err(e) => {
                let (span, fix) = match &e {
                    TlsError::Read { path, .. } if path == key_path => {
                        (key.span(), "check the path (relative paths start at the config file's directory) and that meshgate may read it")
                    }
                    TlsError::Read { .. } => (cert.span(), "check the path (relative paths start at the config file's directory) and that meshgate may read it"),
                    TlsError::BadKey { .. } => (key.span(), "give a PEM private key (-----BEGIN PRIVATE KEY----- or EC/RSA PRIVATE KEY), unencrypted"),
                    TlsError::Mismatch { .. } => (key.span(), "give the key the certificate was issued for"),
                    TlsError::NoCertificate { .. } | TlsError::BadCertificate { .. } => (cert.span(), "give a PEM chain: the leaf certificate first, then intermediates"),
                };
                self.error(span, e.to_string(), fix);
                None
            }
        }
    }

    pub(super) fn ca_bundle(&mut self, p: &Spanned<String>) -> Option<CaBundle> {
        let path = self.path(p);
        match crate::tls::load_certs(&path) {
            Ok(certs) => {
                let der: Vec<u8> = certs
                    .iter()
                    .flat_map(|c| c.to_der().unwrap_or_default())
                    .collect();
                let fingerprint = boring::hash::hash(boring::hash::MessageDigest::sha256(), &der)
                    .map(|d| d.to_vec())
                    .unwrap_or(der);
                self.material.add_ca(&path, certs);
                Some(CaBundle { path, fingerprint })
            }
            Err(e) => {
                self.error(
                    p.span(),
                    e.to_string(),
                    "give a PEM file of one or more CA certificates",
                );
                None
            }
        }
    }
}
