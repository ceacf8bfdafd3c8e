//! Active health checks over the wire, with Pingora's connectors and the
//! upstream's own peer settings (TLS, client certificate, HTTP/2), each on
//! its own connection: `tcp` connects (and completes TLS, with `tls`);
//! `http` sends `GET path` and reads the status; `grpc` asks
//! `grpc.health.v1.Health/Check` and wants `SERVING`. The whole check,
//! connecting included, has `timeout`.

use bytes::Bytes;
use pingora::connectors::http::Connector;
use pingora::connectors::TransportConnector;
use pingora::http::RequestHeader;
use pingora::protocols::http::client::HttpSession;
use pingora::protocols::Digest;
use pingora::upstreams::peer::HttpPeer;

use crate::config::model::{HealthCheck, HealthCheckKind};

const GRPC_PATH: &str = "/grpc.health.v1.Health/Check";
/// An empty `HealthCheckRequest` (the server's overall health), framed.
const GRPC_REQUEST: &[u8] = &[0, 0, 0, 0, 0];
/// `HealthCheckResponse.status = SERVING`.
const GRPC_SERVING: &[u8] = &[0x08, 0x01];
/// The most of a response body a gRPC check reads.
const GRPC_MAX_BODY: usize = 1024;

pub struct Prober {
    policy: HealthCheck,
    http: Connector,
    tcp: TransportConnector,
}

/// A check's result: passed or not, and what it saw.
pub type Verdict = (bool, String);

/// Whether a connection's peer is who the upstream's `tls.verify` asks for.
pub type Identity<'a> = dyn Fn(Option<&Digest>) -> Result<(), String> + Send + Sync + 'a;

impl Prober {
    pub fn new(policy: HealthCheck) -> Self {
        Prober {
            policy,
            http: Connector::new(None),
            tcp: TransportConnector::new(None),
        }
    }

    /// Check the endpoint `peer` connects to; `host` is the Host (or
    /// `:authority`) to send; `identity` checks the connection's peer as
    /// requests do (`tls.verify`).
    pub async fn probe(&self, peer: &HttpPeer, host: &str, identity: &Identity<'_>) -> Verdict {
        let mut peer = peer.clone();
        let t = self.policy.timeout;
        peer.options.connection_timeout =
            Some(peer.options.connection_timeout.map_or(t, |c| c.min(t)));
        peer.options.read_timeout = Some(t);
        peer.options.write_timeout = Some(t);
        // Checks never take a connection from, or leave one in, a pool.
        peer.options.idle_timeout = None;
        match tokio::time::timeout(t, self.run(&peer, host, identity)).await {
            Err(_) => (
                false,
                format!("no answer within {}", humantime::format_duration(t)),
            ),
            Ok(Ok(seen)) => (true, seen),
            Ok(Err(seen)) => (false, seen),
        }
    }

    async fn run(
        &self,
        peer: &HttpPeer,
        host: &str,
        identity: &Identity<'_>,
    ) -> Result<String, String> {
        match self.policy.kind {
            HealthCheckKind::Tcp => {
                let (stream, _) = self.tcp.get_stream(peer).await.map_err(short)?;
                identity(Some(&Digest {
                    ssl_digest: stream.get_ssl_digest(),
                    ..Digest::default()
                }))?;
                Ok("connected".into())
            }
            HealthCheckKind::Http => {
                let (mut session, _) = self.http.get_http_session(peer).await.map_err(short)?;
                identity(session.digest())?;
                let req = request("GET", &self.policy.path, host)?;
                session.write_request_header(req).await.map_err(short)?;
                session.finish_request_body().await.map_err(short)?;
                session.read_response_header().await.map_err(short)?;
                let status = session
                    .response_header()
                    .map(|r| r.status.as_u16())
                    .ok_or("no response")?;
                if self.policy.passes(status) {
                    Ok(status.to_string())
                } else {
                    Err(format!("status {status}"))
                }
            }
            HealthCheckKind::Grpc => {
                let (session, _) = self.http.get_http_session(peer).await.map_err(short)?;
                identity(session.digest())?;
                let HttpSession::H2(mut h2) = session else {
                    return Err("the endpoint did not speak HTTP/2".into());
                };
                let mut req = request("POST", GRPC_PATH, host)?;
                for (name, value) in [("content-type", "application/grpc"), ("te", "trailers")] {
                    req.insert_header(name, value).map_err(short)?;
                }
                h2.write_request_header(req, false).map_err(short)?;
                h2.write_request_body(Bytes::from_static(GRPC_REQUEST), true)
                    .await
                    .map_err(short)?;
                h2.read_response_header().await.map_err(short)?;
                let head = h2.response_header().ok_or("no response")?;
                if head.status != 200 {
                    return Err(format!("status {}", head.status.as_u16()));
                }
                let mut status = head
                    .headers
                    .get("grpc-status")
                    .map(|v| v.as_bytes().to_vec());
                let mut body = Vec::new();
                if status.is_none() {
                    while let Some(chunk) = h2.read_response_body().await.map_err(short)? {
                        body.extend_from_slice(&chunk);
                        if body.len() > GRPC_MAX_BODY {
                            return Err("answer too large for a health check".into());
                        }
                    }
                    let trailers = h2.read_trailers().await.map_err(short)?;
                    status = trailers
                        .as_ref()
                        .and_then(|t| t.get("grpc-status"))
                        .map(|v| v.as_bytes().to_vec());
                }
                match status.as_deref() {
                    Some(b"0") if body.len() >= 5 && &body[5..] == GRPC_SERVING => {
                        Ok("SERVING".into())
                    }
                    Some(b"0") => Err("not SERVING".into()),
                    Some(code) => Err(format!("grpc-status {}", String::from_utf8_lossy(code))),
                    None => Err("no grpc-status".into()),
                }
            }
        }
    }
}

fn request(method: &str, path: &str, host: &str) -> Result<Box<RequestHeader>, String> {
    let mut req = RequestHeader::build(method, path.as_bytes(), None).map_err(short)?;
    req.insert_header("host", host).map_err(short)?;
    req.insert_header(
        "user-agent",
        concat!("meshgate-health/", env!("CARGO_PKG_VERSION")),
    )
    .map_err(short)?;
    Ok(Box::new(req))
}

/// A Pingora error as a few words for the log and `/upstreams`.
fn short<E: std::ops::Deref<Target = pingora::Error>>(e: E) -> String {
    let text = match &e.cause {
        Some(cause) => format!("{}: {cause}", e.etype().as_str()),
        None => e.etype().as_str().to_string(),
    };
    text.chars().take(200).collect()
}
