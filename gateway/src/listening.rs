//! The listeners, started, stopped and moved while the gateway runs.
//!
//! Pingora starts a server's services once, at start. The listeners are
//! instead one service ([`ListenerService`]) that runs each listener as a
//! listening service of its own (Pingora's for TLS, meshgate's
//! [`PlainService`] for plain HTTP), on its runtime, with a stop signal
//! of its own, so that a reload can change them ([`Listeners::plan`], then
//! [`Listeners::apply`]):
//! - an added listener's socket is bound before the new config is swapped
//!   in: a port in use rejects the reload and the old config keeps serving;
//! - a removed listener stops accepting and drains: idle keep-alive
//!   connections close, HTTP/2 ones get a GOAWAY, requests in flight finish;
//! - a changed bind is both, the new address accepting before the old one
//!   stops;
//! - a listener whose TLS context is built at its start (TLS added or
//!   removed, `min_version`, `alpn`, `session_tickets`, a client CA added or
//!   removed) starts again on a duplicate of its own socket, so the kernel's
//!   queue of new connections is never closed: the old service stops
//!   accepting, the new one takes over the queue once the old one's accept
//!   loops have ended (the reload returns then), and no connection is
//!   refused while the old context's connections drain.
//!
//! Every listening socket is in Pingora's table of them, which SIGQUIT
//! hands to a new process (`meshgate run --upgrade`): listeners a reload
//! added go along, removed ones do not.

use std::net::SocketAddr;
use std::os::fd::{BorrowedFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::listeners::ListenerConfig;
use pingora::protocols::l4::stream::L4BufferSettings;
use pingora::proxy::HttpProxy;
use pingora::server::{Fds, ListenFds, ShutdownWatch};
use pingora::services::listening::Service;
use pingora::services::Service as ServiceTrait;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::model::{Config, Listener};
use crate::downstream::accept::PlainService;
use crate::downstream::admission::Admission;
use crate::proxy::Proxy;
use crate::runtime::Runtime;

/// Pingora's L4 read buffer in front of each TLS client socket. Its
/// default, 64 KiB, is allocated zero-filled per connection and stays
/// resident for as long as the connection is open (docs/performance.md).
/// BoringSSL reads a record header and then the record, so TLS keeps one
/// record's worth. Plain sockets have none ([`PlainService`]): every read
/// of theirs goes to a larger buffer of its reader's.
const TLS_READ_BUFFER: usize = 16 * 1024;

/// Longest a listener starting again on its socket waits for the service
/// before it to end.
const HANDOVER_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ListenersError {
    #[error(
        "cannot bind listener `{name}` on {addr}: {source} (is another process using the port?)"
    )]
    Bind {
        name: String,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot bind listener `{name}` on {addr}: listener `{holder}` still accepts on {held}, which overlaps it (a wildcard and an address on one port); change it in two reloads, through another port, or restart")]
    Overlaps {
        name: String,
        addr: SocketAddr,
        holder: String,
        held: SocketAddr,
    },
    #[error("cannot take over the socket of listener `{name}` on {addr}: {source}")]
    Duplicate {
        name: String,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] crate::downstream::tls::ListenerTlsError),
}

type ProxyApp = HttpProxy<Proxy>;

/// Every listener of the process.
pub struct Listeners {
    proxy: Arc<ProxyApp>,
    runtime: Arc<ArcSwap<Runtime>>,
    live: Mutex<Live>,
}

#[derive(Default)]
struct Live {
    /// Set once the service runs.
    started: Option<Started>,
    running: Vec<Running>,
    /// Listeners told to stop whose accept loops may not have ended yet
    /// (their sockets are open until they do), by address.
    stopping: Vec<(SocketAddr, JoinHandle<()>)>,
}

struct Started {
    /// Pingora's table of listening sockets, by bind address.
    fds: ListenFds,
    handle: tokio::runtime::Handle,
    tasks_per_fd: usize,
}

/// A listener accepting now.
struct Running {
    config: Listener,
    admission: Arc<Admission>,
    stop: watch::Sender<bool>,
    done: JoinHandle<()>,
}

/// What a reload changes, its sockets bound: applied once the new config
/// is in, dropped (closing them) when the reload fails after all.
#[derive(Default)]
pub struct Plan {
    start: Vec<Start>,
    /// Running listeners to stop: their names and addresses.
    stop: Vec<(String, SocketAddr)>,
    /// Made before the service started: nothing to change then.
    before_start: bool,
}

