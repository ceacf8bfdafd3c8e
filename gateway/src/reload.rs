//! Config reload on SIGHUP: read and validate the file again, and swap the
//! compiled runtime whole; listeners the file adds, removes or moves start
//! and stop ([`crate::listening`]). A file that fails validation, binds a
//! port in use, or changes what only a restart can (the admin listener,
//! the worker threads, ...), is rejected and the old config keeps serving.

use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use crate::config;
use crate::config::model::{AccessLogFormat, Config};
use crate::listening::Listeners;
use crate::runtime::Runtime;
use crate::telemetry::access_log;
use crate::telemetry::metrics::metrics;

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Invalid(#[from] config::ConfigError),
    #[error(
        "{0}: these change only on restart (docs/operations.md); the old config keeps serving"
    )]
    NeedsRestart(String),
    #[error("{}; the old config keeps serving", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Listeners(Vec<crate::listening::ListenersError>),
    #[error("the reload did not finish: {0}")]
    Failed(String),
}

/// One reload at a time: SIGHUP and `POST /reload` may come together.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A reload that took: the new generation, and a line per listener it
/// started, stopped or moved.
#[derive(Debug)]
pub struct Reloaded {
    pub generation: u64,
    pub listeners: Vec<String>,
}

/// Validate `path` and, when it can be applied live, swap it in and start
/// and stop the listeners it changes.
pub fn reload(
    path: &std::path::Path,
    runtime: &ArcSwap<Runtime>,
    listeners: &Listeners,
) -> Result<Reloaded, ReloadError> {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let new = config::load(path)?;
    let current = runtime.load();
    restart_only_unchanged(&current.config, &new).map_err(ReloadError::NeedsRestart)?;
    let warnings = new.warnings(std::time::SystemTime::now());
    let generation = current.generation + 1;
    let next = Runtime::build_after(new, generation, Some(&current));
    // Sockets bound (or a port in use found) before anything changes; the
    // plan closes them when dropped.
    let plan = listeners
        .plan(&next.config, &next)
        .map_err(ReloadError::Listeners)?;
    let telemetry = &next.config.telemetry;
    if telemetry.access_log != AccessLogFormat::Off {
        // Starts the writer if logging was off; refuses a new destination.
        access_log::init(&access_log::Sink::of(telemetry))
            .map_err(|e| ReloadError::NeedsRestart(e.to_string()))?;
    }
    for warning in warnings {
        log::warn!("{warning}");
    }
    crate::downstream::keepalive::PENDING_HEADS
        .set_budget(next.config.gateway.max_pending_head_bytes);
    metrics().config_loaded(generation, &next.config.source_hash);
    runtime.store(Arc::new(next));
    let changes = plan.changes();
    listeners.apply(plan);
    Ok(Reloaded {
        generation,
        listeners: changes,
    })
}

/// What only a restart changes. All of them are named, so one restart
/// covers every change the operator made rather than one rejected reload
/// per key.
fn restart_only_unchanged(old: &Config, new: &Config) -> Result<(), String> {
    let mut changed = Vec::new();
    if old.gateway.workers != new.gateway.workers {
        changed.push("gateway.workers changed".to_string());
    }
    if old.gateway.work_stealing != new.gateway.work_stealing {
        changed.push("gateway.work_stealing changed".to_string());
    }
    if old.telemetry.access_log_file != new.telemetry.access_log_file {
        changed.push("telemetry.access_log_file changed".to_string());
    }
    if old.telemetry.tracing != new.telemetry.tracing {
        changed.push("[telemetry.tracing] changed".to_string());
    }
    if old.gateway.shutdown_grace_period != new.gateway.shutdown_grace_period {
        changed.push("gateway.shutdown_grace_period changed".to_string());
    }
    if old.admin.listen != new.admin.listen {
        changed.push(format!(
            "admin.listen changed from {} to {}",
            old.admin.listen, new.admin.listen
        ));
    }
    if changed.is_empty() {
        Ok(())
    } else {
        Err(changed.join("; "))
    }
}

/// Reload off the async workers (reading files and looking up names
/// block), count it and log it: what SIGHUP and `POST /reload` both do.
pub async fn reload_and_log(
    path: PathBuf,
    runtime: Arc<ArcSwap<Runtime>>,
    listeners: Arc<Listeners>,
) -> Result<Reloaded, ReloadError> {
    let shown = path.display().to_string();
    crate::notify::reloading();
    let rt = runtime.clone();
    let reloaded = tokio::task::spawn_blocking(move || reload(&path, &rt, &listeners))
        .await
        .unwrap_or_else(|e| Err(ReloadError::Failed(e.to_string())));
    let first_error = reloaded
        .as_ref()
        .err()
        .map(|e| e.to_string().lines().next().unwrap_or_default().to_string());
    crate::notify::reloaded(&runtime.load(), first_error.as_deref());
    match &reloaded {
        Ok(Reloaded {
            generation,
            listeners,
        }) => {
            for change in listeners {
                log::info!("{change}");
            }
            metrics()
                .config_reloads
                .with_label_values(&["success"])
                .inc();
            log::info!("config reloaded from {shown} (generation {generation})");
        }
        Err(e) => {
            metrics()
                .config_reloads
                .with_label_values(&["failure"])
                .inc();
            log::error!("config reload rejected, old config keeps serving:\n{e}");
        }
    }
    reloaded
}

