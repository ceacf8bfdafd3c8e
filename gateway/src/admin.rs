//! The admin listener: liveness, readiness, the effective config and
//! Prometheus metrics. It runs on its own port so data-plane routes can never
//! shadow it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use http::{header, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use crate::config::model::Config;
use crate::runtime::Runtime;

pub struct AdminApp {
    runtime: Arc<ArcSwap<Runtime>>,
    /// The file the gateway runs from, read again by `POST /reload`.
    config_path: std::path::PathBuf,
    /// What a reload starts and stops.
    listeners: Arc<crate::listening::Listeners>,
    /// Where a new process waits for the listening sockets (as at start).
    upgrade_socket: std::path::PathBuf,
    /// Set once every listener has accepted a probe connection.
    listeners_up: AtomicBool,
}

impl AdminApp {
    pub fn new(
        runtime: Arc<ArcSwap<Runtime>>,
        config_path: std::path::PathBuf,
        listeners: Arc<crate::listening::Listeners>,
        upgrade_socket: std::path::PathBuf,
    ) -> Self {
        AdminApp {
            runtime,
            config_path,
            listeners,
            upgrade_socket,
            listeners_up: AtomicBool::new(false),
        }
    }

    /// `POST /reload`, from loopback only: reload the config file as
    /// SIGHUP does, and answer with the outcome (200 with the generation,
    /// or 422 with every error), so `meshgate reload` can report it.
    async fn reload(&self, session: &ServerSession) -> Response<Vec<u8>> {
        if let Some(refused) = loopback_post(session) {
            return refused;
        }
        let reloaded = crate::reload::reload_and_log(
            self.config_path.clone(),
            self.runtime.clone(),
            self.listeners.clone(),
        )
        .await;
        match reloaded {
            Ok(reloaded) => json(
                StatusCode::OK,
                serde_json::json!({
                    "status": "reloaded",
                    "generation": reloaded.generation,
                    "listeners": reloaded.listeners,
                }),
            ),
            Err(e) => json(
                StatusCode::UNPROCESSABLE_ENTITY,
                serde_json::json!({
                    "status": "rejected",
                    "generation": self.runtime.load().generation,
                    "errors": e.to_string().lines().collect::<Vec<_>>(),
                }),
            ),
        }
    }

    /// `POST /upgrade`, from loopback only: start a binary upgrade
    /// ([`crate::upgrade`]) and answer once the new process waits for the
    /// sockets (202 with its id), or with why it did not start (500).
    async fn upgrade(&self, session: &ServerSession) -> Response<Vec<u8>> {
        if let Some(refused) = loopback_post(session) {
            return refused;
        }
        let (config, socket) = (self.config_path.clone(), self.upgrade_socket.clone());
        let started =
            tokio::task::spawn_blocking(move || crate::upgrade::start(&config, &socket)).await;
        match started {
            Ok(Ok(pid)) => json(
                StatusCode::ACCEPTED,
                serde_json::json!({ "status": "handing over", "from": std::process::id(), "to": pid }),
            ),
            Ok(Err(e)) => json(
                StatusCode::INTERNAL_SERVER_ERROR,
                serde_json::json!({ "status": "not upgraded", "error": e.to_string() }),
            ),
            Err(e) => json(
                StatusCode::INTERNAL_SERVER_ERROR,
                serde_json::json!({ "status": "not upgraded", "error": e.to_string() }),
            ),
        }
    }

    /// Ready = a config is loaded, every `dns`/`srv` upstream's first
    /// lookup has ended and every listener accepts connections. Once
    /// ready, it stays so until SIGTERM: an upstream a reload adds does not
    /// take the node out of its balancer while its names are looked up.
    async fn ready(&self) -> Result<(), String> {
        if crate::lifecycle::draining() {
            return Err("shutting down (SIGTERM)".to_string());
        }
        if !crate::lifecycle::signals_handled() {
            return Err("starting: signal handlers not yet installed".to_string());
        }
        if self.listeners_up.load(Ordering::Acquire) {
            return Ok(());
        }
        let rt = self.runtime.load_full();
        rt.discovery_answered()?;
        rt.probe_listeners().await?;
        self.listeners_up.store(true, Ordering::Release);
        Ok(())
    }
}

