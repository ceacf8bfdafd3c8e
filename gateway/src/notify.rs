//! systemd's service protocol (`Type=notify`, the `sd-notify` crate):
//! `READY=1` once every listener accepts (with `MAINPID=` in a process an
//! upgrade started, [`crate::upgrade`]), `RELOADING=1` (with
//! `MONOTONIC_USEC`) then `READY=1` around each reload, `STOPPING=1` at
//! shutdown, a `STATUS=` line for `systemctl status`, and `WATCHDOG=1`
//! while the runtime runs when the unit sets `WatchdogSec`. Without
//! `NOTIFY_SOCKET` (not under systemd) every call does nothing.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use sd_notify::NotifyState;

use crate::runtime::Runtime;

/// The environment variable that tells a new process an upgrade started
/// it, and from which process ([`crate::upgrade`]): it is the service's
/// main process once it serves.
pub const UPGRADE_FROM: &str = "MESHGATE_UPGRADE_FROM";

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, states) {
        log::warn!("cannot notify systemd: {e}");
    }
}

/// What `systemctl status` shows: the config in use and the listeners.
fn status(rt: &Runtime) -> String {
    let listeners: Vec<String> = rt
        .listeners
        .iter()
        .map(|l| format!("{} {}", l.name, l.bind))
        .collect();
    format!(
        "serving config {} (generation {}); listeners: {}",
        rt.config.source_hash,
        rt.generation,
        listeners.join(", ")
    )
}

/// A reload begins.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// A reload ended, with `rt` serving (the new config, or the old one).
pub fn reloaded(rt: &Runtime, rejected: Option<&str>) {
    let status = match rejected {
        None => status(rt),
        Some(why) => format!("{}; the last reload was rejected: {why}", status(rt)),
    };
    send(&[NotifyState::Ready, NotifyState::Status(&status)]);
}

/// The listening sockets go to a new process, which says `MAINPID=` and
/// `READY=1` once it serves; this one drains.
pub fn handing_over() {
    send(&[NotifyState::Status(
        "handing the listening sockets to a new process, then draining",
    )]);
}

/// Shutdown begins.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// `WatchdogSec` in microseconds, as libsystemd's `sd_watchdog_enabled`
/// reads it: `WATCHDOG_USEC`, for this process unless `WATCHDOG_PID` names
/// another. (The crate's own check also insists on `WATCHDOG_PID`.)
fn watchdog_usec() -> Option<u64> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    let for_us = std::env::var("WATCHDOG_PID")
        .ok()
        .is_none_or(|p| p.parse::<u32>().ok() == Some(std::process::id()));
    (usec > 0 && for_us).then_some(usec)
}

/// How often listeners are probed before `READY=1`.
const PROBE_EVERY: Duration = Duration::from_millis(20);

/// Says `READY=1` once every listener accepts and every signal the
/// gateway acts on has its handler (a reload or stop sent at once must not
/// be lost), then keeps the watchdog fed.
pub struct Notify {
    pub runtime: Arc<ArcSwap<Runtime>>,
}

#[async_trait]
impl BackgroundService for Notify {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        loop {
            let rt = self.runtime.load_full();
            if crate::lifecycle::signals_handled() && rt.probe_listeners().await.is_ok() {
                let status = status(&rt);
                if std::env::var_os(UPGRADE_FROM).is_some() {
                    // Started by the unit's old main process for an
                    // upgrade: this one is the main process now.
                    send(&[
                        NotifyState::MainPid(std::process::id()),
                        NotifyState::Ready,
                        NotifyState::Status(&status),
                    ]);
                } else {
                    send(&[NotifyState::Ready, NotifyState::Status(&status)]);
                }
                break;
            }
            tokio::select! {
                () = tokio::time::sleep(PROBE_EVERY) => {}
                _ = shutdown.changed() => return,
            }
        }
        let Some(usec) = watchdog_usec() else {
            return;
        };
        // Twice per WatchdogSec, as systemd advises.
        let mut tick = tokio::time::interval(Duration::from_micros(usec / 2).max(PROBE_EVERY));
        loop {
            tokio::select! {
                _ = tick.tick() => send(&[NotifyState::Watchdog]),
                _ = shutdown.changed() => return,
            }
        }
    }
}
