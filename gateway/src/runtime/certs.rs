//! The certificates of `[certs]`, swappable one by one: a background task
//! polls their files and loads a changed pair atomically (cert and key
//! together, checked to match). A broken or half-written pair is reported
//! and the old one keeps serving; the next change is tried again.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;

use crate::config::model::Config;
use crate::config::Material;
use crate::tls::CertKeyPair;

/// The store's name for an upstream's client certificate (not a valid
/// `[certs]` name, so the two never clash).
pub fn upstream_slot(upstream: &str) -> String {
    format!("upstream/{upstream}")
}
use crate::telemetry::metrics::metrics;

/// How often certificate files are checked for changes.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(2);

/// What identifies a version of a file without reading it. The inode and
/// change time catch a rename into place and a copy that keeps the old
/// modification time (`cp -p`, `rsync -t`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
    changed: (i64, i64),
}

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        modified: m.modified().ok(),
        len: m.len(),
        inode: m.ino(),
        changed: (m.ctime(), m.ctime_nsec()),
    })
}

pub struct CertSlot {
    pub name: String,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    current: ArcSwap<CertKeyPair>,
    /// Stamps of (cert, key) last tried, loaded or not.
    seen: Mutex<(Option<Stamp>, Option<Stamp>)>,
}

impl CertSlot {
    pub fn get(&self) -> Arc<CertKeyPair> {
        self.current.load_full()
    }

    /// Load the files again if they changed since the last look. `Some(Ok)`:
    /// reloaded; `Some(Err)`: changed but unusable (the old pair stays).
    pub fn refresh(&self) -> Option<Result<(), crate::tls::TlsError>> {
        let now = (stamp(&self.cert_path), stamp(&self.key_path));
        {
            let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            if *seen == now {
                return None;
            }
            *seen = now;
        }
        let result = CertKeyPair::load(&self.cert_path, &self.key_path).map(|pair| {
            publish_expiry(&self.name, &pair);
            self.current.store(Arc::new(pair));
        });
        Some(result)
    }
}

fn publish_expiry(name: &str, pair: &CertKeyPair) {
    metrics()
        .tls_cert_expiry
        .with_label_values(&[name])
        .set(pair.not_after);
}

/// Every `[certs]` entry of the running config.
pub struct CertStore {
    slots: Vec<CertSlot>,
}

impl CertStore {
    /// From the pairs validation loaded: `[certs]`, and the client
    /// certificates of upstreams (as `upstream/NAME`), so rotated files are
    /// picked up for both.
    pub fn build(config: &Config, material: &Material) -> Self {
        let named = config.certs.iter().filter_map(|c| {
            Some((
                c.name.clone(),
                c.cert_path.clone(),
                c.key_path.clone(),
                material.cert(&c.name)?.clone(),
            ))
        });
        let upstream = config.upstreams.iter().filter_map(|u| {
            let c = u.tls.as_ref()?.client.as_ref()?;
            Some((
                upstream_slot(&u.name),
                c.cert_path.clone(),
                c.key_path.clone(),
                material.upstream_client(&u.name)?.clone(),
            ))
        });
        let slots = named
            .chain(upstream)
            .map(|(name, cert_path, key_path, pair)| {
                publish_expiry(&name, &pair);
                CertSlot {
                    seen: Mutex::new((stamp(&cert_path), stamp(&key_path))),
                    name,
                    cert_path,
                    key_path,
                    current: ArcSwap::from(pair),
                }
            })
            .collect();
        CertStore { slots }
    }

    pub fn get(&self, name: &str) -> Option<&CertSlot> {
        self.slots.iter().find(|s| s.name == name)
    }

    pub fn slots(&self) -> &[CertSlot] {
        &self.slots
    }

    /// Check every slot's files; report what changed.
    pub fn refresh_all(&self) {
        for slot in &self.slots {
            match slot.refresh() {
                None => {}
                Some(Ok(())) => {
                    log::info!(
                        "certificate `{}` reloaded from {}",
                        slot.name,
                        slot.cert_path.display()
                    );
                    let warnings = crate::tls::chain_warnings(
                        &slot.name,
                        &slot.cert_path,
                        &slot.get().chain,
                        std::time::SystemTime::now(),
                    );
                    for warning in warnings {
                        log::warn!("{warning}");
                    }
                    metrics()
                        .tls_cert_reloads
                        .with_label_values(&[slot.name.as_str(), "success"])
                        .inc();
                }
                Some(Err(e)) => {
                    log::error!(
                        "certificate `{}` not reloaded, still serving the previous one: {e}",
                        slot.name
                    );
                    metrics()
                        .tls_cert_reloads
                        .with_label_values(&[slot.name.as_str(), "failure"])
                        .inc();
                }
            }
        }
    }
}

