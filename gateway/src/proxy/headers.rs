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

/// A request's id: the client's when short and plain, else made here. Held
/// as a header value so that sending it upstream and back to the client
/// shares one buffer instead of copying it for each.
#[derive(Clone, Debug)]
pub struct RequestId(HeaderValue);

impl RequestId {
    /// Keep a client's request id when it is short and plain, else make one.
    pub fn from_request(incoming: Option<&HeaderValue>) -> Self {
        if let Some(v) = incoming {
            let b = v.as_bytes();
            if !b.is_empty()
                && b.len() <= MAX_REQUEST_ID_LEN
                && b.iter()
                    .all(|c| c.is_ascii_alphanumeric() || b"-_.:/+=".contains(c))
            {
                return RequestId(v.clone());
            }
        }
        let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
        let id = uuid::Builder::from_random_bytes(fastrand::u128(..).to_le_bytes())
            .into_uuid()
            .hyphenated()
            .encode_lower(&mut buf)
            .as_bytes();
        // A hyphenated UUID is always a valid header value.
        RequestId(HeaderValue::from_bytes(id).unwrap_or(HeaderValue::from_static("-")))
    }

    pub fn as_str(&self) -> &str {
        // Only visible ASCII gets in (checked or generated above).
        self.0.to_str().unwrap_or("")
    }

    pub fn header_value(&self) -> HeaderValue {
        self.0.clone()
    }
}

impl Default for RequestId {
    fn default() -> Self {
        RequestId(HeaderValue::from_static(""))
    }
}

impl std::ops::Deref for RequestId {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl serde::Serialize for RequestId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// Remove `name` when the request has it. Pingora's removal hashes the name
/// into both of its maps whether it is there or not; a lookup is cheaper,
/// and on most requests finds nothing.
pub fn remove_if_present(req: &mut RequestHeader, name: &HeaderName) {
    if req.headers.contains_key(name) {
        req.remove_header(name);
    }
}

/// `Upgrade: websocket` on an HTTP/1.1 request (the only upgrade forwarded).
pub fn is_websocket_upgrade(req: &RequestHeader) -> bool {
    req.headers
        .get_all(header::UPGRADE)
        .iter()
        .any(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"))
}

/// Every line of a list-valued header, joined with ", " (RFC 9110 §5.3), in
/// a buffer with room for `extra` more bytes (empty when there are none).
/// Lines that are not visible ASCII are kept as they are (lossless bytes).
fn joined(req: &RequestHeader, name: &HeaderName, extra: usize) -> Vec<u8> {
    let mut out: Vec<u8> = Vec::new();
    for v in req.headers.get_all(name) {
        let v = v.as_bytes();
        if v.iter().all(|b| b.is_ascii_whitespace()) {
            continue;
        }
        if out.is_empty() {
            out.reserve(v.len() + 2 + extra);
        } else {
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(v);
    }
    if out.is_empty() {
        out.reserve(extra);
    }
    out
}

/// Append `element` to the list-valued header `name`, as one line.
fn append_element(req: &mut RequestHeader, name: &'static str, list: &HeaderName, element: &[u8]) {
    let mut value = joined(req, list, element.len() + 2);
    if !value.is_empty() {
        value.extend_from_slice(b", ");
    }
    value.extend_from_slice(element);
    // The list's buffer becomes the value: no further copy.
    if let Ok(v) = HeaderValue::from_maybe_shared(bytes::Bytes::from(value)) {
        let _ = req.insert_header(name, v);
    }
}

/// `ip` as text, without going through `fmt` for the common IPv4 case.
fn ip_text(ip: IpAddr, out: &mut Vec<u8>) {
    match ip {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                if octet >= 100 {
                    out.push(b'0' + octet / 100);
                }
                if octet >= 10 {
                    out.push(b'0' + octet / 10 % 10);
                }
                out.push(b'0' + octet % 10);
            }
        }
        IpAddr::V6(v6) => {
            use std::io::Write;
            let _ = write!(out, "{v6}");
        }
    }
}

/// Append the client to the forwarding chain and record scheme and host.
/// Header names are given in the case they go out in; values are built in
/// the buffer that becomes the header, and the client's `Host` is shared.
pub fn add_forwarding(
    req: &mut RequestHeader,
    client: Option<IpAddr>,
    proto: &'static str,
    host: Option<HeaderValue>,
) {
    let mut ip = Vec::with_capacity(48);
    if let Some(addr) = client {
        ip_text(addr, &mut ip);
        append_element(req, "X-Forwarded-For", &X_FORWARDED_FOR, &ip);
    }
    let _ = req.insert_header("X-Forwarded-Proto", HeaderValue::from_static(proto));
    if let Some(h) = &host {
        if !req.headers.contains_key(&X_FORWARDED_HOST) {
            let _ = req.insert_header("X-Forwarded-Host", h.clone());
        }
    }
    // RFC 7239: one element per proxy, appended to the list.
    let mut element = Vec::with_capacity(64);
    match client {
        Some(IpAddr::V4(_)) => {
            element.extend_from_slice(b"for=");
            element.extend_from_slice(&ip);
            element.push(b';');
        }
        Some(IpAddr::V6(_)) => {
            element.extend_from_slice(b"for=\"[");
            element.extend_from_slice(&ip);
            element.extend_from_slice(b"]\";");
        }
        None => {}
    }
    if let Some(h) = host.as_ref().map(|h| h.as_bytes()).filter(|h| {
        h.iter()
            .all(|b| b.is_ascii_graphic() && *b != b'"' && *b != b'\\')
    }) {
        element.extend_from_slice(b"host=\"");
        element.extend_from_slice(h);
        element.extend_from_slice(b"\";");
    }
    element.extend_from_slice(b"proto=");
    element.extend_from_slice(proto.as_bytes());
    append_element(req, "Forwarded", &header::FORWARDED, &element);
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
    // `keep-alive` and `close` are the usual tokens, and `keep-alive` is
    // removed below anyway: skipping them spares a name parse and a list.
    let nominated: Vec<HeaderName> = resp
        .headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.eq_ignore_ascii_case("keep-alive") && !t.eq_ignore_ascii_case("close"))
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .filter(|n| !is_protected(n))
        .collect();
    for n in nominated {
        resp.remove_header(&n);
    }
    // Pingora's removal hashes the name into both of its maps whether it is
    // there or not: one pass over the few names a response has finds the
    // ones to remove (usually just `Connection`).
    let mut present = [false; HOP_BY_HOP_FIELDS];
    for name in resp.headers.keys() {
        if let Some(i) = RESPONSE_HOP_BY_HOP.iter().position(|n| n == name) {
            present[i] = true;
        }
    }
    for (n, present) in RESPONSE_HOP_BY_HOP.iter().zip(present) {
        if present {
            resp.remove_header(n);
        }
    }
}

