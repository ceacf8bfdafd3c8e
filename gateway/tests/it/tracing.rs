//! OpenTelemetry traces: a real OTLP/HTTP receiver decodes what two chained
//! gateways export and checks one connected trace.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::client::get;
use crate::support::upstream::{dead_addr, echo};
use crate::support::Gateway;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::{span::SpanKind, status::StatusCode, Span};
use prost::Message;
use tokio::net::TcpListener;

/// A span as received, with its resource's service.name.
#[derive(Clone, Debug)]
struct Received {
    service: String,
    span: Span,
}

impl Received {
    fn attr(&self, key: &str) -> Option<String> {
        attr(&self.span.attributes, key)
    }
}

fn attr(attrs: &[KeyValue], key: &str) -> Option<String> {
    attrs.iter().find(|kv| kv.key == key).and_then(|kv| {
        match kv.value.as_ref()?.value.as_ref()? {
            Value::StringValue(s) => Some(s.clone()),
            Value::IntValue(i) => Some(i.to_string()),
            Value::BoolValue(b) => Some(b.to_string()),
            Value::DoubleValue(d) => Some(d.to_string()),
            _ => None,
        }
    })
}

struct Collector {
    addr: SocketAddr,
    spans: Arc<Mutex<Vec<Received>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An OTLP/HTTP (protobuf) trace receiver on a loopback port.
async fn collector() -> Collector {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let spans: Arc<Mutex<Vec<Received>>> = Arc::default();
    let store = spans.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let store = store.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let store = store.clone();
                    async move {
                        let ok_path = req.uri().path() == "/v1/traces";
                        let body = req
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        let status = match ExportTraceServiceRequest::decode(body) {
                            Ok(export) if ok_path => {
                                let mut out = store.lock().unwrap();
                                for rs in export.resource_spans {
                                    let service = rs
                                        .resource
                                        .as_ref()
                                        .and_then(|r| attr(&r.attributes, "service.name"))
                                        .unwrap_or_default();
                                    for ss in rs.scope_spans {
                                        for span in ss.spans {
                                            out.push(Received {
                                                service: service.clone(),
                                                span,
                                            });
                                        }
                                    }
                                }
                                200
                            }
                            _ => 400,
                        };
                        let body = ExportTraceServiceResponse::default().encode_to_vec();
                        Ok::<_, std::convert::Infallible>(
                            Response::builder()
                                .status(status)
                                .header("content-type", "application/x-protobuf")
                                .body(Full::new(Bytes::from(body)))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Collector { addr, spans, task }
}

impl Collector {
    /// Wait until `n` spans of `trace_id` (hex) have arrived.
    async fn wait_for(&self, trace_id: &str, n: usize) -> Vec<Received> {
        let start = Instant::now();
        loop {
            let got: Vec<Received> = self
                .spans
                .lock()
                .unwrap()
                .iter()
                .filter(|r| hex(&r.span.trace_id) == trace_id)
                .cloned()
                .collect();
            if got.len() >= n {
                return got;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "only {} of {n} spans arrived: {got:#?}",
                got.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn tracing_section(service: &str, collector: SocketAddr, ratio: f64) -> String {
    tracing_section_logging(service, collector, ratio, std::path::Path::new("/dev/null"))
}

fn tracing_section_logging(
    service: &str,
    collector: SocketAddr,
    ratio: f64,
    log: &std::path::Path,
) -> String {
    let log = log.display();
    format!(
        "[telemetry]\naccess_log = \"json\"\naccess_log_file = \"{log}\"\n[telemetry.tracing]\nendpoint = \"http://{collector}/v1/traces\"\nservice_name = \"{service}\"\nsample_ratio = {ratio:.2}\nexport_interval = \"100ms\"\nresource = {{ \"deployment.environment\" = \"test\" }}\n"
    )
}

fn gateway_config(tracing: &str, route: &str, upstream: &str, upstream_addr: SocketAddr) -> String {
    format!(
        "{tracing}[admin]\nlisten = \"@ADMIN@\"\n[listeners.public]\nbind = \"@LISTEN@\"\ndirection = \"mesh\"\n[routes.{route}]\nupstream = \"{upstream}\"\nretries = false\n[upstreams.{upstream}]\nendpoints = [\"{upstream_addr}\"]\nconnect_retries = 0\n"
    )
}

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_chained_gateways_make_one_connected_trace() {
    let otlp = collector().await;
    let app = echo("app").await;
    let gw_b = Gateway::start(&gateway_config(
        &tracing_section("gw-b", otlp.addr, 1.0),
        "to_app",
        "app",
        app.addr,
    ))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("a.log");
    let gw_a = Gateway::start(&gateway_config(
        &tracing_section_logging("gw-a", otlp.addr, 1.0, &log),
        "to_b",
        "gw_b",
        gw_b.listen,
    ))
    .await;

    let traceparent = format!("00-{TRACE_ID}-{CLIENT_SPAN}-01");
    let r = get(
        gw_a.listen,
        "/orders/7",
        &[("traceparent", &traceparent), ("tracestate", "vendor=1")],
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let upstream_saw = r.json()["headers"]["traceparent"]
        .as_str()
        .unwrap()
        .to_string();
    // The caller's vendor state travels with the trace, through both hops.
    assert_eq!(r.json()["headers"]["tracestate"], "vendor=1");

    let spans = otlp.wait_for(TRACE_ID, 4).await;
    let by = |service: &str, kind: SpanKind| -> Received {
        spans
            .iter()
            .find(|r| r.service == service && r.span.kind == kind as i32)
            .unwrap_or_else(|| panic!("no {kind:?} span from {service}: {spans:#?}"))
            .clone()
    };
    let a_server = by("gw-a", SpanKind::Server);
    let a_client = by("gw-a", SpanKind::Client);
    let b_server = by("gw-b", SpanKind::Server);
    let b_client = by("gw-b", SpanKind::Client);

    // One chain: caller -> A server -> A client -> B server -> B client -> app.
    assert_eq!(hex(&a_server.span.parent_span_id), CLIENT_SPAN);
    assert_eq!(a_client.span.parent_span_id, a_server.span.span_id);
    assert_eq!(b_server.span.parent_span_id, a_client.span.span_id);
    assert_eq!(b_client.span.parent_span_id, b_server.span.span_id);
    let parts: Vec<&str> = upstream_saw.split('-').collect();
    assert_eq!(parts.len(), 4, "{upstream_saw}");
    assert_eq!(
        parts[1], TRACE_ID,
        "the app saw another trace: {upstream_saw}"
    );
    assert_eq!(
        parts[2],
        hex(&b_client.span.span_id),
        "the app's parent is B's client span"
    );
    assert_eq!(parts[3], "01");

    // Names and attributes follow the HTTP semantic conventions.
    assert_eq!(a_server.span.name, "GET to_b");
    assert_eq!(b_client.span.name, "GET");
    for s in [&a_server, &b_server] {
        assert_eq!(s.attr("http.request.method").as_deref(), Some("GET"));
        assert_eq!(s.attr("url.path").as_deref(), Some("/orders/7"));
        assert_eq!(s.attr("http.response.status_code").as_deref(), Some("200"));
        assert_eq!(s.attr("network.peer.address").as_deref(), Some("127.0.0.1"));
        assert_eq!(s.attr("server.address").as_deref(), Some("127.0.0.1"));
        assert_eq!(s.attr("meshgate.listener").as_deref(), Some("public"));
        assert_eq!(s.attr("meshgate.direction").as_deref(), Some("mesh"));
    }
    assert_eq!(b_server.attr("meshgate.route").as_deref(), Some("to_app"));
    assert_eq!(b_client.attr("meshgate.upstream").as_deref(), Some("app"));
    assert_eq!(
        b_client.attr("server.port").as_deref(),
        Some(app.addr.port().to_string().as_str())
    );
    assert_eq!(a_client.attr("meshgate.upstream").as_deref(), Some("gw_b"));
    assert_eq!(
        a_server.span.status.as_ref().map_or(0, |s| s.code),
        StatusCode::Unset as i32
    );

    // The access log carries the same trace id.
    let text =
        crate::support::wait_for_log(&log, Duration::from_secs(5), |t| t.lines().next().is_some())
            .await;
    let line: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(line["trace_id"], TRACE_ID);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_set_span_status() {
    let otlp = collector().await;
    let gw = Gateway::start(&gateway_config(
        &tracing_section("gw", otlp.addr, 1.0),
        "dead",
        "dead",
        dead_addr(),
    ))
    .await;
    let traceparent = format!("00-{TRACE_ID}-{CLIENT_SPAN}-01");
    let r = get(gw.listen, "/", &[("traceparent", &traceparent)])
        .await
        .unwrap();
    assert_eq!(r.status, 502);
    let spans = otlp.wait_for(TRACE_ID, 2).await;
    let kinds: HashMap<i32, &Received> = spans.iter().map(|s| (s.span.kind, s)).collect();
    let server = kinds[&(SpanKind::Server as i32)];
    let client = kinds[&(SpanKind::Client as i32)];
    assert_eq!(
        server.span.status.as_ref().unwrap().code,
        StatusCode::Error as i32
    );
    assert_eq!(
        server.attr("http.response.status_code").as_deref(),
        Some("502")
    );
    assert_eq!(
        client.span.status.as_ref().unwrap().code,
        StatusCode::Error as i32
    );
    assert_eq!(client.attr("error.type").as_deref(), Some("connect"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_follows_the_parent_and_the_ratio() {
    let otlp = collector().await;
    let app = echo("app").await;
    // Ratio 0: the gateway starts no sampled traces of its own...
    let gw = Gateway::start(&gateway_config(
        &tracing_section("gw", otlp.addr, 0.0),
        "r",
        "app",
        app.addr,
    ))
    .await;
    // A `tracestate` without a `traceparent` belongs to no trace: dropped.
    let r = get(gw.listen, "/", &[("tracestate", "stale=1")])
        .await
        .unwrap();
    let tp = r.json()["headers"]["traceparent"]
        .as_str()
        .expect("context is still propagated")
        .to_string();
    assert!(tp.ends_with("-00"), "unsampled: {tp}");
    assert!(r.json()["headers"]["tracestate"].is_null(), "{}", r.text());
    // An unsampled caller is followed too, its state kept.
    let unsampled_caller = format!("00-{TRACE_ID}-{CLIENT_SPAN}-00");
    let r = get(
        gw.listen,
        "/",
        &[
            ("traceparent", &unsampled_caller),
            ("tracestate", "vendor=2"),
        ],
    )
    .await
    .unwrap();
    let forwarded = r.json()["headers"]["traceparent"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        forwarded.starts_with(&format!("00-{TRACE_ID}-")) && forwarded.ends_with("-00"),
        "{forwarded}"
    );
    assert_ne!(
        forwarded, unsampled_caller,
        "a new parent id for the next hop"
    );
    assert_eq!(r.json()["headers"]["tracestate"], "vendor=2");
    // ...but a sampled caller is followed (parent-based).
    let traceparent = format!("00-{TRACE_ID}-{CLIENT_SPAN}-01");
    let r = get(gw.listen, "/", &[("traceparent", &traceparent)])
        .await
        .unwrap();
    assert!(r.json()["headers"]["traceparent"]
        .as_str()
        .unwrap()
        .ends_with("-01"));
    otlp.wait_for(TRACE_ID, 2).await;
    let unsampled_trace = tp.split('-').nth(1).unwrap().to_string();
    assert!(
        !otlp
            .spans
            .lock()
            .unwrap()
            .iter()
            .any(|s| hex(&s.span.trace_id) == unsampled_trace),
        "an unsampled trace was exported"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_collector_neither_slows_nor_fails_requests() {
    let app = echo("app").await;
    let tracing = format!(
        "[telemetry.tracing]\nendpoint = \"http://{}/v1/traces\"\nexport_interval = \"50ms\"\nexport_timeout = \"200ms\"\nqueue_size = 8\n",
        dead_addr()
    );
    let gw = Gateway::start(&gateway_config(&tracing, "r", "app", app.addr)).await;
    for i in 0..100 {
        let r = get(gw.listen, "/", &[]).await.unwrap();
        assert_eq!(r.status, 200, "request {i}");
    }
    let start = Instant::now();
    loop {
        let text = get(gw.admin, "/metrics", &[]).await.unwrap().text();
        let value = |name: &str| {
            text.lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        if value("meshgate_trace_export_errors_total") > 0.0
            && value("meshgate_trace_spans_dropped_total") > 0.0
        {
            assert_eq!(value("meshgate_trace_spans_exported_total"), 0.0);
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "export failures not counted:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
