//! HTTP/1 connections between requests.
//!
//! Pingora's own HTTP/1 loop starts on the next request as soon as a response
//! is written: it allocates that request's state (one boxed future sized for
//! the whole proxy path, and a head buffer), which then waits, idle, for the
//! client. An idle keep-alive connection so costs what a request in flight
//! costs. This loop first waits for the next request's first bytes, read
//! ahead by the client stream's wrapper ([`HeadDeadline`]), and only then
//! hands the connection to Pingora: an idle connection holds its socket and
//! little else.
//!
//! HTTP/2 (prior knowledge or ALPN) and custom protocols take Pingora's own
//! loop, unchanged. The HTTP/1 loop is Pingora's, with the wait added: the
//! same keep-alive settings carried from request to request, and an idle
//! connection closed after its listener's `idle_timeout` or at shutdown.
//!
//! [`HeadDeadline`]: crate::telemetry::head_deadline::HeadDeadline

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::apps::{HttpServerApp, ReusedHttpStream, ServerApp};
use pingora::protocols::http::ServerSession;
use pingora::protocols::{Stream, ALPN};
use pingora::server::ShutdownWatch;

use crate::runtime::Runtime;

const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Pingora's keep-alive timeout, for a connection whose listener is unknown.
const DEFAULT_IDLE: Duration = Duration::from_secs(60);

/// The HTTP proxy app, with idle HTTP/1 connections waiting outside it.
pub struct KeepAlive<A> {
    inner: Arc<A>,
    runtime: Arc<ArcSwap<Runtime>>,
}

impl<A> KeepAlive<A> {
    pub fn new(inner: A, runtime: Arc<ArcSwap<Runtime>>) -> Self {
        KeepAlive {
            inner: Arc::new(inner),
            runtime,
        }
    }
}

#[async_trait]
impl<A: HttpServerApp + Send + Sync + 'static> ServerApp for KeepAlive<A> {
    async fn process_new(
        self: &Arc<Self>,
        mut stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        if !self.speaks_http1(&mut stream).await? {
            return ServerApp::process_new(&self.inner, stream, shutdown).await;
        }
        // The first request: its head is bounded by the head deadline.
        let mut first = [0u8; 1];
        stream.try_peek(&mut first).await.ok()?;
        let options = self.inner.server_options();
        let mut session = ServerSession::new_http1(stream);
        // Pingora's defaults; the proxy sets the listener's own per request.
        session.set_keepalive(if *shutdown.borrow() { None } else { Some(60) });
        session.set_keepalive_reuses_remaining(options.and_then(|o| o.keepalive_request_limit));
        let mut result = self.inner.process_new_http(session, shutdown).await;
        while let Some((mut stream, settings)) = result.map(ReusedHttpStream::consume) {
            if !self.next_request(&mut stream, shutdown).await {
                return None;
            }
            let mut session = ServerSession::new_http1(stream);
            if let Some(settings) = settings {
                settings.apply_to_session(&mut session);
            }
            result = self.inner.process_new_http(session, shutdown).await;
        }
        None
    }

    async fn cleanup(&self) {
        self.inner.http_cleanup().await
    }
}

impl<A: HttpServerApp + Send + Sync + 'static> KeepAlive<A> {
    /// Pingora's choice of protocol, made here so that only HTTP/1 takes this
    /// loop; `None` when the connection failed while being looked at.
    async fn speaks_http1(&self, stream: &mut Stream) -> Option<bool> {
        let options = self.inner.server_options();
        if options.is_some_and(|o| o.force_custom)
            || matches!(
                stream.selected_alpn_proto(),
                Some(ALPN::H2) | Some(ALPN::Custom(_))
            )
        {
            return Some(false);
        }
        if stream.get_ssl_digest().is_some() || !options.is_some_and(|o| o.h2c) {
            return Some(true);
        }
        let mut preface = [0u8; H2_PREFACE.len()];
        match stream.try_peek(&mut preface).await {
            Ok(true) => Some(preface != *H2_PREFACE),
            // A stream that cannot be peeked at: Pingora takes it for h2c.
            Ok(false) => Some(false),
            Err(_) => None,
        }
    }

    /// Wait for the next request's first bytes: `false` when the connection
    /// idled past its listener's `idle_timeout`, closed, or the gateway is
    /// shutting down.
    async fn next_request(&self, stream: &mut Stream, shutdown: &ShutdownWatch) -> bool {
        let idle = {
            let rt = self.runtime.load();
            rt.listener_of(stream)
                .and_then(|i| rt.config.listeners.get(i))
                .map_or(DEFAULT_IDLE, |l| l.limits.idle_timeout)
                // As the proxy tells Pingora: whole seconds, at least one.
                .max(Duration::from_secs(1))
        };
        let mut shutdown = shutdown.clone();
        if *shutdown.borrow_and_update() {
            return false;
        }
        let mut first = [0u8; 1];
        tokio::select! {
            read = pingora::time::fast_timeout::fast_timeout(idle, stream.try_peek(&mut first)) => {
                matches!(read, Ok(Ok(true)))
            }
            _ = shutdown.changed() => false,
        }
    }
}
