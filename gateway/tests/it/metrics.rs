//! Prometheus metrics and access logs, scraped and read as an operator would.

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::client::get;
use crate::support::upstream::{dead_addr, echo};
use crate::support::Gateway;

/// Parse the text exposition into `series -> value` (series = name{labels} as printed).
fn scrape(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect()
}

async fn metrics_text(gw: &Gateway) -> String {
    let r = get(gw.admin, "/metrics", &[]).await.unwrap();
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    r.text()
}

/// Scrape once the gateway has recorded `n` requests and finished them all:
/// metrics are recorded in the logging phase, just after the client has its
/// response, and the in-flight gauge drops when the request's context does.
async fn settled(gw: &Gateway, n: f64) -> HashMap<String, f64> {
    let start = Instant::now();
    loop {
        let m = scrape(&metrics_text(gw).await);
        let sum = |prefix: &str| -> f64 {
            m.iter()
                .filter(|(k, _)| k.starts_with(prefix))
                .map(|(_, v)| v)
                .sum()
        };
        let total = sum("meshgate_downstream_requests_total{");
        let in_flight = sum("meshgate_downstream_requests_in_flight{");
        if total >= n && in_flight == 0.0 {
            return m;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "only {total} of {n} requests recorded, {in_flight} in flight"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Requests `exercise` sends.
const EXERCISED: f64 = 11.0;

fn config(up: &str, dead: &str, extra: &str) -> String {
    format!(
        r#"
{extra}
[admin]
listen = "@ADMIN@"
[listeners.public]
bind = "@LISTEN@"
direction = "ingress"
[routes.api]
path_prefix = "/api/"
upstream = "api"
[routes.slow]
path_prefix = "/delay/"
upstream = "api"
[routes.dead]
path = "/dead"
upstream = "dead"
retries = false
[routes.ping]
path = "/ping"
respond = {{ body = "pong" }}
rate_limits = ["watch"]
[rate_limits.watch]
key = "route"
rate = 100
mode = "shadow"
[upstreams.api]
endpoints = ["{up}"]
[upstreams.dead]
endpoints = ["{dead}"]
connect_retries = 0
health_check = {{ kind = "tcp", interval = "1s", timeout = "500ms" }}
[upstreams.found]
endpoints = ["{dead}"]
discovery = "dns"
concurrency = "adaptive"
[routes.flaky]
path = "/flaky"
upstream = "flaky"
[routes.hedged]
path_prefix = "/hedged/"
strip_prefix = "/hedged"
upstream = "api"
hedge = {{ after = "10ms" }}
[upstreams.flaky]
endpoints = ["{dead}", "{up}"]
connect_retries = 1
"#
    )
}

/// Traffic that touches every metric family: success, 404, direct response,
/// a dead upstream, pooled connections.
async fn exercise(gw: &Gateway) {
    for _ in 0..3 {
        assert_eq!(get(gw.listen, "/api/x", &[]).await.unwrap().status, 200);
    }
    assert_eq!(get(gw.listen, "/nothing", &[]).await.unwrap().status, 404);
    assert_eq!(get(gw.listen, "/ping", &[]).await.unwrap().status, 200);
    assert_eq!(get(gw.listen, "/dead", &[]).await.unwrap().status, 502);
    let body = bytes::Bytes::from_static(b"12345");
    let r = crate::support::client::send(
        gw.listen,
        http::Method::POST,
        "/api/upload",
        &[],
        body,
        false,
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    // Round robin starts half of these on the dead endpoint: retried, then answered.
    for _ in 0..4 {
        assert_eq!(get(gw.listen, "/flaky", &[]).await.unwrap().status, 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_happened() {
    let up = echo("api").await;
    let gw = Gateway::start(&config(&up.addr.to_string(), &dead_addr().to_string(), "")).await;
    exercise(&gw).await;
    let m = settled(&gw, EXERCISED).await;
    let v = |s: &str| {
        *m.get(s)
            .unwrap_or_else(|| panic!("no series {s} in {m:#?}"))
    };
    assert_eq!(
        v(
            r#"meshgate_downstream_requests_total{listener="public",method="GET",route="api",status_class="2xx"}"#
        ),
        3.0
    );
    assert_eq!(
        v(
            r#"meshgate_downstream_requests_total{listener="public",method="POST",route="api",status_class="2xx"}"#
        ),
        1.0
    );
    assert_eq!(
        v(
            r#"meshgate_downstream_requests_total{listener="public",method="GET",route="",status_class="4xx"}"#
        ),
        1.0
    );
    assert_eq!(
        v(
            r#"meshgate_downstream_requests_total{listener="public",method="GET",route="dead",status_class="5xx"}"#
        ),
        1.0
    );
    assert_eq!(
        v(
            r#"meshgate_downstream_request_duration_seconds_count{listener="public",route="ping",status_class="2xx"}"#
        ),
        1.0
    );
    assert_eq!(
        v(r#"meshgate_downstream_request_bytes_total{listener="public",route="api"}"#),
        5.0
    );
    assert_eq!(
        v(r#"meshgate_downstream_response_bytes_total{listener="public",route="ping"}"#),
        4.0
    );
    assert_eq!(v(r#"meshgate_no_route_total{listener="public"}"#), 1.0);
    assert_eq!(
        v(r#"meshgate_upstream_requests_total{status_class="2xx",upstream="api"}"#),
        4.0
    );
    assert_eq!(
        v(r#"meshgate_upstream_requests_total{status_class="none",upstream="dead"}"#),
        1.0
    );
    assert_eq!(
        v(r#"meshgate_upstream_errors_total{kind="connect",upstream="dead"}"#),
        1.0
    );
    assert_eq!(
        v(r#"meshgate_upstream_request_duration_seconds_count{upstream="api"}"#),
        4.0
    );
    // Four requests over new client connections, one upstream connection reused.
    let new = v(r#"meshgate_upstream_connections_total{reused="false",upstream="api"}"#);
    let reused = v(r#"meshgate_upstream_connections_total{reused="true",upstream="api"}"#);
    assert_eq!(new + reused, 4.0);
    assert!(
        reused >= 2.0,
        "pool reuse not visible: new={new} reused={reused}"
    );
    assert_eq!(
        v(r#"meshgate_upstream_connect_duration_seconds_count{upstream="api"}"#),
        new
    );
    assert_eq!(
        v(r#"meshgate_downstream_requests_in_flight{listener="public"}"#),
        0.0
    );
    assert_eq!(v("meshgate_config_generation"), 1.0);
    assert!(v("meshgate_config_last_load_timestamp_seconds") > 1.7e9);
    let hash = get(gw.admin, "/config", &[]).await.unwrap().json()["config_hash"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        v(&format!(
            r#"meshgate_build_info{{config_hash="{hash}",version="{}"}}"#,
            env!("CARGO_PKG_VERSION")
        )),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_requests_and_open_connections_are_visible() {
    let up = echo("api").await;
    let gw = Gateway::start(&config(&up.addr.to_string(), &dead_addr().to_string(), "")).await;
    let listen = gw.listen;
    let slow = tokio::spawn(async move { get(listen, "/delay/1500", &[]).await });
    let in_flight = r#"meshgate_downstream_requests_in_flight{listener="public"}"#;
    let active = r#"meshgate_downstream_connections_active{direction="ingress",listener="public"}"#;
    let start = Instant::now();
    loop {
        let m = scrape(&metrics_text(&gw).await);
        if m.get(in_flight) == Some(&1.0) {
            assert_eq!(m.get(active), Some(&1.0), "{m:#?}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "in-flight never reached 1: {m:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(slow.await.unwrap().unwrap().status, 200);
    // The gauge drops when the request's context does, just after the last byte.
    let start = Instant::now();
    while scrape(&metrics_text(&gw).await).get(in_flight) != Some(&0.0) {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "in-flight never went back to 0"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_accepts_the_output() {
    if Command::new("promtool").arg("--version").output().is_err() {
        crate::support::skip(
            "promtool not installed (make test installs the `prometheus` package)",
        );
        return;
    }
    let up = echo("api").await;
    let gw = Gateway::start(&config(&up.addr.to_string(), &dead_addr().to_string(), "")).await;
    exercise(&gw).await;
    settled(&gw, EXERCISED).await;
    let text = metrics_text(&gw).await;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_the_endpoint() {
    if Command::new("prometheus")
        .arg("--version")
        .output()
        .is_err()
    {
        crate::support::skip(
            "prometheus not installed (make test installs the `prometheus` package)",
        );
        return;
    }
    let up = echo("api").await;
    let gw = Gateway::start(&config(&up.addr.to_string(), &dead_addr().to_string(), "")).await;
    exercise(&gw).await;
    settled(&gw, EXERCISED).await;
    let dir = tempfile::tempdir().unwrap();
    let prom_cfg = dir.path().join("prometheus.yml");
    std::fs::write(
        &prom_cfg,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: meshgate\n    static_configs:\n      - targets: ['{}']\n",
            gw.admin
        ),
    )
    .unwrap();
    let port = crate::support::free_port();
    let mut prom = Command::new("prometheus")
        .arg(format!("--config.file={}", prom_cfg.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let prom_addr = format!("127.0.0.1:{port}").parse().unwrap();
    let start = Instant::now();
    let result = loop {
        let q = "/api/v1/query?query=meshgate_downstream_requests_total%7Broute%3D%22api%22%7D";
        if let Ok(r) = get(prom_addr, q, &[]).await {
            if r.status == 200 {
                let j = r.json();
                if j["data"]["result"]
                    .as_array()
                    .is_some_and(|a| !a.is_empty())
                {
                    break Ok(j);
                }
            }
        }
        if start.elapsed() > Duration::from_secs(30) {
            let targets = get(prom_addr, "/api/v1/targets", &[])
                .await
                .map(|r| r.text());
            break Err(format!("no scraped data after 30s; targets: {targets:?}"));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let _ = prom.kill();
    let _ = prom.wait();
    let j = result.unwrap();
    let series = &j["data"]["result"];
    let total: f64 = series
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["value"][1].as_str().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(total, 4.0, "{j}");
    assert_eq!(series[0]["metric"]["job"], "meshgate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_lines_describe_each_request() {
    let up = echo("api").await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("access.log");
    let telemetry = format!(
        "[telemetry]\naccess_log = \"json\"\naccess_log_file = \"{}\"",
        file.display()
    );
    let gw = Gateway::start(&config(
        &up.addr.to_string(),
        &dead_addr().to_string(),
        &telemetry,
    ))
    .await;
    let ok = get(
        gw.listen,
        "/api/items?x=1",
        &[("x-request-id", "rid-1"), ("user-agent", "probe/1")],
    )
    .await
    .unwrap();
    assert_eq!(ok.status, 200);
    assert_eq!(
        get(gw.listen, "/dead", &[("x-request-id", "rid-2")])
            .await
            .unwrap()
            .status,
        502
    );
    // The admin readiness probe is not logged; only data-plane requests are.
    // Waited for by their ids: a line is written as its exchange ends, so
    // the two need not come in the order the requests were sent.
    let text = crate::support::wait_for_log(&file, Duration::from_secs(5), |t| {
        let lines = crate::support::json_lines(t);
        ["rid-1", "rid-2"]
            .iter()
            .all(|id| lines.iter().any(|l| l["request_id"] == *id))
    })
    .await;
    let lines = crate::support::json_lines(&text);
    let first = lines
        .iter()
        .find(|l| l["request_id"] == "rid-1")
        .expect("line for rid-1");
    assert_eq!(first["route"], "api");
    assert_eq!(first["upstream"], "api");
    assert_eq!(first["endpoint"], up.addr.to_string());
    assert_eq!(first["status"], 200);
    assert_eq!(first["method"], "GET");
    assert_eq!(first["path"], "/api/items");
    assert_eq!(first["listener"], "public");
    assert_eq!(first["direction"], "ingress");
    assert_eq!(first["protocol"], "HTTP/1.1");
    assert_eq!(first["user_agent"], "probe/1");
    assert_eq!(first["bytes_out"].as_u64(), Some(ok.body.len() as u64));
    assert!(first["duration_ms"].as_f64().unwrap() > 0.0);
    assert!(first["upstream_duration_ms"].as_f64().unwrap() > 0.0);
    assert!(first["client"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert_eq!(first["error"], "");
    // A plain connection: no TLS details.
    assert_eq!(first["tls_version"], "");
    assert_eq!(first["tls_cipher"], "");
    assert_eq!(first["sni"], "");
    let failed = lines
        .iter()
        .find(|l| l["request_id"] == "rid-2")
        .expect("line for rid-2");
    assert_eq!(failed["status"], 502);
    assert_eq!(failed["error"], "upstream unreachable");
}

/// The overview dashboard's panels are each explained in
/// docs/observability.md ("what each panel answers").
#[test]
fn every_overview_panel_is_documented() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let docs = std::fs::read_to_string(root.join("docs/observability.md")).unwrap();
    let board: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("docs/grafana/meshgate-overview.json")).unwrap(),
    )
    .unwrap();
    let panels = board["panels"].as_array().unwrap();
    assert!(panels.len() > 10);
    for panel in panels {
        let title = panel["title"].as_str().unwrap();
        assert!(
            docs.contains(&format!("| {title} |")),
            "overview panel {title:?} has no row in docs/observability.md"
        );
    }
}

/// Every metric a dashboard queries must exist in a real scrape, so renaming a
/// metric without updating the dashboards fails here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboards_only_use_exported_metrics() {
    let up = echo("api").await;
    let gw = Gateway::start(&config(&up.addr.to_string(), &dead_addr().to_string(), "")).await;
    exercise(&gw).await;
    settled(&gw, EXERCISED).await;
    // A hedge: the answer takes 100 ms, the hedge goes after 10.
    assert_eq!(
        get(gw.listen, "/hedged/delay/100", &[])
            .await
            .unwrap()
            .status,
        200
    );
    let exported: std::collections::HashSet<String> = scrape(&metrics_text(&gw).await)
        .keys()
        .map(|series| series.split(['{', ' ']).next().unwrap().to_string())
        .collect();
    for exercised in [
        "meshgate_upstream_retries_total",
        "meshgate_upstream_hedges_total",
    ] {
        assert!(
            exported.contains(exercised),
            "{exercised} not exercised: {exported:?}"
        );
    }

    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/grafana");
    let mut dashboards = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        dashboards += 1;
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
                .unwrap_or_else(|e| panic!("{}: not JSON: {e}", path.display()));
        assert!(
            json["uid"].is_string() && json["title"].is_string(),
            "{}: no uid/title",
            path.display()
        );
        let panels = json["panels"].as_array().expect("panels");
        assert!(!panels.is_empty());
        let mut queries = Vec::new();
        collect_queries(&json, &mut queries);
        // A row only groups the panels below it.
        for p in panels.iter().filter(|p| p["type"] != "row") {
            assert!(
                p["targets"].as_array().is_some_and(|t| !t.is_empty()),
                "{}: panel {} has no query",
                path.display(),
                p["title"]
            );
        }
        let mut names = 0;
        for q in &queries {
            for name in metric_names(q) {
                names += 1;
                assert!(
                    exported.contains(&name),
                    "{}: `{name}` (in `{q}`) is not exported; exported: {exported:?}",
                    path.display()
                );
            }
        }
        assert!(names > 0, "{}: no metric names found", path.display());
    }
    assert_eq!(dashboards, 3, "overview, route and upstream dashboards");
}

/// Every PromQL string in a dashboard: panel `expr`s and variable queries.
fn collect_queries(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr" | "definition", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => collect_queries(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| collect_queries(v, out)),
        _ => {}
    }
}

/// Identifiers in a query that name meshgate metrics.
fn metric_names(q: &str) -> Vec<String> {
    let mut out = Vec::new();
    let bytes = q.as_bytes();
    let mut i = 0;
    while let Some(pos) = q[i..].find("meshgate_") {
        let start = i + pos;
        let preceded_by_ident =
            start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        if !preceded_by_ident {
            out.push(q[start..end].to_string());
        }
        i = end;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_attempt_counts_once() {
    let slow = echo("slow").await;
    let gw = Gateway::start(&format!(
        "{}\n[routes.slow]\npath_prefix = \"/\"\nupstream = \"slow\"\n[upstreams.slow]\nendpoints = [\"{}\"]\nread_timeout = \"200ms\"\n",
        crate::support::HEAD.trim_end(),
        slow.addr
    ))
    .await;
    assert_eq!(
        get(gw.listen, "/delay/2000", &[]).await.unwrap().status,
        504
    );
    let m = settled(&gw, 1.0).await;
    assert_eq!(
        m.get(r#"meshgate_upstream_errors_total{kind="timeout",upstream="slow"}"#),
        Some(&1.0),
        "{m:#?}"
    );
    assert_eq!(
        m.get(r#"meshgate_upstream_retries_total{upstream="slow"}"#),
        None
    );
}

/// Send `first` on a new connection and read its answer, which must be a
/// `200` with a `Content-Length` (the echo's); then send `next`, or
/// half-close without one, and return what comes until the gateway closes.
async fn after_one_answer(addr: std::net::SocketAddr, first: &[u8], next: Option<&[u8]>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
    c.write_all(first).await.unwrap();
    let answer = one_response(&mut c).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    match next {
        Some(next) => c.write_all(next).await.unwrap(),
        None => c.shutdown().await.unwrap(),
    }
    let mut rest = String::new();
    c.read_to_string(&mut rest).await.ok();
    rest
}

/// Read one response with a `Content-Length` (the echo's) off `c`.
async fn one_response(c: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&got);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(str::to_owned)
                })
                .and_then(|v| v.trim().parse().ok())
                .expect("the echo sends Content-Length");
            if body.len() >= length {
                return text.into_owned();
            }
        }
        let n = c.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
}

/// Heads the proxy never sees (Pingora's parser refuses them and answers
/// itself, or the client stops sending) get an access-log line and are
/// counted, as every request the proxy takes is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_and_unfinished_heads_are_logged_and_counted() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let up = echo("api").await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("access.log");
    let gw = Gateway::start(&format!(
        r#"
[telemetry]
access_log = "json"
access_log_file = "{}"
[admin]
listen = "@ADMIN@"
[listeners.public]
bind = "@LISTEN@"
direction = "ingress"
limits = {{ header_read_timeout = "1s" }}
[routes.api]
path_prefix = "/api/"
upstream = "api"
[upstreams.api]
endpoints = ["{}"]
"#,
        file.display(),
        up.addr
    ))
    .await;
    // What comes back until the gateway closes, a reset included.
    let exchange = |raw: &'static [u8], half_close: bool| async move {
        let (got, _) =
            crate::support::read_to_close(gw.listen, raw, half_close, Duration::from_secs(10))
                .await;
        String::from_utf8_lossy(&got).into_owned()
    };

    let bad = exchange(b"GET /bad HTTP/1.1\r\nHost: x\r\nNo Colon\r\n\r\n", false).await;
    assert!(bad.starts_with("HTTP/1.1 400"), "{bad}");
    // The second request of a kept-alive connection, sent once the first
    // was answered.
    let rest = after_one_answer(
        gw.listen,
        b"GET /api/ok HTTP/1.1\r\nHost: x\r\n\r\n",
        Some(b"GET /second HTTP/1.1\r\nHost: x\r\n\x01\r\n\r\n"),
    )
    .await;
    assert!(rest.starts_with("HTTP/1.1 400"), "{rest}");
    // Pipelined behind a request that is served: Pingora carried the bytes
    // over, and the line still names what they were.
    let pipelined = exchange(
        b"GET /api/first HTTP/1.1\r\nHost: x\r\n\r\nGET /third HTTP/1.1\r\nHost: x\r\n\x01\r\n\r\n",
        false,
    )
    .await;
    assert!(pipelined.starts_with("HTTP/1.1 200"), "{pipelined}");
    assert!(pipelined.contains("HTTP/1.1 400"), "{pipelined}");
    let pipelined = exchange(b"GET /api/second HTTP/1.1\r\nHost: x\r\n\r\nCONNECT piped.test:443 HTTP/1.1\r\nHost: piped.test:443\r\n\r\n",
        false,
    )
    .await;
    assert!(pipelined.contains("HTTP/1.1 405"), "{pipelined}");
    // A CRLF after a body is no request (RFC 9112 §2.2): no line for it,
    // once the client is done.
    let rest = after_one_answer(
        gw.listen,
        b"POST /api/form HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nab\r\n",
        None,
    )
    .await;
    assert_eq!(rest, "");
    let blank = exchange(b"\r\n", true).await;
    assert_eq!(blank, "");
    let connect = exchange(
        b"CONNECT example.test:443 HTTP/1.1\r\nHost: example.test:443\r\n\r\n",
        false,
    )
    .await;
    assert!(connect.starts_with("HTTP/1.1 405"), "{connect}");
    // The client gives up half-way through its head: nothing to answer.
    let unfinished = exchange(b"GET /half HTTP/1.1\r\nHost: x\r\n", true).await;
    assert_eq!(unfinished, "");
    // Half a head, then nothing until header_read_timeout closes it.
    let slow = exchange(b"GET /slow HTTP/1.1\r\nHo", false).await;
    assert_eq!(slow, "");
    // A request logged after all of the above: once its line is written,
    // theirs are too.
    let last = get(gw.listen, "/api/last", &[("x-request-id", "last")])
        .await
        .unwrap();
    assert_eq!(last.status, 200);

    let text = crate::support::wait_for_log(&file, Duration::from_secs(5), |t| {
        crate::support::json_lines(t)
            .iter()
            .any(|l| l["request_id"] == "last")
    })
    .await;
    let lines = crate::support::json_lines(&text);
    let line = |path: &str| {
        lines
            .iter()
            .find(|l| l["path"] == path)
            .unwrap_or_else(|| panic!("no line for {path}: {lines:?}"))
    };
    for (path, method, status, error) in [
        ("/bad", "GET", 400, "malformed or incomplete request head"),
        ("/third", "GET", 400, "malformed or incomplete request head"),
        (
            "piped.test:443",
            "CONNECT",
            405,
            "CONNECT is not served on this connection",
        ),
        (
            "/second",
            "GET",
            400,
            "malformed or incomplete request head",
        ),
        (
            "example.test:443",
            "CONNECT",
            405,
            "CONNECT is not served on this connection",
        ),
        ("/half", "GET", 400, "malformed or incomplete request head"),
        (
            "/slow",
            "GET",
            408,
            "request head not complete within header_read_timeout",
        ),
    ] {
        let l = line(path);
        assert_eq!(l["method"], method, "{l}");
        assert_eq!(l["status"], status, "{l}");
        assert_eq!(l["error"], error, "{l}");
        assert_eq!(l["listener"], "public", "{l}");
        assert_eq!(l["direction"], "ingress", "{l}");
        assert_eq!(l["route"], "", "{l}");
        assert!(
            l["client"].as_str().unwrap().starts_with("127.0.0.1:"),
            "{l}"
        );
    }
    assert_eq!(line("/bad")["protocol"], "HTTP/1.1");
    assert_eq!(line("/api/ok")["status"], 200);
    assert_eq!(line("/api/first")["status"], 200);
    assert_eq!(line("/api/second")["status"], 200);
    assert_eq!(line("/api/form")["status"], 200);
    // One line per request: the five served, the seven refused.
    assert_eq!(lines.len(), 12, "{lines:?}");

    let text = gw
        .wait_for_metric(
            r#"meshgate_downstream_rejected_total{listener="public",reason="malformed"}"#,
            4.0,
            Duration::from_secs(5),
        )
        .await;
    assert_eq!(
        crate::support::metric(
            &text,
            r#"meshgate_downstream_rejected_total{listener="public",reason="malformed"}"#
        ),
        4.0
    );
    assert_eq!(
        crate::support::metric(
            &text,
            r#"meshgate_downstream_rejected_total{listener="public",reason="header_timeout"}"#
        ),
        1.0
    );
    let refused: f64 = ["GET", "CONNECT"]
        .iter()
        .map(|m| {
            crate::support::metric(
                &text,
                &format!(
                    r#"meshgate_downstream_requests_total{{listener="public",method="{m}",route="",status_class="4xx"}}"#
                ),
            )
        })
        .sum();
    assert_eq!(refused, 7.0, "{text}");

    // A head still coming when the gateway stops: nothing is sent, and the
    // line says why.
    let mut cut = tokio::net::TcpStream::connect(gw.listen).await.unwrap();
    cut.write_all(b"GET /cut HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // A round trip on another connection gives the gateway time to read it.
    assert_eq!(get(gw.listen, "/api/sync", &[]).await.unwrap().status, 200);
    crate::support::signal(gw.pid(), "TERM");
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), cut.read_to_end(&mut rest))
        .await
        .expect("closed at shutdown")
        .ok();
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
    let cut_line = |t: &str| {
        crate::support::json_lines(t)
            .into_iter()
            .find(|l| l["path"] == "/cut")
    };
    let text =
        crate::support::wait_for_log(&file, Duration::from_secs(10), |t| cut_line(t).is_some())
            .await;
    let l = cut_line(&text).unwrap();
    assert_eq!(l["status"], 0, "{l}");
    assert_eq!(
        l["error"],
        "gateway stopped before the request head was read"
    );
}
