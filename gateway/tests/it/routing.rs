//! Matchers, splits, rewrites, redirects and direct responses through the real
//! gateway binary, against real upstreams.

use crate::support::client::{get, send};
use crate::support::upstream::echo;
use crate::support::{Gateway, HEAD};
use bytes::Bytes;
use http::Method;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_matcher_picks_its_route() {
    let ups: Vec<_> = futures_util::future::join_all(
        [
            "exact", "prefix", "regex", "host", "wild", "methods", "headers", "any",
        ]
        .map(echo),
    )
    .await;
    let addr = |i: usize| ups[i].addr;
    let config = format!(
        r#"{HEAD}
[routes.exact]
path = "/exact"
upstream = "exact"
[routes.prefix]
path_prefix = "/p/"
upstream = "prefix"
[routes.regex]
path_regex = "^/v[0-9]+/items$"
upstream = "regex"
[routes.host]
host = "api.example.com"
upstream = "host"
[routes.wild]
host = "*.example.com"
upstream = "wild"
[routes.methods]
path_prefix = "/m/"
methods = ["POST", "DELETE"]
upstream = "methods"
[routes.headers]
path_prefix = "/m/"
headers = {{ "x-canary" = "true" }}
upstream = "headers"
# No path condition: ranks below every path matcher, regex included.
[routes.any]
upstream = "any"
[upstreams.exact]
endpoints = ["{}"]
[upstreams.prefix]
endpoints = ["{}"]
[upstreams.regex]
endpoints = ["{}"]
[upstreams.host]
endpoints = ["{}"]
[upstreams.wild]
endpoints = ["{}"]
[upstreams.methods]
endpoints = ["{}"]
[upstreams.headers]
endpoints = ["{}"]
[upstreams.any]
endpoints = ["{}"]
"#,
        addr(0),
        addr(1),
        addr(2),
        addr(3),
        addr(4),
        addr(5),
        addr(6),
        addr(7)
    );
    let gw = Gateway::start(&config).await;
    let l = gw.listen;
    let name = |r: crate::support::client::Resp| {
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["name"].as_str().unwrap().to_string()
    };
    assert_eq!(name(get(l, "/exact", &[]).await.unwrap()), "exact");
    assert_eq!(name(get(l, "/exact/more", &[]).await.unwrap()), "any");
    assert_eq!(name(get(l, "/p/x?q=1", &[]).await.unwrap()), "prefix");
    assert_eq!(name(get(l, "/v2/items", &[]).await.unwrap()), "regex");
    assert_eq!(name(get(l, "/v2/items/1", &[]).await.unwrap()), "any");
    assert_eq!(
        name(
            get(l, "/", &[("host", "API.example.com:8080")])
                .await
                .unwrap()
        ),
        "host"
    );
    assert_eq!(
        name(get(l, "/", &[("host", "www.example.com")]).await.unwrap()),
        "wild"
    );
    assert_eq!(
        name(get(l, "/", &[("host", "example.com")]).await.unwrap()),
        "any"
    );
    let post = send(
        l,
        Method::POST,
        "/m/1",
        &[],
        Bytes::from_static(b"x"),
        false,
    )
    .await
    .unwrap();
    assert_eq!(name(post), "methods");
    assert_eq!(
        name(get(l, "/m/1", &[("x-canary", "true")]).await.unwrap()),
        "headers"
    );
    assert_eq!(
        name(get(l, "/m/1", &[("x-canary", "false")]).await.unwrap()),
        "any"
    );
    // Over h2c the :authority is the host.
    let h2 = send(l, Method::GET, "/exact", &[], Bytes::new(), true)
        .await
        .unwrap();
    assert_eq!(name(h2), "exact");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_and_endpoint_weights_hold_within_tolerance() {
    let (a, b, c, d) = (
        echo("a").await,
        echo("b").await,
        echo("c").await,
        echo("d").await,
    );
    let config = format!(
        r#"{HEAD}
[routes.split]
path_prefix = "/split"
split = {{ a = 90, b = 10 }}
[routes.weighted]
path_prefix = "/weighted"
upstream = "cd"
[upstreams.a]
endpoints = ["{}"]
[upstreams.b]
endpoints = ["{}"]
[upstreams.cd]
endpoints = [{{ addr = "{}", weight = 3 }}, "{}"]
"#,
        a.addr, b.addr, c.addr, d.addr
    );
    let gw = Gateway::start(&config).await;
    const N: usize = 1000;
    let mut to_b = 0;
    for _ in 0..N {
        let r = get(gw.listen, "/split", &[]).await.unwrap();
        if r.header("x-upstream") == Some("b") {
            to_b += 1;
        }
    }
    // Binomial(1000, 0.1): sd ~9.5; +-50 is more than 5 sd.
    assert!(
        (50..=150).contains(&to_b),
        "b got {to_b} of {N}, expected ~100"
    );
    let mut to_c = 0;
    for _ in 0..400 {
        if get(gw.listen, "/weighted", &[])
            .await
            .unwrap()
            .header("x-upstream")
            == Some("c")
        {
            to_c += 1;
        }
    }
    // Weighted round robin is deterministic: exactly 3 of 4.
    assert!(
        (280..=320).contains(&to_c),
        "c got {to_c} of 400, expected 300"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrites_and_forwarding_headers() {
    let up = echo("api").await;
    let config = format!(
        r#"{HEAD}
[gateway]
name = "edge-test"
[routes.api]
path_prefix = "/v1/"
strip_prefix = "/v1"
upstream = "api"
request_headers = {{ set = {{ "x-via" = "meshgate" }}, add = {{ "x-tag" = "two" }}, remove = ["x-debug"] }}
response_headers = {{ set = {{ "x-served-by" = "edge-1" }}, remove = ["x-upstream"] }}
[upstreams.api]
endpoints = ["{}"]
"#,
        up.addr
    );
    let gw = Gateway::start(&config).await;
    let r = get(
        gw.listen,
        "/v1/items/7?full=1",
        &[
            ("x-debug", "secret"),
            ("x-tag", "one"),
            ("x-forwarded-for", "203.0.113.9"),
            ("x-request-id", "req-abc-1"),
            ("connection", "keep-alive, x-private"),
            ("x-private", "hop"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    let h = &j["headers"];
    assert_eq!(j["path"], "/items/7?full=1");
    assert_eq!(h["x-via"], "meshgate");
    assert_eq!(h["x-tag"], "one, two");
    assert!(h.get("x-debug").is_none(), "{h}");
    assert!(
        h.get("x-private").is_none(),
        "connection-nominated header must not pass: {h}"
    );
    assert_eq!(h["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-request-id"], "req-abc-1");
    assert!(
        h["forwarded"]
            .as_str()
            .unwrap()
            .starts_with("for=127.0.0.1;host="),
        "{h}"
    );
    // Response side: rewrite applied, request id echoed, hop-by-hop dropped.
    assert_eq!(r.header("x-served-by"), Some("edge-1"));
    assert_eq!(r.header("x-upstream"), None);
    assert_eq!(r.header("x-request-id"), Some("req-abc-1"));
    assert_eq!(
        r.header("x-hop"),
        None,
        "connection-nominated response header must not pass"
    );
    assert_eq!(r.header("keep-alive"), None);

    // Without an incoming id one is generated and sent both ways.
    let r = get(gw.listen, "/v1/x", &[]).await.unwrap();
    let id = r.header("x-request-id").unwrap().to_string();
    assert_eq!(id.len(), 36);
    assert_eq!(r.json()["headers"]["x-request-id"], id.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_responses_and_redirects() {
    let config = format!(
        r#"{HEAD}
[routes.ping]
path = "/ping"
respond = {{ status = 200, body = "pong" }}
response_headers = {{ set = {{ "x-served-by" = "edge-1" }} }}
[routes.teapot]
path = "/teapot"
respond = {{ status = 418, body = '{{"short":"stout"}}', content_type = "application/json" }}
[routes.old_docs]
path_prefix = "/docs/"
redirect = {{ location = "https://docs.example.com/", status = 301 }}
[routes.temp]
path = "/temp"
redirect = {{ location = "/elsewhere" }}
"#
    );
    let gw = Gateway::start(&config).await;
    let r = get(gw.listen, "/ping", &[]).await.unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "pong"));
    assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));
    assert_eq!(r.header("x-served-by"), Some("edge-1"));
    let head = send(gw.listen, Method::HEAD, "/ping", &[], Bytes::new(), false)
        .await
        .unwrap();
    assert_eq!((head.status, head.body.len()), (200, 0));
    let r = get(gw.listen, "/teapot", &[]).await.unwrap();
    assert_eq!(r.status, 418);
    assert_eq!(r.json()["short"], "stout");
    assert_eq!(r.header("content-type"), Some("application/json"));
    let r = get(gw.listen, "/docs/intro", &[]).await.unwrap();
    assert_eq!(r.status, 301);
    assert_eq!(r.header("location"), Some("https://docs.example.com/"));
    let r = get(gw.listen, "/temp", &[]).await.unwrap();
    assert_eq!((r.status, r.header("location")), (302, Some("/elsewhere")));
    // On the wire, spelled like the other fields meshgate writes.
    let wire = {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(gw.listen).await.unwrap();
        s.write_all(b"GET /temp HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut out))
            .await
            .unwrap()
            .unwrap();
        String::from_utf8_lossy(&out).into_owned()
    };
    assert!(wire.contains("\r\nLocation: /elsewhere\r\n"), "{wire}");
    assert!(wire.contains("\r\nContent-Length: "), "{wire}");
    // Direct responses work over h2c too.
    let r = send(gw.listen, Method::GET, "/ping", &[], Bytes::new(), true)
        .await
        .unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "pong"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_only_serve_their_listeners() {
    let up = echo("u").await;
    let other = crate::support::free_port();
    let config = format!(
        r#"{HEAD}
[listeners.internal]
bind = "127.0.0.1:{other}"
direction = "mesh"
[routes.public_only]
listeners = ["public"]
path = "/p"
respond = {{ body = "public" }}
[routes.mesh_only]
listeners = ["internal"]
path = "/p"
upstream = "u"
[upstreams.u]
endpoints = ["{}"]
"#,
        up.addr
    );
    let gw = Gateway::start(&config).await;
    assert_eq!(get(gw.listen, "/p", &[]).await.unwrap().text(), "public");
    let internal = format!("127.0.0.1:{other}").parse().unwrap();
    let r = get(internal, "/p", &[]).await.unwrap();
    assert_eq!(r.json()["name"], "u");
}

/// A raw upstream: sends each request head it reads down `heads`, and
/// answers with fields in mixed case.
async fn head_recording_upstream() -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, heads) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut pending = Vec::new();
                let mut buf = [0u8; 4096];
                while let Ok(n) = conn.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    pending.extend_from_slice(&buf[..n]);
                    while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head: Vec<u8> = pending.drain(..end + 4).collect();
                        let _ = tx.send(String::from_utf8_lossy(&head).into_owned());
                        let answer = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Upstream-Thing: 1\r\nETag: \"v1\"\r\n\r\nok";
                        if conn.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, heads)
}

/// One request on a new connection, as raw bytes; the whole response.
async fn raw_exchange(addr: std::net::SocketAddr, request: &str) -> String {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    // The upstream's body is "ok": the response ends with it.
    read_until(&mut s, b"\r\n\r\nok").await
}

/// Every one of `wants` is in `text`.
fn contains_all(text: &str, wants: &[&str]) {
    for want in wants {
        assert!(text.contains(want), "{want:?} not in {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_names_keep_their_case_unless_lowercase_is_chosen() {
    let (addr, mut heads) = head_recording_upstream().await;
    let config = |case: &str| {
        format!(
            r#"{HEAD}
[gateway]
{case}
[routes.case]
path_prefix = "/"
upstream = "case"
request_headers = {{ set = {{ "X-Via" = "gw" }} }}
[upstreams.case]
endpoints = ["{addr}"]
"#
        )
    };
    let gw = Gateway::start(&config("")).await;
    let request =
        "GET /case HTTP/1.1\r\nHost: case.test\r\nUser-Agent: raw/1\r\nX-Custom-Thing: a\r\n\r\n";

    // Default: names go out as they came in; meshgate's own in title case.
    let resp = raw_exchange(gw.listen, request).await;
    let head = heads.recv().await.unwrap();
    contains_all(
        &head,
        &[
            "\r\nHost: case.test\r\n",
            "\r\nUser-Agent: raw/1\r\n",
            "\r\nX-Custom-Thing: a\r\n",
            "\r\nX-Forwarded-For: 127.0.0.1\r\n",
            "\r\nX-Forwarded-Proto: http\r\n",
            "\r\nX-Request-Id: ",
            "\r\nX-Via: gw\r\n",
        ],
    );
    contains_all(
        &resp,
        &[
            "\r\nX-Upstream-Thing: 1\r\n",
            "\r\nETag: \"v1\"\r\n",
            "\r\nX-Request-Id: ",
        ],
    );
    assert!(resp.starts_with("HTTP/1.1 200 OK\r\n"), "{resp}");

    // `lowercase`, taken on reload: the same fields, lower case both ways.
    gw.reload(&config("header_case = \"lowercase\""));
    gw.wait_for_generation(2).await;
    let shown = crate::support::client::get(gw.admin, "/config", &[])
        .await
        .unwrap()
        .json();
    assert_eq!(shown["gateway"]["header_case"], "lowercase");
    let resp = raw_exchange(gw.listen, request).await;
    let head = heads.recv().await.unwrap();
    assert!(head.starts_with("GET /case HTTP/1.1\r\n"), "{head}");
    contains_all(
        &head,
        &[
            "\r\nHost: case.test\r\n",
            "\r\nuser-agent: raw/1\r\n",
            "\r\nx-custom-thing: a\r\n",
            "\r\nx-forwarded-for: 127.0.0.1\r\n",
            "\r\nx-forwarded-proto: http\r\n",
            "\r\nx-request-id: ",
            "\r\nx-via: gw\r\n",
        ],
    );
    contains_all(
        &resp,
        &[
            "\r\nContent-Length: 2\r\n",
            "\r\nx-upstream-thing: 1\r\n",
            "\r\netag: \"v1\"\r\n",
            "\r\nx-request-id: ",
        ],
    );
    assert!(resp.starts_with("HTTP/1.1 200 OK\r\n"), "{resp}");
}

/// Read from `s` until what was read ends with `end`; all of it.
async fn read_until(s: &mut tokio::net::TcpStream, end: &[u8]) -> String {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        while !out.ends_with(end) {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&out));
            out.extend_from_slice(&buf[..n]);
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), read)
        .await
        .expect("the whole response");
    String::from_utf8(out).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_post_to_a_direct_response_keeps_its_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let config = format!(
        r#"{HEAD}
[routes.hook]
path_prefix = "/"
respond = {{ status = 200, body = "taken" }}
"#
    );
    let gw = Gateway::start(&config).await;
    let mut s = tokio::net::TcpStream::connect(gw.listen).await.unwrap();
    // The body left unread would be parsed as the next request; it is read
    // and dropped, and the connection serves the next one.
    for _ in 0..2 {
        s.write_all(b"POST /hook HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\nhello=world")
            .await
            .unwrap();
        let resp = read_until(&mut s, b"taken").await;
        assert!(resp.starts_with("HTTP/1.1 200 OK\r\n"), "{resp}");
        assert!(
            !resp.to_ascii_lowercase().contains("connection: close"),
            "{resp}"
        );
    }
    s.write_all(b"GET /after HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let resp = read_until(&mut s, b"taken").await;
    assert!(resp.starts_with("HTTP/1.1 200 OK\r\n"), "{resp}");

    // A large body is not waited for: answered at once, then closed.
    let mut s = tokio::net::TcpStream::connect(gw.listen).await.unwrap();
    s.write_all(b"POST /hook HTTP/1.1\r\nHost: a\r\nContent-Length: 10000000\r\n\r\nstart")
        .await
        .unwrap();
    let resp = read_until(&mut s, b"taken").await;
    assert!(
        resp.to_ascii_lowercase().contains("connection: close"),
        "{resp}"
    );
    let mut rest = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(10), s.read_to_end(&mut rest))
        .await
        .expect("closed after the response")
        .ok();
}
