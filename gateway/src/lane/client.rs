//! The client's connection while the lane serves a request: it writes
//! response heads as Pingora's HTTP/1 server writes them (`Date` and
//! `Connection` added to a final answer, the status line with the reason
//! phrase), bodies as it frames them, and answers the respond and observe
//! stages' questions ([`Client`]).

use std::net::{IpAddr, SocketAddr};

use async_trait::async_trait;
use bytes::{BufMut, Bytes, BytesMut};
use http::header::{self, HeaderValue};
use http::{Method, Version};
use pingora::http::ResponseHeader;
use pingora::protocols::tls::SslDigest;
use pingora::protocols::Stream;
use pingora::{Error, ErrorType, Result};
use tokio::io::AsyncWriteExt;

use super::plan::Plan;
use crate::http1::fields::FieldList;
use crate::proxy::client::Client;

/// The connection a request came on, as the keep-alive loop knows it.
pub struct Conn<'a> {
    pub stream: &'a mut Stream,
    pub peer: Option<SocketAddr>,
    pub tls: Option<&'a SslDigest>,
}

pub struct LaneClient<'a> {
    stream: &'a mut Stream,
    peer: Option<SocketAddr>,
    tls: Option<&'a SslDigest>,
    method: Method,
    target: &'a str,
    path_len: usize,
    host: &'a str,
    user_agent: &'a str,
    body_read: u64,
    body_sent: u64,
    /// The status of the last head written (a 1xx, or the answer's).
    status: Option<u16>,
    /// A final answer's head has gone out.
    answered: bool,
    /// The connection carries another request after this one.
    keep_alive: bool,
    out: BytesMut,
}

fn write_error(e: std::io::Error) -> Box<Error> {
    Error::because(ErrorType::WriteError, "writing to the client", e).into_down()
}

impl<'a> LaneClient<'a> {
    pub fn new(conn: Conn<'a>, plan: &'a Plan, keep_alive: bool) -> Self {
        let target = plan.target();
        LaneClient {
            stream: conn.stream,
            peer: conn.peer,
            tls: conn.tls,
            method: plan.method.clone(),
            target,
            path_len: plan.path().len(),
            host: plan.host.to_str().unwrap_or(""),
            user_agent: plan
                .user_agent
                .as_ref()
                .and_then(|v| v.to_str().ok())
                .unwrap_or(""),
            body_read: plan.body_len(),
            body_sent: 0,
            status: None,
            answered: false,
            keep_alive,
            out: crate::http1::spare::take(crate::http1::spare::Use::Out, 0),
        }
    }

    /// The client's IP, an IPv4 client on a dual-stack listener as IPv4.
    pub fn peer_ip(peer: Option<SocketAddr>) -> Option<IpAddr> {
        peer.map(|a| a.ip().to_canonical())
    }

    pub fn keeps_alive(&self) -> bool {
        self.keep_alive
    }

    pub fn close_after_now(&mut self) {
        self.keep_alive = false;
    }

    pub fn status_written_any(&self) -> bool {
        self.answered
    }

    /// The `Connection` field a final answer carries, as Pingora's server
    /// writes it.
    fn connection(&self) -> HeaderValue {
        HeaderValue::from_static(if self.keep_alive {
            "keep-alive"
        } else {
            "close"
        })
    }

    /// `HTTP/1.x NNN reason` and CRLF, as Pingora writes a status line.
    fn status_line(&mut self, minor: u8, status: u16, reason: Option<&str>) {
        self.out.put_slice(if minor == 0 {
            b"HTTP/1.0 "
        } else {
            b"HTTP/1.1 "
        });
        let code = [
            b'0' + (status / 100 % 10) as u8,
            b'0' + (status / 10 % 10) as u8,
            b'0' + (status % 10) as u8,
        ];
        self.out.put_slice(&code);
        self.out.put_u8(b' ');
        if let Some(r) = reason {
            self.out.put_slice(r.as_bytes());
        }
        self.out.put_slice(b"\r\n");
    }

    /// A 1xx answer, after the response stage.
    pub async fn write_interim(
        &mut self,
        status: u16,
        reason: Option<&str>,
        fields: FieldList,
    ) -> Result<()> {
        self.out.clear();
        self.status_line(1, status, reason);
        fields.write(&mut self.out);
        self.send_head(status, true).await
    }