/// The refusal of a request to a `POST`-only endpoint that is not a
/// `POST` from loopback (they change what the process runs); `None` for
/// one that is.
fn loopback_post(session: &ServerSession) -> Option<Response<Vec<u8>>> {
    if session.req_header().method != http::Method::POST {
        let mut r = json(
            StatusCode::METHOD_NOT_ALLOWED,
            serde_json::json!({ "error": "only POST" }),
        );
        r.headers_mut()
            .insert(header::ALLOW, http::HeaderValue::from_static("POST"));
        return Some(r);
    }
    let local = session
        .client_addr()
        .and_then(|a| a.as_inet())
        .is_some_and(|a| a.ip().to_canonical().is_loopback());
    if !local {
        let path = session.req_header().uri.path();
        return Some(json(
            StatusCode::FORBIDDEN,
            serde_json::json!({ "error": format!("{path} is accepted only from loopback") }),
        ));
    }
    None
}

fn json(status: StatusCode, body: serde_json::Value) -> Response<Vec<u8>> {
    let body = body.to_string().into_bytes();
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, body.len())
        .body(body)
        .unwrap_or_default()
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path().to_string();
        let method = &session.req_header().method;
        if path == "/reload" {
            return self.reload(session).await;
        }
        if path == "/upgrade" {
            return self.upgrade(session).await;
        }
        if method != http::Method::GET && method != http::Method::HEAD {
            let mut r = json(
                StatusCode::METHOD_NOT_ALLOWED,
                serde_json::json!({ "error": "only GET and HEAD" }),
            );
            r.headers_mut()
                .insert(header::ALLOW, http::HeaderValue::from_static("GET, HEAD"));
            return r;
        }
        match path.as_str() {
            "/healthz" => json(StatusCode::OK, serde_json::json!({ "status": "alive" })),
            "/readyz" => match self.ready().await {
                Ok(()) => json(StatusCode::OK, serde_json::json!({ "status": "ready" })),
                Err(why) => json(
                    StatusCode::SERVICE_UNAVAILABLE,
                    serde_json::json!({ "status": "not ready", "reason": why }),
                ),
            },
            "/metrics" => {
                // Endpoint states change with time (an ejection runs out),
                // so they are counted when asked for.
                for pool in &self.runtime.load().upstreams {
                    pool.series.set_endpoints(pool.state_counts());
                    pool.series.set_pending(pool.gate.pending());
                    if let Some(a) = &pool.adaptive {
                        pool.series.set_concurrency_limit(a.limit());
                    }
                }
                let body = crate::telemetry::metrics::metrics().render();
                Response::builder()
                    .status(StatusCode::OK)
                    .header(
                        header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )
                    .header(header::CONTENT_LENGTH, body.len())
                    .body(body)
                    .unwrap_or_default()
            }
            "/upstreams" => json(StatusCode::OK, upstreams_json(&self.runtime.load())),
            "/config" => {
                let rt = self.runtime.load();
                let mut body = config_json(&rt.config);
                body["generation"] = rt.generation.into();
                // Which process answers: `meshgate upgrade` waits for the new one.
                body["pid"] = std::process::id().into();
                json(StatusCode::OK, body)
            }
            _ => json(
                StatusCode::NOT_FOUND,
                serde_json::json!({ "error": "not found", "endpoints": ["/healthz", "/readyz", "/config", "/upstreams", "/metrics", "POST /reload", "POST /upgrade"] }),
            ),
        }
    }
}

