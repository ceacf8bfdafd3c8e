//! Endpoints that fail: outlier ejection routes around them, and lets them
//! back in when their time is up.

use std::time::{Duration, Instant};

use crate::support::client::get;
use crate::support::upstream::{faulty, Fault, Faulty};
use crate::support::{metric, Gateway, HEAD};

fn config(good: &[&Faulty], bad: &[&Faulty], extra_route: &str) -> String {
    let endpoints: Vec<String> = good
        .iter()
        .chain(bad)
        .map(|f| format!("\"{}\"", f.upstream.addr))
        .collect();
    format!(
        r#"{HEAD}
[routes.api]
path_prefix = "/"
upstream = "api"
timeout = "400ms"
{extra_route}
[upstreams.api]
endpoints = [{}]
connect_retries = 0
outlier = {{ consecutive_failures = 3, base_ejection = "6s", max_ejection = "30s" }}
"#,
        endpoints.join(", ")
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
    assert_eq!(
        metric(
            &m,
            "meshgate_upstream_endpoints{state=\"ejected\",upstream=\"api\"}"
        ),
        2.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "meshgate_upstream_endpoints{state=\"healthy\",upstream=\"api\"}"
        ),
        2.0
    );
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
    assert!(gw.log().contains(&format!(
        "upstream `api` endpoint {} is back from ejection",
        unavailable.upstream.addr
    )));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_most_max_ejected_percent_are_out_and_off_means_never() {
    let a = faulty("a", Fault::Good).await;
    let bad: Vec<Faulty> =
        futures_util::future::join_all(["r1", "r2", "r3"].map(|n| faulty(n, Fault::Reset))).await;
    // 4 endpoints at 50%: two may be out, the third resetting one stays in.
    let text = config(&[&a], &bad.iter().collect::<Vec<_>>(), "");
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
    assert_eq!(
        metric(
            &m,
            "meshgate_upstream_endpoints{state=\"ejected\",upstream=\"api\"}"
        ),
        2.0,
        "{m}"
    );

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
    assert_eq!(
        metric(
            &m,
            "meshgate_upstream_endpoints{state=\"ejected\",upstream=\"api\"}"
        ),
        0.0
    );
}
