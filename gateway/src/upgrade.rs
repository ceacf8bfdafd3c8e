//! A binary upgrade the running gateway starts itself (SIGUSR2, or
//! `POST /upgrade` for `meshgate upgrade`), so that it works under systemd.
//!
//! A new process must be a child of the unit's processes to run in its
//! cgroup; one started from a shell is not. Here the running gateway starts
//! `meshgate run -c FILE --upgrade` from the binary it was started as (after
//! a package upgrade, the new one), waits until that process has read and
//! validated its config and waits on `gateway.upgrade_socket`, then hands
//! its listening sockets over as at SIGQUIT and drains. The new process
//! tells systemd it is the service's main process now (`MAINPID=`, with
//! `READY=1`, once its listeners accept; the unit needs `NotifyAccess=all`).
//! A new process that exits before it waits (an invalid config, a binary
//! that does not start) aborts the upgrade: this one keeps serving.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

/// How long the new process may take to load its config and wait for the
/// sockets.
const START_WAIT: Duration = Duration::from_secs(30);

/// The binary this process was started as, read at start: once a package
/// upgrade has replaced the file, `/proc/self/exe` names a deleted one.
static EXE: OnceLock<Option<PathBuf>> = OnceLock::new();

/// Set when an upgrade has handed over (or is handing over): one at a time.
static STARTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("an upgrade is already under way")]
    UnderWay,
    #[error("cannot tell which binary this process runs")]
    NoBinary,
    #[error("cannot start {exe}: {source}")]
    Spawn {
        exe: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the new process exited ({status}) before taking over (its log says why); this one keeps serving")]
    Exited { status: std::process::ExitStatus },
    #[error("the new process did not wait on {socket} within {START_WAIT:?}; it was stopped and this one keeps serving")]
    Slow { socket: String },
}

/// Note the binary this process runs, before anything replaces it.
pub fn remember_binary() {
    EXE.get_or_init(|| std::env::current_exe().ok());
}

/// Start the new process with `config`, wait until it waits on `socket`,
/// and ask for the handover; the new process's id. Blocks: run it off the
/// async workers.
pub fn start(config: &Path, socket: &Path) -> Result<u32, UpgradeError> {
    use std::sync::atomic::Ordering;
    if STARTED.swap(true, Ordering::AcqRel) {
        return Err(UpgradeError::UnderWay);
    }
    let outcome = spawn_and_wait(config, socket);
    match &outcome {
        Ok(pid) => {
            log::info!("upgrade: process {pid} waits for the listening sockets; handing them over");
            crate::lifecycle::ask_for_handover();
        }
        Err(e) => {
            log::error!("upgrade aborted: {e}");
            STARTED.store(false, Ordering::Release);
        }
    }
    outcome
}

fn spawn_and_wait(config: &Path, socket: &Path) -> Result<u32, UpgradeError> {
    let exe = EXE
        .get_or_init(|| std::env::current_exe().ok())
        .clone()
        .ok_or(UpgradeError::NoBinary)?;
    // A file left by an earlier upgrade would look like the new process
    // waiting.
    let _ = std::fs::remove_file(socket);
    let mut child = Command::new(&exe)
        .arg("run")
        .arg("-c")
        .arg(config)
        .arg("--upgrade")
        .env(crate::notify::UPGRADE_FROM, std::process::id().to_string())
        // The watchdog is the new main process's to feed once it says
        // MAINPID=; systemd's WATCHDOG_PID names this one.
        .env_remove("WATCHDOG_PID")
        .stdin(Stdio::null())
        .spawn()
        .map_err(|source| UpgradeError::Spawn {
            exe: exe.display().to_string(),
            source,
        })?;
    log::info!(
        "upgrade: started {} run -c {} --upgrade (process {})",
        exe.display(),
        config.display(),
        child.id()
    );
    let started = Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(UpgradeError::Exited { status });
        }
        // Pingora binds the socket once the config is valid and the process
        // is about to wait for the sockets.
        if socket.exists() {
            return Ok(child.id());
        }
        if started.elapsed() > START_WAIT {
            let _ = child.kill();
            let _ = child.wait();
            return Err(UpgradeError::Slow {
                socket: socket.display().to_string(),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts an upgrade at SIGUSR2; runs as a Pingora background service.
pub struct UpgradeOnSigusr2 {
    pub config: PathBuf,
    pub socket: PathBuf,
}

#[async_trait]
impl BackgroundService for UpgradeOnSigusr2 {
    async fn start(&self, shutdown: ShutdownWatch) {
        use tokio::signal::unix::SignalKind;
        let upgrade = || async {
            log::info!("SIGUSR2: starting a binary upgrade");
            let (config, socket) = (self.config.clone(), self.socket.clone());
            // Errors are logged by `start`.
            let _ = tokio::task::spawn_blocking(move || start(&config, &socket)).await;
        };
        let without = "upgrades by signal disabled";
        crate::shutdown::on_each_signal(
            SignalKind::user_defined2(),
            "SIGUSR2",
            without,
            shutdown,
            upgrade,
        )
        .await;
    }
}
