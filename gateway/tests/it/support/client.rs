//! Minimal real HTTP clients (hyper): HTTP/1.1 and h2c with prior knowledge.

use std::net::SocketAddr;

use bytes::Bytes;
use http::{HeaderMap, Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub trailers: Option<HeaderMap>,
}

impl Resp {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

pub type Error = Box<dyn std::error::Error + Send + Sync>;

pub async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Result<Resp, Error> {
    send(addr, Method::GET, path, headers, Bytes::new(), false).await
}

/// One request on a new connection, over HTTP/1.1 or h2c.
pub async fn send(
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
    h2c: bool,
) -> Result<Resp, Error> {
    let stream = TcpStream::connect(addr).await?;
    let io = TokioIo::new(stream);
    let mut builder = Request::builder().method(method);
    builder = if h2c {
        builder.uri(format!("http://{addr}{path}"))
    } else {
        builder.uri(path)
    };
    let mut has_host = false;
    for (k, v) in headers {
        has_host |= k.eq_ignore_ascii_case("host");
        builder = builder.header(*k, *v);
    }
    if !has_host && !h2c {
        builder = builder.header("host", addr.to_string());
    }
    let req = builder.body(Full::new(body))?;
    exchange(io, h2c, req).await
}

/// Send one request over a fresh connection (HTTP/2 or HTTP/1.1) and read
/// the whole response.
pub async fn exchange<I>(io: TokioIo<I>, h2: bool, req: Request<Full<Bytes>>) -> Result<Resp, Error>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let resp = if h2 {
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
        tokio::spawn(conn);
        sender.send_request(req).await?
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(conn);
        sender.send_request(req).await?
    };
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let collected = resp.into_body().collect().await?;
    let trailers = collected.trailers().cloned();
    Ok(Resp {
        status,
        headers,
        body: collected.to_bytes(),
        trailers,
    })
}
