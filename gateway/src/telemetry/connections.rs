//! Counting open client connections per listener, and refusing those over
//! `max_connections`. Pingora has no connection hooks in `ProxyHttp`, so the
//! proxy app is wrapped: the listening service calls `process_new` once per
//! connection (Pingora 0.9 serves a kept-alive HTTP/1 connection's requests
//! inside that one call).

use std::sync::Arc;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;

use super::metrics::{metrics, GaugeGuard};
use crate::runtime::Runtime;

pub struct CountConnections<A> {
    inner: Arc<A>,
    runtime: Arc<ArcSwap<Runtime>>,
}

impl<A> CountConnections<A> {
    pub fn new(inner: A, runtime: Arc<ArcSwap<Runtime>>) -> Self {
        CountConnections {
            inner: Arc::new(inner),
            runtime,
        }
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for CountConnections<A> {
    async fn process_new(
        self: &Arc<Self>,
        session: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let rt = self.runtime.load();
        let index = rt.listener_of(&session);
        let listener = index
            .and_then(|i| rt.listeners.get(i))
            .map_or("", |l| l.name.as_str());
        let gauge = rt.connections_gauge(index);
        let max = index
            .and_then(|i| rt.config.listeners.get(i))
            .and_then(|l| l.limits.max_connections);
        if max.is_some_and(|max| gauge.get() >= max as i64) {
            // Full: close at once (a kept-alive connection coming back for
            // another request counts as new, so overload sheds idle ones too).
            metrics()
                .rejected
                .with_label_values(&[listener, "connection_limit"])
                .inc();
            return None;
        }
        drop(rt);
        let _open = GaugeGuard::new(gauge);
        self.inner.process_new(session, shutdown).await
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await
    }
}
