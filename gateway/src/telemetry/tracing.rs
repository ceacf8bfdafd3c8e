//! OpenTelemetry tracing: a server span per request, a client span per
//! upstream attempt, W3C Trace Context in and out, OTLP/HTTP export.
//!
//! Export never touches the request path: finished spans go into a bounded
//! queue drained by one thread, which batches them and calls the OTLP
//! exporter. A full queue drops the span and counts it, so a dead collector
//! costs requests nothing. The SDK's own batch processor keeps its drop count
//! private, hence this small processor.

use std::borrow::Cow;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use http::{HeaderName, HeaderValue};
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{
    SpanContext, SpanKind, Status, TraceContextExt, TraceFlags, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{SpanExporter as OtlpExporter, WithExportConfig};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    IdGenerator, RandomIdGenerator, Sampler, SdkTracer, SdkTracerProvider, SpanData, SpanExporter,
    SpanProcessor,
};
use opentelemetry_sdk::Resource;
use pingora::http::RequestHeader;

use super::metrics::metrics;
use crate::config::model::Tracing as TracingConfig;

/// Spans sent to the collector in one request at most.
const MAX_BATCH: usize = 512;
/// How long shutdown waits for the last export.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum TracingError {
    #[error("cannot build the OTLP exporter for {endpoint}: {source}")]
    Exporter {
        endpoint: String,
        #[source]
        source: opentelemetry_otlp::ExporterBuildError,
    },
    #[error("cannot start the span export thread: {0}")]
    Thread(#[from] std::io::Error),
}

/// The tracer, its provider and the propagator; one per process.
pub struct Tracing {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    propagator: TraceContextPropagator,
    /// Span ids for the hops of unsampled requests (the SDK's own generator).
    ids: RandomIdGenerator,
}

impl std::fmt::Debug for Tracing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tracing")
    }
}

impl Tracing {
    /// Build the exporter and the export thread. Call outside any tokio
    /// runtime: the blocking HTTP client refuses to be built inside one.
    pub fn start(cfg: &TracingConfig, gateway_name: &str) -> Result<Tracing, TracingError> {
        let mut exporter = OtlpExporter::builder()
            .with_http()
            .with_endpoint(cfg.endpoint.clone())
            .with_timeout(cfg.export_timeout)
            .build()
            .map_err(|source| TracingError::Exporter {
                endpoint: cfg.endpoint.clone(),
                source,
            })?;
        let mut attributes = vec![
            KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            KeyValue::new("meshgate.gateway", gateway_name.to_string()),
        ];
        attributes.extend(
            cfg.resource
                .iter()
                .map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
        );
        let resource = Resource::builder()
            .with_service_name(cfg.service_name.clone())
            .with_attributes(attributes)
            .build();
        exporter.set_resource(&resource);
        let processor =
            BoundedBatchProcessor::start(exporter, cfg.queue_size, cfg.export_interval)?;
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                cfg.sample_ratio,
            ))))
            .with_resource(resource)
            .build();
        let tracer = provider.tracer("meshgate");
        Ok(Tracing {
            provider,
            tracer,
            propagator: TraceContextPropagator::new(),
            ids: RandomIdGenerator::default(),
        })
    }

    /// The server span for a request, child of the caller's `traceparent` if
    /// any. `attributes` is only called when the span is sampled.
    pub fn server_span(
        &self,
        req: &RequestHeader,
        attributes: impl FnOnce() -> Vec<KeyValue>,
    ) -> Context {
        // Most requests carry no context: spare them the propagator's lookups.
        let parent = if req.headers.contains_key(&TRACEPARENT) {
            self.propagator.extract(&HeaderExtractor(&req.headers))
        } else {
            Context::new()
        };
        let span = self
            .tracer
            .span_builder(span_name(&req.method))
            .with_kind(SpanKind::Server)
            .start_with_context(&self.tracer, &parent);
        let cx = parent.with_span(span);
        if cx.span().is_recording() {
            cx.span().set_attributes(attributes());
        }
        cx
    }

    /// A client span for one upstream attempt, child of the server span.
    /// `attributes` is only called when the span is sampled.
    pub fn client_span(
        &self,
        server: &Context,
        method: &http::Method,
        attributes: impl FnOnce() -> Vec<KeyValue>,
    ) -> Context {
        let parent = server.span();
        if !parent.is_recording() {
            // The parent-based sampler drops every child of an unsampled
            // span: the hop needs only its own span id to propagate, not an
            // SDK span that would record nothing.
            let sc = parent.span_context();
            if sc.is_valid() && !sc.is_sampled() {
                return server.with_remote_span_context(SpanContext::new(
                    sc.trace_id(),
                    self.ids.new_span_id(),
                    sc.trace_flags(),
                    false,
                    sc.trace_state().clone(),
                ));
            }
        }
        let span = self
            .tracer
            .span_builder(span_name(method))
            .with_kind(SpanKind::Client)
            .start_with_context(&self.tracer, server);
        let cx = server.with_span(span);
        if cx.span().is_recording() {
            cx.span().set_attributes(attributes());
        }
        cx
    }

    /// Flush what is queued and stop the export thread.
    pub fn shutdown(&self) {
        if let Err(e) = self.provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT) {
            log::warn!("tracing shutdown: {e}");
        }
    }
}

