//! Global rate limits against a real redis-server: the GCRA script itself,
//! two gateways sharing one budget, batching, and what happens when Redis
//! dies or hangs (on_error, and no request waits beyond the timeout).

use std::time::{Duration, Instant};

use crate::support::client::{get, Resp};
use crate::support::redis::{RedisCluster, RedisServer};
use crate::support::{metric, Gateway, HEAD};
use meshgate::config::model::{OnError, Redis};
use meshgate::ratelimit::global::RedisBackend;

/// Longest any request may take while Redis is down or frozen. The gateway's
/// `timeout` is 500ms (50ms where the timeout is under test); the rest is
/// slack for a loaded CI machine. A shorter one fails healthy calls open when
/// the test machine is busy, and the budgets then come out wrong.
const NO_HANG: Duration = Duration::from_secs(2);
/// A deadline for direct calls to the backend.
fn soon() -> Instant {
    Instant::now() + Duration::from_secs(1)
}

fn config(redis: &RedisServer, redis_extra: &str, policy: &str) -> String {
    format!(
        "{}\n[redis]\nurl = \"{}\"\ntimeout = \"500ms\"\n{redis_extra}\n[rate_limits.shared]\nscope = \"global\"\n{policy}\n[routes.api]\npath_prefix = \"/\"\nrate_limits = [\"shared\"]\nrespond = {{ body = \"ok\" }}\n",
        HEAD.trim_end(),
        redis.url()
    )
}

async fn timed_get(gw: &Gateway, headers: &[(&str, &str)]) -> (Resp, Duration) {
    let start = Instant::now();
    let r = get(gw.listen, "/", headers).await.unwrap();
    (r, start.elapsed())
}

