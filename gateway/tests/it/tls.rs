//! TLS termination and mTLS through the real gateway, with certificates made
//! in each test: SNI selection, ALPN, minimum version, client certificates
//! (required, optional, wrong CA, expired), identity forwarding and rate
//! limiting by identity, certificate reload, and an mTLS mesh pair.

#![allow(
    unsafe_code,
    reason = "TLS clients set what the boring crate has no safe call for"
)]

use std::path::Path;
use std::time::{Duration, Instant};

use crate::support::client::get;
use crate::support::tls::{self, Ca, ClientTls, Leaf, Pem};
use crate::support::upstream::echo;
use crate::support::{metric, Gateway, HEAD};
use boring::ssl::SslVersion;
use foreign_types::ForeignTypeRef;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WEB: &str = "spiffe://prod.example/ns/web/sa/frontend";
const API: &str = "spiffe://prod.example/ns/api/sa/backend";

/// Certificates for `edge.example` (ECDSA) and `api.example` (RSA), and the
/// `[certs]` tables naming them.
fn edge_and_api(ca: &Ca, dir: &Path) -> String {
    let (ec, ek) = ca
        .issue(Leaf {
            dns: &["edge.example"],
            ..Leaf::default()
        })
        .write(dir, "edge");
    let (ac, ak) = ca
        .issue(Leaf {
            dns: &["api.example", "*.api.example"],
            rsa: true,
            ..Leaf::default()
        })
        .write(dir, "api");
    format!(
        "[certs.edge]\ncert = \"{}\"\nkey = \"{}\"\n[certs.api]\ncert = \"{}\"\nkey = \"{}\"\n",
        ec.display(),
        ek.display(),
        ac.display(),
        ak.display()
    )
}

fn tls_listener(tls: &str, certs: &str, routes: &str) -> String {
    format!("{certs}{}\ntls = {{ {tls} }}\n{routes}", HEAD.trim_end())
}

const RESPOND: &str = "[routes.r]\npath_prefix = \"/\"\nrespond = { body = \"secure\" }\n";

