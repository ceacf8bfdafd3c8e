//! The egress allowlist, end to end: plain HTTP out over TLS that meshgate
//! originates and verifies, CONNECT tunnels whose ClientHello must name the
//! CONNECT host, bare ClientHellos passed through by SNI, and everything
//! else refused with an audit line and a metric. Destinations are test
//! names pinned to 127.0.0.1 with `[egress] resolve`, so nothing leaves
//! this machine.

use std::net::SocketAddr;
use std::time::Duration;

use crate::support::client::{exchange, Resp};
use crate::support::tls::{connect_over, Ca, ClientTls, Leaf};
use crate::support::upstream::{echo, https_echo, Upstream};
use crate::support::{metric, Gateway, HEAD};
use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const API: &str = "api.example.test";
const SVC: &str = "a.svc.example.test";

/// An HTTPS origin for `API` and `SVC`, its CA, and a directory for files.
struct Origin {
    server: Upstream,
    ca: Ca,
    dir: tempfile::TempDir,
}

async fn origin() -> Origin {
    let ca = Ca::new("egress test root");
    let pem = ca.issue(Leaf {
        dns: &[API, SVC, "other.example.test"],
        ..Leaf::default()
    });
    let server = https_echo("origin", &pem).await;
    Origin {
        server,
        ca,
        dir: tempfile::tempdir().unwrap(),
    }
}

impl Origin {
    fn port(&self) -> u16 {
        self.server.addr.port()
    }

    fn ca_file(&self) -> String {
        self.ca.write(self.dir.path(), "ca").display().to_string()
    }
}

/// An egress listener (the harness's `public` listener) with `[egress]`
/// pinning the test names to the origin.
fn egress_config(o: &Origin, extra: &str, allow: &str) -> String {
    format!(
        "{HEAD}direction = \"egress\"\n[egress]\nresolve = {{ \"{API}\" = \"127.0.0.1\", \"{SVC}\" = \"127.0.0.1\", \"other.example.test\" = \"127.0.0.1\", \"b.a.svc.example.test\" = \"127.0.0.1\" }}\n{extra}\n[egress.allow]\n{allow}\n",
    )
    .replace("@PORT@", &o.port().to_string())
}

/// One request through the egress listener with an absolute-form target
/// (as `http_proxy` clients send it), or origin-form when `url` is a path.
async fn via_proxy(gw: SocketAddr, url: &str, headers: &[(&str, &str)]) -> Resp {
    let stream = TcpStream::connect(gw).await.unwrap();
    let mut b = Request::builder().uri(url);
    if let Ok(uri) = url.parse::<http::Uri>() {
        if let Some(a) = uri.authority() {
            b = b.header("host", a.as_str());
        }
    }
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    exchange(
        TokioIo::new(stream),
        false,
        b.body(Full::new(Bytes::new())).unwrap(),
    )
    .await
    .unwrap()
}

async fn metrics(gw: &Gateway) -> String {
    crate::support::client::get(gw.admin, "/metrics", &[])
        .await
        .unwrap()
        .text()
}

