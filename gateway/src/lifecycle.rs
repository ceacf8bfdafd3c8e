//! Process-wide state every layer may read and the process layer sets:
//! whether the gateway is draining (a stop signal came, or a handover to a
//! new process, which an upgrade asks for here) and whether it is
//! shedding load (memory over `gateway.overload.memory`), and which signals
//! it already handles.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::LazyLock;

use pingora::server::ShutdownWatch;
use tokio::signal::unix::SignalKind;

use crate::telemetry::metrics::metrics;

/// Set once a signal to stop has arrived; never cleared (the process is
/// ending).
static DRAINING: AtomicBool = AtomicBool::new(false);

/// The same, as a watch for HTTP/2 connections, which Pingora shuts down
/// (GOAWAY) when their watch changes. The receiver kept here never reads,
/// so a clone made after the change sees it at once.
static DRAIN: LazyLock<(tokio::sync::watch::Sender<bool>, ShutdownWatch)> =
    LazyLock::new(|| tokio::sync::watch::channel(false));

static OVERLOADED: AtomicBool = AtomicBool::new(false);

/// Whether the process is in SIGTERM's delay, or past it.
pub fn draining() -> bool {
    DRAINING.load(Ordering::Relaxed)
}

/// The watch an HTTP/2 connection is given in place of Pingora's: it
/// changes when a signal to stop arrives, before Pingora's does.
pub fn h2_watch() -> ShutdownWatch {
    DRAIN.1.clone()
}

/// A signal to stop came: drain.
pub fn begin_drain() {
    DRAINING.store(true, Ordering::Relaxed);
    DRAIN.0.send_replace(true);
}

/// Set when the draining is a handover to a new process (a binary
/// upgrade), whose clients are served on there.
static HANDING_OVER: AtomicBool = AtomicBool::new(false);

/// A new process takes the listening sockets over: drain.
pub fn begin_handover() {
    HANDING_OVER.store(true, Ordering::Relaxed);
    begin_drain();
}

/// Whether the process is draining for a handover (not a stop).
pub fn handing_over() -> bool {
    HANDING_OVER.load(Ordering::Relaxed)
}

/// The cue that an upgrade this process started is ready for the
/// listening sockets (the stop-signal watcher then hands them over).
static HANDOVER_ASKED: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// Ask for the listening sockets to be handed over now.
pub fn ask_for_handover() {
    HANDOVER_ASKED.notify_one();
}

/// Done once a handover is asked for.
pub async fn handover_asked() {
    HANDOVER_ASKED.notified().await
}

/// The signals (one bit per number) whose handlers run. Until a handler
/// runs, a signal is lost or takes its default action, which for SIGTERM
/// and SIGUSR2 ends the process: readiness waits for them.
static HANDLED_SIGNALS: AtomicU64 = AtomicU64::new(0);

/// The signals the gateway acts on: stop (TERM, INT), hand over (QUIT),
/// reload (HUP), upgrade (USR2).
fn acted_on() -> [SignalKind; 5] {
    [
        SignalKind::terminate(),
        SignalKind::interrupt(),
        SignalKind::quit(),
        SignalKind::hangup(),
        SignalKind::user_defined2(),
    ]
}

fn bit(kind: SignalKind) -> u64 {
    u32::try_from(kind.as_raw_value())
        .ok()
        .and_then(|n| 1u64.checked_shl(n))
        .unwrap_or(0)
}

/// The handler for `kind` runs (or, logged, cannot be installed).
pub fn handling_signal(kind: SignalKind) {
    HANDLED_SIGNALS.fetch_or(bit(kind), Ordering::Relaxed);
}

/// Whether every signal the gateway acts on has its handler running (so
/// one sent now is acted on): part of being ready.
pub fn signals_handled() -> bool {
    let handled = HANDLED_SIGNALS.load(Ordering::Relaxed);
    acted_on().iter().all(|&k| handled & bit(k) == bit(k))
}

/// Whether the gateway is shedding load now.
pub fn overloaded() -> bool {
    OVERLOADED.load(Ordering::Relaxed)
}

/// Enter or leave overload.
pub fn set_overloaded(on: bool) {
    OVERLOADED.store(on, Ordering::Relaxed);
    metrics().overload_active.set(i64::from(on));
}

/// Count one connection or request refused for overload.
pub fn shed(kind: &str) {
    metrics().overload_shed.with_label_values(&[kind]).inc();
}