static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
static TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// Span names are the method; the usual ones need no allocation.
fn span_name(method: &http::Method) -> Cow<'static, str> {
    match method.as_str() {
        "GET" => Cow::Borrowed("GET"),
        "POST" => Cow::Borrowed("POST"),
        "PUT" => Cow::Borrowed("PUT"),
        "DELETE" => Cow::Borrowed("DELETE"),
        "HEAD" => Cow::Borrowed("HEAD"),
        "PATCH" => Cow::Borrowed("PATCH"),
        "OPTIONS" => Cow::Borrowed("OPTIONS"),
        other => Cow::Owned(other.to_string()),
    }
}

/// W3C `traceparent` (version 00) for a valid span context.
fn traceparent(sc: &SpanContext) -> Option<HeaderValue> {
    if !sc.is_valid() {
        return None;
    }
    let mut buf = [0u8; 55];
    buf[..3].copy_from_slice(b"00-");
    hex_into(&mut buf[3..35], &sc.trace_id().to_bytes());
    buf[35] = b'-';
    hex_into(&mut buf[36..52], &sc.span_id().to_bytes());
    buf[52] = b'-';
    hex_into(
        &mut buf[53..],
        &[(sc.trace_flags() & TraceFlags::SAMPLED).to_u8()],
    );
    HeaderValue::from_bytes(&buf).ok()
}

fn hex_into(out: &mut [u8], bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = DIGITS[usize::from(b >> 4)];
        pair[1] = DIGITS[usize::from(b & 0xf)];
    }
}

/// Write `cx` as `traceparent` (and `tracestate`, when it has one) into the
/// upstream request, replacing what the client sent.
///
/// The same header the SDK's `TraceContextPropagator` writes (a test holds
/// them equal), built without `format!` and without an empty `tracestate`:
/// every request pays this, sampled or not.
/// Each field as (name, spelling, value); `None`: remove the client's.
pub fn trace_fields(cx: &Context) -> [(&'static HeaderName, &'static str, Option<HeaderValue>); 2] {
    let span = cx.span();
    let sc = span.span_context();
    let state = sc.trace_state().header();
    let state = (sc.is_valid() && !state.is_empty())
        .then(|| HeaderValue::from_str(&state).ok())
        .flatten();
    [
        (&TRACEPARENT, "traceparent", traceparent(sc)),
        (&TRACESTATE, "tracestate", state),
    ]
}

/// The trace id of a context as 32 hex digits, or "" when it has no valid span.
pub fn trace_id(cx: &Context) -> String {
    let sc = cx.span().span_context().clone();
    if sc.is_valid() {
        sc.trace_id().to_string()
    } else {
        String::new()
    }
}