fn decision(listener: &str, mode: &str, dest: &str, outcome: &str, reason: &str) -> String {
    format!(
        "meshgate_egress_decisions_total{{destination=\"{dest}\",listener=\"{listener}\",mode=\"{mode}\",outcome=\"{outcome}\",reason=\"{reason}\"}}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_to_allowlisted_hosts_goes_out_over_verified_tls() {
    let o = origin().await;
    let internal = echo("internal").await;
    let config = egress_config(
        &o,
        &format!("ca = \"{}\"", o.ca_file()),
        &format!("hosts = [\"{API}\", \"*.svc.example.test\"]\nports = [@PORT@]"),
    ) + &format!(
        "[routes.internal]\nhost = \"internal.local\"\nupstream = \"internal\"\n[upstreams.internal]\nendpoints = [\"{}\"]\n",
        internal.addr
    );
    let gw = Gateway::start(&config).await;
    let port = o.port();

    // Absolute form, as http_proxy clients send it.
    let r = via_proxy(
        gw.listen,
        &format!("http://{API}:{port}/v1/charges?x=1"),
        &[("proxy-authorization", "Basic c2VjcmV0"), ("x-app", "1")],
    )
    .await;
    assert_eq!(r.status, 200, "{}\n{}", r.text(), gw.log());
    let j = r.json();
    // TLS to the origin, with the requested name as SNI.
    assert_eq!(j["name"], format!("origin@{API}"));
    assert_eq!(j["path"], "/v1/charges?x=1");
    assert_eq!(j["headers"]["host"], format!("{API}:{port}"));
    assert_eq!(j["headers"]["x-app"], "1");
    // Proxy credentials and facts about this machine stay here.
    for h in [
        "proxy-authorization",
        "x-forwarded-for",
        "x-request-id",
        "traceparent",
    ] {
        assert!(j["headers"].get(h).is_none(), "{h} leaked: {j}");
    }

    // Origin form with a Host header, and a one-label wildcard entry.
    let r = via_proxy(gw.listen, "/svc", &[("host", &format!("{SVC}:{port}"))]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["name"], format!("origin@{SVC}"));

    // A route on the egress listener comes first.
    let r = via_proxy(gw.listen, "/x", &[("host", "internal.local")]).await;
    assert_eq!(r.json()["name"], "internal");

    // Pooled: a second request reuses the TLS connection.
    let before = o.server.connections();
    let r = via_proxy(gw.listen, &format!("http://{API}:{port}/again"), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        o.server.connections(),
        before,
        "a new TLS connection per request"
    );

    let config = crate::support::client::get(gw.admin, "/config", &[])
        .await
        .unwrap()
        .json();
    assert_eq!(config["egress"]["allow"][0]["host"], API);
    assert_eq!(config["egress"]["allow"][1]["host"], "*.svc.example.test");
    assert_eq!(config["egress"]["resolve"][API][0], "127.0.0.1");

    // Counted when each request's log line is made, just after its answer.
    let text = gw
        .wait_for_metric(
            r#"meshgate_upstream_requests_total{status_class="2xx",upstream="(egress)"}"#,
            3.0,
            std::time::Duration::from_secs(5),
        )
        .await;
    let dest = format!("{API}:{port}");
    assert_eq!(
        metric(&text, &decision("public", "http", &dest, "allowed", "")),
        2.0,
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_else_is_refused_with_an_audit_line_and_a_metric() {
    let o = origin().await;
    let config = egress_config(
        &o,
        &format!("ca = \"{}\"", o.ca_file()),
        &format!("hosts = [\"{API}\", \"*.svc.example.test\"]\nports = [@PORT@]"),
    );
    let gw = Gateway::start(&config).await;
    let port = o.port();
    let cases = [
        (
            format!("http://evil.example.test:{port}/"),
            403,
            "host_not_allowed",
            format!("evil.example.test:{port}"),
        ),
        (
            format!("http://{API}:{}/", port ^ 1),
            403,
            "port_not_allowed",
            format!("{API}:{}", port ^ 1),
        ),
        // No port: TLS to 443, which is not allowed here.
        (
            format!("http://{API}/"),
            403,
            "port_not_allowed",
            format!("{API}:443"),
        ),
        // Wildcards: one label only, and no suffix tricks.
        (
            format!("http://b.a.svc.example.test:{port}/"),
            403,
            "host_not_allowed",
            format!("b.a.svc.example.test:{port}"),
        ),
        (
            format!("http://svc.example.test:{port}/"),
            403,
            "host_not_allowed",
            format!("svc.example.test:{port}"),
        ),
        (
            format!("http://{API}.evil.test:{port}/"),
            403,
            "host_not_allowed",
            format!("{API}.evil.test:{port}"),
        ),
        (
            format!("http://127.0.0.1:{port}/"),
            403,
            "ip_literal",
            format!("127.0.0.1:{port}"),
        ),
    ];
    for (url, status, reason, dest) in &cases {
        let r = via_proxy(gw.listen, url, &[]).await;
        assert_eq!(r.status, *status, "{url}: {}", r.text());
        let j = r.json();
        assert_eq!(j["error"], "egress destination not allowed", "{url}");
        assert_eq!(j["destination"], dest.as_str(), "{url}");
        let text = metrics(&gw).await;
        assert_eq!(
            metric(&text, &decision("public", "http", dest, "denied", reason)),
            1.0,
            "{url}\n{text}"
        );
    }
    // User info in the authority is not a destination.
    let r = via_proxy(
        gw.listen,
        "/",
        &[("host", &format!("{API}@evil.example.test"))],
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text());
    // The origin never saw any of them.
    assert_eq!(o.server.connections(), 0);
    let log = gw.log();
    assert!(
        log.contains("egress denied: listener=public mode=http")
            && log.contains(&format!(
                "destination=\"evil.example.test:{port}\" reason=host_not_allowed"
            )),
        "{log}"
    );

    // A reload changes the list; the old one no longer applies.
    gw.reload(&egress_config(
        &o,
        &format!("ca = \"{}\"", o.ca_file()),
        &format!("hosts = [\"evil.example.test:{port}\"]"),
    ));
    gw.wait_for_generation(2).await;
    let pinned = format!("http://{API}:{port}/");
    assert_eq!(via_proxy(gw.listen, &pinned, &[]).await.status, 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_comes_from_the_system_store_or_the_configured_ca() {
    let o = origin().await;
    let allow = format!("hosts = [\"{API}\"]\nports = [@PORT@]");
    let url = format!("http://{API}:{}/", o.port());

    // No `ca`: the system store, which BoringSSL reads from SSL_CERT_FILE
    // when set. With the origin's CA in it, the origin is trusted...
    let ca_file = o.ca_file();
    let gw = Gateway::start_with_env(
        &egress_config(&o, "", &allow),
        &[("SSL_CERT_FILE", &ca_file)],
    )
    .await;
    let r = via_proxy(gw.listen, &url, &[]).await;
    assert_eq!(r.status, 200, "{}\n{}", r.text(), gw.log());
    drop(gw);

    // ...and with an unrelated store it is not.
    let other = Ca::new("unrelated")
        .write(o.dir.path(), "other")
        .display()
        .to_string();
    let gw =
        Gateway::start_with_env(&egress_config(&o, "", &allow), &[("SSL_CERT_FILE", &other)]).await;
    let r = via_proxy(gw.listen, &url, &[]).await;
    assert_eq!(r.status, 502, "{}", r.text());
    drop(gw);

    // A configured `ca` that did not sign the origin: refused too.
    let gw = Gateway::start(&egress_config(&o, &format!("ca = \"{other}\""), &allow)).await;
    assert_eq!(via_proxy(gw.listen, &url, &[]).await.status, 502);
    let text = metrics(&gw).await;
    assert!(
        metric(
            &text,
            r#"meshgate_upstream_errors_total{kind="tls",upstream="(egress)"}"#
        ) >= 1.0,
        "{text}"
    );
    drop(gw);

    // The right CA, but a certificate for other names: refused.
    let wrong_name = https_echo(
        "wrong",
        &o.ca.issue(Leaf {
            dns: &["elsewhere.test"],
            ..Leaf::default()
        }),
    )
    .await;
    let config = format!(
        "{HEAD}direction = \"egress\"\n[egress]\nca = \"{ca_file}\"\nresolve = {{ \"{API}\" = \"{}\" }}\n[egress.allow]\nhosts = [\"{API}\"]\nports = [{}]\n",
        wrong_name.addr,
        wrong_name.addr.port()
    );
    let gw = Gateway::start(&config).await;
    let r = via_proxy(
        gw.listen,
        &format!("http://{API}:{}/", wrong_name.addr.port()),
        &[],
    )
    .await;
    assert_eq!(r.status, 502, "{}", r.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_that_resolve_into_deny_networks_are_refused() {
    let o = origin().await;
    // `localhost` is looked up (from /etc/hosts), not pinned: 127.0.0.1 is
    // in the default deny_networks.
    let config = egress_config(
        &o,
        &format!("ca = \"{}\"", o.ca_file()),
        "hosts = [\"localhost\"]\nports = [@PORT@]",
    );
    let gw = Gateway::start(&config).await;
    let r = via_proxy(gw.listen, &format!("http://localhost:{}/", o.port()), &[]).await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(
        r.json()["reason"],
        "the host resolves only to addresses in [egress] deny_networks"
    );
    // The same for a tunnel.
    let (_, status, head) = connect(gw.listen, &format!("localhost:{}", o.port())).await;
    assert_eq!(status, 403, "{head}");
    assert_eq!(o.server.connections(), 0);
    let text = metrics(&gw).await;
    let dest = format!("localhost:{}", o.port());
    assert_eq!(
        metric(
            &text,
            &decision("public", "connect", &dest, "denied", "address_denied")
        ),
        1.0,
        "{text}"
    );
}

/// Send `CONNECT target`, read the response head; the open connection and
/// the status.
async fn connect(gw: SocketAddr, target: &str) -> (TcpStream, u16, String) {
    let mut s = TcpStream::connect(gw).await.unwrap();
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).await.unwrap() == 0 {
            break;
        }
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (s, status, text)
}

/// A GET over an established TLS stream.
async fn get_over_tls(stream: pingora::tls::tokio_ssl::SslStream<TcpStream>, host: &str) -> Resp {
    let req = Request::builder()
        .uri("/tunnel")
        .header("host", host)
        .body(Full::new(Bytes::new()))
        .unwrap();
    exchange(TokioIo::new(stream), false, req).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_tunnels_carry_tls_only_to_the_host_they_named() {
    let o = origin().await;
    let config = egress_config(
        &o,
        "",
        &format!("hosts = [\"{API}\", \"other.example.test\"]\nports = [@PORT@]"),
    );
    let gw = Gateway::start(&config).await;
    let port = o.port();
    let ca = o.ca.pem();
    let target = format!("{API}:{port}");

    // Allowed, and the ClientHello names the CONNECT host: a real tunnel.
    let (s, status, head) = connect(gw.listen, &target).await;
    assert_eq!(status, 200, "{head}");
    let (tls, _) = connect_over(s, &ClientTls::new(&ca, Some(API)))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", gw.log()));
    let r = get_over_tls(tls, API).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["name"], format!("origin@{API}"));

    // CONNECT to a host that is not allowed: 403 before any tunnel.
    let (_, status, head) = connect(gw.listen, &format!("evil.example.test:{port}")).await;
    assert_eq!(status, 403, "{head}");
    let (_, status, _) = connect(gw.listen, &format!("127.0.0.1:{port}")).await;
    assert_eq!(status, 403);
    let (_, status, _) = connect(gw.listen, API).await;
    assert_eq!(status, 400, "CONNECT without a port");
    let (_, status, _) = connect(gw.listen, &format!("{API}:{}", port ^ 1)).await;
    assert_eq!(status, 403, "a port not on the list");

    // The classic bypass: CONNECT an allowed host, then a ClientHello for
    // another one (allowed or not). The tunnel is closed, nothing relayed.
    for sni in ["other.example.test", "evil.example.test"] {
        let (s, status, _) = connect(gw.listen, &target).await;
        assert_eq!(status, 200);
        assert!(
            connect_over(s, &ClientTls::new(&ca, Some(sni)))
                .await
                .is_err(),
            "a ClientHello for {sni} went through a tunnel to {API}"
        );
    }
    // And no SNI at all.
    let (s, _, _) = connect(gw.listen, &target).await;
    assert!(connect_over(s, &ClientTls::new(&ca, None)).await.is_err());

    let text = metrics(&gw).await;
    for (dest, outcome, reason, n) in [
        (target.as_str(), "allowed", "", 1.0),
        (target.as_str(), "denied", "sni_mismatch", 2.0),
        (target.as_str(), "denied", "no_sni", 1.0),
    ] {
        assert_eq!(
            metric(&text, &decision("public", "connect", dest, outcome, reason)),
            n,
            "{dest} {reason}\n{text}"
        );
    }
    assert!(
        metric(
            &text,
            r#"meshgate_egress_tunnel_bytes_total{direction="received",listener="public",mode="connect"}"#
        ) > 0.0,
        "{text}"
    );
    let log = gw.log();
    assert!(log.contains("reason=sni_mismatch"), "{log}");
    assert!(log.contains("egress tunnel closed"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_client_hellos_pass_through_by_sni() {
    let o = origin().await;
    let config = egress_config(
        &o,
        "passthrough_port = @PORT@",
        &format!("hosts = [\"{API}\"]\nports = [@PORT@]"),
    )
    // A tunnel is not a request head: the head deadline must not cut it.
    .replacen(
        "direction = \"egress\"\n",
        "direction = \"egress\"\nlimits = { header_read_timeout = \"1s\" }\n",
        1,
    );
    let gw = Gateway::start(&config).await;
    let ca = o.ca.pem();

    // The client does its own TLS with the origin, through meshgate.
    let (tls, info) = crate::support::tls::connect(gw.listen, &ClientTls::new(&ca, Some(API)))
        .await
        .unwrap();
    assert!(info.server_names.iter().any(|n| n == API), "{info:?}");
    // Quiet for longer than header_read_timeout, as a real client may be.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let r = get_over_tls(tls, API).await;
    assert_eq!(r.json()["name"], format!("origin@{API}"));

    // Not allowed, or no SNI: the connection is closed.
    assert!(crate::support::tls::connect(
        gw.listen,
        &ClientTls::new(&ca, Some("other.example.test"))
    )
    .await
    .is_err());
    assert!(
        crate::support::tls::connect(gw.listen, &ClientTls::new(&ca, None))
            .await
            .is_err()
    );

    // Plain HTTP still works on the same port.
    let r = via_proxy(gw.listen, &format!("http://{API}:{}/", o.port()), &[]).await;
    assert_eq!(
        r.status,
        502,
        "no CA configured and the system store lacks the test CA: {}",
        r.text()
    );

    let text = metrics(&gw).await;
    let dest = format!("other.example.test:{}", o.port());
    assert_eq!(
        metric(
            &text,
            &decision("public", "sni", &dest, "denied", "host_not_allowed")
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        metric(&text, &decision("public", "sni", "-", "denied", "no_sni")),
        1.0,
        "{text}"
    );
    // Idle tunnels end; the gauge goes back to zero once clients are gone.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = metrics(&gw).await;
        if metric(
            &text,
            r#"meshgate_egress_tunnels_active{listener="public",mode="sni"}"#,
        ) == 0.0
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