/// `GET /upstreams`: each upstream's endpoints as meshgate sees them now.
pub fn upstreams_json(rt: &crate::runtime::Runtime) -> serde_json::Value {
    use crate::endpoints::set::State;
    use crate::endpoints::Now;
    let now = Now::default();
    let wall = std::time::SystemTime::now();
    let upstreams: Vec<serde_json::Value> = rt
        .upstreams
        .iter()
        .map(|pool| {
            let members = pool.members();
            let set = &members.set;
            let endpoints: Vec<serde_json::Value> = set
                .members()
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    let mut e = serde_json::json!({
                        "address": m.addr.to_string(),
                        "weight": m.weight,
                        "in_flight": m.record.load.in_flight(),
                        "consecutive_failures": m.record.outlier.failures(),
                    });
                    if let Some(last) = m.record.health.last() {
                        e["last_health_check"] = serde_json::json!({
                            "at": humantime::format_rfc3339_seconds(last.at).to_string(),
                            "passed": last.passed,
                            "result": last.detail,
                        });
                    }
                    let state = set.state(i, &now).unwrap_or(State::Healthy);
                    e["state"] = state.name().into();
                    if let State::Ejected { until } = state {
                        let left = until.saturating_duration_since(now.get());
                        e["ejected_for_seconds"] = left.as_secs_f64().into();
                        e["ejected_until"] = humantime::format_rfc3339_seconds(wall + left)
                            .to_string()
                            .into();
                    }
                    e
                })
                .collect();
            let refresh = pool.last_refresh().map(|r| {
                serde_json::json!({
                    "at": humantime::format_rfc3339_seconds(r.at).to_string(),
                    "result": if r.failed.is_some() { "failure" } else { "success" },
                    "error": r.failed,
                })
            });
            let mut u = serde_json::json!({
                "name": pool.name,
                "discovery": pool.discovery.as_str(),
                "last_refresh": refresh,
                "load_balancing": set.policy().load_balancing.as_str(),
                "endpoints": endpoints,
            });
            // Counted only where `limits.max_connections` asks for it.
            if let Some(c) = &pool.gate.connections {
                u["open_connections"] = c.open().into();
            }
            u
        })
        .collect();
    serde_json::json!({ "generation": rt.generation, "upstreams": upstreams })
}