/// End a span, marking it failed with `error` when given.
pub fn end(cx: &Context, status_code: Option<u16>, error: Option<&str>, error_from_status: u16) {
    let span = cx.span();
    if !span.is_recording() {
        span.end();
        return;
    }
    if let Some(code) = status_code.filter(|c| *c > 0) {
        span.set_attribute(KeyValue::new("http.response.status_code", i64::from(code)));
    }
    match (error, status_code) {
        (Some(e), _) => {
            span.set_attribute(KeyValue::new("error.type", e.to_string()));
            span.set_status(Status::error(e.to_string()));
        }
        (None, Some(code)) if code >= error_from_status => {
            span.set_attribute(KeyValue::new("error.type", code.to_string()));
            span.set_status(Status::error(format!("HTTP {code}")));
        }
        _ => {}
    }
    span.end();
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

enum Message {
    Span(Box<SpanData>),
    /// Export everything queued, then acknowledge.
    Flush(SyncSender<()>),
    /// Export what is queued until the deadline, drop the rest, stop.
    Shutdown(SyncSender<()>, Instant),
}

/// Bounded queue + one export thread; see the module docs.
#[derive(Debug)]
struct BoundedBatchProcessor {
    tx: SyncSender<Message>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl BoundedBatchProcessor {
    fn start(exporter: OtlpExporter, queue: usize, interval: Duration) -> std::io::Result<Self> {
        let (tx, rx) = sync_channel(queue);
        let thread = std::thread::Builder::new()
            .name("otlp-export".into())
            .spawn(move || export_loop(rx, exporter, interval))?;
        Ok(BoundedBatchProcessor {
            tx,
            thread: Mutex::new(Some(thread)),
        })
    }

    fn request(
        &self,
        message: impl FnOnce(SyncSender<()>) -> Message,
        timeout: Duration,
    ) -> OTelSdkResult {
        let (ack_tx, ack_rx) = sync_channel(1);
        self.tx
            .send(message(ack_tx))
            .map_err(|_| opentelemetry_sdk::error::OTelSdkError::AlreadyShutdown)?;
        ack_rx
            .recv_timeout(timeout)
            .map_err(|_| opentelemetry_sdk::error::OTelSdkError::Timeout(timeout))
    }
}

impl SpanProcessor for BoundedBatchProcessor {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        match self.tx.try_send(Message::Span(Box::new(span))) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                metrics().trace_spans_dropped.inc()
            }
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.request(Message::Flush, SHUTDOWN_TIMEOUT)
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        let deadline = Instant::now() + timeout;
        let result = self.request(|ack| Message::Shutdown(ack, deadline), timeout);
        // A thread stuck in an export past the deadline is left behind rather
        // than holding up the exit.
        if result.is_ok() {
            if let Some(t) = self.thread.lock().ok().and_then(|mut t| t.take()) {
                let _ = t.join();
            }
        }
        result
    }
}

/// How often the export thread wakes to drain the queue. It sleeps rather
/// than blocking on the queue, so ending a span never wakes a thread.
const DRAIN_INTERVAL: Duration = Duration::from_millis(50);

