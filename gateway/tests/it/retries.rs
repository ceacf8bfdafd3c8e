//! Requests that survive a failed attempt: retries on another endpoint,
//! per-try timeouts, the upstream's retry budget, and what is never
//! retried.

use std::time::{Duration, Instant};

use crate::support::client::get;
use crate::support::upstream::{api_config, close_mid_response, faulty, next_head, Fault, Faulty};
use crate::support::{metric, Gateway, HEAD};

fn config(endpoints: &[&Faulty], route: &str, upstream: &str) -> String {
    api_config(
        endpoints,
        &format!("timeout = \"5s\"\n{route}"),
        &format!("outlier = false\n{upstream}"),
    )
}

/// `n` requests with `method`, `concurrency` at a time: the statuses (0:
/// no answer) and the longest wait.
async fn send(gw: &Gateway, method: &str, n: usize, concurrency: usize) -> (Vec<u16>, Duration) {
    let mut statuses = Vec::new();
    let mut longest = Duration::ZERO;
    for _ in 0..n.div_ceil(concurrency) {
        let batch: Vec<_> = (0..concurrency)
            .map(|_| async {
                let start = Instant::now();
                let method = http::Method::from_bytes(method.as_bytes()).unwrap();
                let r = crate::support::client::send(
                    gw.listen,
                    method,
                    "/",
                    &[],
                    bytes::Bytes::new(),
                    false,
                )
                .await;
                (r.map_or(0, |r| r.status), start.elapsed())
            })
            .collect();
        for (s, t) in futures_util::future::join_all(batch).await {
            statuses.push(s);
            longest = longest.max(t);
        }
    }
    statuses.truncate(n);
    (statuses, longest)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_is_retried_on_another_endpoint_for_get_but_not_for_post() {
    let good = faulty("good", Fault::Good).await;
    let busy = faulty("busy", Fault::Unavailable).await;
    let gw = Gateway::start(&config(&[&good, &busy], "", "")).await;
    let (statuses, _) = send(&gw, "GET", 200, 4).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert!(
        busy.requests() > 20,
        "the 503 endpoint got no requests to retry"
    );
    let m = get(gw.admin, "/metrics", &[]).await.unwrap().text();
    assert_eq!(
        metric(
            &m,
            "meshgate_upstream_retries_total{reason=\"503\",upstream=\"api\"}"
        ) as usize,
        busy.requests(),
        "{m}"
    );

    // POST is not in the default methods: the 503s reach the client.
    let before = busy.requests();
    let (statuses, _) = send(&gw, "POST", 40, 4).await;
    let refused = statuses.iter().filter(|s| **s == 503).count();
    assert_eq!(refused, busy.requests() - before, "{statuses:?}");
    assert!(refused > 5, "{statuses:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_are_retried_and_a_hang_is_cut_by_per_try_timeout() {
    let good = faulty("good", Fault::Good).await;
    let resetting = faulty("resetting", Fault::Reset).await;
    let gw = Gateway::start(&config(&[&good, &resetting], "", "")).await;
    let (statuses, _) = send(&gw, "GET", 100, 4).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert!(resetting.requests() > 10);
    drop(gw);

    let hung = faulty("hung", Fault::Hang).await;
    let gw = Gateway::start(&config(
        &[&good, &hung],
        r#"retries = { attempts = 2, on = ["timeout", "reset", "connect-failure"], per_try_timeout = "200ms" }"#,
        "",
    ))
    .await;
    let (statuses, longest) = send(&gw, "GET", 40, 4).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert!(hung.requests() > 5);
    // Each hang cost one per-try timeout, not the route's 5 s.
    assert!(longest < Duration::from_millis(1500), "{longest:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retry_budget_bounds_what_a_failing_upstream_sees() {
    let a = faulty("a", Fault::Unavailable).await;
    let b = faulty("b", Fault::Unavailable).await;
    let gw = Gateway::start(&config(
        &[&a, &b],
        r#"retries = { attempts = 5, on = ["503"], backoff = "0s", max_backoff = "0s" }"#,
        "retry_budget = { ratio = 0.2, min_per_second = 1 }",
    ))
    .await;
    let (statuses, _) = send(&gw, "GET", 200, 4).await;
    assert!(statuses.iter().all(|s| *s == 503), "{statuses:?}");
    let seen = a.requests() + b.requests();
    // 200 requests, 20% of them and 10 (1/s over the 10 s window) more.
    assert!(seen <= 200 + 40 + 10, "{seen} attempts for 200 requests");
    assert!(seen > 200, "nothing was retried");
    let m = get(gw.admin, "/metrics", &[]).await.unwrap().text();
    assert!(
        metric(
            &m,
            "meshgate_upstream_retry_budget_exhausted_total{upstream=\"api\"}"
        ) >= 100.0,
        "{m}"
    );

    // Without a budget, every request takes all its attempts.
    gw.reload(&config(
        &[&a, &b],
        r#"retries = { attempts = 5, on = ["503"], backoff = "0s", max_backoff = "0s" }"#,
        "retry_budget = false",
    ));
    gw.wait_for_generation(2).await;
    let before = a.requests() + b.requests();
    send(&gw, "GET", 20, 2).await;
    assert_eq!(a.requests() + b.requests() - before, 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_already_streaming_is_never_retried() {
    let cut = close_mid_response().await;
    let config = format!(
        r#"{HEAD}
[routes.api]
path_prefix = "/"
upstream = "api"
retries = {{ attempts = 3, on = ["reset", "connect-failure", "5xx"] }}
[upstreams.api]
endpoints = ["{}"]
"#,
        cut.addr
    );
    let gw = Gateway::start(&config).await;
    let r = get(gw.listen, "/", &[]).await;
    // The head came, the body was cut: the client sees the cut.
    assert!(
        r.is_err() || r.as_ref().is_ok_and(|r| r.body.len() < 100),
        "{r:?}"
    );
    assert_eq!(cut.connections(), 1, "retried after the response began");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_queue_then_refuse_with_upstream_overloaded() {
    let slow = faulty("slow", Fault::Slow).await;
    let gw = Gateway::start(&config(
        &[&slow],
        "",
        r#"limits = { max_requests = 10, max_pending = 5, queue_timeout = "3s" }"#,
    ))
    .await;
    // 30 at once to an endpoint that takes 800 ms each.
    let requests: Vec<_> = (0..30)
        .map(|_| async {
            let start = Instant::now();
            let r = get(gw.listen, "/", &[]).await.unwrap();
            (r, start.elapsed())
        })
        .collect();
    let results = futures_util::future::join_all(requests).await;
    let served: Vec<Duration> = results
        .iter()
        .filter(|(r, _)| r.status == 200)
        .map(|(_, t)| *t)
        .collect();
    let refused: Vec<&(crate::support::client::Resp, Duration)> =
        results.iter().filter(|(r, _)| r.status == 503).collect();
    assert_eq!(served.len(), 15, "10 at once and 5 after waiting");
    assert_eq!(refused.len(), 15);
    // 5 of the served waited for a place: about two endpoint times.
    assert_eq!(
        served
            .iter()
            .filter(|t| **t > Duration::from_millis(1500))
            .count(),
        5
    );
    for (r, t) in refused {
        let j = r.json();
        assert_eq!(j["kind"], "upstream_overloaded", "{j}");
        assert_eq!(j["limit"], "max_pending", "{j}");
        assert_eq!(j["upstream"], "api", "{j}");
        // Refused at once, not after waiting.
        assert!(*t < Duration::from_millis(700), "{t:?}");
    }
    assert_eq!(slow.requests(), 15);
    let m = get(gw.admin, "/metrics", &[]).await.unwrap().text();
    assert_eq!(
        metric(
            &m,
            "meshgate_upstream_overflow_total{limit=\"max_pending\",upstream=\"api\"}"
        ),
        15.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "meshgate_upstream_pending{upstream=\"api\"}"),
        0.0
    );

    // A short queue_timeout: waiting in vain ends in max_requests.
    gw.reload(&config(
        &[&slow],
        "",
        r#"limits = { max_requests = 1, max_pending = 5, queue_timeout = "100ms" }"#,
    ));
    gw.wait_for_generation(2).await;
    let (a, b) = tokio::join!(get(gw.listen, "/", &[]), async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        get(gw.listen, "/", &[]).await
    });
    let mut statuses = [a.unwrap(), b.unwrap()];
    statuses.sort_by_key(|r| r.status);
    assert_eq!(statuses[0].status, 200);
    assert_eq!(statuses[1].status, 503);
    assert_eq!(statuses[1].json()["limit"], "max_requests");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_shows_each_attempt_and_why_it_was_retried() {
    let good = faulty("good", Fault::Good).await;
    let busy = faulty("busy", Fault::Unavailable).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let gw = Gateway::start(&format!(
        "[telemetry]\naccess_log = \"json\"\naccess_log_file = \"{}\"\n{}",
        log.display(),
        config(&[&good, &busy], "", "")
    ))
    .await;
    let (statuses, _) = send(&gw, "GET", 10, 1).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let start = Instant::now();
    let lines = loop {
        let lines = crate::support::json_lines(&std::fs::read_to_string(&log).unwrap_or_default());
        if lines.len() >= 10 {
            break lines;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "{lines:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let retried: Vec<&serde_json::Value> = lines.iter().filter(|l| l["attempts"] == 2).collect();
    assert!(!retried.is_empty(), "{lines:?}");
    for l in &retried {
        assert_eq!(l["retries"], format!("{}/503", busy.upstream.addr), "{l}");
        assert_eq!(l["endpoint"], good.upstream.addr.to_string(), "{l}");
        assert_eq!(l["status"], 200);
    }
    for l in lines.iter().filter(|l| l["attempts"] == 1) {
        assert_eq!(l["retries"], "", "{l}");
    }
}

/// `max_connections` bounds the connections the upstream ever sees: past
/// it requests wait for a pooled connection, then are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_bounds_upstream_connections_and_requests_wait_for_one() {
    let slow = faulty("slow", Fault::Slow).await;
    let gw = Gateway::start(&config(
        &[&slow],
        "",
        r#"limits = { max_connections = 2, max_pending = 10, queue_timeout = "3s" }"#,
    ))
    .await;
    // Six at once to an endpoint that takes 800 ms each, over two
    // connections: two rounds of waiting, every one served.
    let requests: Vec<_> = (0..6)
        .map(|_| async {
            let start = Instant::now();
            let r = get(gw.listen, "/", &[]).await.unwrap();
            (r.status, start.elapsed())
        })
        .collect();
    let results = futures_util::future::join_all(requests).await;
    assert!(results.iter().all(|(s, _)| *s == 200), "{results:?}");
    let waited = |rounds: u64| {
        results
            .iter()
            .filter(|(_, t)| *t > Duration::from_millis(800 * rounds - 100))
            .count()
    };
    assert_eq!((waited(2), waited(3)), (4, 2), "{results:?}");
    assert_eq!(
        slow.upstream.connections(),
        2,
        "the upstream saw more connections"
    );
    let u = get(gw.admin, "/upstreams", &[]).await.unwrap().json();
    assert_eq!(u["upstreams"][0]["open_connections"], 2, "{u}");

    // A short wait: one served, the other refused naming the limit.
    gw.reload(&config(
        &[&slow],
        "",
        r#"limits = { max_connections = 1, max_pending = 10, queue_timeout = "200ms" }"#,
    ));
    gw.wait_for_generation(2).await;
    let (a, b) = tokio::join!(get(gw.listen, "/", &[]), get(gw.listen, "/", &[]));
    let mut answers = [a.unwrap(), b.unwrap()];
    answers.sort_by_key(|r| r.status);
    assert_eq!(answers[0].status, 200);
    assert_eq!(answers[1].status, 503);
    let j = answers[1].json();
    assert_eq!(
        (&j["kind"], &j["limit"]),
        (&"upstream_overloaded".into(), &"max_connections".into()),
        "{j}"
    );
    let m = get(gw.admin, "/metrics", &[]).await.unwrap().text();
    assert_eq!(
        metric(
            &m,
            "meshgate_upstream_overflow_total{limit=\"max_connections\",upstream=\"api\"}"
        ),
        1.0,
        "{m}"
    );
}

/// One endpoint answers one request in five after 800 ms: with `hedge`,
/// each of those is also sent to the other endpoint after 100 ms, whose
/// answer wins; the slow attempt is cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hedging_cuts_the_tail_of_a_sometimes_slow_endpoint() {
    let tail = faulty("tail", Fault::SlowSometimes).await;
    let good = faulty("good", Fault::Good).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let gw = Gateway::start(&format!(
        "[telemetry]\naccess_log = \"json\"\naccess_log_file = \"{}\"\n{}",
        log.display(),
        config(&[&tail, &good], "hedge = { after = \"100ms\" }", "")
    ))
    .await;
    let mut took = Vec::new();
    for _ in 0..50 {
        let batch: Vec<_> = (0..4)
            .map(|_| async {
                let start = Instant::now();
                let r = get(gw.listen, "/", &[]).await;
                (r.map_or(0, |r| r.status), start.elapsed())
            })
            .collect();
        for (status, t) in futures_util::future::join_all(batch).await {
            assert_eq!(status, 200);
            took.push(t);
        }
    }
    took.sort();
    let p99 = took[took.len() * 99 / 100 - 1];
    assert!(p99 < Duration::from_millis(250), "p99 {p99:?}: {took:?}");
    // The slow answers the tail endpoint began: each one was hedged, and
    // the hedge won.
    let slow = tail.requests().div_ceil(5);
    assert!(
        slow >= 15,
        "only {} requests reached the tail endpoint",
        tail.requests()
    );
    let m = get(gw.admin, "/metrics", &[]).await.unwrap().text();
    let won = metric(
        &m,
        "meshgate_upstream_hedges_total{upstream=\"api\",won=\"true\"}",
    ) as usize;
    let lost = metric(
        &m,
        "meshgate_upstream_hedges_total{upstream=\"api\",won=\"false\"}",
    ) as usize;
    assert!(
        won >= slow,
        "{won} hedges won, {slow} slow answers begun\n{m}"
    );
    // A fast attempt is hedged only when this machine stalls it 100 ms.
    assert!(
        won + lost <= slow + 10,
        "{won} + {lost} hedges for {slow} slow answers"
    );

    let start = Instant::now();
    let lines = loop {
        let lines = crate::support::json_lines(&std::fs::read_to_string(&log).unwrap_or_default());
        if lines.len() >= 200 {
            break lines;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "{}", lines.len());
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let hedged: Vec<_> = lines.iter().filter(|l| l["hedged"] == 1).collect();
    assert_eq!(hedged.len(), won + lost);
    for l in hedged {
        assert_eq!(l["attempts"], 2, "{l}");
        assert_eq!(l["status"], 200, "{l}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unavailable_is_retried_as_a_503_and_grpc_timeout_caps_the_deadline() {
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    let down = crate::support::upstream::grpc_health(Arc::new(AtomicBool::new(false))).await;
    let up = crate::support::upstream::grpc_health(Arc::new(AtomicBool::new(true))).await;
    let slow = faulty("slow", Fault::Slow).await;
    let config = format!(
        r#"{HEAD}
[routes.grpc]
path_prefix = "/test."
upstream = "grpc"
retries = {{ on = ["503"], methods = ["POST"] }}
[routes.slow]
path_prefix = "/"
upstream = "slow"
timeout = "5s"
[upstreams.grpc]
endpoints = ["{}", "{}"]
protocol = "h2c"
outlier = false
[upstreams.slow]
endpoints = ["{}"]
"#,
        down.addr, up.addr, slow.upstream.addr
    );
    let gw = Gateway::start(&config).await;
    for _ in 0..20 {
        let r = crate::support::client::send(
            gw.listen,
            http::Method::POST,
            "/test.Svc/Call",
            &[("content-type", "application/grpc"), ("te", "trailers")],
            bytes::Bytes::from_static(&[0, 0, 0, 0, 0]),
            true,
        )
        .await
        .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.header("grpc-status"), Some("0"), "{r:?}");
    }
    let m = get(gw.admin, "/metrics", &[]).await.unwrap().text();
    assert!(
        metric(
            &m,
            "meshgate_upstream_retries_total{reason=\"503\",upstream=\"grpc\"}"
        ) >= 5.0,
        "{m}"
    );

    // The client's grpc-timeout (100 ms) comes before the route's 5 s.
    let start = Instant::now();
    let r = get(gw.listen, "/", &[("grpc-timeout", "100m")])
        .await
        .unwrap();
    assert_eq!(r.status, 504, "{}", r.text());
    assert!(
        start.elapsed() < Duration::from_millis(700),
        "{:?}",
        start.elapsed()
    );
}

/// An upstream that serves one request at a time, 20 ms each: latency
/// grows with the requests waiting in it.
async fn serial_upstream() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let one_at_a_time = std::sync::Arc::new(tokio::sync::Mutex::new(()));
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let lock = one_at_a_time.clone();
            tokio::spawn(async move {
                let mut pending = Vec::new();
                while next_head(&mut s, &mut pending).await.is_some() {
                    {
                        let _serving = lock.lock().await;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    (addr, task)
}

/// 20 clients, each sending requests back to back for `run`: the
/// latencies of the answers served (200) and how many were refused.
async fn closed_loop(gw: &Gateway, run: Duration) -> (Vec<Duration>, usize) {
    let until = Instant::now() + run;
    let clients: Vec<_> = (0..20)
        .map(|_| async move {
            let (mut served, mut refused) = (Vec::new(), 0);
            while Instant::now() < until {
                let start = Instant::now();
                match get(gw.listen, "/", &[]).await {
                    Ok(r) if r.status == 200 => served.push(start.elapsed()),
                    Ok(r) if r.status == 503 => {
                        assert_eq!(r.json()["limit"], "concurrency", "{}", r.text());
                        refused += 1;
                        // A refused client backs off a little, as real ones do.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    other => panic!("{other:?}"),
                }
            }
            (served, refused)
        })
        .collect();
    let mut all = Vec::new();
    let mut refused = 0;
    for (s, r) in futures_util::future::join_all(clients).await {
        all.extend(s);
        refused += r;
    }
    all.sort();
    (all, refused)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adaptive_concurrency_keeps_served_latency_near_the_unloaded_one() {
    let (addr, _server) = serial_upstream().await;
    let config = |extra: &str| {
        format!(
            "{HEAD}\n[routes.api]\npath_prefix = \"/\"\nupstream = \"api\"\ntimeout = \"10s\"\nretries = false\n[upstreams.api]\nendpoints = [\"{addr}\"]\n{extra}\n"
        )
    };
    let gw = Gateway::start(&config("")).await;
    let p90 = |v: &[Duration]| v[v.len() * 9 / 10];
    // Without a limit every request waits behind all the others.
    let (plain, _) = closed_loop(&gw, Duration::from_secs(3)).await;
    gw.reload(&config("concurrency = \"adaptive\""));
    gw.wait_for_generation(2).await;
    // The limit learns for a while, then is measured.
    closed_loop(&gw, Duration::from_secs(2)).await;
    let (adaptive, refused) = closed_loop(&gw, Duration::from_secs(3)).await;
    eprintln!(
        "unlimited: {} served, p90 {:?}; adaptive: {} served, p90 {:?}, {refused} refused",
        plain.len(),
        p90(&plain),
        adaptive.len(),
        p90(&adaptive)
    );
    assert!(refused > 0, "nothing was refused");
    assert!(
        p90(&adaptive) * 3 < p90(&plain),
        "p90 {:?} with the adaptive limit, {:?} without",
        p90(&adaptive),
        p90(&plain)
    );
    // The limit does not starve the upstream: it stays busy most of the
    // time (it can serve 150 in 3 s). How close to that is a benchmark's
    // question, not this test's.
    assert!(
        adaptive.len() >= 75,
        "{} served with the adaptive limit ({} without)",
        adaptive.len(),
        plain.len()
    );
    let m = get(gw.admin, "/metrics", &[]).await.unwrap().text();
    let limit = metric(&m, "meshgate_upstream_concurrency_limit{upstream=\"api\"}");
    assert!((2.0..=8.0).contains(&limit), "limit {limit}\n{m}");
}