/// The effective config (defaults filled in) as JSON.
pub fn config_json(c: &Config) -> serde_json::Value {
    use crate::config::model::{
        Action, Alpn, ClientAuth, HeaderRewrite, HostMatch, LimitMode, LimitScope, RateLimitKey,
        TlsVersion,
    };
    use serde_json::json;
    let secs = |d: Duration| d.as_secs_f64();
    let rewrite = |rw: &HeaderRewrite| {
        json!({
            "set": fields(&rw.set),
            "add": fields(&rw.add),
            "remove": rw.remove.iter().map(|k| k.to_string()).collect::<Vec<_>>(),
        })
    };
    let routes: Vec<_> = c
        .routes
        .iter()
        .map(|r| {
            let mut v = json!({
                "name": r.name,
                "listeners": r.listeners,
                "host": r.host.as_ref().map(|h| match h {
                    HostMatch::Exact(h) => h.clone(),
                    HostMatch::Wildcard(s) => format!("*{s}"),
                }),
                "methods": r.methods.iter().map(|m| m.to_string()).collect::<Vec<_>>(),
                "headers": pairs(&r.headers),
                "timeout_seconds": secs(r.timeout),
                "response_headers": rewrite(&r.response_headers),
                "rate_limits": r.rate_limits,
                "policies": r.policies,
                "max_body_bytes": r.max_body_bytes,
                "buffer_request_body": r.buffer_request_body,
            });
            if let Some(p) = &r.path {
                let (k, val) = p.describe();
                v[k] = json!(val);
            }
            match &r.action {
                Action::Forward(f) => {
                    v["split"] = f.targets.iter().map(|(u, w)| (u.clone(), json!(w))).collect::<serde_json::Map<_, _>>().into();
                    v["strip_prefix"] = json!(f.strip_prefix);
                    v["request_headers"] = rewrite(&f.request_headers);
                }
                Action::Respond { status, body, content_type } => {
                    v["respond"] = json!({ "status": status.as_u16(), "body": String::from_utf8_lossy(body), "content_type": String::from_utf8_lossy(content_type.as_bytes()) });
                }
                Action::Redirect { location, status } => {
                    v["redirect"] = json!({ "location": String::from_utf8_lossy(location.as_bytes()), "status": status.as_u16() });
                }
            }
            v
        })
        .collect();
    json!({
        "gateway": {
            "name": c.gateway.name,
            "workers": c.gateway.workers,
            "work_stealing": c.gateway.work_stealing,
            "shutdown_grace_period_seconds": secs(c.gateway.shutdown_grace_period),
            "shutdown_delay_seconds": secs(c.gateway.shutdown_delay),
            "header_case": c.gateway.header_case.as_str(),
            "http1_engine": c.gateway.http1_engine.as_str(),
            "max_pending_head_bytes": c.gateway.max_pending_head_bytes,
            "overload": c.gateway.overload_memory.map(|m| serde_json::json!({ "memory": m })),
        },
        "admin": { "listen": c.admin.listen.to_string() },
        "telemetry": {
            "access_log": c.telemetry.access_log.as_str(),
            "access_log_file": c.telemetry.access_log_file.as_ref().map(|p| p.display().to_string()),
            "tracing": c.telemetry.tracing.as_ref().map(|t| json!({
                // Credentials in the URL never leave the process.
                "endpoint": crate::config::model::redact_secrets(&t.endpoint),
                "service_name": t.service_name,
                "sample_ratio": t.sample_ratio,
                "resource": t.resource.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
                "export_interval_seconds": secs(t.export_interval),
                "export_timeout_seconds": secs(t.export_timeout),
                "queue_size": t.queue_size,
            })),
        },
        "config_hash": c.source_hash,
        "listeners": c.listeners.iter().map(|l| json!({
            "name": l.name,
            "bind": l.bind.to_string(),
            "direction": l.direction.as_str(),
            "trusted_proxies": l.trusted_proxies.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
            "limits": {
                "max_connections": l.limits.max_connections,
                "max_request_header_bytes": l.limits.max_request_header_bytes,
                "max_request_headers": l.limits.max_request_headers,
                "max_uri_bytes": l.limits.max_uri_bytes,
                "idle_timeout_seconds": secs(l.limits.idle_timeout),
                "header_read_timeout_seconds": l.limits.header_read_timeout.map(secs),
                "handshake_timeout_seconds": secs(l.limits.handshake_timeout),
                "max_requests_per_connection": l.limits.max_requests_per_connection,
                "body_read_timeout_seconds": secs(l.limits.body_read_timeout),
            },
            "tls": l.tls.as_ref().map(|t| json!({
                "certs": t.certs,
                "min_version": match t.min_version { TlsVersion::V1_2 => "1.2", TlsVersion::V1_3 => "1.3" },
                "alpn": match t.alpn { Alpn::H2H1 => vec!["h2", "http/1.1"], Alpn::H1 => vec!["http/1.1"], Alpn::H2 => vec!["h2"] },
                "client_ca": t.client_ca.as_ref().map(|ca| ca.path.display().to_string()),
                "client_auth": t.client_ca.as_ref().map(|_| match t.client_auth { ClientAuth::Require => "require", ClientAuth::Optional => "optional" }),
                "forward_identity": t.forward_identity,
                "session_tickets": if t.client_ca.is_some() { 0 } else { t.session_tickets },
            })),
        })).collect::<Vec<_>>(),
        "certs": c.certs.iter().map(|cert| json!({
            "name": cert.name,
            "cert": cert.cert_path.display().to_string(),
            "key": cert.key_path.display().to_string(),
        })).collect::<Vec<_>>(),
        "routes": routes,
        "upstreams": c.upstreams.iter().map(|u| json!({
            "name": u.name,
            "endpoints": u.endpoints.iter().map(|e| json!({
                "addr": e.addr,
                "resolved": e.sockets.first().map(ToString::to_string),
                "addresses": e.sockets.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "weight": e.weight,
            })).collect::<Vec<_>>(),
            "discovery": u.discovery.as_str(),
            "protocol": u.protocol.as_str(),
            "connect_timeout_seconds": secs(u.connect_timeout),
            "read_timeout_seconds": secs(u.read_timeout),
            "write_timeout_seconds": secs(u.write_timeout),
            "idle_timeout_seconds": secs(u.idle_timeout),
            "connect_retries": u.connect_retries,
            "load_balancing": u.load_balancing.as_str(),
            "hash_key": match &u.load_balancing {
                crate::config::model::LoadBalancing::ConsistentHash(k) => Some(k.as_text()),
                _ => None,
            },
            "slow_start_seconds": u.slow_start.map(secs),
            "panic_threshold": u.panic_threshold,
            "health_check": u.health_check.as_ref().map(|h| json!({
                "kind": h.kind.as_str(),
                "path": h.path,
                "host": h.host,
                "expect_status": h.expect_status,
                "interval_seconds": secs(h.interval),
                "timeout_seconds": secs(h.timeout),
                "healthy": h.healthy,
                "unhealthy": h.unhealthy,
            })),
            "limits": json!({
                "max_connections": u.limits.max_connections,
                "max_requests": u.limits.max_requests,
                "max_pending": u.limits.max_pending,
                "queue_timeout_seconds": secs(u.limits.queue_timeout),
            }),
            "concurrency": if u.adaptive_concurrency { "adaptive" } else { "off" },
            "retry_budget": u.retry_budget.map(|b| json!({ "ratio": b.ratio, "min_per_second": b.min_per_second })),
            "outlier": u.outlier.map(|o| json!({
                "consecutive_failures": o.consecutive_failures,
                "base_ejection_seconds": secs(o.base_ejection),
                "max_ejection_seconds": secs(o.max_ejection),
                "max_ejected_percent": o.max_ejected_percent,
            })),
            "tls": u.tls.as_ref().map(|t| json!({
                "ca": t.ca.as_ref().map(|ca| ca.path.display().to_string()),
                "client_cert": t.client.as_ref().map(|c| c.cert_path.display().to_string()),
                "client_key": t.client.as_ref().map(|c| c.key_path.display().to_string()),
                "sni": t.sni,
                "verify": t.verify.as_ref().map(|v| v.as_text()),
            })),
        })).collect::<Vec<_>>(),
        "rate_limits": c.rate_limits.iter().map(|p| json!({
            "name": p.name,
            "key": match &p.key {
                RateLimitKey::ClientIp => "client_ip".to_string(),
                RateLimitKey::Header(h) => format!("header:{h}"),
                RateLimitKey::Route => "route".to_string(),
                RateLimitKey::Identity => "identity".to_string(),
            },
            "rate": p.rate,
            "per_seconds": secs(p.per),
            "burst": p.burst,
            "mode": match p.mode { LimitMode::Enforce => "enforce", LimitMode::Shadow => "shadow" },
            "scope": match p.scope { LimitScope::Local => "local", LimitScope::Global { .. } => "global" },
            "batch": match p.scope { LimitScope::Local => None, LimitScope::Global { batch } => Some(batch) },
            "headers_on_allowed": p.headers_on_allowed,
            "max_keys": p.max_keys,
        })).collect::<Vec<_>>(),
        "policies": c.policies.iter().map(|p| {
            let rule = |r: &crate::config::model::AuthzRule| json!({
                "identity": r.identity.iter().map(|i| i.as_text()).collect::<Vec<_>>(),
                "source": r.source.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
                "methods": r.methods.iter().map(|m| m.to_string()).collect::<Vec<_>>(),
                "path_prefix": r.path_prefix,
                "headers": pairs(&r.headers),
            });
            json!({
                "name": p.name,
                "allow": p.allow.iter().map(rule).collect::<Vec<_>>(),
                "deny": p.deny.iter().map(rule).collect::<Vec<_>>(),
                "default": if p.default_allow { "allow" } else { "deny" },
                "mode": match p.mode { LimitMode::Enforce => "enforce", LimitMode::Shadow => "shadow" },
            })
        }).collect::<Vec<_>>(),
        // The password never leaves the process.
        "redis": c.redis.as_ref().map(|r| json!({
            "url": r.redacted_url(),
            "ca": r.ca.as_ref().map(|(path, _)| path.display().to_string()),
            "on_error": r.on_error.as_str(),
            "timeout_seconds": secs(r.timeout),
            "key_prefix": r.key_prefix,
        })),
        "egress": c.egress.as_ref().map(|e| json!({
            "allow": e.allow.iter().map(|a| json!({ "host": a.pattern.to_string(), "ports": a.ports })).collect::<Vec<_>>(),
            "ca": e.ca.as_ref().map(|ca| ca.path.display().to_string()),
            "resolve": e.resolve.iter().map(|(host, pins)| (host.clone(), pins.iter().map(|p| match p.port {
                Some(port) => std::net::SocketAddr::new(p.ip, port).to_string(),
                None => p.ip.to_string(),
            }).collect::<Vec<_>>().into())).collect::<serde_json::Map<_, _>>(),
            "deny_networks": e.deny_networks.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
            "connect_timeout_seconds": secs(e.connect_timeout),
            "timeout_seconds": secs(e.timeout),
            "tunnel_idle_timeout_seconds": secs(e.tunnel_idle_timeout),
            "passthrough_port": e.passthrough_port,
        })),
    })
}

/// A rewrite's fields, named as the config spells them.
fn fields(list: &[crate::config::model::FieldValue]) -> serde_json::Value {
    list.iter()
        .map(|f| {
            (
                String::from_utf8_lossy(&f.spelled).into_owned(),
                String::from_utf8_lossy(f.value.as_bytes())
                    .into_owned()
                    .into(),
            )
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}

fn pairs(list: &[(http::HeaderName, http::HeaderValue)]) -> serde_json::Value {
    list.iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned().into(),
            )
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}
