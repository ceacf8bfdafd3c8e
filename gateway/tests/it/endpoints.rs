//! Endpoints that fail: outlier ejection routes around them, and lets them
//! back in when their time is up.

use std::time::{Duration, Instant};

use crate::support::client::get;
use crate::support::upstream::{api_config, faulty, faulty_at, Fault, Faulty};
use crate::support::{metric, Gateway, HEAD};

fn config(good: &[&Faulty], bad: &[&Faulty], extra_route: &str) -> String {
    let all: Vec<&Faulty> = good.iter().chain(bad).copied().collect();
    api_config(
        &all,
        &format!("timeout = \"400ms\"\n{extra_route}"),
        "connect_retries = 0\noutlier = { consecutive_failures = 3, base_ejection = \"6s\", max_ejection = \"30s\" }",
    )
}

/// Send `n` requests, `concurrency` at a time; the statuses seen.
async fn load(gw: &Gateway, n: usize, concurrency: usize) -> Vec<u16> {
    let mut statuses = Vec::with_capacity(n);
    for _ in 0..n.div_ceil(concurrency) {
        let batch: Vec<_> = (0..concurrency).map(|_| get(gw.listen, "/", &[])).collect();
        for r in futures_util::future::join_all(batch).await {
            statuses.push(r.map_or(0, |r| r.status));
        }
    }
    statuses.truncate(n);
    statuses
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_endpoints_are_ejected_routed_around_and_let_back() {
    let a = faulty("a", Fault::Good).await;
    let b = faulty("b", Fault::Good).await;
    let unavailable = faulty("unavailable", Fault::Unavailable).await;
    let hung = faulty("hung", Fault::Hang).await;
    let text = config(&[&a, &b], &[&unavailable, &hung], "");
    let gw = Gateway::start(&text).await;

    // Detection: three failures in a row each (503s, and 400 ms timeouts).
    let start = Instant::now();
    while metric(
        &get(gw.admin, "/metrics", &[]).await.unwrap().text(),
        "meshgate_upstream_ejections_total{upstream=\"api\"}",
    ) < 2.0
    {
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "not ejected: {}",
            gw.log()
        );
        load(&gw, 8, 8).await;
    }
    let m = get(gw.admin, "/metrics", &[]).await.unwrap().text();
    assert_eq!(state_count(&m, "ejected"), 2.0, "{m}");
    assert_eq!(state_count(&m, "healthy"), 2.0);
    let log = gw.log();
    for bad in [&unavailable, &hung] {
        assert!(
            log.contains(&format!(
                "upstream `api` endpoint {} ejected for 6s after failing 3 times in a row",
                bad.upstream.addr
            )),
            "{log}"
        );
    }

    // A reload keeps the ejections of endpoints that stay.
    gw.reload(&config(
        &[&a, &b],
        &[&unavailable, &hung],
        "[routes.other]\npath = \"/other\"\nupstream = \"api\"",
    ));
    gw.wait_for_generation(2).await;

    // Ejected: every request goes to a good endpoint, and succeeds.
    let before = (unavailable.requests(), hung.requests());
    let good_before = a.requests() + b.requests();
    let statuses = load(&gw, 100, 10).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!((unavailable.requests(), hung.requests()), before);
    assert_eq!(a.requests() + b.requests() - good_before, 100);

    // Recovered: back after its ejection time, it gets requests again.
    unavailable.set(Fault::Good);
    hung.set(Fault::Good);
    let back = unavailable.requests();
    let start = Instant::now();
    while unavailable.requests() == back {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "never let back: {}",
            gw.log()
        );
        let statuses = load(&gw, 4, 4).await;
        assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        start.elapsed() > Duration::from_secs(1),
        "let back before its ejection time was up"
    );
    wait_log(
        &gw,
        &format!(
            "upstream `api` endpoint {} is back from ejection",
            unavailable.upstream.addr
        ),
        Duration::from_secs(5),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_most_max_ejected_percent_are_out_and_off_means_never() {
    let a = faulty("a", Fault::Good).await;
    let bad: Vec<Faulty> =
        futures_util::future::join_all(["r1", "r2", "r3"].map(|n| faulty(n, Fault::Reset))).await;
    // 4 endpoints at 50%: two may be out, the third resetting one stays in.
    // Retries would hide the resets this test counts.
    let text = config(&[&a], &bad.iter().collect::<Vec<_>>(), "retries = false");
    let gw = Gateway::start(&text).await;
    let start = Instant::now();
    while !gw
        .log()
        .contains("keeps failing but stays in: max_ejected_percent = 50")
    {
        assert!(start.elapsed() < Duration::from_secs(5), "{}", gw.log());
        load(&gw, 8, 4).await;
    }
    let m = get(gw.admin, "/metrics", &[]).await.unwrap().text();
    assert_eq!(state_count(&m, "ejected"), 2.0, "{m}");

    // `outlier = false`: the failing endpoints keep their share.
    gw.reload(&text.replace(
        "outlier = { consecutive_failures = 3, base_ejection = \"6s\", max_ejection = \"30s\" }",
        "outlier = false",
    ));
    gw.wait_for_generation(2).await;
    let before: usize = bad.iter().map(Faulty::requests).sum();
    let statuses = load(&gw, 40, 4).await;
    let failed = statuses.iter().filter(|s| **s != 200).count();
    assert_eq!(
        bad.iter().map(Faulty::requests).sum::<usize>() - before,
        failed
    );
    assert!(
        failed >= 20,
        "round robin over 3 of 4 failing: {statuses:?}"
    );
    let m = get(gw.admin, "/metrics", &[]).await.unwrap().text();
    assert_eq!(state_count(&m, "ejected"), 0.0);
}

/// `n` requests from `clients` clients, each waiting for its answer before
/// the next; `headers(i)` for request `i`. The bodies (endpoint names).
async fn clients(
    gw: &Gateway,
    n: usize,
    clients: usize,
    headers: impl Fn(usize) -> Vec<(String, String)> + Sync,
) -> Vec<String> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results = std::sync::Mutex::new(vec![String::new(); n]);
    let one = || async {
        loop {
            let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if i >= n {
                return;
            }
            let h = headers(i);
            let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let r = get(gw.listen, "/", &h).await.unwrap();
            assert_eq!(r.status, 200, "{}", r.text());
            results.lock().unwrap()[i] = r.text();
        }
    };
    futures_util::future::join_all((0..clients).map(|_| one())).await;
    results.into_inner().unwrap()
}

