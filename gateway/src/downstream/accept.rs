//! The accept loop of a plain (not TLS) listener.
//!
//! Pingora's listening service spawns one task per connection whose future
//! is sized for a TLS handshake (with its timeout) as well as for the
//! connection's app, and puts a write buffer in front of every socket: an
//! idle keep-alive connection so holds ~4 KiB that only its first moments,
//! or a TLS listener, need. A plain listener has no handshake, and the fast
//! lane writes each head (with a small body) in one piece itself, so this
//! loop accepts the connection and runs [`Listener`] on it in a task of its
//! own, the socket unbuffered: what an idle connection holds is its socket,
//! its slot and the keep-alive loop's wait. Pingora's driver gets a write
//! buffer for the requests it serves ([`super::buffered`]).
//!
//! The rest is Pingora's listener, step for step: the socket comes from
//! Pingora's table of listening sockets (so a binary upgrade hands it on),
//! the listener's [`Admission`] filters each connection as it is accepted
//! (and holds the loop while the listener is full), `TCP_NODELAY` is set,
//! the socket digest carries the peer's address, each connection's task is
//! spawned on one of the worker threads, and the loop ends at shutdown, its
//! socket closed once every loop on it has ended.

use std::net::SocketAddr;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::{HttpServerApp, ServerApp};
use pingora::listeners::ConnectionFilter;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::{GetSocketDigest, SocketDigest, Stream};
use pingora::server::{ListenFds, ShutdownWatch};
use pingora::services::Service as ServiceTrait;
use tokio::net::TcpListener;

use super::admission::Admission;
use super::keepalive::Listener;

/// Pingora's listen backlog, which it sets on every socket it listens on.
const BACKLOG: u32 = 65535;
/// How long an accept loop pauses when the process is out of descriptors:
/// `accept` would fail again at once, and spin.
const OUT_OF_DESCRIPTORS_PAUSE: Duration = Duration::from_secs(1);
/// "Too many open files", in the process and in the system.
const EMFILE: i32 = 24;
const ENFILE: i32 = 23;

/// One plain listener's connections, accepted here rather than by Pingora.
pub struct PlainService<A> {
    name: String,
    bind: SocketAddr,
    app: Arc<Listener<A>>,
    admission: Arc<Admission>,
}

impl<A> PlainService<A> {
    pub fn new(
        name: String,
        bind: SocketAddr,
        app: Listener<A>,
        admission: Arc<Admission>,
    ) -> Self {
        PlainService {
            name,
            bind,
            app: Arc::new(app),
            admission,
        }
    }
}

#[async_trait]
impl<A: HttpServerApp + Send + Sync + 'static> ServiceTrait for PlainService<A> {
    async fn start_service(
        &mut self,
        fds: Option<ListenFds>,
        shutdown: ShutdownWatch,
        listeners_per_fd: usize,
    ) {
        let socket = match listen(fds, self.bind) {
            Ok(socket) => Arc::new(socket),
            Err(e) => {
                log::error!(
                    "listener `{}` cannot listen on {}: {e}",
                    self.name,
                    self.bind
                );
                return;
            }
        };
        let mut loops = Vec::with_capacity(listeners_per_fd.max(1));
        for _ in 0..listeners_per_fd.max(1) {
            let accepting = accept_loop(
                socket.clone(),
                self.app.clone(),
                self.admission.clone(),
                shutdown.clone(),
            );
            loops.push(pingora_runtime::current_handle().spawn(accepting));
        }
        for l in loops {
            let _ = l.await;
        }
        self.app.cleanup().await;
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn threads(&self) -> Option<usize> {
        None
    }
}

/// The listening socket for `bind` in Pingora's table, taken over (the
/// listener that starts on an address owns the table's descriptor for it,
/// as Pingora's own does); a new one when the table has none.
fn listen(fds: Option<ListenFds>, bind: SocketAddr) -> std::io::Result<TcpListener> {
    let key = bind.to_string();
    let held = fds.as_ref().and_then(|f| f.lock().get(&key).copied());
    let socket: std::net::TcpStream = match held {
        Some(fd) => take(fd).into(),
        None => {
            let socket = std::net::TcpListener::bind(bind)?;
            if let Some(fds) = &fds {
                fds.lock()
                    .add(key, std::os::fd::AsRawFd::as_raw_fd(&socket));
            }
            OwnedFd::from(socket).into()
        }
    };
    socket.set_nonblocking(true)?;
    tokio::net::TcpSocket::from_std_stream(socket).listen(BACKLOG)
}

/// Ownership of a listening socket in Pingora's table.
#[allow(unsafe_code)]
fn take(fd: RawFd) -> OwnedFd {
    // SAFETY: the table's descriptor for an address belongs to the one
    // listener service started on it (Pingora's own listener takes it the
    // same way); `listening` replaces or removes the entry before another
    // service may start there, and only duplicates it (never takes it)
    // while this one runs.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

async fn accept_loop<A: HttpServerApp + Send + Sync + 'static>(
    socket: Arc<TcpListener>,
    app: Arc<Listener<A>>,
    admission: Arc<Admission>,
    mut shutdown: ShutdownWatch,
) {
    loop {
        // Shutdown first: once it is broadcast, a connection still in the
        // kernel's queue is left to the process taking over the socket.
        let accepted = tokio::select! {
            biased;
            changed = shutdown.changed() => match changed {
                Ok(()) if !*shutdown.borrow() => continue,
                _ => break,
            },
            accepted = socket.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                log::error!("accept() failed: {e}");
                if matches!(e.raw_os_error(), Some(EMFILE | ENFILE)) {
                    tokio::time::sleep(OUT_OF_DESCRIPTORS_PAUSE).await;
                }
                continue;
            }
        };
        if !admission.should_accept(Some(&peer)).await {
            continue;
        }
        if let Err(e) = tcp.set_nodelay(true) {
            log::debug!("TCP_NODELAY not set on a connection from {peer}: {e}");
        }
        let stream = stream(tcp, peer);
        let app = app.clone();
        let shutdown = shutdown.clone();
        pingora_runtime::current_handle().spawn(async move {
            let mut next = ServerApp::process_new(&app, stream, &shutdown).await;
            while let Some(stream) = next {
                next = ServerApp::process_new(&app, stream, &shutdown).await;
            }
        });
    }
}

/// The connection as Pingora's stream, unbuffered, with the peer's address
/// in its socket digest (as Pingora's listener leaves it).
fn stream(tcp: tokio::net::TcpStream, peer: SocketAddr) -> Stream {
    let fd = std::os::fd::AsRawFd::as_raw_fd(&tcp);
    let mut l4 = L4Stream::from(tcp);
    let digest = SocketDigest::from_raw_fd(fd);
    let _ = digest.peer_addr.set(Some(peer.into()));
    l4.set_socket_digest(digest);
    Box::new(l4)
}
