//! Header policy applied while forwarding: request ids, the forwarding chain
//! (`x-forwarded-*`, `forwarded`), route rewrites, and response hop-by-hop fields.
//! Request hop-by-hop fields are stripped by pingora's upstream request policy.

use std::net::IpAddr;

use http::header::{self, HeaderName, HeaderValue};
use pingora::http::{RequestHeader, ResponseHeader};

use crate::config::model::HeaderRewrite;

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
/// The client certificate identity meshgate verified (listener `forward_identity`).
pub const X_MESHGATE_PEER_IDENTITY: HeaderName =
    HeaderName::from_static("x-meshgate-peer-identity");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
const MAX_REQUEST_ID_LEN: usize = 128;

/// Keep a client's request id when it is short and plain, else make one.
pub fn request_id(incoming: Option<&HeaderValue>) -> String {
    if let Some(v) = incoming {
        let b = v.as_bytes();
        if !b.is_empty()
            && b.len() <= MAX_REQUEST_ID_LEN
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || b"-_.:/+=".contains(c))
        {
            // Checked above to be ASCII.
            return String::from_utf8_lossy(b).into_owned();
        }
    }
    uuid::Builder::from_random_bytes(fastrand::u128(..).to_le_bytes())
        .into_uuid()
        .hyphenated()
        .to_string()
}

/// `Upgrade: websocket` on an HTTP/1.1 request (the only upgrade forwarded).
pub fn is_websocket_upgrade(req: &RequestHeader) -> bool {
    req.headers
        .get_all(header::UPGRADE)
        .iter()
        .any(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"))
}

/// Every line of a list-valued header, joined with ", " (RFC 9110 §5.3).
/// Lines that are not visible ASCII are kept as they are (lossless bytes).
fn joined(req: &RequestHeader, name: &HeaderName) -> Option<Vec<u8>> {
    let mut out: Vec<u8> = Vec::new();
    for v in req.headers.get_all(name) {
        let v = v.as_bytes();
        if v.iter().all(|b| b.is_ascii_whitespace()) {
            continue;
        }
        if !out.is_empty() {
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(v);
    }
    (!out.is_empty()).then_some(out)
}

fn append_element(req: &mut RequestHeader, name: HeaderName, element: &str) {
    let value = match joined(req, &name) {
        Some(mut prev) => {
            prev.extend_from_slice(b", ");
            prev.extend_from_slice(element.as_bytes());
            prev
        }
        None => element.as_bytes().to_vec(),
    };
    if let Ok(v) = HeaderValue::from_bytes(&value) {
        let _ = req.insert_header(name, v);
    }
}

/// Append the client to the forwarding chain and record scheme and host.
pub fn add_forwarding(
    req: &mut RequestHeader,
    client: Option<IpAddr>,
    proto: &str,
    host: Option<&str>,
) {
    if let Some(ip) = client {
        append_element(req, X_FORWARDED_FOR, &ip.to_string());
    }
    set(req, X_FORWARDED_PROTO, proto);
    if let Some(h) = host {
        if !req.headers.contains_key(&X_FORWARDED_HOST) {
            set(req, X_FORWARDED_HOST, h);
        }
    }
    // RFC 7239: one element per proxy, appended to the list.
    let mut element = String::new();
    if let Some(ip) = client {
        match ip {
            IpAddr::V4(v4) => element.push_str(&format!("for={v4}")),
            IpAddr::V6(v6) => element.push_str(&format!("for=\"[{v6}]\"")),
        }
        element.push(';');
    }
    if let Some(h) = host.filter(|h| {
        h.bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
    }) {
        element.push_str(&format!("host=\"{h}\";"));
    }
    element.push_str(&format!("proto={proto}"));
    append_element(req, header::FORWARDED, &element);
}

fn set(req: &mut RequestHeader, name: HeaderName, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        // Only fails for invalid values, which `from_str` has ruled out.
        let _ = req.insert_header(name, v);
    }
}

pub fn rewrite_request(req: &mut RequestHeader, rw: &HeaderRewrite) {
    for name in &rw.remove {
        req.remove_header(name);
    }
    for (name, value) in &rw.set {
        let _ = req.insert_header(name.clone(), value.clone());
    }
    for (name, value) in &rw.add {
        let _ = req.append_header(name.clone(), value.clone());
    }
}

pub fn rewrite_response(resp: &mut ResponseHeader, rw: &HeaderRewrite) {
    for name in &rw.remove {
        resp.remove_header(name);
    }
    for (name, value) in &rw.set {
        let _ = resp.insert_header(name.clone(), value.clone());
    }
    for (name, value) in &rw.add {
        let _ = resp.append_header(name.clone(), value.clone());
    }
}

/// RFC 9110 §7.6.1: drop the upstream's connection-specific fields. A 101
/// Switching Protocols answer keeps `Connection`/`Upgrade`, which it needs.
pub fn strip_response_hop_by_hop(resp: &mut ResponseHeader) {
    if resp.status == http::StatusCode::SWITCHING_PROTOCOLS {
        return;
    }
    let nominated: Vec<HeaderName> = resp
        .headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| !is_protected(n))
        .collect();
    for n in nominated {
        resp.remove_header(&n);
    }
    for n in [
        header::CONNECTION,
        KEEP_ALIVE,
        PROXY_CONNECTION,
        header::UPGRADE,
        header::TE,
    ] {
        resp.remove_header(&n);
    }
}