fn balanced(endpoints: &[&Faulty], settings: &str) -> String {
    api_config(endpoints, "timeout = \"10s\"", settings)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_request_and_ewma_send_a_slow_endpoint_far_less_than_its_share() {
    for algorithm in ["least_request", "ewma"] {
        let fast: Vec<Faulty> =
            futures_util::future::join_all(["f1", "f2", "f3"].map(|n| faulty(n, Fault::Good)))
                .await;
        let slow = faulty("slow", Fault::Slow).await;
        let mut all: Vec<&Faulty> = fast.iter().collect();
        all.push(&slow);
        let gw = Gateway::start(&balanced(
            &all,
            &format!("load_balancing = \"{algorithm}\""),
        ))
        .await;
        let bodies = clients(&gw, 400, 20, |_| Vec::new()).await;
        let to_slow = bodies.iter().filter(|b| *b == "slow").count();
        // Round robin would send it 100 of the 400.
        assert!(
            to_slow <= 25,
            "{algorithm}: {to_slow} of 400 went to the slow endpoint"
        );
        assert_eq!(slow.requests(), to_slow);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hash_keeps_keys_and_moves_few_when_an_endpoint_is_added() {
    let eps: Vec<Faulty> =
        futures_util::future::join_all(["e1", "e2", "e3", "e4"].map(|n| faulty(n, Fault::Good)))
            .await;
    let three: Vec<&Faulty> = eps.iter().take(3).collect();
    let settings = "load_balancing = \"consistent_hash\"\nhash_key = \"header:x-user\"";
    let gw = Gateway::start(&balanced(&three, settings)).await;
    let user = |i: usize| vec![("x-user".to_string(), format!("user-{}", i % 1000))];
    let first = clients(&gw, 1000, 10, user).await;
    let again = clients(&gw, 1000, 10, user).await;
    assert_eq!(first, again, "a key changed endpoints");
    let used: std::collections::BTreeSet<&String> = first.iter().collect();
    assert_eq!(used.len(), 3, "{used:?}");

    let four: Vec<&Faulty> = eps.iter().collect();
    gw.reload(&balanced(&four, settings));
    gw.wait_for_generation(2).await;
    let after = clients(&gw, 1000, 10, user).await;
    let moved: Vec<usize> = (0..1000).filter(|i| first[*i] != after[*i]).collect();
    assert!(
        moved.len() <= 1000 / 4 + 50,
        "{} of 1000 keys moved",
        moved.len()
    );
    assert!(!moved.is_empty(), "the new endpoint got no keys");
    assert!(
        moved.iter().all(|i| after[*i] == "e4"),
        "keys moved between endpoints that stayed"
    );
    // Without the key: balanced over all of them.
    let keyless = clients(&gw, 200, 4, |_| Vec::new()).await;
    let used: std::collections::BTreeSet<&String> = keyless.iter().collect();
    assert_eq!(used.len(), 4, "{used:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstreams_endpoint_shows_each_endpoint_state() {
    let good = faulty("good", Fault::Good).await;
    let bad = faulty("bad", Fault::Unavailable).await;
    let gw = Gateway::start(&balanced(
        &[&good, &bad],
        "outlier = { consecutive_failures = 2, base_ejection = \"1m\" }\nload_balancing = \"least_request\"",
    ))
    .await;
    let view = get(gw.admin, "/upstreams", &[]).await.unwrap().json();
    let eps = &view["upstreams"][0]["endpoints"];
    assert_eq!(view["upstreams"][0]["name"], "api");
    assert_eq!(view["upstreams"][0]["load_balancing"], "least_request");
    assert_eq!(eps[1]["address"], bad.upstream.addr.to_string());
    assert_eq!(eps[1]["state"], "healthy");
    assert_eq!(eps[1]["weight"], 1);

    let start = Instant::now();
    loop {
        let view = get(gw.admin, "/upstreams", &[]).await.unwrap().json();
        let bad_view = &view["upstreams"][0]["endpoints"][1];
        if bad_view["state"] == "ejected" {
            let left = bad_view["ejected_for_seconds"].as_f64().unwrap();
            assert!(left > 30.0 && left <= 60.0, "{bad_view}");
            assert!(bad_view["ejected_until"].as_str().unwrap().ends_with('Z'));
            assert_eq!(view["upstreams"][0]["endpoints"][0]["state"], "healthy");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "{view}");
        load(&gw, 4, 2).await;
    }
}

/// `meshgate_upstream_endpoints` of upstream `api` in `state`.
fn state_count(metrics: &str, state: &str) -> f64 {
    metric(
        metrics,
        &format!("meshgate_upstream_endpoints{{state=\"{state}\",upstream=\"api\"}}"),
    )
}

/// The first endpoint of the first upstream in `/upstreams`, once its
/// first health check (at its own point of the interval) has run.
async fn first_checked(gw: &Gateway) -> serde_json::Value {
    let start = Instant::now();
    loop {
        let view = get(gw.admin, "/upstreams", &[]).await.unwrap().json();
        let first = &view["upstreams"][0]["endpoints"][0];
        if !first["last_health_check"].is_null() {
            return first.clone();
        }
        assert!(start.elapsed() < Duration::from_secs(5), "{view}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Wait until the gateway's log has `needle`.
async fn wait_log(gw: &Gateway, needle: &str, within: Duration) {
    gw.wait_for_log(within, |log| log.contains(needle)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_health_checks_take_failing_endpoints_out_and_bring_them_back() {
    let good = faulty("good", Fault::Good).await;
    let flaky = faulty("flaky", Fault::Unavailable).await;
    let (garbage, _) = crate::support::upstream::scripted(b"garbage\r\n\r\n").await;
    let dead = crate::support::upstream::dead_addr();
    let config = format!(
        r#"{HEAD}
[routes.api]
path_prefix = "/"
upstream = "api"
[upstreams.api]
endpoints = ["{}", "{}", "{}", "{dead}"]
outlier = false
health_check = {{ path = "/healthz", host = "api.internal", interval = "200ms", timeout = "100ms", healthy = 2, unhealthy = 2 }}
"#,
        good.upstream.addr, flaky.upstream.addr, garbage.addr
    );
    let gw = Gateway::start(&config).await;
    for addr in [
        flaky.upstream.addr.to_string(),
        garbage.addr.to_string(),
        dead.to_string(),
    ] {
        wait_log(
            &gw,
            &format!("upstream `api` endpoint {addr} is unhealthy"),
            Duration::from_secs(5),
        )
        .await;
    }
    assert!(
        gw.log().contains("its health check failed (status 503)"),
        "{}",
        gw.log()
    );
    // The good endpoint's checks run beside the others': wait for its first.
    let start = Instant::now();
    while good.checks() == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "no check reached the good endpoint"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        good.last_check().contains("host: api.internal\r\n"),
        "{}",
        good.last_check()
    );

    // Out: every request reaches the good endpoint.
    let before = flaky.requests();
    let statuses = load(&gw, 50, 5).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(flaky.requests(), before);
    let view = get(gw.admin, "/upstreams", &[]).await.unwrap().json();
    let eps = &view["upstreams"][0]["endpoints"];
    assert_eq!(eps[1]["state"], "unhealthy", "{view}");
    assert_eq!(eps[1]["last_health_check"]["passed"], false, "{view}");
    assert_eq!(eps[0]["state"], "healthy", "{view}");
    let m = get(gw.admin, "/metrics", &[]).await.unwrap().text();
    assert_eq!(state_count(&m, "unhealthy"), 3.0, "{m}");
    assert!(
        metric(
            &m,
            "meshgate_upstream_health_checks_total{result=\"failure\",upstream=\"api\"}"
        ) >= 3.0
    );

    // Back after `healthy` passes in a row.
    flaky.set(Fault::Good);
    wait_log(
        &gw,
        &format!(
            "upstream `api` endpoint {} is healthy again (200)",
            flaky.upstream.addr
        ),
        Duration::from_secs(5),
    )
    .await;
    let statuses = load(&gw, 40, 4).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert!(
        flaky.requests() > before,
        "a healthy endpoint got no requests"
    );
    // One failed check took it out, two passes brought it back.
    assert!(good.checks() >= 1 && flaky.checks() >= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_and_grpc_health_checks() {
    let good = faulty("good", Fault::Good).await;
    let dead = crate::support::upstream::dead_addr();
    let tcp = r#"health_check = { kind = "tcp", interval = "200ms", timeout = "100ms" }"#;
    let gw = health_checked(good.upstream.addr, dead, tcp).await;
    assert_eq!(good.checks(), 0, "a tcp check sends no request");
    drop(gw);

    let serving = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let a = crate::support::upstream::grpc_health(serving.clone()).await;
    let b_serving = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let b = crate::support::upstream::grpc_health(b_serving.clone()).await;
    let grpc = two_endpoints(
        a.addr,
        b.addr,
        r#"protocol = "h2c"
health_check = { kind = "grpc", interval = "200ms", timeout = "150ms", healthy = 1 }"#,
    );
    let gw = Gateway::start(&grpc).await;
    wait_log(
        &gw,
        &format!(
            "upstream `api` endpoint {} is unhealthy: its health check failed (not SERVING)",
            b.addr
        ),
        Duration::from_secs(5),
    )
    .await;
    // The other's first check comes at its own time in the interval.
    let first = first_checked(&gw).await;
    assert_eq!(first["state"], "healthy", "{first}");
    assert_eq!(first["last_health_check"]["result"], "SERVING", "{first}");
    b_serving.store(true, std::sync::atomic::Ordering::SeqCst);
    wait_log(
        &gw,
        &format!(
            "upstream `api` endpoint {} is healthy again (SERVING)",
            b.addr
        ),
        Duration::from_secs(5),
    )
    .await;
}

/// A UDP and TCP "DNS server" at `addr` that answers every query with
/// garbage; stops when dropped.
struct GarbageDns(tokio::task::JoinHandle<()>, tokio::task::JoinHandle<()>);

impl GarbageDns {
    async fn start(addr: std::net::SocketAddr) -> GarbageDns {
        let udp = tokio::net::UdpSocket::bind(addr).await.unwrap();
        let tcp = tokio::net::TcpListener::bind(addr).await.unwrap();
        let u = tokio::spawn(async move {
            let mut buf = [0u8; 512];
            while let Ok((_, from)) = udp.recv_from(&mut buf).await {
                let _ = udp.send_to(b"\x00\x01garbage, not DNS", from).await;
            }
        });
        let t = tokio::spawn(async move {
            while let Ok((mut s, _)) = tcp.accept().await {
                use tokio::io::AsyncWriteExt;
                let _ = s.write_all(b"\x00\x10garbage, not DNS").await;
            }
        });
        GarbageDns(u, t)
    }
}

/// At start, `/readyz` waits for a `dns` upstream's first lookup to end:
/// here a server that never answers, so the lookup fails at its timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_only_once_the_first_lookup_has_ended() {
    let silent = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let gw = Gateway::start(&format!(
        "{HEAD}[resolver]\nnameservers = [\"{}\"]\ntimeout = \"500ms\"\n[routes.api]\npath_prefix = \"/\"\nupstream = \"api\"\n[upstreams.api]\nendpoints = [\"api.test:80\"]\ndiscovery = \"dns\"\n",
        silent.local_addr().unwrap()
    ))
    .await;
    let view = get(gw.admin, "/upstreams", &[]).await.unwrap().json();
    assert_eq!(
        view["upstreams"][0]["last_refresh"]["result"], "failure",
        "{view}"
    );
    let mut query = [0u8; 512];
    let asked = silent.try_recv_from(&mut query);
    assert!(asked.is_ok(), "the server was asked: {asked:?}");
}

impl Drop for GarbageDns {
    fn drop(&mut self) {
        self.0.abort();
        self.1.abort();
    }
}

fn discovered(
    gw_config_endpoints: &str,
    discovery: &str,
    dns: &crate::support::dns::Dnsmasq,
) -> String {
    format!(
        r#"{HEAD}
[resolver]
nameservers = ["{}"]
timeout = "300ms"
min_ttl = "200ms"
max_ttl = "1s"
[routes.api]
path_prefix = "/"
upstream = "api"
timeout = "2s"
[upstreams.api]
endpoints = [{gw_config_endpoints}]
discovery = "{discovery}"
"#,
        dns.addr
    )
}

/// Send requests until `done` holds (each must succeed), for at most 10 s.
async fn until(gw: &Gateway, what: &str, done: impl Fn() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{what}:\n{}",
            gw.log()
        );
        let statuses = load(gw, 4, 2).await;
        assert!(
            statuses.iter().all(|s| *s == 200),
            "{what}: {statuses:?}\n{}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_discovery_follows_the_records_and_keeps_the_last_set_when_dns_fails() {
    if crate::support::dns::binary().is_none() {
        return crate::support::skip("dnsmasq is not installed (make test installs dnsmasq-base)");
    }
    // Two endpoints on one port, at two loopback addresses.
    let a = faulty_at("a", Fault::Good, "127.0.0.2:0".parse().unwrap())
        .await
        .unwrap();
    let port = a.upstream.addr.port();
    let b = faulty_at(
        "b",
        Fault::Good,
        format!("127.0.0.3:{port}").parse().unwrap(),
    )
    .await
    .expect("127.0.0.3 with the same port");
    let dns = crate::support::dns::Dnsmasq::start("127.0.0.2 api.test\n", &[], None);
    let gw = Gateway::start(&discovered(&format!("\"api.test:{port}\""), "dns", &dns)).await;
    until(&gw, "a never got a request", || a.requests() > 0).await;
    assert_eq!(b.requests(), 0);

    // A second address appears: no reload, b gets requests too.
    dns.set_hosts("127.0.0.2 api.test\n127.0.0.3 api.test\n");
    until(&gw, "b was never added", || b.requests() > 0).await;
    // Logged just after the new set is in force.
    wait_log(
        &gw,
        &format!("upstream `api` endpoints changed: +127.0.0.3:{port}"),
        Duration::from_secs(5),
    )
    .await;
    let view = get(gw.admin, "/upstreams", &[]).await.unwrap().json();
    assert_eq!(view["upstreams"][0]["discovery"], "dns", "{view}");
    assert_eq!(
        view["upstreams"][0]["endpoints"].as_array().unwrap().len(),
        2,
        "{view}"
    );
    assert_eq!(
        view["upstreams"][0]["last_refresh"]["result"], "success",
        "{view}"
    );

    // The first goes away: it gets nothing more.
    dns.set_hosts("127.0.0.3 api.test\n");
    let start = Instant::now();
    while !gw.log().contains(&format!("-127.0.0.2:{port}")) {
        assert!(start.elapsed() < Duration::from_secs(10), "{}", gw.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = a.requests();
    let statuses = load(&gw, 20, 4).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(a.requests(), before);

    // DNS stops answering, then answers garbage: the last set keeps serving.
    let dns_addr = dns.addr;
    drop(dns);
    gw.wait_for_metric(
        "meshgate_discovery_refreshes_total{result=\"failure\",upstream=\"api\"}",
        1.0,
        Duration::from_secs(10),
    )
    .await;
    let garbage = GarbageDns::start(dns_addr).await;
    let failures = metric(
        &get(gw.admin, "/metrics", &[]).await.unwrap().text(),
        "meshgate_discovery_refreshes_total{result=\"failure\",upstream=\"api\"}",
    );
    gw.wait_for_metric(
        "meshgate_discovery_refreshes_total{result=\"failure\",upstream=\"api\"}",
        failures + 2.0,
        Duration::from_secs(10),
    )
    .await;
    let before = b.requests();
    let statuses = load(&gw, 20, 4).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(b.requests() - before, 20);
    assert!(gw
        .log()
        .contains("upstream `api` discovery failed, keeping the last endpoints found"));
    drop(garbage);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_not_there_yet_answers_503_no_endpoints_until_it_is() {
    if crate::support::dns::binary().is_none() {
        return crate::support::skip("dnsmasq is not installed (make test installs dnsmasq-base)");
    }
    let a = faulty("a", Fault::Good).await;
    let dns = crate::support::dns::Dnsmasq::start("", &[], None);
    let port = a.upstream.addr.port();
    let gw = Gateway::start(&discovered(&format!("\"late.test:{port}\""), "dns", &dns)).await;
    let r = get(gw.listen, "/", &[]).await.unwrap();
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["kind"], "no_endpoints", "{}", r.text());
    dns.set_hosts("127.0.0.1 late.test\n");
    let start = Instant::now();
    loop {
        let r = get(gw.listen, "/", &[]).await.unwrap();
        if r.status == 200 {
            break;
        }
        assert_eq!(r.json()["kind"], "no_endpoints");
        assert!(start.elapsed() < Duration::from_secs(10), "{}", gw.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn srv_discovery_takes_targets_ports_and_weights_from_the_records() {
    if crate::support::dns::binary().is_none() {
        return crate::support::skip("dnsmasq is not installed (make test installs dnsmasq-base)");
    }
    let a = faulty("a", Fault::Good).await;
    let b = faulty("b", Fault::Good).await;
    let records = |targets: &[(&str, u16, u16)]| -> Vec<String> {
        targets
            .iter()
            .map(|(t, port, weight)| format!("_http._tcp.api.test,{t},{port},0,{weight}"))
            .collect()
    };
    let hosts = "127.0.0.1 a.test\n127.0.0.1 b.test\n";
    let dns = crate::support::dns::Dnsmasq::start(
        hosts,
        &records(&[
            ("a.test", a.upstream.addr.port(), 10),
            ("b.test", b.upstream.addr.port(), 30),
        ]),
        None,
    );
    let gw = Gateway::start(&discovered("\"_http._tcp.api.test\"", "srv", &dns)).await;
    until(&gw, "both targets", || a.requests() > 0 && b.requests() > 0).await;
    let view = get(gw.admin, "/upstreams", &[]).await.unwrap().json();
    let mut weights: Vec<(String, u64)> = view["upstreams"][0]["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["address"].as_str().unwrap().to_string(),
                e["weight"].as_u64().unwrap(),
            )
        })
        .collect();
    weights.sort();
    let mut want = vec![
        (a.upstream.addr.to_string(), 10),
        (b.upstream.addr.to_string(), 30),
    ];
    want.sort();
    assert_eq!(weights, want, "{view}");

    // Records now point at a name that does not exist: the last set stays.
    let port = dns.addr.port();
    drop(dns);
    let _dns = crate::support::dns::Dnsmasq::start(
        hosts,
        &records(&[("missing.test", a.upstream.addr.port(), 10)]),
        Some(port),
    );
    gw.wait_for_metric(
        "meshgate_discovery_refreshes_total{result=\"failure\",upstream=\"api\"}",
        1.0,
        Duration::from_secs(10),
    )
    .await;
    let (before_a, before_b) = (a.requests(), b.requests());
    let statuses = load(&gw, 40, 4).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert!(a.requests() > before_a && b.requests() > before_b);
    let view = get(gw.admin, "/upstreams", &[]).await.unwrap().json();
    assert_eq!(
        view["upstreams"][0]["endpoints"].as_array().unwrap().len(),
        2,
        "{view}"
    );
    assert!(
        view["upstreams"][0]["last_refresh"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("no target has an address")),
        "{view}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_endpoint_is_ejected_for_longer_each_time_and_ramps_up_when_back() {
    let good = faulty("good", Fault::Good).await;
    let flappy = faulty("flappy", Fault::Unavailable).await;
    let config = api_config(
        &[&good, &flappy],
        "",
        "outlier = { consecutive_failures = 3, base_ejection = \"300ms\", max_ejection = \"5s\" }\nslow_start = \"30s\"",
    );
    let gw = Gateway::start(&config).await;
    let ejected_again = format!(
        "upstream `api` endpoint {} ejected for 600ms after failing 3 times in a row (ejection 2 in a row)",
        flappy.upstream.addr
    );
    // Bad, let back after 300 ms, still bad: ejected again, for twice as long
    // (600 ms).
    let start = Instant::now();
    while !gw.log().contains(&ejected_again) {
        assert!(start.elapsed() < Duration::from_secs(10), "{}", gw.log());
        load(&gw, 4, 4).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Good again: back after the second ejection, and ramping up.
    flappy.set(Fault::Good);
    let back = format!(
        "upstream `api` endpoint {} is back from ejection",
        flappy.upstream.addr
    );
    let start = Instant::now();
    while gw.log().matches(&back).count() < 2 {
        assert!(start.elapsed() < Duration::from_secs(10), "{}", gw.log());
        load(&gw, 2, 2).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let view = get(gw.admin, "/upstreams", &[]).await.unwrap().json();
    assert_eq!(
        view["upstreams"][0]["endpoints"][1]["state"], "slow_start",
        "{view}"
    );
    let before = flappy.requests();
    let statuses = load(&gw, 200, 4).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let share = flappy.requests() - before;
    // Round robin would send it 100 of the 200; ramping from 10% of that.
    assert!(share > 0 && share < 60, "{share} of 200 while ramping up");
}

/// A route to upstream `api` of endpoints `a` and `b`, with `keys` and
/// outlier detection off.
fn two_endpoints(a: std::net::SocketAddr, b: std::net::SocketAddr, keys: &str) -> String {
    format!(
        r#"{HEAD}
[routes.api]
path_prefix = "/"
upstream = "api"
[upstreams.api]
endpoints = ["{a}", "{b}"]
outlier = false
{keys}
"#
    )
}

/// An HTTP health check every 200 ms.
const HTTP_CHECK: &str = r#"health_check = { path = "/", interval = "200ms", timeout = "150ms" }"#;

/// A gateway whose upstream `api` is `good` and `bad`, with `keys` (its
/// `health_check`, and its `tls` if any) and outlier detection off;
/// returns once `bad` is unhealthy, after checking that requests all
/// succeed.
async fn health_checked(
    good: std::net::SocketAddr,
    bad: std::net::SocketAddr,
    keys: &str,
) -> Gateway {
    let gw = Gateway::start(&two_endpoints(good, bad, keys)).await;
    wait_log(
        &gw,
        &format!("upstream `api` endpoint {bad} is unhealthy"),
        Duration::from_secs(5),
    )
    .await;
    let statuses = load(&gw, 20, 4).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    gw
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_use_the_upstreams_tls() {
    use crate::support::tls::{Ca, Leaf};
    let ca = Ca::new("health test root");
    let other = Ca::new("someone else's root");
    let leaf = |ca: &Ca| {
        ca.issue(Leaf {
            dns: &["api.test"],
            ..Leaf::default()
        })
    };
    let trusted = crate::support::upstream::https_echo("trusted", &leaf(&ca)).await;
    let stranger = crate::support::upstream::https_echo("stranger", &leaf(&other)).await;
    let dir = tempfile::tempdir().unwrap();
    let keys = format!(
        "tls = {{ ca = \"{}\", sni = \"api.test\" }}\n{HTTP_CHECK}",
        ca.write(dir.path(), "ca.pem").display()
    );
    let gw = health_checked(trusted.addr, stranger.addr, &keys).await;
    let first = first_checked(&gw).await;
    assert_eq!(first["state"], "healthy", "{first}");
    assert_eq!(first["last_health_check"]["result"], "200", "{first}");
}

/// With `tls.verify`, a health check holds the endpoint to the identity
/// requests are held to: a certificate from the right CA for another
/// workload fails it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_check_the_upstreams_identity() {
    use crate::support::tls::{Ca, Leaf};
    let ca = Ca::new("mesh root");
    let leaf = |uri: &'static [&'static str]| {
        ca.issue(Leaf {
            uris: uri,
            ..Leaf::default()
        })
    };
    let api = crate::support::upstream::https_echo("api", &leaf(&["spiffe://test/api"])).await;
    let other =
        crate::support::upstream::https_echo("other", &leaf(&["spiffe://test/other"])).await;
    let dir = tempfile::tempdir().unwrap();
    let keys = format!(
        "tls = {{ ca = \"{}\", sni = \"api.mesh\", verify = \"spiffe://test/api\" }}\n{HTTP_CHECK}",
        ca.write(dir.path(), "ca.pem").display()
    );
    let gw = health_checked(api.addr, other.addr, &keys).await;
    assert!(gw.log().contains("does not match verify"), "{}", gw.log());
}
