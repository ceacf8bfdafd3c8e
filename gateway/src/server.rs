//! Assembling and running the pingora server from a validated config.

use std::net::TcpListener;
use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use pingora::apps::HttpServerOptions;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server};
use pingora::services::background::background_service;
use pingora::services::listening::Service;

use crate::admin::AdminApp;
use crate::config::model::{AccessLogFormat, Config};
use crate::config::Loaded;
use crate::proxy::Proxy;
use crate::reload::ReloadOnSighup;
use crate::runtime::Runtime;
use crate::telemetry::access_log::{self, Sink};
use crate::telemetry::metrics::metrics;
use crate::telemetry::tracing::Tracing;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Tracing(#[from] crate::telemetry::tracing::TracingError),
    #[error("cannot open the access log {path}: {source}")]
    AccessLog {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] crate::downstream::tls::ListenerTlsError),
    #[error("cannot bind {what} {addr}: {source} (is another process using the port?)")]
    Bind {
        what: String,
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Fail early with a clear message when a port is taken, instead of a panic
/// deep inside the listener start-up.
fn check_binds(config: &Config) -> Result<(), ServerError> {
    let admin = std::iter::once(("admin listener".to_string(), config.admin.listen));
    let listeners = config
        .listeners
        .iter()
        .map(|l| (format!("listener `{}`", l.name), l.bind));
    for (what, addr) in admin.chain(listeners) {
        TcpListener::bind(addr).map_err(|source| ServerError::Bind { what, addr, source })?;
    }
    Ok(())
}

/// Pingora's message when a service cannot open its listening sockets.
const LISTENERS_FAILED: &str = "Failed to build listeners";

/// Whether a panic's message is Pingora failing to open a service's
/// listening sockets.
fn is_listener_failure(message: &str) -> bool {
    message.starts_with(LISTENERS_FAILED)
}

/// A port can still be taken between [`check_binds`] and Pingora's own
/// bind, which then panics in that service's thread only: the process
/// would run on without the listener, and `/readyz`, which connects to its
/// address, would be answered by whoever took the port. Such a panic ends
/// the process instead, with the error, as a taken port does at start.
fn exit_when_a_listener_fails() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if is_listener_failure(message) {
            eprintln!(
                "meshgate: cannot open a listener: {message} (is another process using the port?)"
            );
            std::process::exit(1);
        }
        previous(info);
    }));
}