    /// Write the head in `out` (its final empty line added) for `status`;
    /// `flush` when nothing follows it at once.
    async fn send_head(&mut self, status: u16, flush: bool) -> Result<()> {
        self.out.put_slice(b"\r\n");
        self.status = Some(status);
        self.stream
            .write_all(&self.out)
            .await
            .map_err(write_error)?;
        if flush {
            self.flush().await?;
        }
        Ok(())
    }

    /// The final answer's head; its body follows through [`Body`]. Its
    /// version is the gateway's own, whatever the upstream's (as
    /// `proxy::response_head` has it for Pingora's driver).
    pub async fn write_answer(
        &mut self,
        status: u16,
        reason: Option<&str>,
        fields: &mut FieldList,
        no_body: bool,
    ) -> Result<()> {
        // A response written after SIGTERM closes its connection, even for
        // a request that came before it.
        if crate::lifecycle::draining() {
            self.keep_alive = false;
        }
        fields.insert(
            Bytes::from_static(b"Date"),
            pingora::protocols::http::date::get_cached_date(),
        );
        fields.insert(Bytes::from_static(b"Connection"), self.connection());
        self.out.clear();
        self.out.reserve(fields.wire_len() + 64);
        self.status_line(1, status, reason);
        fields.write(&mut self.out);
        self.answered = true;
        self.send_head(status, no_body).await
    }

    /// A piece of the body, framed as a chunk when `chunked`.
    pub async fn write_piece(&mut self, piece: Bytes, chunked: bool) -> Result<()> {
        if piece.is_empty() {
            return Ok(());
        }
        self.body_sent += piece.len() as u64;
        if chunked {
            let size = format!("{:X}\r\n", piece.len());
            self.stream
                .write_all(size.as_bytes())
                .await
                .map_err(write_error)?;
            self.stream.write_all(&piece).await.map_err(write_error)?;
            self.stream.write_all(b"\r\n").await.map_err(write_error)
        } else {
            self.stream.write_all(&piece).await.map_err(write_error)
        }
    }

    /// The end of a chunked body.
    pub async fn end_chunked(&mut self, chunked: bool) -> Result<()> {
        if chunked {
            self.stream
                .write_all(b"0\r\n\r\n")
                .await
                .map_err(write_error)?;
        }
        self.flush().await
    }

    pub async fn flush(&mut self) -> Result<()> {
        self.stream.flush().await.map_err(write_error)
    }
}

impl Drop for LaneClient<'_> {
    fn drop(&mut self) {
        crate::http1::spare::give(crate::http1::spare::Use::Out, std::mem::take(&mut self.out));
    }
}

#[async_trait]
impl Client for LaneClient<'_> {
    fn method(&self) -> &Method {
        &self.method
    }
    fn path(&self) -> &str {
        &self.target[..self.path_len]
    }
    fn host(&self) -> &str {
        self.host
    }
    fn version(&self) -> Version {
        Version::HTTP_11
    }
    fn user_agent(&self) -> &str {
        self.user_agent
    }
    fn status_written(&self) -> Option<u16> {
        self.status
    }
    fn body_bytes_read(&self) -> u64 {
        self.body_read
    }
    fn body_bytes_sent(&self) -> u64 {
        self.body_sent
    }
    fn client_text(&self) -> String {
        self.peer.map(|a| a.to_string()).unwrap_or_default()
    }
    fn tls(&self) -> Option<&SslDigest> {
        self.tls
    }
    fn close_after(&mut self) {
        self.keep_alive = false;
    }
    async fn discard_small_body(&mut self) {
        // The lane takes only requests whose body it has read whole.
    }
    /// An answer the gateway writes itself, as Pingora's server writes it.
    async fn write_head(&mut self, mut resp: Box<ResponseHeader>, end: bool) -> Result<()> {
        if !resp.status.is_informational() {
            resp.insert_header(
                header::DATE,
                pingora::protocols::http::date::get_cached_date(),
            )?;
            resp.insert_header(header::CONNECTION, self.connection())?;
            self.answered = true;
        }
        self.out.clear();
        let minor = u8::from(resp.version != Version::HTTP_10);
        let status = resp.status.as_u16();
        let reason = resp.get_reason_phrase().map(str::to_owned);
        self.status_line(minor, status, reason.as_deref());
        resp.header_to_h1_wire(&mut self.out);
        self.send_head(status, end).await
    }
    async fn write_body(&mut self, body: Bytes, end: bool) -> Result<()> {
        if self.method != Method::HEAD {
            self.body_sent += body.len() as u64;
            self.stream.write_all(&body).await.map_err(write_error)?;
        }
        if end {
            self.flush().await?;
        }
        Ok(())
    }
}
