//! Signals that stop the process, with SIGTERM's optional delay.
//!
//! Pingora closes its listeners as soon as SIGTERM arrives. A load balancer
//! that still sends new connections until its health check fails would see
//! them refused. With `gateway.shutdown_delay`, SIGTERM first marks the
//! process as draining: `/readyz` answers 503 and kept-alive connections are
//! closed after their next response, HTTP/2 connections get a GOAWAY (their
//! streams in flight finish; the client opens a new connection for more),
//! while the listeners keep accepting.
//! Once the delay has passed (or at a second SIGTERM) Pingora's graceful
//! shutdown runs as before. SIGINT still stops at once. SIGQUIT is
//! Pingora's graceful upgrade: the listening sockets go to the new process
//! waiting on `gateway.upgrade_socket` (`meshgate run --upgrade`), and this
//! one drains as for SIGTERM (kept-alive connections close after their
//! next response, so clients move over) and exits. An upgrade this process
//! starts itself ([`crate::upgrade`]) hands over the same way.

use std::sync::Arc;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::server::{ShutdownSignal, ShutdownSignalWatch, ShutdownWatch};
use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::runtime::Runtime;

/// Pingora's signals, with `gateway.shutdown_delay` before a SIGTERM's
/// graceful shutdown (read when the signal comes, so a reload applies).
pub struct DelayedTerminate {
    pub runtime: Arc<ArcSwap<Runtime>>,
}

/// A stream of `kind`, or none (a signal never received) if the handler
/// cannot be installed. Either way readiness no longer waits for it.
fn listen(kind: SignalKind, name: &str) -> Option<Signal> {
    let s = signal(kind)
        .inspect_err(|e| log::error!("cannot listen for {name}: {e}"))
        .ok();
    crate::lifecycle::handling_signal(kind);
    s
}

/// Run `on` at each `kind` signal (`name` in the log) until `shutdown`
/// changes. When the handler cannot be installed, says so, with what
/// goes missing (`without`), and returns.
pub async fn on_each_signal<F, Fut>(
    kind: SignalKind,
    name: &str,
    without: &str,
    mut shutdown: ShutdownWatch,
    mut on: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let installed = signal(kind);
    // Readiness waits for the handler, not for one that cannot come.
    crate::lifecycle::handling_signal(kind);
    let mut signals = match installed {
        Ok(s) => s,
        Err(e) => {
            log::error!("cannot listen for {name}, {without}: {e}");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = signals.recv() => on().await,
            _ = shutdown.changed() => return,
        }
    }
}

async fn next(s: &mut Option<Signal>) {
    match s {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}

/// Drain while a new process takes the sockets over. The service is not
/// stopping (no `STOPPING=1`): under systemd the new process becomes its
/// main process.
fn hand_over() -> ShutdownSignal {
    crate::lifecycle::begin_handover();
    crate::notify::handing_over();
    ShutdownSignal::GracefulUpgrade
}

#[async_trait]
impl ShutdownSignalWatch for DelayedTerminate {
    async fn recv(&self) -> ShutdownSignal {
        let mut quit = listen(SignalKind::quit(), "SIGQUIT");
        let mut term = listen(SignalKind::terminate(), "SIGTERM");
        let mut int = listen(SignalKind::interrupt(), "SIGINT");
        let signal = tokio::select! {
            () = next(&mut quit) => {
                // A new process (`run --upgrade`) takes the sockets over;
                // this one drains and exits.
                log::info!("SIGQUIT: handing the listening sockets to the new meshgate, then draining");
                return hand_over();
            }
            () = crate::lifecycle::handover_asked() => {
                log::info!("upgrade: handing the listening sockets to the new meshgate, then draining");
                return hand_over();
            }
            () = next(&mut int) => ShutdownSignal::FastShutdown,
            () = next(&mut term) => ShutdownSignal::GracefulTerminate,
        };
        crate::lifecycle::begin_drain();
        crate::notify::stopping();
        if !matches!(signal, ShutdownSignal::GracefulTerminate) {
            return signal;
        }
        let delay = self.runtime.load().config.gateway.shutdown_delay;
        if delay.is_zero() {
            return ShutdownSignal::GracefulTerminate;
        }
        log::info!(
            "SIGTERM: draining for {} (gateway.shutdown_delay): /readyz answers 503, listeners still accept; then graceful shutdown",
            humantime::format_duration(delay)
        );
        let end = tokio::time::sleep(delay);
        tokio::pin!(end);
        loop {
            tokio::select! {
                () = &mut end => break ShutdownSignal::GracefulTerminate,
                () = next(&mut term) => {
                    log::info!("second SIGTERM: the delay ends now");
                    break ShutdownSignal::GracefulTerminate;
                }
                () = next(&mut int) => break ShutdownSignal::FastShutdown,
                () = next(&mut quit) => {}
            }
        }
    }
}