/// A gateway whose TLS listener has `tls` (which names `edge` and `api`
/// certificates) and answers with `RESPOND`; the directory holding the
/// certificates, and their CA.
async fn edge_gateway(tls: &str) -> (tempfile::TempDir, Ca, Gateway) {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test root");
    let gw = Gateway::start(&tls_listener(tls, &edge_and_api(&ca, dir.path()), RESPOND)).await;
    (dir, ca, gw)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_picks_the_certificate_and_alpn_the_protocol() {
    let (_dir, ca, gw) = edge_gateway("certs = [\"edge\", \"api\"]").await;
    let ca_pem = ca.pem();
    // The effective TLS settings, defaults filled in.
    let c = get(gw.admin, "/config", &[]).await.unwrap().json();
    let t = &c["listeners"][0]["tls"];
    assert_eq!(t["certs"], serde_json::json!(["edge", "api"]));
    assert_eq!(t["min_version"], "1.2");
    assert_eq!(t["alpn"], serde_json::json!(["h2", "http/1.1"]));
    assert_eq!(t["session_tickets"], 1);
    assert!(t["client_ca"].is_null());
    assert_eq!(c["certs"][0]["name"], "edge");

    let (r, info) = tls::get(
        gw.listen,
        &ClientTls::new(&ca_pem, Some("api.example")),
        "/",
        &[],
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "secure");
    assert!(info.server_names.contains(&"api.example".to_string()));
    assert_eq!(info.version, "TLSv1.3");
    assert_eq!(info.alpn.as_deref(), Some("http/1.1"));

    // A wildcard name, then the default (first listed) for unknown or no SNI.
    let (_, info) = tls::get(
        gw.listen,
        &ClientTls::new(&ca_pem, Some("v2.api.example")),
        "/",
        &[],
    )
    .await
    .unwrap();
    assert!(info.server_names.contains(&"*.api.example".to_string()));
    let (_, info) = tls::get(gw.listen, &ClientTls::new(&ca_pem, None), "/", &[])
        .await
        .unwrap();
    assert_eq!(info.server_names, vec!["edge.example".to_string()]);
    // Unknown names get the default, which then fails the client's own name check.
    assert!(tls::get(
        gw.listen,
        &ClientTls::new(&ca_pem, Some("other.example")),
        "/",
        &[]
    )
    .await
    .is_err());

    // HTTP/2 over TLS when offered.
    let mut h2 = ClientTls::new(&ca_pem, Some("edge.example"));
    h2.h2 = true;
    let (r, info) = tls::get(gw.listen, &h2, "/", &[]).await.unwrap();
    assert_eq!(info.alpn.as_deref(), Some("h2"));
    assert_eq!(r.status, 200);

    // TLS 1.2 still works by default.
    let mut old = ClientTls::new(&ca_pem, Some("edge.example"));
    old.max_version = Some(SslVersion::TLS1_2);
    let (_, info) = tls::get(gw.listen, &old, "/", &[]).await.unwrap();
    assert_eq!(info.version, "TLSv1.2");

    // Certificates' expiry times are exported.
    let text = get(gw.admin, "/metrics", &[]).await.unwrap().text();
    let expiry = metric(
        &text,
        r#"meshgate_tls_cert_expiry_timestamp_seconds{cert="edge"}"#,
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (expiry - (now + 10.0 * 86_400.0)).abs() < 3_600.0,
        "expiry {expiry} vs now {now}"
    );
}

/// A GET of `/` over TLS with `x-request-id: id`, answered 200.
async fn named_get(addr: std::net::SocketAddr, opts: &ClientTls<'_>, id: &str) -> tls::TlsInfo {
    let (r, info) = tls::get(addr, opts, "/", &[("x-request-id", id)])
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    info
}

/// The access log says how each request's connection was secured: TLS
/// version, cipher and the server name asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_lines_carry_the_tls_version_cipher_and_sni() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let ca = Ca::new("test root");
    let telemetry = format!(
        "[telemetry]\naccess_log = \"json\"\naccess_log_file = \"{}\"\n",
        log.display()
    );
    let gw = Gateway::start(&tls_listener(
        "certs = [\"edge\", \"api\"]",
        &(telemetry + &edge_and_api(&ca, dir.path())),
        RESPOND,
    ))
    .await;
    let ca_pem = ca.pem();
    let info = named_get(
        gw.listen,
        &ClientTls::new(&ca_pem, Some("api.example")),
        "with-sni",
    )
    .await;
    let tls12 = ClientTls {
        max_version: Some(SslVersion::TLS1_2),
        ..ClientTls::new(&ca_pem, None)
    };
    named_get(gw.listen, &tls12, "tls12-no-sni").await;
    // A name that is not UTF-8 is logged as near as it can be.
    let raw = ClientTls {
        raw_sni: Some(b"odd\xffname"),
        ..ClientTls::new(&ca_pem, None)
    };
    named_get(gw.listen, &raw, "raw-sni").await;
    let text =
        crate::support::wait_for_log(&log, Duration::from_secs(5), |t| t.lines().count() >= 3)
            .await;
    let lines = crate::support::json_lines(&text);
    let line = |id: &str| lines.iter().find(|l| l["request_id"] == id).unwrap();
    let sni = line("with-sni");
    assert_eq!(sni["tls_version"], "TLSv1.3");
    assert_eq!(sni["tls_cipher"], info.cipher.as_str());
    assert_eq!(sni["sni"], "api.example");
    let old = line("tls12-no-sni");
    assert_eq!(old["tls_version"], "TLSv1.2");
    assert!(
        old["tls_cipher"].as_str().unwrap().contains("GCM")
            || old["tls_cipher"].as_str().unwrap().contains("CHACHA20"),
        "{old}"
    );
    assert_eq!(old["sni"], "");
    assert_eq!(line("raw-sni")["sni"], "odd\u{fffd}name");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_version_refuses_older_clients_and_counts_the_failure() {
    let (_dir, ca, gw) = edge_gateway("certs = [\"edge\"], min_version = \"1.3\"").await;
    let ca_pem = ca.pem();
    let mut old = ClientTls::new(&ca_pem, Some("edge.example"));
    old.max_version = Some(SslVersion::TLS1_2);
    assert!(tls::get(gw.listen, &old, "/", &[]).await.is_err());
    gw.wait_for_metric(
        r#"meshgate_tls_handshake_errors_total{listener="public",reason="protocol_version"}"#,
        1.0,
        Duration::from_secs(5),
    )
    .await;
    let (r, _) = tls::get(
        gw.listen,
        &ClientTls::new(&ca_pem, Some("edge.example")),
        "/",
        &[],
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    // Counted, and not logged as an error: the client's failure, not the
    // gateway's (`RUST_LOG=debug` shows it).
    let log = gw.log();
    assert!(!log.contains("Downstream handshake"), "{log}");
}

/// A TLS client has `handshake_timeout` to send its ClientHello, however it
/// sends it (or nothing); plain HTTP to the port is told so with a 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_client_hello_is_cut_and_plain_http_gets_400() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test root");
    let gw = Gateway::start(&tls_listener(
        "certs = [\"edge\"]",
        &edge_and_api(&ca, dir.path()),
        &format!("limits = {{ handshake_timeout = \"1s\" }}\n{RESPOND}"),
    ))
    .await;
    // Nothing at all; then a record header promising 512 bytes, and 10 of them.
    for sent in [
        &b""[..],
        &[0x16, 0x03, 0x01, 0x02, 0x00, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
    ] {
        let mut s = tokio::net::TcpStream::connect(gw.listen).await.unwrap();
        s.write_all(sent).await.unwrap();
        let start = Instant::now();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
            .await
            .expect("a stalled ClientHello must be cut");
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(5),
            "{took:?}"
        );
    }
    let (answer, _) = crate::support::read_to_close(
        gw.listen,
        b"GET / HTTP/1.1\r\nHost: edge.example\r\n\r\n",
        false,
        Duration::from_secs(5),
    )
    .await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(
        answer.contains("plain HTTP request sent to an HTTPS port"),
        "{answer}"
    );
    let text = get(gw.admin, "/metrics", &[]).await.unwrap().text();
    let reason = |r: &str| {
        metric(
            &text,
            &format!("meshgate_tls_handshake_errors_total{{listener=\"public\",reason=\"{r}\"}}"),
        )
    };
    assert_eq!(reason("timeout"), 2.0, "{text}");
    assert_eq!(reason("plain_http"), 1.0, "{text}");
    // A prompt client is served as ever.
    let (r, _) = tls::get(
        gw.listen,
        &ClientTls::new(&ca.pem(), Some("edge.example")),
        "/",
        &[],
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_refusing_the_certificate_is_counted_by_the_alert_it_sent() {
    let (_dir, _ca, gw) = edge_gateway("certs = [\"edge\"]").await;
    // The client trusts another root: it refuses the chain with `unknown_ca`.
    let other = Ca::new("another root").pem();
    assert!(tls::get(
        gw.listen,
        &ClientTls::new(&other, Some("edge.example")),
        "/",
        &[]
    )
    .await
    .is_err());
    let text = gw
        .wait_for_metric(
            r#"meshgate_tls_handshake_errors_total{listener="public",reason="peer_unknown_ca"}"#,
            1.0,
            Duration::from_secs(5),
        )
        .await;
    // Alerts the gateway did not send are not counted as sent.
    assert!(
        !text.contains(r#"listener="public",reason="unknown_ca""#),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_served_with_ecdsa_and_rsa_gets_the_one_the_client_can_verify() {
    use boring::ssl::SslSignatureAlgorithm as Alg;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test root");
    let (ec, ek) = ca
        .issue(Leaf {
            dns: &["edge.example", "ecdsa.marker"],
            ..Leaf::default()
        })
        .write(dir.path(), "edge");
    let (rc, rk) = ca
        .issue(Leaf {
            dns: &["edge.example", "rsa.marker"],
            rsa: true,
            ..Leaf::default()
        })
        .write(dir.path(), "edge-rsa");
    let certs = format!(
        "[certs.edge]\ncert = \"{}\"\nkey = \"{}\"\n[certs.edge_rsa]\ncert = \"{}\"\nkey = \"{}\"\n",
        ec.display(),
        ek.display(),
        rc.display(),
        rk.display()
    );
    let gw = Gateway::start(&tls_listener(
        "certs = [\"edge\", \"edge_rsa\"]",
        &certs,
        RESPOND,
    ))
    .await;
    let ca_pem = ca.pem();
    let served = |algorithms: Option<&'static [Alg]>, version: SslVersion| {
        let ca_pem = ca_pem.clone();
        let addr = gw.listen;
        async move {
            let o = ClientTls {
                verify_algorithms: algorithms,
                max_version: Some(version),
                ..ClientTls::new(&ca_pem, Some("edge.example"))
            };
            let (r, info) = tls::get(addr, &o, "/", &[]).await.unwrap();
            assert_eq!(r.status, 200);
            info.server_names
        }
    };
    const RSA_ONLY: &[Alg] = &[Alg::RSA_PSS_RSAE_SHA256, Alg::RSA_PKCS1_SHA256];
    const ECDSA_ONLY: &[Alg] = &[Alg::ECDSA_SECP256R1_SHA256];
    for version in [SslVersion::TLS1_3, SslVersion::TLS1_2] {
        // The first listed when the client can verify both.
        assert!(served(None, version).await.contains(&"ecdsa.marker".into()));
        assert!(served(Some(ECDSA_ONLY), version)
            .await
            .contains(&"ecdsa.marker".into()));
        assert!(
            served(Some(RSA_ONLY), version)
                .await
                .contains(&"rsa.marker".into()),
            "{version:?}"
        );
    }
}

const AES_128: u16 = 0x1301;
const AES_256: u16 = 0x1302;
const CHACHA20: u16 = 0x1303;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls13_prefers_aes128_unless_the_client_puts_chacha20_first() {
    let (_dir, ca, gw) = edge_gateway("certs = [\"edge\"]").await;
    let ca_pem = ca.pem();
    let cipher_for = |suites: &'static [u16]| {
        let ca_pem = ca_pem.clone();
        let addr = gw.listen;
        async move {
            let o = ClientTls {
                tls13_suites: Some(suites),
                ..ClientTls::new(&ca_pem, Some("edge.example"))
            };
            let (r, info) = tls::get(addr, &o, "/", &[]).await.unwrap();
            assert_eq!(r.status, 200);
            assert_eq!(info.version, "TLSv1.3");
            info.cipher
        }
    };
    // SAFETY: reads BoringSSL's CPU capability flags.
    let aes_hardware = unsafe { boring_sys::EVP_has_aes_hardware() } == 1;
    // OpenSSL's order (curl, Python, wrk): AES-256 first.
    let openssl_order = cipher_for(&[AES_256, CHACHA20, AES_128]).await;
    if aes_hardware {
        assert_eq!(openssl_order, "TLS_AES_128_GCM_SHA256");
    } else {
        // BoringSSL's own order without AES instructions: ChaCha20 first.
        assert_eq!(openssl_order, "TLS_CHACHA20_POLY1305_SHA256");
    }
    // A client without AES instructions lists ChaCha20 first and gets it.
    assert_eq!(
        cipher_for(&[CHACHA20, AES_128, AES_256]).await,
        "TLS_CHACHA20_POLY1305_SHA256"
    );
    // A client that offers only one suite gets that one.
    assert_eq!(cipher_for(&[AES_256]).await, "TLS_AES_256_GCM_SHA384");
}

/// One GET with `o`; the handshake's outcome and the tickets it brought.
async fn with_tickets(
    addr: std::net::SocketAddr,
    o: ClientTls<'_>,
) -> (tls::TlsInfo, Vec<boring::ssl::SslSession>) {
    let tickets = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let o = ClientTls {
        tickets: Some(tickets.clone()),
        ..o
    };
    let (r, info) = tls::get(addr, &o, "/", &[]).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let tickets = std::mem::take(&mut *tickets.lock().unwrap());
    (info, tickets)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_tickets_sets_how_many_tickets_a_handshake_gets() {
    for (setting, tls13, tls12) in [
        ("", 1, 1),
        (", session_tickets = 3", 3, 1),
        (", session_tickets = 0", 0, 0),
    ] {
        let (_dir, ca, gw) = edge_gateway(&format!("certs = [\"edge\"]{setting}")).await;
        let ca_pem = ca.pem();
        for (version, expected) in [(SslVersion::TLS1_3, tls13), (SslVersion::TLS1_2, tls12)] {
            let o = ClientTls {
                max_version: Some(version),
                ..ClientTls::new(&ca_pem, Some("edge.example"))
            };
            let (info, sessions) = with_tickets(gw.listen, o).await;
            assert!(!info.resumed);
            // A TLS 1.2 session without a ticket can still resume by its id.
            let tickets = sessions
                .iter()
                // SAFETY: reads a live session the client was handed.
                .filter(|s| unsafe { boring_sys::SSL_SESSION_has_ticket(s.as_ptr()) } == 1)
                .count();
            assert_eq!(tickets, expected, "`{setting}` over {version:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_tickets_change_starts_the_listener_again() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test root");
    let certs = edge_and_api(&ca, dir.path());
    let config = |tls: &str| tls_listener(tls, &certs, RESPOND);
    let gw = Gateway::start(&config("certs = [\"edge\"]")).await;
    let ca_pem = ca.pem();
    let o = || ClientTls {
        max_version: Some(SslVersion::TLS1_3),
        ..ClientTls::new(&ca_pem, Some("edge.example"))
    };
    let (_, sessions) = with_tickets(gw.listen, o()).await;
    assert_eq!(sessions.len(), 1, "the default");
    // The TLS context is built when a listener starts: the reload starts
    // it again, on the same socket.
    let reloaded = gw
        .reload_now(&config("certs = [\"edge\"], session_tickets = 3"))
        .await;
    assert_eq!(reloaded.status, 200, "{}", reloaded.text());
    let (_, sessions) = with_tickets(gw.listen, o()).await;
    assert_eq!(sessions.len(), 3, "{}", gw.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_resume_from_tickets_except_with_client_certificates() {
    let (dir, ca, gw) = edge_gateway("certs = [\"edge\"]").await;
    let ca_pem = ca.pem();
    for version in [SslVersion::TLS1_3, SslVersion::TLS1_2] {
        let fresh = ClientTls {
            max_version: Some(version),
            ..ClientTls::new(&ca_pem, Some("edge.example"))
        };
        let (info, tickets) = with_tickets(gw.listen, fresh).await;
        assert!(!info.resumed);
        let ticket = tickets
            .last()
            .unwrap_or_else(|| panic!("no ticket ({version:?})"));
        let again = ClientTls {
            max_version: Some(version),
            resume: Some(ticket),
            ..ClientTls::new(&ca_pem, Some("edge.example"))
        };
        let (info, _) = with_tickets(gw.listen, again).await;
        assert!(info.resumed, "{version:?} did not resume");
    }

    // With client certificates every connection is checked in full: no
    // tickets, so an expired or revoked certificate cannot live on in one.
    let clients = Ca::new("client root");
    let (gw, _app) = mtls_gateway(dir.path(), &ca, &clients, "require").await;
    let web = clients.issue(Leaf {
        uris: &[WEB],
        ..Leaf::default()
    });
    for version in [SslVersion::TLS1_3, SslVersion::TLS1_2] {
        let o = ClientTls {
            max_version: Some(version),
            client: Some(&web),
            ..ClientTls::new(&ca_pem, Some("edge.example"))
        };
        let (info, tickets) = with_tickets(gw.listen, o).await;
        assert!(!info.resumed);
        assert!(tickets.is_empty(), "{version:?}: {} tickets", tickets.len());
    }
}

/// A listener requiring client certificates from `clients`, forwarding the
/// identity to an echo upstream, with a rate limit per identity.
async fn mtls_gateway(
    dir: &Path,
    server_ca: &Ca,
    clients: &Ca,
    auth: &str,
) -> (Gateway, crate::support::upstream::Upstream) {
    let app = echo("app").await;
    let client_ca = clients.write(dir, "clients-ca");
    let config = tls_listener(
        &format!(
            "certs = [\"edge\"], client_ca = \"{}\", client_auth = \"{auth}\", forward_identity = true",
            client_ca.display()
        ),
        &edge_and_api(server_ca, dir),
        &format!(
            "[rate_limits.per_identity]\nkey = \"identity\"\nrate = 2\nper = \"1h\"\n[routes.r]\npath_prefix = \"/\"\nupstream = \"app\"\nrate_limits = [\"per_identity\"]\n[upstreams.app]\nendpoints = [\"{}\"]\n",
            app.addr
        ),
    );
    (Gateway::start(&config).await, app)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_client_certificates_give_identities() {
    let dir = tempfile::tempdir().unwrap();
    let server_ca = Ca::new("server root");
    let clients = Ca::new("client root");
    let (gw, _app) = mtls_gateway(dir.path(), &server_ca, &clients, "require").await;
    let ca_pem = server_ca.pem();
    let web = clients.issue(Leaf {
        uris: &[WEB],
        dns: &["frontend.web"],
        ..Leaf::default()
    });

    // No certificate, a certificate from another CA, an expired one: refused.
    assert!(tls::get(
        gw.listen,
        &ClientTls::new(&ca_pem, Some("edge.example")),
        "/",
        &[]
    )
    .await
    .is_err());
    let stranger = Ca::new("other root").issue(Leaf {
        uris: &[WEB],
        ..Leaf::default()
    });
    let mut o = ClientTls::new(&ca_pem, Some("edge.example"));
    o.client = Some(&stranger);
    assert!(tls::get(gw.listen, &o, "/", &[]).await.is_err());
    let expired = clients.issue(Leaf {
        uris: &[WEB],
        expired: true,
        ..Leaf::default()
    });
    o.client = Some(&expired);
    assert!(tls::get(gw.listen, &o, "/", &[]).await.is_err());

    // A good one: the upstream sees the SPIFFE ID (the URI SAN wins over the
    // DNS SAN), never the client's own claim.
    o.client = Some(&web);
    let (r, _) = tls::get(
        gw.listen,
        &o,
        "/who",
        &[(
            "x-meshgate-peer-identity",
            "spiffe://prod.example/ns/admin/sa/root",
        )],
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    assert_eq!(j["headers"]["x-meshgate-peer-identity"], WEB);
    assert_eq!(j["headers"]["x-forwarded-proto"], "https");

    // Rate limited per identity: 2 per hour each.
    let api = clients.issue(Leaf {
        uris: &[API],
        ..Leaf::default()
    });
    let mut statuses = Vec::new();
    for cert in [&web, &web, &api, &api, &api] {
        let mut o = ClientTls::new(&ca_pem, Some("edge.example"));
        o.client = Some(cert);
        statuses.push(tls::get(gw.listen, &o, "/", &[]).await.unwrap().0.status);
    }
    assert_eq!(statuses, vec![200, 429, 200, 200, 429]);

    let start = Instant::now();
    loop {
        let text = get(gw.admin, "/metrics", &[]).await.unwrap().text();
        let refused: f64 = [
            "certificate_required",
            "unknown_ca",
            "certificate_expired",
            "bad_certificate",
        ]
        .iter()
        .map(|r| {
            metric(
                &text,
                &format!(
                    "meshgate_tls_handshake_errors_total{{listener=\"public\",reason=\"{r}\"}}"
                ),
            )
        })
        .sum();
        if refused >= 3.0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "handshake failures not counted: {text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn optional_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let server_ca = Ca::new("server root");
    let clients = Ca::new("client root");
    let (gw, _app) = mtls_gateway(dir.path(), &server_ca, &clients, "optional").await;
    let ca_pem = server_ca.pem();
    let (r, _) = tls::get(
        gw.listen,
        &ClientTls::new(&ca_pem, Some("edge.example")),
        "/",
        &[("x-meshgate-peer-identity", WEB)],
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    assert!(
        r.json()["headers"]
            .get("x-meshgate-peer-identity")
            .is_none(),
        "a claimed identity is stripped: {}",
        r.text()
    );
    let dns_only = clients.issue(Leaf {
        dns: &["batch.jobs.internal"],
        ..Leaf::default()
    });
    let mut o = ClientTls::new(&ca_pem, Some("edge.example"));
    o.client = Some(&dns_only);
    let (r, _) = tls::get(gw.listen, &o, "/", &[]).await.unwrap();
    assert_eq!(
        r.json()["headers"]["x-meshgate-peer-identity"],
        "batch.jobs.internal"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_files_are_reloaded_when_they_change() {
    let (dir, ca, gw) = edge_gateway("certs = [\"edge\"]").await;
    let ca_pem = ca.pem();
    let names = |info: tls::TlsInfo| info.server_names;

    // A broken file: reported, the old certificate keeps serving.
    std::fs::write(dir.path().join("edge.pem"), "not a certificate").unwrap();
    gw.wait_for_metric(
        r#"meshgate_tls_cert_reloads_total{cert="edge",result="failure"}"#,
        1.0,
        Duration::from_secs(10),
    )
    .await;
    let (_, info) = tls::get(gw.listen, &ClientTls::new(&ca_pem, None), "/", &[])
        .await
        .unwrap();
    assert_eq!(names(info), vec!["edge.example".to_string()]);
    assert!(gw.log().contains("certificate `edge` not reloaded"));

    // A new pair: served from the next handshakes on, without a restart.
    let renewed: Pem = ca.issue(Leaf {
        dns: &["edge.example", "renewed.example"],
        ..Leaf::default()
    });
    renewed.write(dir.path(), "edge");
    let start = Instant::now();
    loop {
        let (_, info) = tls::get(gw.listen, &ClientTls::new(&ca_pem, None), "/", &[])
            .await
            .unwrap();
        if names(info).contains(&"renewed.example".to_string()) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "not reloaded: {}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Gateway B: a mesh listener requiring client certificates from the mesh
/// CA, forwarding to an echo app. Gateway A: a plain listener whose upstream
/// is B over mTLS, checking B's identity against `verify`, trusting the mesh
/// CA or (`trust_mesh = false`) an unrelated one.
async fn mesh_pair(
    verify: &str,
    trust_mesh: bool,
) -> (
    Gateway,
    Gateway,
    crate::support::upstream::Upstream,
    tempfile::TempDir,
    Ca,
) {
    let dir = tempfile::tempdir().unwrap();
    let mesh = Ca::new("mesh root");
    let app = echo("orders-app").await;
    let (bc, bk) = mesh
        .issue(Leaf {
            uris: &["spiffe://prod.example/ns/orders/sa/api"],
            dns: &["orders.mesh"],
            ..Leaf::default()
        })
        .write(dir.path(), "b");
    let mesh_ca = mesh.write(dir.path(), "mesh-ca");
    let b = Gateway::start(&format!(
        "[certs.b]\ncert = \"{}\"\nkey = \"{}\"\n{}\ndirection = \"mesh\"\ntls = {{ certs = [\"b\"], client_ca = \"{}\", forward_identity = true }}\n[routes.r]\npath_prefix = \"/\"\nupstream = \"app\"\n[upstreams.app]\nendpoints = [\"{}\"]\n",
        bc.display(),
        bk.display(),
        HEAD.trim_end(),
        mesh_ca.display(),
        app.addr
    ))
    .await;
    let (ac, ak) = mesh
        .issue(Leaf {
            uris: &[WEB],
            ..Leaf::default()
        })
        .write(dir.path(), "a");
    let trusted = if trust_mesh {
        mesh_ca
    } else {
        Ca::new("unrelated root").write(dir.path(), "unrelated-ca")
    };
    let a = Gateway::start(&format!(
        "{}\n[routes.r]\npath_prefix = \"/\"\nupstream = \"orders\"\n[upstreams.orders]\nendpoints = [\"{}\"]\ntls = {{ ca = \"{}\", cert = \"{}\", key = \"{}\", sni = \"orders.mesh\", verify = \"{verify}\" }}\n",
        HEAD.trim_end(),
        b.listen,
        trusted.display(),
        ac.display(),
        ak.display()
    ))
    .await;
    (a, b, app, dir, mesh)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_pair_over_mtls_with_spiffe_verification() {
    let (a, b, _app, _dir, _) = mesh_pair("spiffe://prod.example/ns/orders/*", true).await;
    for _ in 0..3 {
        let r = get(a.listen, "/orders/1", &[]).await.unwrap();
        assert_eq!(
            r.status,
            200,
            "{}\nA: {}\nB: {}",
            r.text(),
            a.log(),
            b.log()
        );
        let j = r.json();
        assert_eq!(j["name"], "orders-app");
        // B saw A's certificate and says so; A's own client could not.
        assert_eq!(j["headers"]["x-meshgate-peer-identity"], WEB);
    }
    // The TLS connection from A to B is pooled, not made per request.
    let text = get(a.admin, "/metrics", &[]).await.unwrap().text();
    assert!(
        metric(
            &text,
            r#"meshgate_upstream_connections_total{reused="true",upstream="orders"}"#
        ) >= 1.0,
        "{text}"
    );

    // A DNS SAN as the expected identity works too.
    let (a, _b, _app, _dir, _) = mesh_pair("orders.mesh", true).await;
    assert_eq!(get(a.listen, "/", &[]).await.unwrap().status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_identity_or_ca_mismatch_is_refused() {
    let (a, _b, _app, _dir, _) = mesh_pair("spiffe://prod.example/ns/payments/*", true).await;
    let r = get(a.listen, "/", &[]).await.unwrap();
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(a.log().contains("does not match verify"), "{}", a.log());

    let (a, _b, _app, _dir, _) = mesh_pair("spiffe://prod.example/ns/orders/*", false).await;
    let r = get(a.listen, "/", &[]).await.unwrap();
    assert_eq!(r.status, 502, "{}", r.text());
    // With the fast lane on, it is the lane that connects over TLS and
    // refuses the identity (not a hand-over to Pingora's driver).
    if crate::support::http1_engine().as_deref() != Some("pingora") {
        let metrics = get(a.admin, "/metrics", &[]).await.unwrap().text();
        let served = r#"meshgate_http1_lane_requests_total{driver="fast",reason=""}"#;
        assert!(crate::support::metric(&metrics, served) >= 1.0, "{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_listener_names_and_client_auth_start() {
    // The session id context is limited to 32 bytes; names are not.
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test root");
    let clients = Ca::new("client root");
    let client_ca = clients.write(dir.path(), "clients");
    let config = tls_listener(
        &format!(
            "certs = [\"edge\"], client_ca = \"{}\"",
            client_ca.display()
        ),
        &edge_and_api(&ca, dir.path()),
        RESPOND,
    )
    .replace(
        "[listeners.public]",
        "[listeners.a-listener-name-well-over-thirty-two-bytes]",
    );
    let gw = Gateway::start(&config).await;
    let ca_pem = ca.pem();
    let me = clients.issue(Leaf {
        uris: &[WEB],
        ..Leaf::default()
    });
    let mut o = ClientTls::new(&ca_pem, Some("edge.example"));
    o.client = Some(&me);
    let (r, _) = tls::get(gw.listen, &o, "/", &[]).await.unwrap();
    assert_eq!(r.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_upstream_client_certificate_is_used_without_restart() {
    let (a, _b, _app, dir, mesh) = mesh_pair("spiffe://prod.example/ns/orders/*", true).await;
    let r = get(a.listen, "/", &[]).await.unwrap();
    assert_eq!(r.json()["headers"]["x-meshgate-peer-identity"], WEB);
    let rotated = "spiffe://prod.example/ns/web/sa/frontend-v2";
    mesh.issue(Leaf {
        uris: &[rotated],
        ..Leaf::default()
    })
    .write(dir.path(), "a");
    let start = Instant::now();
    loop {
        let r = get(a.listen, "/", &[]).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        if r.json()["headers"]["x-meshgate-peer-identity"] == rotated {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "still the old certificate: {}",
            a.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let text = get(a.admin, "/metrics", &[]).await.unwrap().text();
    assert!(
        metric(
            &text,
            r#"meshgate_tls_cert_reloads_total{cert="upstream/orders",result="success"}"#
        ) >= 1.0,
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_client_ca_and_client_auth_apply_on_reload() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test root");
    let (old_clients, new_clients) = (Ca::new("old client root"), Ca::new("new client root"));
    let client_ca = old_clients.write(dir.path(), "clients");
    let config = |auth: &str| {
        tls_listener(
            &format!(
                "certs = [\"edge\"], client_ca = \"{}\", client_auth = \"{auth}\"",
                client_ca.display()
            ),
            &edge_and_api(&ca, dir.path()),
            RESPOND,
        )
    };
    let gw = Gateway::start(&config("require")).await;
    let ca_pem = ca.pem();
    let old = old_clients.issue(Leaf {
        uris: &[WEB],
        ..Leaf::default()
    });
    let new = new_clients.issue(Leaf {
        uris: &[API],
        ..Leaf::default()
    });
    assert_eq!(
        client_status(gw.listen, &ca_pem, Some(&old)).await,
        Some(200)
    );
    assert_eq!(client_status(gw.listen, &ca_pem, Some(&new)).await, None);
    // A connection that outlives the reloads below.
    let mut o = ClientTls::new(&ca_pem, Some("edge.example"));
    o.client = Some(&old);
    let (mut kept, _) = tls::connect(gw.listen, &o).await.unwrap();
    assert!(kept_get(&mut kept).await.starts_with("HTTP/1.1 200"));

    // Rotation, first step: both CAs. The kept connection's certificate is
    // checked again, and still trusted.
    std::fs::write(
        &client_ca,
        format!("{}{}", old_clients.pem(), new_clients.pem()),
    )
    .unwrap();
    gw.reload(&config("require"));
    gw.wait_for_generation(2).await;
    assert_eq!(
        client_status(gw.listen, &ca_pem, Some(&new)).await,
        Some(200),
        "{}",
        gw.log()
    );
    assert!(kept_get(&mut kept).await.starts_with("HTTP/1.1 200"));

    // Then the new CA only: the old one's clients are refused, on new
    // connections and on the kept one, which is closed.
    new_clients.write(dir.path(), "clients");
    gw.reload(&config("require"));
    gw.wait_for_generation(3).await;
    assert_eq!(
        client_status(gw.listen, &ca_pem, Some(&new)).await,
        Some(200),
        "{}",
        gw.log()
    );
    assert_eq!(client_status(gw.listen, &ca_pem, Some(&old)).await, None);
    assert_eq!(client_status(gw.listen, &ca_pem, None).await, None);
    let refused = kept_get(&mut kept).await;
    assert!(refused.starts_with("HTTP/1.1 403"), "{refused}");
    assert!(refused.contains("not accepted since a reload"), "{refused}");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), kept.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the connection stays open");

    // client_auth reloads too.
    gw.reload(&config("optional"));
    gw.wait_for_generation(4).await;
    assert_eq!(
        client_status(gw.listen, &ca_pem, None).await,
        Some(200),
        "{}",
        gw.log()
    );
    assert_eq!(
        client_status(gw.listen, &ca_pem, Some(&new)).await,
        Some(200)
    );
    assert_eq!(client_status(gw.listen, &ca_pem, Some(&old)).await, None);

    // Back to `require`: a connection opened without a certificate under
    // `optional` is refused at its next request, and closed.
    let (mut anonymous, _) =
        tls::connect(gw.listen, &ClientTls::new(&ca_pem, Some("edge.example")))
            .await
            .unwrap();
    assert!(kept_get(&mut anonymous).await.starts_with("HTTP/1.1 200"));
    gw.reload(&config("require"));
    gw.wait_for_generation(5).await;
    let refused = kept_get(&mut anonymous).await;
    assert!(refused.starts_with("HTTP/1.1 403"), "{refused}");
    let mut rest = Vec::new();
    let closed =
        tokio::time::timeout(Duration::from_secs(5), anonymous.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the connection stays open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_ca_may_name_the_issuing_intermediate_alone() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test root");
    let root = Ca::new("client root");
    let (team, other) = (
        root.intermediate("team issuer"),
        root.intermediate("other issuer"),
    );
    // Trust only what `team` issues, not everything under the root.
    let client_ca = team.write(dir.path(), "clients");
    let gw = Gateway::start(&tls_listener(
        &format!(
            "certs = [\"edge\"], client_ca = \"{}\"",
            client_ca.display()
        ),
        &edge_and_api(&ca, dir.path()),
        RESPOND,
    ))
    .await;
    let ca_pem = ca.pem();
    let mine = team.issue(Leaf {
        uris: &[WEB],
        ..Leaf::default()
    });
    let theirs = other.issue(Leaf {
        uris: &[API],
        ..Leaf::default()
    });
    assert_eq!(
        client_status(gw.listen, &ca_pem, Some(&mine)).await,
        Some(200),
        "{}",
        gw.log()
    );
    assert_eq!(client_status(gw.listen, &ca_pem, Some(&theirs)).await, None);
}

/// One `GET /` on a kept-alive TLS connection: the response up to its
/// body's end (`RESPOND`'s or an error's, both with a length).
async fn kept_get(s: &mut pingora::tls::tokio_ssl::SslStream<tokio::net::TcpStream>) -> String {
    s.write_all(b"GET / HTTP/1.1\r\nHost: edge.example\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            if body.len() >= len {
                return text;
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("an answer")
            .unwrap();
        if n == 0 {
            return text;
        }
        got.extend_from_slice(&buf[..n]);
    }
}

/// The status of `GET /` on edge.example with `client`'s certificate; `None`
/// when the handshake fails.
async fn client_status(
    listen: std::net::SocketAddr,
    ca_pem: &str,
    client: Option<&Pem>,
) -> Option<u16> {
    let mut o = ClientTls::new(ca_pem, Some("edge.example"));
    o.client = client;
    tls::get(listen, &o, "/", &[])
        .await
        .map(|(r, _)| r.status)
        .ok()
}

/// A reload adds a TLS listener (its context built from the new config's
/// certificates), makes it plain again (the listener starts again on its
/// socket), and renames a listener on the same address (the new name's
/// service takes the socket over): no restart, no refused connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_add_tls_listeners_and_rename_on_the_same_socket() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test root");
    let certs = edge_and_api(&ca, dir.path());
    let secure = format!("127.0.0.1:{}", crate::support::free_port());
    let config = |public: &str, extra: &str| {
        format!(
            "{certs}[admin]\nlisten = \"@ADMIN@\"\n[listeners.{public}]\nbind = \"@LISTEN@\"\n{extra}{RESPOND}"
        )
    };
    let gw = Gateway::start(&config("public", "")).await;
    assert_eq!(get(gw.listen, "/", &[]).await.unwrap().text(), "secure");

    let with_tls =
        format!("[listeners.tls]\nbind = \"{secure}\"\ntls = {{ certs = [\"edge\"] }}\n");
    let r = gw.reload_now(&config("public", &with_tls)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let ca_pem = ca.pem();
    let (resp, info) = tls::get(
        secure.parse().unwrap(),
        &ClientTls::new(&ca_pem, Some("edge.example")),
        "/",
        &[],
    )
    .await
    .unwrap();
    assert_eq!(resp.text(), "secure");
    assert_eq!(info.server_names, ["edge.example"]);

    // A connection whose handshake is done but whose request has not come
    // when the listener starts again (a new TLS context) is served its
    // request by the old one, then closed.
    let opts = ClientTls::new(&ca_pem, Some("edge.example"));
    let (mut waiting, _) = tls::connect(secure.parse().unwrap(), &opts).await.unwrap();
    gw.wait_for_metric(
        r#"meshgate_downstream_connections_active{direction="ingress",listener="tls"}"#,
        1.0,
        Duration::from_secs(5),
    )
    .await;
    let tickets = format!("[listeners.tls]\nbind = \"{secure}\"\ntls = {{ certs = [\"edge\"], session_tickets = 2 }}\n");
    let r = gw.reload_now(&config("public", &tickets)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json()["listeners"],
        serde_json::json!([format!(
            "listener `tls` restarted on {secure} (a new TLS context)"
        )])
    );
    let answer = last_request(&mut waiting).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}\n{}", gw.log());
    assert!(answer.ends_with("secure"), "{answer}");

    // TLS off: the same address now speaks plain HTTP.
    let plain = format!("[listeners.tls]\nbind = \"{secure}\"\n");
    let r = gw.reload_now(&config("public", &plain)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let resp = get(secure.parse().unwrap(), "/", &[]).await.unwrap();
    assert_eq!(resp.text(), "secure");

    // Renamed on the same address: served, counted under the new name.
    let r = gw.reload_now(&config("front", &plain)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let mut kept = tokio::net::TcpStream::connect(gw.listen).await.unwrap();
    kept.write_all(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .unwrap();
    let mut answer = [0u8; 12];
    kept.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"HTTP/1.1 200");
    // Counted under the new name (a connection answered before may still
    // be closing: wait for the count to settle on this one).
    gw.wait_for_metric_line(
        r#"meshgate_downstream_connections_active{direction="ingress",listener="front"} 1"#,
        Duration::from_secs(5),
    )
    .await;
}

/// A binary upgrade: a TLS connection the old process accepted, whose
/// request has not come when the old process stops accepting, is served
/// that request by the old process, then closed (the client goes on with
/// the new one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binary_upgrade_serves_a_tls_connection_its_first_request() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test root");
    let certs = edge_and_api(&ca, dir.path());
    let sock = dir.path().join("upgrade.sock");
    let config = format!(
        "[gateway]\nupgrade_socket = \"{}\"\nshutdown_grace_period = \"5s\"\n{}",
        sock.display(),
        tls_listener("certs = [\"edge\"]", &certs, RESPOND)
    );
    let mut old = Gateway::start(&config).await;
    let ca_pem = ca.pem();
    let opts = ClientTls::new(&ca_pem, Some("edge.example"));
    let (mut waiting, _) = tls::connect(old.listen, &opts).await.unwrap();
    let new =
        crate::support::Upgrading::start(&old.config_path, &sock, dir.path().join("new.log")).await;
    crate::support::signal(old.pid(), "QUIT");
    // The old process stops accepting 5 s after SIGQUIT.
    let start = Instant::now();
    while !old.log().contains("Broadcasting graceful shutdown") {
        assert!(start.elapsed() < Duration::from_secs(15), "{}", old.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let answer = last_request(&mut waiting).await;
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "{answer}\nold: {}\nnew: {}",
        old.log(),
        new.log()
    );
    // The new process serves the same address.
    let (resp, _) = tls::get(old.listen, &opts, "/", &[]).await.unwrap();
    assert_eq!(resp.text(), "secure");
    assert!(old.wait_exit(Duration::from_secs(20)).await.is_some());
}

/// `GET /` on an open TLS connection the gateway then closes: all it sent.
async fn last_request<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    stream: &mut S,
) -> String {
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: edge.example\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
    assert!(matches!(read, Ok(Ok(_))), "{read:?}");
    String::from_utf8_lossy(&answer).into_owned()
}
