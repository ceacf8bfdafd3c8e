//! The client's side of a request, whichever driver serves it: what the
//! respond and observe stages read of the request and its connection, and
//! how they write an answer. Pingora's `Session` is one; the fast lane's
//! connection ([`crate::lane`]) the other, so both write the same answers
//! and the same log lines and metrics.

use async_trait::async_trait;
use bytes::Bytes;
use http::{Method, Version};
use pingora::http::ResponseHeader;
use pingora::protocols::tls::SslDigest;
use pingora::proxy::Session;
use pingora::Result;

/// Request bodies up to this size are read and dropped before a response
/// meshgate writes itself, so that the connection stays open: a driver
/// closes a connection answered before its request body was read (the rest
/// of the body would be taken for the next request), but a small body of
/// declared length that arrives promptly is read and dropped instead, as
/// NGINX does, so a POST to a direct response keeps its connection.
/// Larger, chunked or `Expect: 100-continue` bodies are left, and the
/// connection closes after the response.
pub const DISCARD_BODY_LIMIT: u64 = 64 * 1024;
/// How long such a body may take to arrive.
const DISCARD_BODY_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

#[async_trait]
pub trait Client: Send {
    fn method(&self) -> &Method;
    /// The request's path, without its query.
    fn path(&self) -> &str;
    /// The target's authority, else the `Host` line; empty without either.
    fn host(&self) -> &str;
    fn version(&self) -> Version;
    fn user_agent(&self) -> &str;
    /// The status of the response head written so far, if any.
    fn status_written(&self) -> Option<u16>;
    fn body_bytes_read(&self) -> u64;
    fn body_bytes_sent(&self) -> u64;
    /// The client's address as the access log writes it.
    fn client_text(&self) -> String;
    fn tls(&self) -> Option<&SslDigest>;
    /// The connection ends after this response.
    fn close_after(&mut self);
    /// Read and drop a small request body before an answer meshgate
    /// writes itself, so that the connection can stay open.
    async fn discard_small_body(&mut self);
    /// Write the response head; `end`: there is no body.
    async fn write_head(&mut self, resp: Box<ResponseHeader>, end: bool) -> Result<()>;
    /// Write (the last piece of) the body.
    async fn write_body(&mut self, body: Bytes, end: bool) -> Result<()>;
}

#[async_trait]
impl Client for Session {
    fn method(&self) -> &Method {
        &self.req_header().method
    }
    fn path(&self) -> &str {
        self.req_header().uri.path()
    }
    fn host(&self) -> &str {
        super::admission::request_host(self.req_header()).unwrap_or("")
    }
    fn version(&self) -> Version {
        self.req_header().version
    }
    fn user_agent(&self) -> &str {
        self.req_header()
            .headers
            .get(http::header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
    fn status_written(&self) -> Option<u16> {
        self.response_written().map(|r| r.status.as_u16())
    }
    fn body_bytes_read(&self) -> u64 {
        self.as_ref().body_bytes_read() as u64
    }
    fn body_bytes_sent(&self) -> u64 {
        self.as_ref().body_bytes_sent() as u64
    }
    fn client_text(&self) -> String {
        self.client_addr()
            .map(|a| a.to_string())
            .unwrap_or_default()
    }
    fn tls(&self) -> Option<&SslDigest> {
        self.digest().and_then(|d| d.ssl_digest.as_deref())
    }
    fn close_after(&mut self) {
        self.set_keepalive(None);
    }
    async fn discard_small_body(&mut self) {
        // Nothing left to read, or the connection closes anyway.
        if self.is_body_done() || self.get_keepalive().is_none() {
            return;
        }
        let req = self.req_header();
        let small = super::headers::declared_length(req).is_some_and(|n| n <= DISCARD_BODY_LIMIT);
        if !small || req.headers.contains_key(http::header::EXPECT) {
            return;
        }
        let _ = pingora::time::timeout(DISCARD_BODY_WAIT, self.drain_request_body()).await;
    }
    async fn write_head(&mut self, resp: Box<ResponseHeader>, end: bool) -> Result<()> {
        self.write_response_header(resp, end).await
    }
    async fn write_body(&mut self, body: Bytes, end: bool) -> Result<()> {
        self.write_response_body(Some(body), end).await
    }
}