struct Start {
    config: Listener,
    /// `None`: a socket Pingora's table holds already and no listener uses
    /// (one handed over by the process this one upgraded).
    socket: Option<OwnedFd>,
    service: Box<dyn ServiceTrait>,
    admission: Arc<Admission>,
}

impl Plan {
    /// What the plan changes, a line per listener, for the reload's report.
    pub fn changes(&self) -> Vec<String> {
        let mut lines = Vec::new();
        for s in &self.start {
            let (name, bind) = (&s.config.name, s.config.bind);
            lines.push(match self.stop.iter().find(|(n, _)| n == name) {
                Some((_, old)) if *old == bind => {
                    format!("listener `{name}` restarted on {bind} (a new TLS context)")
                }
                Some((_, old)) => format!("listener `{name}` moved from {old} to {bind}"),
                None => format!("listener `{name}` added on {bind}"),
            });
        }
        for (name, bind) in &self.stop {
            if !self.start.iter().any(|s| &s.config.name == name) {
                lines.push(format!(
                    "listener `{name}` removed from {bind}; its connections drain"
                ));
            }
        }
        lines
    }
}

impl Listeners {
    pub fn new(proxy: Arc<ProxyApp>, runtime: Arc<ArcSwap<Runtime>>) -> Arc<Self> {
        Arc::new(Listeners {
            proxy,
            runtime,
            live: Mutex::new(Live::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Live> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bind what `new` (with `rt`, its compiled runtime, not yet swapped
    /// in) adds and build its services; every error, or none. Before the
    /// service runs, nothing: it starts whatever the config is then.
    pub fn plan(&self, new: &Config, rt: &Runtime) -> Result<Plan, Vec<ListenersError>> {
        let live = self.lock();
        let Some(started) = &live.started else {
            return Ok(Plan {
                before_start: true,
                ..Plan::default()
            });
        };
        self.plan_from(&live.running, &live.stopping, &started.fds, new, rt)
    }

    fn plan_from(
        &self,
        running: &[Running],
        stopping: &[(SocketAddr, JoinHandle<()>)],
        fds: &ListenFds,
        new: &Config,
        rt: &Runtime,
    ) -> Result<Plan, Vec<ListenersError>> {
        let mut plan = Plan::default();
        let mut errors = Vec::new();
        for r in running {
            let kept = new
                .listeners
                .iter()
                .any(|n| n.name == r.config.name && !needs_start(&r.config, n));
            if !kept {
                plan.stop.push((r.config.name.clone(), r.config.bind));
            }
        }
        for n in &new.listeners {
            let current = running.iter().find(|r| r.config.name == n.name);
            if current.is_some_and(|r| !needs_start(&r.config, n)) {
                continue;
            }
            let socket = match socket_for(n, running, stopping, fds) {
                Ok(socket) => socket,
                Err(e) => {
                    errors.push(e);
                    continue;
                }
            };
            let admission = current
                .map(|r| r.admission.clone())
                .unwrap_or_else(|| Admission::new(&n.name, self.runtime.clone(), rt));
            match self.service(n, rt, admission.clone()) {
                Ok(service) => plan.start.push(Start {
                    config: n.clone(),
                    socket,
                    service,
                    admission,
                }),
                Err(e) => errors.push(e),
            }
        }
        if errors.is_empty() {
            Ok(plan)
        } else {
            Err(errors)
        }
    }

    /// Start and stop what `plan` says; the new config is in by now.
    /// Returns once every listener that starts again on its own socket
    /// has it to itself (the old service's accept loops have ended), so
    /// that a client connecting after the reload reaches the new one.
    /// Blocks: called off the async workers.
    pub fn apply(&self, plan: Plan) {
        let handovers = self.apply_locked(plan);
        for ended in handovers {
            let _ = ended.recv_timeout(HANDOVER_WAIT);
        }
    }

    fn apply_locked(&self, plan: Plan) -> Vec<std::sync::mpsc::Receiver<()>> {
        let mut live = self.lock();
        let started_since = live
            .started
            .as_ref()
            .filter(|_| plan.before_start)
            .map(|s| s.fds.clone());
        if let Some(fds) = started_since {
            // The service started, with the config before this one, while
            // the reload was under way: what it changes is planned again.
            let rt = self.runtime.load();
            let planned = self.plan_from(&live.running, &live.stopping, &fds, &rt.config, &rt);
            return match planned {
                Ok(plan) => self.apply_to(&mut live, plan),
                Err(errors) => {
                    for e in errors {
                        log::error!("listener not changed by the reload: {e}");
                    }
                    Vec::new()
                }
            };
        }
        self.apply_to(&mut live, plan)
    }

    /// Start and stop; each listener that starts again on a socket
    /// another service had says on its channel when that one has ended.
    fn apply_to(&self, live: &mut Live, plan: Plan) -> Vec<std::sync::mpsc::Receiver<()>> {
        let Live {
            started,
            running,
            stopping: stopped,
        } = live;
        stopped.retain(|(_, done)| !done.is_finished());
        let Some(started) = started else {
            return Vec::new();
        };
        let taken: Vec<SocketAddr> = plan.start.iter().map(|s| s.config.bind).collect();
        let mut stopping = Vec::new();
        for (name, _) in &plan.stop {
            if let Some(at) = running.iter().position(|r| &r.config.name == name) {
                stopping.push(running.remove(at));
            }
        }
        // The old services stop first. A listener that moves has its new
        // address accepting at once; one that starts again on its own
        // socket (or a new name on it) waits for the old service's accept
        // loops to end, so that no connection is taken by the old one
        // after the new one began (a plain client reaching a TLS service,
        // say): meanwhile the kernel queues them.
        let mut handed_over = Vec::new();
        for old in stopping {
            log::info!(
                "listener `{}` on {} stops accepting; its connections drain",
                old.config.name,
                old.config.bind
            );
            old.stop.send_replace(true);
            if taken.contains(&old.config.bind) {
                handed_over.push((old.config.bind, old.done));
            } else {
                // Its service closes its socket once its accept loops end.
                forget(&mut started.fds.lock(), &old.config.bind.to_string());
                stopped.push((old.config.bind, old.done));
            }
        }
        let mut handovers = Vec::new();
        for start in plan.start {
            let after = handed_over
                .iter()
                .position(|(bind, _)| *bind == start.config.bind)
                .map(|at| {
                    let (tx, rx) = std::sync::mpsc::channel();
                    handovers.push(rx);
                    (handed_over.swap_remove(at).1, tx)
                });
            running.push(self.start(started, start, after));
        }
        handovers
    }

    /// Run `start`'s service on the listeners' runtime, once `after` (the
    /// service that had its socket) has ended.
    fn start(
        &self,
        started: &Started,
        start: Start,
        after: Option<(JoinHandle<()>, std::sync::mpsc::Sender<()>)>,
    ) -> Running {
        let Start {
            config,
            socket,
            mut service,
            admission,
        } = start;
        if let Some(socket) = socket {
            // Pingora's listener takes the socket from the table, and owns it.
            started
                .fds
                .lock()
                .add(config.bind.to_string(), socket.into_raw_fd());
        }
        log::info!(
            "listener `{}` ({}) on {}://{}",
            config.name,
            config.direction.as_str(),
            if config.tls.is_some() {
                "https"
            } else {
                "http"
            },
            config.bind
        );
        let (stop, stopped) = watch::channel(false);
        let fds = started.fds.clone();
        let tasks = started.tasks_per_fd;
        let done = started.handle.spawn(async move {
            if let Some((old, ended)) = after {
                // Its accept loops end as soon as they see the stop.
                let _ = tokio::time::timeout(HANDOVER_WAIT, old).await;
                let _ = ended.send(());
            }
            service.start_service(Some(fds), stopped, tasks).await;
        });
        Running {
            config,
            admission,
            stop,
            done,
        }
    }

    /// The listening service for `l`, with the slots of the listener of the
    /// same name when there is one: a plain listener's connections are
    /// accepted by meshgate's own loop, a TLS listener's by Pingora's.
    fn service(
        &self,
        l: &Listener,
        rt: &Runtime,
        admission: Arc<Admission>,
    ) -> Result<Box<dyn ServiceTrait>, ListenersError> {
        let app = crate::downstream::Listener::new(
            self.proxy.clone(),
            self.runtime.clone(),
            &l.name,
            admission.clone(),
        );
        let name = format!("meshgate listener {}", l.name);
        let Some(tls) = &l.tls else {
            return Ok(Box::new(PlainService::new(name, l.bind, app, admission)));
        };
        let mut service = Service::new(name, app);
        let settings =
            crate::downstream::tls::settings(l, tls, self.runtime.clone(), &rt.material)?;
        service.add_listener(
            ListenerConfig::tcp(l.bind.to_string())
                .tls(settings)
                .l4_buffer(L4BufferSettings::default().read(TLS_READ_BUFFER)),
        );
        service.set_connection_filter(admission);
        // The ClientHello within the listener's handshake_timeout.
        service.endpoints().set_pre_tls_callback(Arc::new(
            crate::downstream::hello::ClientHelloDeadline {
                runtime: self.runtime.clone(),
            },
        ));
        Ok(Box::new(service))
    }

    /// Stop every listener (the process is stopping) and wait for their
    /// accept loops to end.
    async fn stop_all(&self) {
        let running = std::mem::take(&mut self.lock().running);
        let mut done = Vec::with_capacity(running.len());
        for r in running {
            r.stop.send_replace(true);
            done.push(r.done);
        }
        for d in done {
            let _ = d.await;
        }
    }
}

/// The socket listener `n` starts on: a duplicate of one a running
/// listener holds on its address (it stops now), `None` for one Pingora's
/// table holds that no listener uses (handed over by the process this one
/// upgraded), else a new one.
fn socket_for(
    n: &Listener,
    running: &[Running],
    stopping: &[(SocketAddr, JoinHandle<()>)],
    fds: &ListenFds,
) -> Result<Option<OwnedFd>, ListenersError> {
    let held = fds.lock().get(&n.bind.to_string()).copied();
    let in_use = running.iter().any(|r| r.config.bind == n.bind);
    match held {
        // Another listener, stopping now, or this one starting again.
        Some(fd) if in_use => duplicate(fd)
            .map(Some)
            .map_err(|source| ListenersError::Duplicate {
                name: n.name.clone(),
                addr: n.bind,
                source,
            }),
        Some(_) => Ok(None),
        None => bind_after(n.bind, stopping).map(Some).map_err(|source| {
            let overlapping = running.iter().find(|r| {
                r.config.bind.port() == n.bind.port()
                    && (r.config.bind.ip().is_unspecified() || n.bind.ip().is_unspecified())
            });
            match overlapping {
                Some(r) if source.kind() == std::io::ErrorKind::AddrInUse => {
                    ListenersError::Overlaps {
                        name: n.name.clone(),
                        addr: n.bind,
                        holder: r.config.name.clone(),
                        held: r.config.bind,
                    }
                }
                _ => ListenersError::Bind {
                    name: n.name.clone(),
                    addr: n.bind,
                    source,
                },
            }
        }),
    }
}

/// Whether `new` needs a listening service of its own rather than the one
/// `old` runs: a new address, or a TLS context built differently.
pub(crate) fn needs_start(old: &Listener, new: &Listener) -> bool {
    if old.bind != new.bind {
        return true;
    }
    match (&old.tls, &new.tls) {
        (None, None) => false,
        (Some(o), Some(n)) => {
            o.min_version != n.min_version
                || o.alpn != n.alpn
                || o.session_tickets != n.session_tickets
                || o.client_ca.is_some() != n.client_ca.is_some()
        }
        _ => true,
    }
}

/// A new listening socket on `addr`, as Pingora's own (address reuse,
/// non-blocking; Pingora sets its backlog when it takes it).
fn bind(addr: SocketAddr) -> std::io::Result<OwnedFd> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    Ok(listener.into())
}

/// [`bind`], once a listener of ours that was told to stop has closed its
/// socket on `addr` (a reload that adds back a listener the last one
/// removed comes right after it).
fn bind_after(
    addr: SocketAddr,
    stopping: &[(SocketAddr, JoinHandle<()>)],
) -> std::io::Result<OwnedFd> {
    const WAIT: std::time::Duration = std::time::Duration::from_secs(2);
    let started = std::time::Instant::now();
    loop {
        match bind(addr) {
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                let ours = stopping
                    .iter()
                    .any(|(a, done)| *a == addr && !done.is_finished());
                if !ours || started.elapsed() > WAIT {
                    return Err(e);
                }
                // Called off the async workers (a reload's blocking task).
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            bound => return bound,
        }
    }
}

/// A second descriptor of the listening socket `fd`, for a second service.
///
/// Pingora's table holds raw descriptors (it hands them to another process
/// on upgrade), so borrowing one is the crate's one `unsafe` block.
#[allow(unsafe_code)]
fn duplicate(fd: RawFd) -> std::io::Result<OwnedFd> {
    // SAFETY: `fd` is in Pingora's table and a running listener's service
    // owns it: a service's entry leaves the table when it is stopped (or
    // is replaced by its successor's), and it closes its descriptor only
    // after that, once its accept loops end. Listener changes are made
    // one reload at a time, under the lock the caller holds.
    unsafe { BorrowedFd::borrow_raw(fd) }.try_clone_to_owned()
}

/// Take `key` out of Pingora's table of listening sockets, without closing
/// it (its service does).
fn forget(table: &mut Fds, key: &str) {
    let (binds, raw) = table.serialize();
    let (binds, raw): (Vec<String>, Vec<RawFd>) =
        binds.into_iter().zip(raw).filter(|(b, _)| b != key).unzip();
    let mut kept = Fds::new();
    kept.deserialize(binds, raw);
    *table = kept;
}

/// The listeners as one Pingora service, on `workers` threads.
pub struct ListenerService {
    pub listeners: Arc<Listeners>,
    pub threads: usize,
    /// Bind addresses besides the listeners' that Pingora's table keeps (the
    /// admin listener's).
    pub also_bound: Vec<SocketAddr>,
}

#[async_trait]
impl ServiceTrait for ListenerService {
    async fn start_service(
        &mut self,
        fds: Option<ListenFds>,
        mut shutdown: ShutdownWatch,
        listeners_per_fd: usize,
    ) {
        let listeners = &self.listeners;
        let Some(fds) = fds else {
            // Pingora passes its table on every Unix system.
            log::error!("meshgate: no table of listening sockets; cannot start the listeners");
            std::process::exit(1);
        };
        {
            let mut live = listeners.lock();
            let rt = listeners.runtime.load();
            let plan = match listeners.plan_from(&[], &[], &fds, &rt.config, &rt) {
                Ok(plan) => plan,
                Err(errors) => {
                    for e in errors {
                        log::error!("meshgate: {e}");
                    }
                    std::process::exit(1);
                }
            };
            // Sockets an upgraded-from process handed over for listeners
            // this config no longer has.
            let keep = rt
                .config
                .listeners
                .iter()
                .map(|l| l.bind)
                .chain(self.also_bound.iter().copied())
                .map(|a| a.to_string())
                .collect();
            for closed in fds.lock().close_unclaimed(&keep) {
                log::info!("closed the handed-over socket {closed}: no listener binds it now");
            }
            live.started = Some(Started {
                fds,
                handle: tokio::runtime::Handle::current(),
                tasks_per_fd: listeners_per_fd.max(1),
            });
            // Nothing runs yet, so nothing is handed over.
            listeners.apply_to(&mut live, plan);
        }
        while !*shutdown.borrow() {
            if shutdown.changed().await.is_err() {
                break;
            }
        }
        listeners.stop_all().await;
    }

    fn name(&self) -> &str {
        "meshgate listeners"
    }

    fn threads(&self) -> Option<usize> {
        Some(self.threads)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forget_takes_one_address_out_of_the_table() {
        let mut fds = Fds::new();
        fds.add("127.0.0.1:1".into(), 7);
        fds.add("127.0.0.1:2".into(), 8);
        forget(&mut fds, "127.0.0.1:1");
        assert_eq!(fds.get("127.0.0.1:1"), None);
        assert_eq!(fds.get("127.0.0.1:2"), Some(&8));
    }

    #[test]
    fn a_duplicate_is_the_same_listening_socket() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let dup =
            std::net::TcpListener::from(duplicate(std::os::fd::AsRawFd::as_raw_fd(&l)).unwrap());
        drop(l);
        // The queue stays open through the duplicate.
        let _client = std::net::TcpStream::connect(addr).unwrap();
        let (_, from) = dup.accept().unwrap();
        assert!(from.ip().is_loopback());
    }
}