/// The certificates a handshake may use, best first: those whose names cover
/// the SNI (exact names before one-label wildcards such as `*.example.com`),
/// else all, each in list order. BoringSSL then serves the first one the
/// client can verify (an ECDSA or an RSA certificate of the same name, say).
pub fn select<'a>(
    candidates: &'a [Arc<CertKeyPair>],
    sni: Option<&str>,
) -> Vec<&'a Arc<CertKeyPair>> {
    let Some(sni) = sni.map(|s| s.trim_end_matches('.').to_ascii_lowercase()) else {
        return candidates.iter().collect();
    };
    let parent = sni.split_once('.').map(|(_, parent)| parent);
    let exact = |c: &CertKeyPair| c.names.contains(&sni);
    let wildcard = |c: &CertKeyPair| {
        parent.is_some_and(|p| c.names.iter().any(|n| n.strip_prefix("*.") == Some(p)))
    };
    let mut fit: Vec<_> = candidates.iter().filter(|c| exact(c)).collect();
    fit.extend(candidates.iter().filter(|c| !exact(c) && wildcard(c)));
    if fit.is_empty() {
        candidates.iter().collect()
    } else {
        fit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(names: &[&str]) -> Arc<CertKeyPair> {
        // Only `names` matters for selection; the material is a throwaway.
        let key = boring::pkey::PKey::from_ec_key(
            boring::ec::EcKey::generate(
                &boring::ec::EcGroup::from_curve_name(boring::nid::Nid::X9_62_PRIME256V1).unwrap(),
            )
            .unwrap(),
        )
        .unwrap();
        let mut b = boring::x509::X509Builder::new().unwrap();
        b.set_pubkey(&key).unwrap();
        b.set_not_before(&boring::asn1::Asn1Time::days_from_now(0).unwrap())
            .unwrap();
        b.set_not_after(&boring::asn1::Asn1Time::days_from_now(1).unwrap())
            .unwrap();
        b.sign(&key, boring::hash::MessageDigest::sha256()).unwrap();
        let mut pair = CertKeyPair::new(vec![b.build()], key);
        pair.names = names.iter().map(|s| s.to_string()).collect();
        Arc::new(pair)
    }

    #[test]
    fn sni_selection_prefers_exact_then_wildcard_then_default() {
        let list = vec![
            pair(&["default.example"]),
            pair(&["*.example.com"]),
            pair(&["api.example.com"]),
        ];
        let pick = |sni| {
            select(&list, sni)
                .iter()
                .map(|c| c.names[0].as_str())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            pick(Some("api.example.com")),
            ["api.example.com", "*.example.com"]
        );
        assert_eq!(
            pick(Some("API.Example.com.")),
            ["api.example.com", "*.example.com"]
        );
        assert_eq!(pick(Some("www.example.com")), ["*.example.com"]);
        let all = ["default.example", "*.example.com", "api.example.com"];
        assert_eq!(pick(Some("a.b.example.com")), all);
        assert_eq!(pick(Some("other.org")), all);
        assert_eq!(pick(Some("example")), all);
        assert_eq!(pick(None), all);
        assert!(select(&[], Some("x")).is_empty());
    }

    #[test]
    fn every_certificate_for_the_name_is_offered_exact_ones_first() {
        let list = vec![
            pair(&["edge.example"]),
            pair(&["*.example"]),
            pair(&["edge.example", "www.example"]),
        ];
        let pick = |sni| {
            select(&list, Some(sni))
                .into_iter()
                .map(|c| list.iter().position(|l| Arc::ptr_eq(l, c)).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(pick("edge.example"), [0, 2, 1]);
        assert_eq!(pick("www.example"), [2, 1]);
        assert_eq!(pick("api.example"), [1]);
        assert_eq!(pick("other.org"), [0, 1, 2]);
    }
}