/// Start every listener and serve until a shutdown signal: SIGTERM drains
/// (graceful), SIGINT stops at once.
/// `upgrade`: take the listening sockets over from a running meshgate
/// (they are in use, so they are not tried first).
pub fn run(loaded: Loaded, path: &Path, upgrade: bool) -> Result<(), ServerError> {
    let config = &loaded.config;
    if !upgrade {
        check_binds(config)?;
    }
    exit_when_a_listener_fails();
    start_access_log(config)?;
    // Before any runtime exists: the exporter's blocking HTTP client needs that.
    let tracing = config
        .telemetry
        .tracing
        .as_ref()
        .map(|t| Tracing::start(t, &config.gateway.name))
        .transpose()?
        .map(Arc::new);
    metrics().config_loaded(1, &config.source_hash);
    let conf = ServerConf {
        threads: config.gateway.workers.unwrap_or_else(num_workers),
        work_stealing: config.gateway.work_stealing,
        grace_period_seconds: Some(config.gateway.shutdown_grace_period.as_secs_f64().ceil() as u64),
        graceful_shutdown_timeout_seconds: Some(1),
        // Where SIGQUIT hands the listening sockets to a new process, and
        // where `run --upgrade` waits for them.
        upgrade_sock: config.gateway.upgrade_socket.display().to_string(),
        ..ServerConf::default()
    };
    if upgrade {
        log::info!(
            "waiting for the running meshgate's listening sockets on {} (send it SIGQUIT)",
            config.gateway.upgrade_socket.display()
        );
    }
    let opt = pingora::server::configuration::Opt {
        upgrade,
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(Some(opt), conf);
    server.bootstrap();

    let admin_addr = config.admin.listen;
    let upgrade_socket = config.gateway.upgrade_socket.clone();
    let listeners = config.listeners.clone();
    log::info!(
        "meshgate `{}` starting: {} listener(s), {} route(s), {} upstream(s); admin on http://{admin_addr}",
        config.gateway.name,
        config.listeners.len(),
        config.routes.len(),
        config.upstreams.len()
    );
    for warning in loaded.warnings(std::time::SystemTime::now()) {
        log::warn!("{warning}");
    }
    crate::downstream::keepalive::PENDING_HEADS.set_budget(config.gateway.max_pending_head_bytes);
    let runtime = Arc::new(ArcSwap::from_pointee(Runtime::build(loaded, 1)));

    let mut proxy = pingora::proxy::http_proxy(
        &server.configuration,
        Proxy::new(runtime.clone(), tracing.clone()),
    );
    let mut options = HttpServerOptions::default();
    // Plain listeners accept HTTP/1.1 and HTTP/2 with prior knowledge.
    options.h2c = true;
    // One proxy service serves every listener: the longest idle timeout wins
    // for HTTP/2 connections (HTTP/1 ones use their listener's own).
    options.h2_idle_timeout = listeners.iter().map(|l| l.limits.idle_timeout).max();
    proxy.server_options = Some(options);
    // An HTTP/2 head is refused by the h2 layer once past the largest
    // listener's limit, before it is decoded whole; the proxy then holds
    // each request to its own listener's.
    let mut h2 = pingora::protocols::http::v2::server::default_h2_options();
    if let Some(max) = listeners
        .iter()
        .map(|l| l.limits.max_request_header_bytes)
        .max()
    {
        h2.max_header_list_size(u32::try_from(max).unwrap_or(u32::MAX));
    }
    proxy.h2_options = Some(h2);
    // One proxy app (and so one upstream connection pool) for every
    // listener; each listener its own listening service, so that its
    // accept loop has its own filter (`max_connections`: a full listener
    // accepts nothing until a connection ends) and a reload can start and
    // stop it; all of them on one runtime.
    let listening = crate::listening::Listeners::new(Arc::new(proxy), runtime.clone());
    let listener_service = crate::listening::ListenerService {
        listeners: listening.clone(),
        threads: server.configuration.threads,
        also_bound: vec![admin_addr],
    };
    let overload = background_service(
        "overload",
        crate::background::OverloadWatch {
            runtime: runtime.clone(),
        },
    );

    let reloader = background_service(
        "config reload",
        ReloadOnSighup {
            path: path.to_path_buf(),
            runtime: runtime.clone(),
            listeners: listening.clone(),
        },
    );
    let evictor = background_service(
        "rate-limit key eviction",
        crate::background::EvictIdleKeys {
            runtime: runtime.clone(),
        },
    );
    let cert_watcher = background_service(
        "certificate files",
        crate::background::WatchCertFiles {
            runtime: runtime.clone(),
        },
    );
    let endpoints = background_service(
        "endpoints",
        crate::background::WatchEndpoints {
            runtime: runtime.clone(),
        },
    );
    let lane_pools = background_service(
        "fast lane upstream connections",
        crate::background::SweepIdleUpstreams,
    );
    crate::upgrade::remember_binary();
    let upgrader = background_service(
        "binary upgrade",
        crate::upgrade::UpgradeOnSigusr2 {
            config: path.to_path_buf(),
            socket: upgrade_socket.clone(),
        },
    );
    let notify = background_service(
        "systemd notify",
        crate::notify::Notify {
            runtime: runtime.clone(),
        },
    );
    let shutdown_runtime = runtime.clone();
    let mut admin = Service::new(
        "meshgate admin".to_string(),
        AdminApp::new(runtime, path.to_path_buf(), listening, upgrade_socket),
    );
    admin.add_tcp(&admin_addr.to_string());
    admin.threads = Some(1);

    server.add_service(listener_service);
    server.add_service(overload);
    server.add_service(admin);
    server.add_service(reloader);
    server.add_service(evictor);
    server.add_service(endpoints);
    server.add_service(lane_pools);
    server.add_service(notify);
    server.add_service(upgrader);
    server.add_service(cert_watcher);
    ignore_sighup_until_handled();
    server.run(RunArgs {
        shutdown_signal: Box::new(crate::shutdown::DelayedTerminate {
            runtime: shutdown_runtime,
        }),
    });
    if let Some(t) = tracing {
        t.shutdown();
    }
    access_log::flush(std::time::Duration::from_secs(2));
    log::info!("meshgate stopped");
    Ok(())
}

/// The access-log writer starts only when some format is on, so `off` costs nothing.
fn start_access_log(config: &Config) -> Result<(), ServerError> {
    if config.telemetry.access_log == AccessLogFormat::Off {
        return Ok(());
    }
    let sink = Sink::of(&config.telemetry);
    access_log::init(&sink).map_err(|source| ServerError::AccessLog {
        path: config
            .telemetry
            .access_log_file
            .as_ref()
            .map_or("(stdout)".to_string(), |p| p.display().to_string()),
        source,
    })
}

fn num_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// SIGHUP's default action ends the process. Register tokio's handler before
/// the services start, so a SIGHUP that arrives before the reload service
/// listens is dropped instead of killing the gateway.
fn ignore_sighup_until_handled() {
    use tokio::signal::unix::{signal, SignalKind};
    let registered = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .and_then(|rt| rt.block_on(async { signal(SignalKind::hangup()).map(drop) }));
    if let Err(e) = registered {
        log::warn!("cannot register a SIGHUP handler: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pingoras_listener_failure_is_recognised() {
        // The panic Pingora raises (`.expect(...)` on the build of a
        // service's listeners) starts with its message.
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let again = std::net::TcpListener::bind(taken.local_addr().unwrap());
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            again.expect(LISTENERS_FAILED);
        }))
        .unwrap_err();
        let message = caught.downcast_ref::<String>().unwrap();
        assert!(is_listener_failure(message), "{message}");
        assert!(!is_listener_failure(
            "called `Option::unwrap()` on a `None` value"
        ));
    }
}
