//! Counting open client connections per listener. Pingora has no
//! connection hooks in `ProxyHttp`, so the proxy app is wrapped: the
//! listening service calls `process_new` once per connection (Pingora 0.9
//! serves a kept-alive HTTP/1 connection's requests inside that one call).
//! Whether a connection is let in at all is the listener's accept filter
//! ([`crate::downstream::admission`]).

use std::sync::Arc;

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;

use crate::downstream::admission::Admission;

/// One listener's connections, served by the app shared by all listeners.
pub struct CountConnections<A> {
    inner: Arc<A>,
    admission: Arc<Admission>,
}

impl<A> CountConnections<A> {
    pub fn new(inner: Arc<A>, admission: Arc<Admission>) -> Self {
        CountConnections { inner, admission }
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for CountConnections<A> {
    async fn process_new(
        self: &Arc<Self>,
        session: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let _open = self.admission.opened();
        self.inner.process_new(session, shutdown).await
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await
    }
}
