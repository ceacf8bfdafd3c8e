//! Authorization policies through the real gateway: identity rules on an
//! mTLS listener, source rules behind a trusted proxy, deny over allow,
//! shadow mode, the 403 body, metrics and the access log.

use std::time::Duration;

use crate::support::client::{get, send};
use crate::support::tls::{self, Ca, ClientTls, Leaf, Pem};
use crate::support::upstream::echo;
use crate::support::{metric, Gateway, HEAD};
use http::Method;

const WEB: &str = "spiffe://prod.example/ns/web/sa/frontend";
const BATCH: &str = "spiffe://prod.example/ns/batch/sa/report";

const POLICIES: &str = r#"
[policies.orders_internal]
allow = [{ identity = "spiffe://prod.example/ns/web/*", methods = ["GET", "POST"], path_prefix = "/orders/" },
         { source = "127.0.0.0/8", path_prefix = "/healthz" }]
deny = [{ path_prefix = "/orders/admin" }]
default = "deny"

[policies.trial]
allow = [{ headers = { "x-team" = "payments" } }]
mode = "shadow"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_rules_on_an_mtls_listener() {
    let dir = tempfile::tempdir().unwrap();
    let server_ca = Ca::new("server root");
    let clients = Ca::new("client root");
    let (cert, key) = server_ca
        .issue(Leaf {
            dns: &["orders.example"],
            ..Leaf::default()
        })
        .write(dir.path(), "server");
    let client_ca = clients.write(dir.path(), "clients");
    let log = dir.path().join("access.log");
    let app = echo("orders").await;
    let gw = Gateway::start(&format!(
        "[telemetry]\naccess_log = \"json\"\naccess_log_file = \"{}\"\n[certs.server]\ncert = \"{}\"\nkey = \"{}\"\n{}\ntls = {{ certs = [\"server\"], client_ca = \"{}\" }}\n{POLICIES}\n[routes.orders]\npath_prefix = \"/\"\nupstream = \"orders\"\npolicies = [\"orders_internal\", \"trial\"]\n[upstreams.orders]\nendpoints = [\"{}\"]\n",
        log.display(),
        cert.display(),
        key.display(),
        HEAD.trim_end(),
        client_ca.display(),
        app.addr
    ))
    .await;
    let ca_pem = server_ca.pem();
    let web = clients.issue(Leaf {
        uris: &[WEB],
        ..Leaf::default()
    });
    let batch = clients.issue(Leaf {
        uris: &[BATCH],
        ..Leaf::default()
    });
    let call = |who: &'static Pem, path: &'static str| {
        let ca_pem = ca_pem.clone();
        let addr = gw.listen;
        async move {
            let o = ClientTls {
                client: Some(who),
                ..ClientTls::new(&ca_pem, Some("orders.example"))
            };
            tls::get(addr, &o, path, &[]).await.unwrap().0
        }
    };
    let web: &'static Pem = Box::leak(Box::new(web));
    let batch: &'static Pem = Box::leak(Box::new(batch));

    let r = call(web, "/orders/7").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["name"], "orders");

    // Another workload: no rule allows it, the default denies.
    let r = call(batch, "/orders/7").await;
    assert_eq!(r.status, 403);
    let j = r.json();
    assert_eq!(j["error"], "forbidden");
    assert_eq!(j["policy"], "orders_internal");
    assert_eq!(j["route"], "orders");
    assert_eq!(j["request_id"].as_str(), r.header("x-request-id"));

    // Deny wins over the web rule.
    assert_eq!(call(web, "/orders/admin/users").await.status, 403);
    // The source rule: any identity from loopback may read /healthz.
    assert_eq!(call(batch, "/healthz").await.status, 200);

    let text = get(gw.admin, "/metrics", &[]).await.unwrap().text();
    assert_eq!(
        metric(
            &text,
            r#"meshgate_authz_decisions_total{outcome="denied",policy="orders_internal"}"#
        ),
        2.0
    );
    assert_eq!(
        metric(
            &text,
            r#"meshgate_authz_decisions_total{outcome="allowed",policy="orders_internal"}"#
        ),
        2.0
    );
    // The shadow policy would have denied each request, and blocked none.
    assert_eq!(
        metric(
            &text,
            r#"meshgate_authz_decisions_total{outcome="shadow_denied",policy="trial"}"#
        ),
        4.0
    );

    let has = |lines: &str, s: &str| lines.lines().any(|l| l.contains(s));
    let lines = crate::support::wait_for_log(&log, Duration::from_secs(5), |t| {
        has(t, r#""authz":"denied:orders_internal""#) && has(t, r#""authz":"shadow_denied:trial""#)
    })
    .await;
    assert!(
        has(&lines, &format!(r#""peer_identity":"{BATCH}""#)),
        "{lines}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_rules_see_the_client_behind_a_trusted_proxy() {
    let gw = Gateway::start(&format!(
        "{}\ntrusted_proxies = [\"127.0.0.1\"]\n[policies.office]\nallow = [{{ source = [\"198.51.100.0/24\"], methods = [\"GET\"] }}]\n[routes.r]\npath_prefix = \"/\"\npolicies = [\"office\"]\nrespond = {{ body = \"in\" }}\n",
        HEAD.trim_end()
    ))
    .await;
    let via = |xff: &'static str| [("x-forwarded-for", xff)];
    assert_eq!(
        get(gw.listen, "/", &via("198.51.100.7"))
            .await
            .unwrap()
            .status,
        200
    );
    // Spoofed entries to the left of the real client are not believed.
    assert_eq!(
        get(gw.listen, "/", &via("198.51.100.7, 203.0.113.5"))
            .await
            .unwrap()
            .status,
        403
    );
    // The loopback peer itself is not in the office range.
    assert_eq!(get(gw.listen, "/", &[]).await.unwrap().status, 403);
    let post = send(
        gw.listen,
        Method::POST,
        "/",
        &via("198.51.100.7"),
        bytes::Bytes::from_static(b"x"),
        false,
    )
    .await
    .unwrap();
    assert_eq!(post.status, 403, "methods narrow the rule");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_tricks_do_not_walk_around_a_rule() {
    let app = echo("app").await;
    let gw = Gateway::start(&format!(
        "{}\n[policies.no_admin]\ndeny = [{{ path_prefix = \"/admin\" }}]\ndefault = \"allow\"\n[routes.r]\npath_prefix = \"/\"\nupstream = \"app\"\npolicies = [\"no_admin\"]\n[upstreams.app]\nendpoints = [\"{}\"]\n",
        HEAD.trim_end(),
        app.addr
    ))
    .await;
    for trick in [
        "/admin",
        "/x/../admin",
        "/public/%2e%2e/admin/users",
        "//admin",
        "/%61dmin",
        "/./admin",
    ] {
        let r = get(gw.listen, trick, &[]).await.unwrap();
        assert_eq!(r.status, 403, "{trick}: {}", r.text());
    }
    // What the upstream gets is the path the rules saw.
    let r = get(gw.listen, "/a/./b/../%63?q=%2e%2e", &[]).await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["path"], "/a/c?q=%2e%2e");
    // An encoded slash is not a separator: the rule does not apply, and the
    // upstream sees it still encoded.
    let r = get(gw.listen, "/admin%2Fx", &[]).await.unwrap();
    assert_eq!(r.status, 403, "prefix /admin matches /admin%2Fx as text");
}
