//! Rate limits through the real gateway: exact burst accounting, 429s with
//! their headers and body, independent keys, shadow mode, trusted proxies.

use crate::support::client::{get, Resp};
use crate::support::{metric, Gateway, HEAD};

fn routes(policies: &str, listener_extra: &str, rate_limits: &[&str]) -> String {
    let rate_limits = rate_limits
        .iter()
        .map(|p| format!("\"{p}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "{}{listener_extra}\n{policies}\n[routes.api]\nrate_limits = [{rate_limits}]\npath_prefix = \"/\"\nrespond = {{ body = \"ok\" }}\n",
        HEAD.trim_end()
    )
}

async fn statuses(gw: &Gateway, n: usize, headers: &[(&str, &str)]) -> Vec<u16> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(get(gw.listen, "/", headers).await.unwrap().status);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_gets_exactly_the_allowed_number_then_429s() {
    let config = routes(
        "[rate_limits.per_client]\nkey = \"client_ip\"\nrate = 5\nper = \"1m\"\n",
        "",
        &["per_client"],
    );
    let gw = Gateway::start(&config).await;
    let got = statuses(&gw, 8, &[]).await;
    assert_eq!(got, vec![200, 200, 200, 200, 200, 429, 429, 429]);

    let r: Resp = get(gw.listen, "/", &[]).await.unwrap();
    assert_eq!(r.status, 429);
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!(
        (1..=12).contains(&retry),
        "one request per 12s refills: retry-after {retry}"
    );
    assert_eq!(
        r.header("ratelimit-policy"),
        Some("\"per_client\";q=5;w=60")
    );
    let limit = r.header("ratelimit").unwrap();
    assert!(limit.starts_with("\"per_client\";r=0;t="), "{limit}");
    let j = r.json();
    assert_eq!(j["policy"], "per_client");
    assert_eq!(j["route"], "api");
    assert_eq!(j["error"], "rate limited");
    assert_eq!(j["request_id"].as_str(), r.header("x-request-id"));
    // Allowed responses carry no headers unless asked to.
    let text = get(gw.admin, "/metrics", &[]).await.unwrap().text();
    assert_eq!(
        metric(
            &text,
            r#"meshgate_rate_limit_decisions_total{outcome="allowed",policy="per_client"}"#
        ),
        5.0
    );
    assert_eq!(
        metric(
            &text,
            r#"meshgate_rate_limit_decisions_total{outcome="limited",policy="per_client"}"#
        ),
        4.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_independent_and_allowed_responses_can_carry_headers() {
    let gw = Gateway::start(&routes(
        "[rate_limits.per_key]\nkey = \"header:x-api-key\"\nrate = 2\nper = \"1m\"\nheaders_on_allowed = true\n",
        "", &["per_key"]))
    .await;
    let first = get(gw.listen, "/", &[("x-api-key", "a")]).await.unwrap();
    assert_eq!(first.status, 200);
    assert_eq!(
        first.header("ratelimit-policy"),
        Some("\"per_key\";q=2;w=60")
    );
    assert!(
        first
            .header("ratelimit")
            .unwrap()
            .starts_with("\"per_key\";r=1;"),
        "{:?}",
        first.header("ratelimit")
    );
    assert_eq!(
        statuses(&gw, 2, &[("x-api-key", "a")]).await,
        vec![200, 429]
    );
    assert_eq!(
        statuses(&gw, 3, &[("x-api-key", "b")]).await,
        vec![200, 200, 429]
    );
    // Leaving the header out is not a way around the limit: one shared bucket.
    assert_eq!(statuses(&gw, 3, &[]).await, vec![200, 200, 429]);
}

/// `headers_on_allowed` is the policy's own: an allowed response names only
/// the policies that set it, a 429 every enforcing policy asked. A
/// sub-second `per` is advertised over one second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_responses_name_only_the_policies_that_ask_to_be_shown() {
    let gw = Gateway::start(&routes(
        "[rate_limits.quiet]\nkey = \"route\"\nrate = 100\nper = \"1m\"\n[rate_limits.fast]\nkey = \"route\"\nrate = 50\nper = \"500ms\"\nheaders_on_allowed = true\n[rate_limits.loud]\nkey = \"route\"\nrate = 1\nper = \"1m\"\nheaders_on_allowed = true\n",
        "", &["quiet", "fast", "loud"]))
    .await;
    let allowed = get(gw.listen, "/", &[]).await.unwrap();
    assert_eq!(allowed.status, 200);
    assert_eq!(
        allowed.header("ratelimit-policy"),
        Some("\"fast\";q=100;w=1, \"loud\";q=1;w=60")
    );
    let refused = get(gw.listen, "/", &[]).await.unwrap();
    assert_eq!(refused.status, 429);
    assert_eq!(
        refused.header("ratelimit-policy"),
        Some("\"quiet\";q=100;w=60, \"fast\";q=100;w=1, \"loud\";q=1;w=60")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_mode_never_blocks_but_counts() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let config = routes(
        "[rate_limits.trial]\nkey = \"route\"\nrate = 1\nper = \"1m\"\nmode = \"shadow\"\n",
        "",
        &["trial"],
    );
    let config = format!(
        "[telemetry]\naccess_log = \"json\"\naccess_log_file = \"{}\"\n{config}",
        log.display()
    );
    let gw = Gateway::start(&config).await;
    let got = statuses(&gw, 5, &[]).await;
    assert_eq!(got, vec![200; 5]);
    let r = get(gw.listen, "/", &[]).await.unwrap();
    assert!(
        r.header("ratelimit").is_none(),
        "shadow policies stay invisible to clients"
    );
    let start = std::time::Instant::now();
    loop {
        let text = get(gw.admin, "/metrics", &[]).await.unwrap().text();
        if metric(
            &text,
            r#"meshgate_rate_limit_decisions_total{outcome="shadow_limited",policy="trial"}"#,
        ) == 5.0
        {
            assert_eq!(
                metric(
                    &text,
                    r#"meshgate_rate_limit_decisions_total{outcome="allowed",policy="trial"}"#
                ),
                1.0
            );
            break;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(5),
            "{text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let text = crate::support::wait_for_log(&log, std::time::Duration::from_secs(5), |t| {
        t.lines().count() >= 6
    })
    .await;
    assert!(text.contains("\"rate_limit\":\"shadow:trial\""), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_ip_behind_a_trusted_proxy_comes_from_x_forwarded_for() {
    let config = routes(
        "[rate_limits.per_client]\nkey = \"client_ip\"\nrate = 2\nper = \"1m\"\n",
        "\ntrusted_proxies = [\"127.0.0.0/8\"]",
        &["per_client"],
    );
    let gw = Gateway::start(&config).await;
    let a = [("x-forwarded-for", "203.0.113.1")];
    let b = [("x-forwarded-for", "198.51.100.7, 203.0.113.2")];
    assert_eq!(statuses(&gw, 3, &a).await, vec![200, 200, 429]);
    assert_eq!(statuses(&gw, 3, &b).await, vec![200, 200, 429]);
    // Without trust, the header would be ignored: here the peer is trusted, so
    // a third address is a third client.
    assert_eq!(
        statuses(&gw, 1, &[("x-forwarded-for", "192.0.2.9")]).await,
        vec![200]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_policy_must_allow_and_the_first_refusal_is_named() {
    let config = routes(
        "[rate_limits.loose]\nkey = \"route\"\nrate = 100\nper = \"1m\"\n[rate_limits.tight]\nkey = \"client_ip\"\nrate = 1\nper = \"1m\"\n",
        "", &["loose", "tight"]);
    let gw = Gateway::start(&config).await;
    assert_eq!(get(gw.listen, "/", &[]).await.unwrap().status, 200);
    let r = get(gw.listen, "/", &[]).await.unwrap();
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["policy"], "tight");
    let policy = r.header("ratelimit-policy").unwrap();
    assert_eq!(policy, "\"loose\";q=100;w=60, \"tight\";q=1;w=60");
}

/// A client refused by its own limit, listed first, does not spend the
/// route's shared cap listed after it: others still get through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_request_spends_nothing_from_the_policies_after_the_refusal() {
    let config = routes(
        "[rate_limits.per_user]\nkey = \"header:x-user\"\nrate = 1\nper = \"1m\"\n[rate_limits.cap]\nkey = \"route\"\nrate = 3\nper = \"1m\"\n",
        "", &["per_user", "cap"]);
    let gw = Gateway::start(&config).await;
    let a = [("x-user", "a")];
    assert_eq!(
        statuses(&gw, 6, &a).await,
        vec![200, 429, 429, 429, 429, 429]
    );
    let b = [("x-user", "b")];
    let c = [("x-user", "c")];
    assert_eq!(statuses(&gw, 1, &b).await, vec![200]);
    assert_eq!(statuses(&gw, 1, &c).await, vec![200]);
    // a, b and c spent the cap's three units: a fourth user meets it.
    let r = get(gw.listen, "/", &[("x-user", "d")]).await.unwrap();
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["policy"], "cap");
    // Only the policies asked are in the metrics: the cap saw 4 requests.
    let text = gw
        .wait_for_metric(
            r#"meshgate_rate_limit_decisions_total{outcome="limited",policy="cap"}"#,
            1.0,
            std::time::Duration::from_secs(5),
        )
        .await;
    assert_eq!(
        crate::support::metric(
            &text,
            r#"meshgate_rate_limit_decisions_total{outcome="allowed",policy="cap"}"#
        ),
        3.0,
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_does_not_hand_out_a_fresh_budget() {
    let config = routes(
        "[rate_limits.per_client]\nkey = \"client_ip\"\nrate = 2\nper = \"1m\"\n",
        "",
        &["per_client"],
    );
    let gw = Gateway::start(&config).await;
    assert_eq!(statuses(&gw, 3, &[]).await, vec![200, 200, 429]);
    // Same policy, another route added: the budget carries over.
    let text = std::fs::read_to_string(&gw.config_path).unwrap()
        + "[routes.other]\npath = \"/other\"\nrespond = { body = \"x\" }\n";
    std::fs::write(&gw.config_path, text).unwrap();
    crate::support::signal(gw.pid(), "HUP");
    let start = std::time::Instant::now();
    while get(gw.listen, "/other", &[]).await.unwrap().text() != "x" {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(10),
            "reload not applied"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(get(gw.listen, "/", &[]).await.unwrap().status, 429);
}