/// Fields a `Connection` header may not remove: framing and identity.
fn is_protected(n: &HeaderName) -> bool {
    n == header::CONTENT_LENGTH
        || n == header::TRANSFER_ENCODING
        || n == header::CONTENT_TYPE
        || n == header::DATE
}

/// Repeated `Content-Length` lines with one value (which the parser
/// accepted; differing values are rejected with 400) leave as one line, so
/// no upstream has to decide what two of them mean.
pub fn single_content_length(req: &mut RequestHeader) {
    let mut values = req.headers.get_all(http::header::CONTENT_LENGTH).iter();
    let (Some(first), Some(_)) = (values.next(), values.next()) else {
        return;
    };
    let first = first.clone();
    req.remove_header(&http::header::CONTENT_LENGTH);
    let _ = req.insert_header(http::header::CONTENT_LENGTH, first);
}

/// Apply `strip_prefix` to a path-and-query, keeping the query.
pub fn strip_prefix(path_and_query: &str, prefix: &str) -> Option<String> {
    let (path, query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_and_query, None),
    };
    let rest = path.strip_prefix(prefix)?;
    let mut out = String::with_capacity(path_and_query.len());
    if !rest.starts_with('/') {
        out.push('/');
    }
    out.push_str(rest);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_id_kept_when_plain_else_generated() {
        let ok = HeaderValue::from_static("abc-123");
        assert_eq!(request_id(Some(&ok)), "abc-123");
        let bad = HeaderValue::from_static("has space");
        let generated = request_id(Some(&bad));
        assert_eq!(generated.len(), 36);
        assert_ne!(generated, request_id(None));
        let long = HeaderValue::from_str(&"a".repeat(200)).unwrap();
        assert_eq!(request_id(Some(&long)).len(), 36);
    }

    #[test]
    fn forwarding_chain_appends() {
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        req.insert_header("x-forwarded-for", "10.0.0.1").unwrap();
        req.insert_header("forwarded", "for=10.0.0.1").unwrap();
        add_forwarding(
            &mut req,
            Some("192.0.2.7".parse().unwrap()),
            "http",
            Some("api.example.com"),
        );
        assert_eq!(req.headers["x-forwarded-for"], "10.0.0.1, 192.0.2.7");
        assert_eq!(req.headers["x-forwarded-proto"], "http");
        assert_eq!(req.headers["x-forwarded-host"], "api.example.com");
        assert_eq!(
            req.headers["forwarded"],
            "for=10.0.0.1, for=192.0.2.7;host=\"api.example.com\";proto=http"
        );
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        add_forwarding(&mut req, Some("2001:db8::1".parse().unwrap()), "http", None);
        assert_eq!(req.headers["forwarded"], "for=\"[2001:db8::1]\";proto=http");
    }

    #[test]
    fn every_forwarding_line_is_kept() {
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        req.append_header("x-forwarded-for", "10.0.0.1").unwrap();
        req.append_header("x-forwarded-for", "10.0.0.2").unwrap();
        req.append_header("forwarded", "for=10.0.0.1").unwrap();
        req.append_header("forwarded", "for=10.0.0.2").unwrap();
        add_forwarding(&mut req, Some("192.0.2.7".parse().unwrap()), "http", None);
        assert_eq!(
            req.headers["x-forwarded-for"],
            "10.0.0.1, 10.0.0.2, 192.0.2.7"
        );
        assert_eq!(req.headers.get_all("x-forwarded-for").iter().count(), 1);
        assert_eq!(
            req.headers["forwarded"],
            "for=10.0.0.1, for=10.0.0.2, for=192.0.2.7;proto=http"
        );
    }

    #[test]
    fn websocket_upgrade_detection() {
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        assert!(!is_websocket_upgrade(&req));
        req.insert_header("upgrade", "foo").unwrap();
        assert!(!is_websocket_upgrade(&req));
        req.insert_header("upgrade", "WebSocket").unwrap();
        assert!(is_websocket_upgrade(&req));
    }

    #[test]
    fn response_hop_by_hop_removed() {
        let mut resp = ResponseHeader::build(200, None).unwrap();
        resp.insert_header("connection", "close, x-secret").unwrap();
        resp.insert_header("x-secret", "1").unwrap();
        resp.insert_header("keep-alive", "timeout=5").unwrap();
        resp.insert_header("content-length", "3").unwrap();
        strip_response_hop_by_hop(&mut resp);
        assert!(resp.headers.get("x-secret").is_none());
        assert!(resp.headers.get("keep-alive").is_none());
        assert!(resp.headers.get("connection").is_none());
        assert_eq!(resp.headers["content-length"], "3");
    }

    #[test]
    fn strip_prefix_keeps_query_and_leading_slash() {
        assert_eq!(
            strip_prefix("/v1/items?a=1", "/v1").as_deref(),
            Some("/items?a=1")
        );
        assert_eq!(strip_prefix("/v1", "/v1").as_deref(), Some("/"));
        assert_eq!(strip_prefix("/v1?x", "/v1/").as_deref(), None);
        assert_eq!(strip_prefix("/v1/x", "/v1/").as_deref(), Some("/x"));
        assert_eq!(strip_prefix("/other", "/v1").as_deref(), None);
    }
}