/// Waits for SIGHUP and reloads; runs as a pingora background service.
pub struct ReloadOnSighup {
    pub path: PathBuf,
    pub runtime: Arc<ArcSwap<Runtime>>,
    pub listeners: Arc<Listeners>,
}

#[async_trait]
impl BackgroundService for ReloadOnSighup {
    async fn start(&self, shutdown: ShutdownWatch) {
        use tokio::signal::unix::SignalKind;
        // Reading files and looking up names block: off the async workers.
        let reload = || async {
            let _ = reload_and_log(
                self.path.clone(),
                self.runtime.clone(),
                self.listeners.clone(),
            )
            .await;
        };
        crate::shutdown::on_each_signal(
            SignalKind::hangup(),
            "SIGHUP",
            "reload disabled",
            shutdown,
            reload,
        )
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::listening::needs_start;

    fn parse(src: &str) -> Config {
        config::parse(std::path::Path::new("t.toml"), src)
            .unwrap()
            .config
    }

    #[test]
    fn every_restart_only_change_is_named() {
        let base = "[listeners.public]\nbind = \"127.0.0.1:18080\"\n";
        let old = parse(&format!("[gateway]\nworkers = 2\n{base}"));
        let same = parse(&format!("[gateway]\nworkers = 2\n{base}"));
        assert_eq!(restart_only_unchanged(&old, &same), Ok(()));
        let new = parse(
            "[gateway]\nworkers = 4\n[admin]\nlisten = \"127.0.0.1:19901\"\n[listeners.public]\nbind = \"127.0.0.1:18081\"\n",
        );
        let why = restart_only_unchanged(&old, &new).unwrap_err();
        for part in [
            "gateway.workers changed",
            "admin.listen changed from 127.0.0.1:9901 to 127.0.0.1:19901",
        ] {
            assert!(why.contains(part), "{part} missing from: {why}");
        }
        // Listeners are the reload's to start and stop.
        assert!(!why.contains("listeners"), "{why}");
        let renamed =
            parse("[gateway]\nworkers = 2\n[listeners.edge]\nbind = \"127.0.0.1:18081\"\n");
        assert_eq!(restart_only_unchanged(&old, &renamed), Ok(()));
    }

    /// A self-signed ECDSA certificate and its key, as PEM files in `dir`.
    fn cert_files(dir: &std::path::Path) -> (PathBuf, PathBuf) {
        use boring::{ec, hash, nid::Nid, pkey::PKey, x509};
        let group = ec::EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
        let key = PKey::from_ec_key(ec::EcKey::generate(&group).unwrap()).unwrap();
        let mut name = x509::X509NameBuilder::new().unwrap();
        name.append_entry_by_nid(Nid::COMMONNAME, "edge.test")
            .unwrap();
        let name = name.build();
        let mut b = x509::X509::builder().unwrap();
        b.set_version(2).unwrap();
        b.set_subject_name(&name).unwrap();
        b.set_issuer_name(&name).unwrap();
        b.set_pubkey(&key).unwrap();
        b.set_not_before(&boring::asn1::Asn1Time::days_from_now(0).unwrap())
            .unwrap();
        b.set_not_after(&boring::asn1::Asn1Time::days_from_now(30).unwrap())
            .unwrap();
        b.sign(&key, hash::MessageDigest::sha256()).unwrap();
        let (cert, key_path) = (dir.join("edge.pem"), dir.join("edge.key"));
        std::fs::write(&cert, b.build().to_pem().unwrap()).unwrap();
        std::fs::write(&key_path, key.private_key_to_pem_pkcs8().unwrap()).unwrap();
        (cert, key_path)
    }

    #[test]
    fn tls_changes_start_the_listener_again() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = cert_files(dir.path());
        let listener = |tls: &str| {
            parse(&format!(
                "[certs.edge]\ncert = \"{}\"\nkey = \"{}\"\n[listeners.public]\nbind = \"127.0.0.1:18080\"\n{tls}",
                cert.display(),
                key.display()
            ))
        };
        let plain = listener("");
        let tls = listener("tls = { certs = [\"edge\"] }\n");
        let only = |c: &Config| c.listeners[0].clone();
        assert_eq!(restart_only_unchanged(&tls, &plain), Ok(()));
        assert!(!needs_start(&only(&tls), &only(&tls)));
        assert!(needs_start(&only(&plain), &only(&tls)));
        assert!(needs_start(&only(&tls), &only(&plain)));
        for changed in [
            "min_version = \"1.3\"",
            "alpn = [\"h2\"]",
            "session_tickets = 2",
        ] {
            let changed = listener(&format!("tls = {{ certs = [\"edge\"], {changed} }}\n"));
            assert!(needs_start(&only(&tls), &only(&changed)));
        }
        // The certificates served are chosen per handshake: no new context.
        let other = listener(&format!(
            "tls = {{ certs = [\"other\"] }}\n[certs.other]\ncert = \"{}\"\nkey = \"{}\"\n",
            cert.display(),
            key.display()
        ));
        assert!(!needs_start(&only(&tls), &only(&other)));
    }
}