fn backend(redis: &RedisServer) -> RedisBackend {
    RedisBackend::new(&Redis {
        url: redis.url(),
        cluster: Vec::new(),
        ca: None,
        on_error: OnError::Allow,
        timeout: Duration::from_secs(1),
        key_prefix: "t:".into(),
    })
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gcra_script_grants_burst_then_refuses_then_refills() {
    let redis = RedisServer::start().await;
    let b = backend(&redis);
    let hour = Duration::from_secs(3600);

    let g = b.take("t:a", hour, 3, 1, soon()).await.unwrap();
    assert_eq!((g.granted, g.remaining), (1, 2));
    // Asking for more than is left grants what is left.
    let g = b.take("t:a", hour, 3, 5, soon()).await.unwrap();
    assert_eq!((g.granted, g.remaining), (2, 0));
    let g = b.take("t:a", hour, 3, 1, soon()).await.unwrap();
    assert_eq!(g.granted, 0);
    assert!(
        g.retry_after > Duration::from_secs(3590) && g.retry_after <= hour,
        "{:?}",
        g.retry_after
    );
    assert!(
        g.full_in > Duration::from_secs(3 * 3600 - 10),
        "{:?}",
        g.full_in
    );
    // The key expires when its bucket would be full again.
    let ttl: i64 = redis.command("PTTL t:a").await.unwrap()[1..]
        .parse()
        .unwrap();
    assert!(
        ttl > 3 * 3_600_000 - 10_000 && ttl <= 3 * 3_600_000,
        "{ttl}"
    );
    // Other keys are independent.
    assert_eq!(b.take("t:b", hour, 3, 1, soon()).await.unwrap().granted, 1);

    // A fractional interval is kept, not rounded to whole microseconds.
    let third = Duration::from_secs(1) / 3;
    let g = b.take("t:d", third, 1, 1, soon()).await.unwrap();
    assert_eq!(g.granted, 1);
    assert!(
        g.retry_after > Duration::from_micros(333_000)
            && g.retry_after <= third + Duration::from_micros(1),
        "the next unit comes one interval later: {:?}",
        g.retry_after
    );

    // Refill: one unit per 100ms.
    let tick = Duration::from_millis(100);
    assert_eq!(b.take("t:c", tick, 1, 1, soon()).await.unwrap().granted, 1);
    let refused = b.take("t:c", tick, 1, 1, soon()).await.unwrap();
    assert_eq!(refused.granted, 0);
    assert!(refused.retry_after <= tick);
    tokio::time::sleep(refused.retry_after + Duration::from_millis(5)).await;
    assert_eq!(b.take("t:c", tick, 1, 1, soon()).await.unwrap().granted, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_share_one_budget() {
    let redis = RedisServer::start().await;
    let cfg = config(
        &redis,
        "",
        "key = \"route\"\nrate = 10\nper = \"1m\"\nheaders_on_allowed = true\n",
    );
    let a = Gateway::start(&cfg).await;
    let b = Gateway::start(&cfg).await;
    let mut ok = [0usize; 2];
    let mut last = None;
    for i in 0..30 {
        let gw = if i % 2 == 0 { &a } else { &b };
        let r = get(gw.listen, "/", &[]).await.unwrap();
        match r.status {
            200 => ok[i % 2] += 1,
            429 => last = Some(r),
            s => panic!("unexpected status {s}: {}", r.text()),
        }
    }
    // One atomic call per request: the combined count is exact.
    assert_eq!(ok, [5, 5], "each gateway served half of one shared budget");
    let r = last.expect("some requests were limited");
    assert_eq!(r.header("ratelimit-policy"), Some("\"shared\";q=10;w=60"));
    assert!(
        r.header("ratelimit")
            .unwrap()
            .starts_with("\"shared\";r=0;t="),
        "{:?}",
        r.header("ratelimit")
    );
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=6).contains(&retry), "one unit per 6s: {retry}");
    assert_eq!(r.json()["policy"], "shared");

    let text = get(a.admin, "/metrics", &[]).await.unwrap().text();
    assert_eq!(
        metric(
            &text,
            r#"meshgate_rate_limit_decisions_total{outcome="allowed",policy="shared"}"#
        ),
        5.0
    );
    assert_eq!(
        metric(
            &text,
            r#"meshgate_rate_limit_decisions_total{outcome="limited",policy="shared"}"#
        ),
        10.0
    );
    assert!(
        metric(&text, "meshgate_rate_limit_backend_duration_seconds_count") >= 5.0,
        "answered Redis calls are timed"
    );
}

/// 20 clients send 10 requests each, half through each of two gateways, to
/// a global budget of 50; how many were allowed.
async fn allowed_of_200_concurrent(batch: u32) -> usize {
    let redis = RedisServer::start().await;
    let cfg = config(
        &redis,
        "",
        &format!("key = \"route\"\nrate = 50\nper = \"1h\"\nbatch = {batch}\n"),
    );
    let a = Gateway::start(&cfg).await;
    let b = Gateway::start(&cfg).await;
    let mut tasks = Vec::new();
    for client in 0..20 {
        let addr = if client % 2 == 0 { a.listen } else { b.listen };
        tasks.push(tokio::spawn(async move {
            let mut ok = 0;
            for _ in 0..10 {
                match get(addr, "/", &[]).await.unwrap().status {
                    200 => ok += 1,
                    429 => {}
                    s => panic!("unexpected status {s}"),
                }
            }
            ok
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clients_on_two_gateways_get_exactly_the_budget() {
    assert_eq!(allowed_of_200_concurrent(1).await, 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_batches_concurrent_clients_stay_within_the_stated_tolerance() {
    // Never more than the budget; at most batch - 1 units per gateway left
    // leased and unspent when the clients stop.
    let total = allowed_of_200_concurrent(5).await;
    assert!((42..=50).contains(&total), "{total} allowed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_units_are_spent_locally_and_never_exceed_the_budget() {
    let redis = RedisServer::start().await;
    let cfg = config(
        &redis,
        "",
        "key = \"route\"\nrate = 10\nper = \"1m\"\nbatch = 5\n",
    );
    let a = Gateway::start(&cfg).await;
    let b = Gateway::start(&cfg).await;
    // A takes 5 units from Redis and spends one.
    assert_eq!(get(a.listen, "/", &[]).await.unwrap().status, 200);
    let keys_after_a = redis.command("DBSIZE").await.unwrap();
    assert_eq!(keys_after_a, ":1");
    // B takes the other 5; then Redis has none left for it.
    let mut b_ok = 0;
    for _ in 0..8 {
        if get(b.listen, "/", &[]).await.unwrap().status == 200 {
            b_ok += 1;
        }
    }
    assert_eq!(b_ok, 5);
    // A still holds 4 leased units, and no more.
    let mut a_ok = 0;
    for _ in 0..8 {
        if get(a.listen, "/", &[]).await.unwrap().status == 200 {
            a_ok += 1;
        }
    }
    assert_eq!(a_ok, 4, "1 + 4 (A) + 5 (B) = the budget of 10");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopped_mid_test_fails_open_without_hanging_then_recovers() {
    let mut redis = RedisServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let gw = Gateway::start(&format!(
        "[telemetry]\naccess_log = \"json\"\naccess_log_file = \"{}\"\n{}",
        log.display(),
        config(
            &redis,
            "on_error = \"allow\"",
            "key = \"header:x-user\"\nrate = 3\nper = \"1m\"\n",
        )
    ))
    .await;
    let user = |u| [("x-user", u)];
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(get(gw.listen, "/", &user("a")).await.unwrap().status);
    }
    assert_eq!(got, vec![200, 200, 200, 429]);

    redis.stop();
    for _ in 0..10 {
        let (r, took) = timed_get(&gw, &user("b")).await;
        assert_eq!(r.status, 200, "on_error = allow lets requests through");
        assert!(took < NO_HANG, "a request waited {took:?} for a dead Redis");
    }
    // A refusal Redis gave holds until its retry time, Redis or not.
    let (r, took) = timed_get(&gw, &user("a")).await;
    assert_eq!(r.status, 429);
    assert!(took < NO_HANG);
    let text = get(gw.admin, "/metrics", &[]).await.unwrap().text();
    assert!(
        metric(
            &text,
            r#"meshgate_rate_limit_decisions_total{outcome="backend_error",policy="shared"}"#
        ) >= 1.0,
        "backend errors are counted per policy"
    );
    let errors: f64 = ["timeout", "unavailable", "error"]
        .iter()
        .map(|k| {
            metric(
                &text,
                &format!("meshgate_rate_limit_backend_errors_total{{kind=\"{k}\"}}"),
            )
        })
        .sum();
    assert!(errors >= 10.0, "every failed decision is counted: {errors}");
    // The access log says which requests went through without Redis.
    crate::support::wait_for_log(&log, NO_HANG, |t| {
        t.contains(r#""rate_limit":"backend_error:shared""#)
    })
    .await;

    // Redis comes back empty (no persistence): a fresh budget of 3, enforced again.
    redis.restart().await;
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut statuses = Vec::new();
    while !statuses.ends_with(&[429]) {
        assert!(
            Instant::now() < deadline,
            "limits not enforced again after Redis came back: {statuses:?}"
        );
        statuses.push(get(gw.listen, "/", &user("b")).await.unwrap().status);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// docs/ratelimiting.md: one warning when Redis starts failing, calls
/// paused after three failures in a row (answered by `on_error` at once),
/// and no `request failed` line per refused request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_redis_is_warned_of_at_once_and_paused_after_three_failures() {
    for freeze in [false, true] {
        let mut redis = RedisServer::start().await;
        let gw = Gateway::start(&config(
            &redis,
            "on_error = \"deny\"",
            "key = \"route\"\nrate = 100\nper = \"1m\"\n",
        ))
        .await;
        assert_eq!(get(gw.listen, "/", &[]).await.unwrap().status, 200);
        if freeze {
            redis.pause();
        } else {
            redis.stop();
        }
        let (r, _) = timed_get(&gw, &[]).await;
        assert_eq!(r.status, 503);
        let start = Instant::now();
        while !gw.log().contains("is failing") {
            assert!(
                start.elapsed() < NO_HANG,
                "no warning after the first failure:\n{}",
                gw.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Two more failures, then the pause: the next calls are not made.
        for _ in 0..5 {
            let (r, took) = timed_get(&gw, &[]).await;
            assert_eq!(r.status, 503);
            assert!(took < NO_HANG, "waited {took:?}");
        }
        let text = get(gw.admin, "/metrics", &[]).await.unwrap().text();
        let kind = |k: &str| {
            metric(
                &text,
                &format!("meshgate_rate_limit_backend_errors_total{{kind=\"{k}\"}}"),
            )
        };
        assert_eq!(
            kind("timeout") + kind("error"),
            3.0,
            "freeze={freeze}: calls made before the pause:\n{text}"
        );
        assert_eq!(kind("unavailable"), 3.0, "freeze={freeze}:\n{text}");
        let log = gw.log();
        assert_eq!(log.matches("is failing").count(), 1, "{log}");
        assert!(!log.contains("request failed"), "{log}");
        if freeze {
            redis.resume();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_redis_is_counted_as_a_timeout_whatever_the_timeout() {
    // Above the Redis client's own default response timeout (500 ms), which
    // must not answer first and count the wait as an error.
    let redis = RedisServer::start().await;
    let cfg = config(
        &redis,
        "on_error = \"deny\"",
        "key = \"route\"\nrate = 100\nper = \"1m\"\n",
    )
    .replace("timeout = \"500ms\"", "timeout = \"700ms\"");
    let gw = Gateway::start(&cfg).await;
    assert_eq!(get(gw.listen, "/", &[]).await.unwrap().status, 200);
    redis.pause();
    let (r, took) = timed_get(&gw, &[]).await;
    redis.resume();
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(took < NO_HANG, "waited {took:?}");
    let text = get(gw.admin, "/metrics", &[]).await.unwrap().text();
    let kind = |k: &str| {
        metric(
            &text,
            &format!("meshgate_rate_limit_backend_errors_total{{kind=\"{k}\"}}"),
        )
    };
    assert_eq!(kind("timeout"), 1.0, "{text}");
    assert_eq!(kind("error"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_redis_fails_closed_within_the_timeout() {
    let redis = RedisServer::start().await;
    // This test is about the timeout: the short one the other tests avoid.
    let cfg = config(&redis, "on_error = \"deny\"", "key = \"route\"\nrate = 100\nper = \"1m\"\n")
        .replace("timeout = \"500ms\"", "timeout = \"50ms\"")
        .replace(
        "[routes.api]",
        "[rate_limits.trial]\nkey = \"route\"\nscope = \"global\"\nrate = 100\nmode = \"shadow\"\n[routes.free]\npath_prefix = \"/free/\"\nrate_limits = [\"trial\"]\nrespond = { body = \"free\" }\n[routes.api]",
    );
    let gw = Gateway::start(&cfg).await;
    // Redis answers (a busy machine may miss the 50 ms once or twice).
    let start = std::time::Instant::now();
    while get(gw.listen, "/", &[]).await.unwrap().status != 200 {
        assert!(start.elapsed() < Duration::from_secs(5), "{}", gw.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    redis.pause();
    for _ in 0..5 {
        let (r, took) = timed_get(&gw, &[]).await;
        assert_eq!(r.status, 503, "on_error = deny refuses: {}", r.text());
        assert!(
            took < NO_HANG,
            "a request waited {took:?} for a frozen Redis"
        );
        assert_eq!(r.header("retry-after"), Some("1"));
        let j = r.json();
        assert_eq!(j["policy"], "shared");
        assert_eq!(j["error"], "rate limit store unavailable");
    }
    // A shadow policy never blocks, whatever Redis does.
    let free = get(gw.listen, "/free/x", &[]).await.unwrap();
    assert_eq!(free.status, 200);
    let text = get(gw.admin, "/metrics", &[]).await.unwrap().text();
    assert!(
        metric(
            &text,
            r#"meshgate_rate_limit_backend_errors_total{kind="timeout"}"#
        ) >= 1.0
    );

    redis.resume();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = get(gw.listen, "/", &[]).await.unwrap();
        if r.status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still {} after Redis resumed",
            r.status
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_to_another_redis_takes_its_budget() {
    let first = RedisServer::start().await;
    let second = RedisServer::start().await;
    let policy = "key = \"route\"\nrate = 2\nper = \"1h\"\n";
    let gw = Gateway::start(&config(&first, "", policy)).await;
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(get(gw.listen, "/", &[]).await.unwrap().status);
    }
    assert_eq!(got, vec![200, 200, 429]);

    gw.reload(&config(&second, "", policy));
    gw.wait_for_generation(2).await;
    // The refusal cached from the first Redis does not carry over.
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(get(gw.listen, "/", &[]).await.unwrap().status);
    }
    assert_eq!(got, vec![200, 200, 429]);
    assert_eq!(second.command("DBSIZE").await.unwrap(), ":1");
    let c = get(gw.admin, "/config", &[]).await.unwrap().json();
    assert_eq!(c["redis"]["url"], second.url());
    assert_eq!(c["rate_limits"][0]["scope"], "global");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_started_before_redis_fails_open_then_enforces() {
    let mut redis = RedisServer::start().await;
    redis.stop();
    let gw = Gateway::start(&config(
        &redis,
        "",
        "key = \"route\"\nrate = 2\nper = \"1h\"\n",
    ))
    .await;
    for _ in 0..3 {
        let (r, took) = timed_get(&gw, &[]).await;
        assert_eq!(r.status, 200);
        assert!(took < NO_HANG, "a request waited {took:?} for Redis");
    }
    redis.restart().await;
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut statuses = Vec::new();
    while !statuses.ends_with(&[429]) {
        assert!(Instant::now() < deadline, "never enforced: {statuses:?}");
        statuses.push(get(gw.listen, "/", &[]).await.unwrap().status);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Once Redis answers, exactly the budget goes through.
    let tail: Vec<u16> = statuses.iter().rev().take(3).rev().copied().collect();
    assert_eq!(tail, vec![200, 200, 429], "{statuses:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_key_above_its_rate_is_limited_not_waved_through() {
    // With batch > 1, requests beyond the rate must get 429 from the local
    // cache, not pile up behind Redis calls until on_error lets them through.
    let redis = RedisServer::start().await;
    let gw = Gateway::start(&config(
        &redis,
        "on_error = \"allow\"",
        "key = \"route\"\nrate = 100\nper = \"1s\"\nburst = 10\nbatch = 5\n",
    ))
    .await;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let addr = gw.listen;
        tasks.push(tokio::spawn(async move {
            let mut ok = 0;
            for _ in 0..25 {
                match get(addr, "/", &[]).await.unwrap().status {
                    200 => ok += 1,
                    429 => {}
                    s => panic!("unexpected status {s}"),
                }
            }
            ok
        }));
    }
    let mut allowed = 0;
    for t in tasks {
        allowed += t.await.unwrap();
    }
    let elapsed = start.elapsed().as_secs_f64();
    // burst + rate x elapsed, + at most batch - 1 leased early, + one refill in flight.
    let bound = 10.0 + 100.0 * elapsed + 4.0 + 1.0;
    assert!(
        f64::from(allowed) <= bound,
        "{allowed} of 400 allowed in {elapsed:.3}s; the limit allows {bound:.0}"
    );
    let text = get(gw.admin, "/metrics", &[]).await.unwrap().text();
    assert_eq!(
        metric(
            &text,
            r#"meshgate_rate_limit_decisions_total{outcome="backend_error",policy="shared"}"#
        ),
        0.0,
        "a healthy Redis is never a backend error"
    );
}

/// A fleet outgrows one Redis: `[redis] cluster` names a Redis Cluster's
/// nodes. Two gateways share each client's budget through it (each budget
/// is one key, so one slot on one shard), and a node stopping mid-test
/// leaves the budgets on it to `on_error` while the others hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_share_budgets_through_a_redis_cluster_and_a_lost_node_follows_on_error() {
    let mut cluster = RedisCluster::start(3).await;
    let nodes: Vec<String> = cluster.urls().iter().map(|u| format!("\"{u}\"")).collect();
    let cfg = format!(
        "{}\n[redis]\ncluster = [{}]\ntimeout = \"500ms\"\non_error = \"deny\"\n[rate_limits.per_user]\nscope = \"global\"\nkey = \"header:x-user\"\nrate = 3\nper = \"1h\"\n[routes.api]\npath_prefix = \"/\"\nrate_limits = [\"per_user\"]\nrespond = {{ body = \"ok\" }}\n",
        HEAD.trim_end(),
        nodes.join(", ")
    );
    let a = Gateway::start(&cfg).await;
    let b = Gateway::start(&cfg).await;
    // 30 clients, so every shard holds some of their budgets.
    let users: Vec<String> = (0..30).map(|i| format!("user-{i}")).collect();
    for user in &users {
        let mut allowed = 0;
        for i in 0..5 {
            let gw = if i % 2 == 0 { &a } else { &b };
            match get(gw.listen, "/", &[("x-user", user)])
                .await
                .unwrap()
                .status
            {
                200 => allowed += 1,
                429 => {}
                s => panic!("{user}: unexpected status {s}"),
            }
        }
        assert_eq!(allowed, 3, "{user}: one budget of 3 across both gateways");
    }
    let counted: usize = {
        let mut keys = 0;
        for n in &cluster.nodes {
            let reply = n.command("DBSIZE").await.unwrap();
            let size: usize = reply.trim_start_matches(':').parse().unwrap();
            assert!(size > 0, "a shard holds no budget: {reply}");
            keys += size;
        }
        keys
    };
    assert_eq!(counted, users.len(), "one key per budget");

    // A node stops: budgets on it fail closed (on_error = "deny"), at once
    // and within the timeout; budgets on the others are still kept. (New
    // clients: a spent budget's refusal is remembered by each gateway.)
    cluster.nodes[0].stop();
    let mut denied = 0;
    let mut counted = 0;
    for user in (0..30).map(|i| format!("late-{i}")) {
        let (r, took) = timed_get(&a, &[("x-user", &user)]).await;
        assert!(took < NO_HANG, "{user} waited {took:?}");
        match r.status {
            503 => denied += 1,
            200 => counted += 1,
            s => panic!("{user}: unexpected status {s}"),
        }
    }
    assert!(
        denied > 0 && counted > 0,
        "{denied} denied, {counted} counted"
    );
}

/// `rediss://` with `[redis] ca`: a global limit over TLS to a real
/// redis-server (its certificate made here); a gateway trusting another CA
/// cannot connect, and its requests follow `on_error`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_limits_over_tls_to_redis_trust_the_configured_ca() {
    use crate::support::tls::{Ca, Leaf};
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("redis test CA");
    let ca_file = ca.write(dir.path(), "ca.pem");
    let (cert, key) = ca
        .issue(Leaf {
            dns: &["localhost"],
            ..Leaf::default()
        })
        .write(dir.path(), "redis");
    // The server wants a CA file even when it asks for no client certificate.
    let redis = RedisServer::start_tls(&cert, &key).await;
    let other_ca = Ca::new("someone else").write(dir.path(), "other.pem");
    let cfg = |ca: &std::path::Path| {
        format!(
            "{}\n[redis]\nurl = \"rediss://localhost:{}/0\"\nca = \"{}\"\ntimeout = \"1s\"\non_error = \"deny\"\n[rate_limits.shared]\nscope = \"global\"\nkey = \"route\"\nrate = 2\nper = \"1h\"\n[routes.api]\npath_prefix = \"/\"\nrate_limits = [\"shared\"]\nrespond = {{ body = \"ok\" }}\n",
            HEAD.trim_end(),
            redis.addr.port(),
            ca.display()
        )
    };
    let a = Gateway::start(&cfg(&ca_file)).await;
    let b = Gateway::start(&cfg(&ca_file)).await;
    let statuses = [
        get(a.listen, "/", &[]).await.unwrap().status,
        get(b.listen, "/", &[]).await.unwrap().status,
        get(a.listen, "/", &[]).await.unwrap().status,
    ];
    assert_eq!(statuses, [200, 200, 429], "one budget of 2 over TLS");
    // The server's certificate does not chain to this CA: no connection,
    // so the policy fails closed.
    let c = Gateway::start(&cfg(&other_ca)).await;
    let (r, took) = timed_get(&c, &[]).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(took < NO_HANG, "{took:?}");
}
