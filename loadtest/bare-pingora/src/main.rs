//! The floor meshgate is measured against (`make bench`): a Pingora proxy
//! with nothing of its own, built with the same release profile. Every
//! request goes to one pre-built peer over a pooled keep-alive connection.
//!
//! Usage: `bare-pingora LISTEN UPSTREAM [CERT KEY]`. With CERT and KEY the
//! listener terminates TLS (Mozilla intermediate, ALPN h2 and http/1.1);
//! without, it speaks HTTP/1.1 and h2c, like a plain meshgate listener.

use std::net::SocketAddr;

use async_trait::async_trait;
use pingora::apps::HttpServerOptions;
use pingora::listeners::tls::TlsSettings;
use pingora::proxy::{http_proxy_service, ProxyHttp, Session};
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server};
use pingora::upstreams::peer::HttpPeer;
use pingora::Result;

// As in meshgate (`gateway/src/main.rs`): the floor is measured with the
// same allocator.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Bare {
    peer: HttpPeer,
}

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(self.peer.clone()))
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (listen, upstream) = match (args.first(), args.get(1)) {
        (Some(l), Some(u)) => (l.clone(), u.clone()),
        _ => {
            eprintln!("usage: bare-pingora LISTEN UPSTREAM [CERT KEY]");
            std::process::exit(64);
        }
    };
    let Ok(upstream) = upstream.parse::<SocketAddr>() else {
        eprintln!("UPSTREAM must be IP:PORT, got {upstream}");
        std::process::exit(64);
    };
    let conf = ServerConf {
        threads: 1,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut service = http_proxy_service(
        &server.configuration,
        Bare {
            peer: HttpPeer::new(upstream, false, String::new()),
        },
    );
    match (args.get(2), args.get(3)) {
        (Some(cert), Some(key)) => {
            let mut tls = TlsSettings::intermediate(cert, key).unwrap_or_else(|e| {
                eprintln!("cannot load {cert} / {key}: {e}");
                std::process::exit(64);
            });
            tls.enable_h2();
            service.add_tls_with_settings(&listen, None, tls);
        }
        _ => {
            let mut options = HttpServerOptions::default();
            options.h2c = true;
            if let Some(app) = service.app_logic_mut() {
                app.server_options = Some(options);
            }
            service.add_tcp(&listen);
        }
    }
    server.add_service(service);
    server.run(RunArgs::default());
}
