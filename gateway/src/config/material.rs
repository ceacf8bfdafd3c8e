//! What the config's files hold, loaded beside the model: certificate
//! chains with their private keys, and CA bundles. The model names the
//! files (plain data, safe to print); this holds what they held when the
//! config was loaded, for the runtime to serve. Its `Debug` shows no key.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use boring::x509::X509;

use super::model::{CaBundle, Config};
use crate::tls::{bundle_warnings, chain_warnings, CertKeyPair};

#[derive(Default)]
pub struct Material {
    /// `[certs]` pairs, by name.
    certs: HashMap<String, Arc<CertKeyPair>>,
    /// Upstreams' client certificates, by upstream name.
    upstream_clients: HashMap<String, Arc<CertKeyPair>>,
    /// CA bundles, by path.
    cas: HashMap<PathBuf, Arc<Vec<X509>>>,
}

impl std::fmt::Debug for Material {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Material")
            .field("certs", &self.certs.keys().collect::<Vec<_>>())
            .field(
                "upstream_clients",
                &self.upstream_clients.keys().collect::<Vec<_>>(),
            )
            .field("cas", &self.cas.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Material {
    pub(super) fn add_cert(&mut self, name: &str, pair: Arc<CertKeyPair>) {
        self.certs.insert(name.to_string(), pair);
    }

    pub(super) fn add_upstream_client(&mut self, upstream: &str, pair: Arc<CertKeyPair>) {
        self.upstream_clients.insert(upstream.to_string(), pair);
    }

    pub(super) fn add_ca(&mut self, path: &Path, certs: Vec<X509>) {
        self.cas.insert(path.to_path_buf(), Arc::new(certs));
    }

    /// The pair of `[certs.NAME]`.
    pub fn cert(&self, name: &str) -> Option<&Arc<CertKeyPair>> {
        self.certs.get(name)
    }

    /// The client certificate of `[upstreams.NAME]`.
    pub fn upstream_client(&self, upstream: &str) -> Option<&Arc<CertKeyPair>> {
        self.upstream_clients.get(upstream)
    }

    /// The certificates of a CA bundle the config names (none if it was
    /// not loaded with this config, which validation rules out).
    pub fn ca(&self, bundle: &CaBundle) -> Arc<Vec<X509>> {
        self.cas.get(&bundle.path).cloned().unwrap_or_default()
    }

    /// Certificates clients will refuse, or soon: past their `notAfter` or
    /// within a week of it, or before their `notBefore`, anywhere in a
    /// served chain or a CA bundle; and `client_ca` entries that are no CA.
    /// One line each, for `check` and the log. Warnings, not errors: the
    /// client decides, and a reload must not be refused because a
    /// certificate expired.
    pub fn warnings(&self, config: &Config, now: std::time::SystemTime) -> Vec<String> {
        let mut out = Vec::new();
        for c in &config.certs {
            if let Some(pair) = self.cert(&c.name) {
                out.extend(chain_warnings(
                    &format!("certs.{}", c.name),
                    &c.cert_path,
                    &pair.chain,
                    now,
                ));
            }
        }
        for l in &config.listeners {
            if let Some(ca) = l.tls.as_ref().and_then(|t| t.client_ca.as_ref()) {
                out.extend(bundle_warnings(
                    &format!("listeners.{}.tls.client_ca", l.name),
                    &ca.path,
                    &self.ca(ca),
                    true,
                    now,
                ));
            }
        }
        for u in &config.upstreams {
            let Some(tls) = &u.tls else { continue };
            if let (Some(client), Some(pair)) = (&tls.client, self.upstream_client(&u.name)) {
                out.extend(chain_warnings(
                    &format!("upstreams.{}.tls", u.name),
                    &client.cert_path,
                    &pair.chain,
                    now,
                ));
            }
            if let Some(ca) = &tls.ca {
                out.extend(bundle_warnings(
                    &format!("upstreams.{}.tls.ca", u.name),
                    &ca.path,
                    &self.ca(ca),
                    false,
                    now,
                ));
            }
        }
        out
    }
}
