//! Client connections before a request reaches the proxy: request heads
//! read whole and within their limits ([`head`]), under a memory budget
//! shared by every connection ([`pending`]); HTTP/2 connections with their
//! churn bounded ([`h2`]); a listener's connection slots ([`admission`]);
//! egress tunnels ([`tunnel`]); TLS termination ([`tls`], [`hello`]); the
//! close of a connection a client may still be sending on ([`linger`]); and
//! each listener's connection app over all of them ([`Listener`]).

pub mod accept;
pub mod admission;
pub mod buffered;
pub mod h2;
pub mod head;
pub mod hello;
pub mod keepalive;
pub mod linger;
pub mod pending;
mod probe;
pub mod tls;
pub mod tunnel;

pub use keepalive::Listener;

/// Implement the stream traits Pingora's `IO` needs beyond reading and
/// writing by handing each to the wrapped stream, which `$ty`'s methods
/// `$get` and `$get_mut` lend; with `but_shutdown`, all but `Shutdown`,
/// which the type implements itself.
#[macro_export]
macro_rules! delegate_stream_traits {
    ($ty:ty, $get:ident, $get_mut:ident) => {
        #[async_trait::async_trait]
        impl pingora::protocols::Shutdown for $ty {
            async fn shutdown(&mut self) {
                self.$get_mut().shutdown().await
            }
        }

        $crate::delegate_stream_traits!(but_shutdown: $ty, $get, $get_mut);
    };
    (but_shutdown: $ty:ty, $get:ident, $get_mut:ident) => {
        impl pingora::protocols::UniqueID for $ty {
            fn id(&self) -> pingora::protocols::UniqueIDType {
                self.$get().id()
            }
        }

        impl pingora::protocols::Ssl for $ty {
            fn get_ssl(&self) -> Option<&pingora::protocols::tls::TlsRef> {
                self.$get().get_ssl()
            }

            fn get_ssl_digest(&self) -> Option<std::sync::Arc<pingora::protocols::tls::SslDigest>> {
                self.$get().get_ssl_digest()
            }

            fn selected_alpn_proto(&self) -> Option<pingora::protocols::ALPN> {
                self.$get().selected_alpn_proto()
            }
        }

        impl pingora::protocols::GetTimingDigest for $ty {
            fn get_timing_digest(&self) -> Vec<Option<pingora::protocols::TimingDigest>> {
                self.$get().get_timing_digest()
            }

            fn get_read_pending_time(&self) -> std::time::Duration {
                self.$get().get_read_pending_time()
            }

            fn get_write_pending_time(&self) -> std::time::Duration {
                self.$get().get_write_pending_time()
            }
        }

        impl pingora::protocols::GetProxyDigest for $ty {
            fn get_proxy_digest(
                &self,
            ) -> Option<std::sync::Arc<pingora::protocols::raw_connect::ProxyDigest>> {
                self.$get().get_proxy_digest()
            }

            fn set_proxy_digest(&mut self, digest: pingora::protocols::raw_connect::ProxyDigest) {
                self.$get_mut().set_proxy_digest(digest)
            }
        }

        impl pingora::protocols::GetSocketDigest for $ty {
            fn get_socket_digest(
                &self,
            ) -> Option<std::sync::Arc<pingora::protocols::SocketDigest>> {
                self.$get().get_socket_digest()
            }

            fn set_socket_digest(&mut self, digest: pingora::protocols::SocketDigest) {
                self.$get_mut().set_socket_digest(digest)
            }
        }

        #[async_trait::async_trait]
        impl pingora::protocols::Peek for $ty {
            async fn try_peek(&mut self, buf: &mut [u8]) -> std::io::Result<bool> {
                self.$get_mut().try_peek(buf).await
            }
        }
    };
}

#[cfg(test)]
pub(crate) mod tests {
    use pingora::protocols::Stream;

    /// A connected pair of plain sockets: one as Pingora's unbuffered
    /// stream, the other as it is.
    pub async fn pair() -> (Stream, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        let stream = pingora::protocols::l4::stream::Stream::from(accepted.unwrap().0);
        (Box::new(stream), client.unwrap())
    }
}