fn export_loop(rx: Receiver<Message>, exporter: OtlpExporter, interval: Duration) {
    let mut batch: Vec<SpanData> = Vec::with_capacity(MAX_BATCH);
    let mut next_export = Instant::now() + interval;
    loop {
        std::thread::sleep(DRAIN_INTERVAL.min(interval));
        loop {
            match rx.try_recv() {
                Ok(Message::Span(span)) => {
                    batch.push(*span);
                    if batch.len() >= MAX_BATCH {
                        export(&exporter, &mut batch);
                    }
                }
                Ok(Message::Flush(ack)) => {
                    export(&exporter, &mut batch);
                    let _ = ack.send(());
                }
                Ok(Message::Shutdown(ack, deadline)) => {
                    while let Ok(Message::Span(span)) = rx.try_recv() {
                        batch.push(*span);
                    }
                    for chunk in std::mem::take(&mut batch).chunks(MAX_BATCH) {
                        if Instant::now() < deadline {
                            export(&exporter, &mut chunk.to_vec());
                        } else {
                            metrics().trace_spans_dropped.inc_by(chunk.len() as u64);
                        }
                    }
                    let _ = exporter.shutdown();
                    let _ = ack.send(());
                    return;
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    export(&exporter, &mut batch);
                    return;
                }
            }
        }
        if Instant::now() >= next_export {
            export(&exporter, &mut batch);
            next_export = Instant::now() + interval;
        }
    }
}

fn export(exporter: &OtlpExporter, batch: &mut Vec<SpanData>) {
    if batch.is_empty() {
        return;
    }
    let spans = std::mem::take(batch);
    let n = spans.len() as u64;
    match futures_executor::block_on(exporter.export(spans)) {
        Ok(()) => metrics().trace_spans_exported.inc_by(n),
        Err(e) => {
            metrics().trace_export_errors.inc();
            metrics().trace_spans_dropped.inc_by(n);
            log::warn!("OTLP export of {n} span(s) failed: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use opentelemetry::trace::{SpanId, TraceId, TraceState};

    use super::*;

    fn context(flags: u8, state: &[(&str, &str)]) -> Context {
        let state = TraceState::from_key_value(state.iter().copied()).unwrap();
        Context::new().with_remote_span_context(SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            TraceFlags::new(flags),
            true,
            state,
        ))
    }

    fn client_request() -> RequestHeader {
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        req.insert_header(
            "traceparent",
            "00-11111111111111111111111111111111-2222222222222222-01",
        )
        .unwrap();
        req.insert_header("tracestate", "client=1").unwrap();
        req
    }

    fn values<'a>(req: &'a RequestHeader, name: &str) -> Vec<&'a str> {
        req.headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect()
    }

    /// What the proxy does with `trace_fields`, on a plain request.
    fn inject(cx: &Context, req: &mut RequestHeader) {
        for (name, wire, value) in trace_fields(cx) {
            match value {
                Some(v) => {
                    let _ = req.insert_header(wire, v);
                }
                None => {
                    req.remove_header(name);
                }
            }
        }
    }

    #[test]
    fn inject_writes_what_the_sdk_propagator_writes() {
        // 0x03: a flag bit beyond `sampled` is not propagated.
        for (flags, state) in [
            (0x01, vec![("vendor", "1"), ("other", "x")]),
            (0x00, vec![("vendor", "1")]),
            (0x03, vec![]),
        ] {
            let cx = context(flags, &state);
            let mut sdk: HashMap<String, String> = HashMap::new();
            TraceContextPropagator::new().inject_context(&cx, &mut sdk);
            let mut req = client_request();
            inject(&cx, &mut req);
            assert_eq!(values(&req, "traceparent"), [sdk["traceparent"].as_str()]);
            if state.is_empty() {
                // The SDK writes an empty `tracestate`; the client's is dropped either way.
                assert_eq!(sdk["tracestate"], "");
                assert!(values(&req, "tracestate").is_empty());
            } else {
                assert_eq!(values(&req, "tracestate"), [sdk["tracestate"].as_str()]);
            }
        }
    }

    #[test]
    fn inject_without_a_valid_context_removes_the_clients_headers() {
        let mut req = client_request();
        inject(&Context::new(), &mut req);
        assert!(values(&req, "traceparent").is_empty());
        assert!(values(&req, "tracestate").is_empty());
    }

    #[test]
    fn span_names_are_the_method() {
        for m in ["GET", "POST", "PURGE", "PROPFIND"] {
            let method = http::Method::from_bytes(m.as_bytes()).unwrap();
            assert_eq!(span_name(&method), m);
        }
    }
}