const HOP_BY_HOP_FIELDS: usize = 5;
static RESPONSE_HOP_BY_HOP: [HeaderName; HOP_BY_HOP_FIELDS] = [
    header::CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    header::UPGRADE,
    header::TE,
];

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
        assert_eq!(RequestId::from_request(Some(&ok)).as_str(), "abc-123");
        let bad = HeaderValue::from_static("has space");
        let generated = RequestId::from_request(Some(&bad));
        assert_eq!(generated.len(), 36);
        assert!(uuid::Uuid::parse_str(&generated).is_ok());
        assert_ne!(generated.as_str(), RequestId::from_request(None).as_str());
        let long = HeaderValue::from_str(&"a".repeat(200)).unwrap();
        assert_eq!(RequestId::from_request(Some(&long)).len(), 36);
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
            Some(HeaderValue::from_static("api.example.com")),
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
    fn ip_text_matches_display() {
        for ip in [
            "0.0.0.0",
            "9.10.99.100",
            "101.110.199.200",
            "255.255.255.255",
            "127.0.0.1",
            "2001:db8::1",
            "::ffff:10.0.0.1",
        ] {
            let addr: IpAddr = ip.parse().unwrap();
            let mut out = Vec::new();
            ip_text(addr, &mut out);
            assert_eq!(String::from_utf8(out).unwrap(), addr.to_string());
        }
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

        // Each standard hop-by-hop field alone, and all of them with repeats.
        let fields = [
            "connection",
            "keep-alive",
            "proxy-connection",
            "upgrade",
            "te",
        ];
        for only in fields {
            let mut resp = ResponseHeader::build(200, None).unwrap();
            resp.append_header("server", "app").unwrap();
            resp.append_header(only, "x").unwrap();
            strip_response_hop_by_hop(&mut resp);
            assert!(resp.headers.get(only).is_none(), "{only} kept");
            assert_eq!(resp.headers["server"], "app");
        }
        let mut resp = ResponseHeader::build(200, None).unwrap();
        for f in fields.iter().chain(&fields) {
            resp.append_header(*f, "x").unwrap();
        }
        strip_response_hop_by_hop(&mut resp);
        assert!(resp.headers.is_empty(), "{:?}", resp.headers);
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
