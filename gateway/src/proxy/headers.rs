//! Header policy applied while forwarding: request ids, the forwarding chain
//! (`x-forwarded-*`, `forwarded`), route rewrites, and response hop-by-hop fields.
//! Request hop-by-hop fields are stripped by pingora's upstream request policy.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use pingora::http::{RequestHeader, ResponseHeader};

use bytes::Bytes;

use crate::config::model::{FieldValue, HeaderRewrite};
use crate::http1::fields::FieldList;

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

/// A message head meshgate edits: Pingora's, which keeps each name's wire
/// case in a second map (so an edit touches two maps and parses the name);
/// with `gateway.header_case = "lowercase"`, the plain `http` map under
/// it (one map; names are constants); or the fast lane's list of the lines
/// as read ([`FieldList`]). The policy below is written once against this.
pub trait Fields {
    /// Every value of `name`, in order.
    fn values<'a>(&'a self, name: &'a HeaderName) -> impl Iterator<Item = &'a HeaderValue> + 'a;
    /// Whether a line of `name` is there.
    fn contains(&self, name: &HeaderName) -> bool;
    /// Which of `names` are there (`present[i]` for `names[i]`), in one
    /// pass over the fields.
    fn which_of(&self, names: &[HeaderName], present: &mut [bool]);
    /// Replace `name`; `wire` is how it is spelled when case is kept.
    fn set(&mut self, name: &HeaderName, wire: &'static str, value: HeaderValue);
    /// Replace `name`, spelled as the name itself.
    fn set_name(&mut self, name: &HeaderName, value: HeaderValue);
    /// Replace a configured field, spelled as the config writes it.
    fn set_field(&mut self, field: &FieldValue);
    /// Add a line for a configured field, keeping the ones already there.
    fn add_field(&mut self, field: &FieldValue);
    /// Remove every line of `name`.
    fn remove(&mut self, name: &HeaderName);
}

/// `which_of` over a map's names.
fn which_of_map(map: &HeaderMap, names: &[HeaderName], present: &mut [bool]) {
    for name in map.keys() {
        if let Some(i) = names.iter().position(|n| n == name) {
            present[i] = true;
        }
    }
}

macro_rules! pingora_fields {
    ($t:ty) => {
        impl Fields for $t {
            fn values<'a>(
                &'a self,
                name: &'a HeaderName,
            ) -> impl Iterator<Item = &'a HeaderValue> + 'a {
                self.headers.get_all(name).iter()
            }
            fn contains(&self, name: &HeaderName) -> bool {
                self.headers.contains_key(name)
            }
            fn which_of(&self, names: &[HeaderName], present: &mut [bool]) {
                which_of_map(&self.headers, names, present)
            }
            fn set(&mut self, _: &HeaderName, wire: &'static str, value: HeaderValue) {
                // `wire` is a valid name (constants only): this cannot fail.
                let _ = self.insert_header(wire, value);
            }
            fn set_name(&mut self, name: &HeaderName, value: HeaderValue) {
                let _ = match wire_name(name) {
                    Some(spelled) => self.insert_header(spelled, value),
                    None => self.insert_header(name.clone(), value),
                };
            }
            fn set_field(&mut self, field: &FieldValue) {
                // The spelling was checked as a name when the config loaded.
                let _ = self.insert_header(field.spelled.clone(), field.value.clone());
            }
            fn add_field(&mut self, field: &FieldValue) {
                let _ = self.append_header(field.spelled.clone(), field.value.clone());
            }
            fn remove(&mut self, name: &HeaderName) {
                // Pingora's removal hashes the name into both of its maps
                // whether it is there or not; a lookup is cheaper, and on
                // most messages finds nothing.
                if self.headers.contains_key(name) {
                    self.remove_header(name);
                }
            }
        }
    };
}
pingora_fields!(RequestHeader);
pingora_fields!(ResponseHeader);

impl Fields for HeaderMap {
    fn values<'a>(&'a self, name: &'a HeaderName) -> impl Iterator<Item = &'a HeaderValue> + 'a {
        self.get_all(name).iter()
    }
    fn contains(&self, name: &HeaderName) -> bool {
        self.contains_key(name)
    }
    fn which_of(&self, names: &[HeaderName], present: &mut [bool]) {
        which_of_map(self, names, present)
    }
    fn set(&mut self, name: &HeaderName, _: &'static str, value: HeaderValue) {
        self.insert(name.clone(), value);
    }
    fn set_name(&mut self, name: &HeaderName, value: HeaderValue) {
        self.insert(name.clone(), value);
    }
    fn set_field(&mut self, field: &FieldValue) {
        self.insert(field.name.clone(), field.value.clone());
    }
    fn add_field(&mut self, field: &FieldValue) {
        self.append(field.name.clone(), field.value.clone());
    }
    fn remove(&mut self, name: &HeaderName) {
        HeaderMap::remove(self, name);
    }
}

/// The lane's lines, spelled as Pingora's maps would spell them after the
/// same edits (the differential test below holds the two together).
impl Fields for FieldList {
    fn values<'a>(&'a self, name: &'a HeaderName) -> impl Iterator<Item = &'a HeaderValue> + 'a {
        FieldList::values(self, name.as_str().as_bytes())
    }
    fn contains(&self, name: &HeaderName) -> bool {
        FieldList::contains(self, name.as_str().as_bytes())
    }
    fn which_of(&self, names: &[HeaderName], present: &mut [bool]) {
        for spelled in self.names() {
            if let Some(i) = names
                .iter()
                .position(|n| n.as_str().as_bytes().eq_ignore_ascii_case(spelled))
            {
                present[i] = true;
            }
        }
    }
    fn set(&mut self, _: &HeaderName, wire: &'static str, value: HeaderValue) {
        self.insert(Bytes::from_static(wire.as_bytes()), value);
    }
    fn set_name(&mut self, name: &HeaderName, value: HeaderValue) {
        let spelled = match wire_name(name).or_else(|| crate::http1::fields::titled(name)) {
            Some(s) => Bytes::from_static(s.as_bytes()),
            None => Bytes::copy_from_slice(name.as_str().as_bytes()),
        };
        self.insert(spelled, value);
    }
    fn set_field(&mut self, field: &FieldValue) {
        self.insert(field.spelled.clone(), field.value.clone());
    }
    fn add_field(&mut self, field: &FieldValue) {
        self.append(field.spelled.clone(), field.value.clone());
    }
    fn remove(&mut self, name: &HeaderName) {
        FieldList::remove(self, name.as_str().as_bytes());
    }
}

/// How the fields meshgate itself writes are spelled on HTTP/1 when Pingora
/// does not know them (it title-cases only a dozen common names, and would
/// write these in lower case beside its `Content-Length`).
pub fn wire_name(name: &HeaderName) -> Option<&'static str> {
    if *name == header::LOCATION {
        Some("Location")
    } else if *name == header::RETRY_AFTER {
        Some("Retry-After")
    } else if *name == RATELIMIT_POLICY {
        Some("RateLimit-Policy")
    } else if *name == RATELIMIT {
        Some("RateLimit")
    } else {
        None
    }
}

/// Run `edit` on `req`'s fields as a plain map with room for `more`, and
/// leave `req` without its case map: every name is then written lower case
/// (Pingora spells a dozen common ones, `Host` and `Content-Length` among
/// them, in title case). The request target is kept as it was.
pub fn edit_plain_request<R>(
    req: &mut RequestHeader,
    more: usize,
    edit: impl FnOnce(&mut HeaderMap) -> R,
) -> R {
    // An absolute-form target is kept beside the URI, which a conversion
    // through `Parts` loses: it is copied and set again (rare).
    let from_uri = req
        .uri
        .path_and_query()
        .is_some_and(|pq| std::ptr::eq(req.raw_path().as_ptr(), pq.as_str().as_ptr()));
    let raw = (!from_uri).then(|| req.raw_path().to_vec());
    // Not kept in `Parts` either (HTTP/2 only; set by Pingora's gRPC-web bridge).
    let end_stream = req.send_end_stream();
    let blank = RequestHeader::from(http::Request::new(()).into_parts().0);
    let mut parts: http::request::Parts = std::mem::replace(req, blank).into();
    parts.headers.reserve(more);
    let out = edit(&mut parts.headers);
    *req = RequestHeader::from(parts);
    if let Some(raw) = raw {
        // It was accepted from the client in this very form.
        let _ = req.set_raw_path(&raw);
    }
    if let Some(end_stream) = end_stream {
        req.set_send_end_stream(end_stream);
    }
    out
}

/// As [`edit_plain_request`], for a response; a reason phrase other than
/// the status's usual one is kept.
pub fn edit_plain_response<R>(
    resp: &mut ResponseHeader,
    more: usize,
    edit: impl FnOnce(&mut HeaderMap) -> R,
) -> R {
    let reason = resp
        .get_reason_phrase()
        .filter(|r| Some(*r) != resp.status.canonical_reason())
        .map(str::to_owned);
    let blank = ResponseHeader::from(http::Response::new(()).into_parts().0);
    let mut parts: http::response::Parts = std::mem::replace(resp, blank).into();
    parts.headers.reserve(more);
    let out = edit(&mut parts.headers);
    *resp = ResponseHeader::from(parts);
    if reason.is_some() {
        let _ = resp.set_reason_phrase(reason.as_deref());
    }
    out
}

/// The body length a request declares in `Content-Length` (the parser has
/// already refused differing repeats and lists).
pub fn declared_length(req: &RequestHeader) -> Option<u64> {
    req.headers.get(header::CONTENT_LENGTH).and_then(length_of)
}

/// A `Content-Length` value the parser accepted: a number, or a list of the
/// same number (`5, 5`).
fn length_of(v: &HeaderValue) -> Option<u64> {
    std::str::from_utf8(v.as_bytes())
        .ok()?
        .split(',')
        .next()?
        .trim()
        .parse()
        .ok()
}

/// `Upgrade: websocket` on an HTTP/1.1 request (the only upgrade forwarded).
pub fn is_websocket_upgrade(req: &RequestHeader) -> bool {
    req.headers
        .get_all(header::UPGRADE)
        .iter()
        .any(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"))
}

/// Every non-empty line of a header, joined with `sep` (`, ` for lists,
/// RFC 9110 §5.3), in a buffer with room for `extra` more bytes (empty,
/// unallocated, when there are none). Lines that are not visible ASCII are kept as they are
/// (lossless bytes).
fn joined(fields: &impl Fields, name: &HeaderName, sep: &[u8], extra: usize) -> Vec<u8> {
    let mut out: Vec<u8> = Vec::new();
    for v in fields.values(name) {
        let v = v.as_bytes();
        if v.iter().all(|b| b.is_ascii_whitespace()) {
            continue;
        }
        if out.is_empty() {
            out.reserve_exact(v.len() + extra);
        } else {
            out.extend_from_slice(sep);
        }
        out.extend_from_slice(v);
    }
    out
}

/// Append `element` to the list-valued header `name`, as one line.
fn append_element(req: &mut impl Fields, list: &HeaderName, wire: &'static str, element: &[u8]) {
    let mut value = joined(req, list, b", ", element.len() + 2);
    if value.is_empty() {
        value.reserve_exact(element.len());
    } else {
        value.extend_from_slice(b", ");
    }
    value.extend_from_slice(element);
    // The list's buffer becomes the value: no further copy (and, filled to
    // its capacity, no shared block either).
    if let Ok(v) = HeaderValue::from_maybe_shared(bytes::Bytes::from(value)) {
        req.set(list, wire, v);
    }
}

/// What meshgate writes into a request it forwards, after Pingora's own
/// hop-by-hop policy.
pub struct Forwarding<'a> {
    pub client: Option<IpAddr>,
    pub scheme: &'static str,
    pub host: Option<HeaderValue>,
    /// The verified client identity, when the listener forwards it.
    pub identity: Option<HeaderValue>,
    pub request_id: HeaderValue,
    pub rewrite: &'a HeaderRewrite,
    /// `Host` for a request that came without one (HTTP/1.0): the
    /// upstream's name, since an HTTP/1.1 request must carry one.
    pub upstream_host: Option<HeaderValue>,
}

impl Forwarding<'_> {
    /// Fields this may add (the forwarding chain, identity, request id, a
    /// trace context pair, the route's own), so a map can be sized once.
    pub fn room(&self) -> usize {
        8 + self.rewrite.set.len() + self.rewrite.add.len()
    }

    pub fn apply(self, req: &mut impl Fields) {
        single_content_length(req);
        single_cookie(req);
        add_forwarding(req, self.client, self.scheme, self.host);
        // Only meshgate says who the peer is: a client-sent value is dropped.
        match self.identity {
            Some(id) => req.set(&X_MESHGATE_PEER_IDENTITY, "x-meshgate-peer-identity", id),
            None => req.remove(&X_MESHGATE_PEER_IDENTITY),
        }
        req.set(&X_REQUEST_ID, "X-Request-Id", self.request_id);
        if let Some(host) = self.upstream_host {
            if !req.contains(&header::HOST) {
                req.set(&header::HOST, "Host", host);
            }
        }
        rewrite(req, self.rewrite);
    }
}

/// What meshgate writes into a response it passes back.
pub struct Answer<'a> {
    pub status: http::StatusCode,
    pub rate_limit: Vec<(HeaderName, HeaderValue)>,
    pub request_id: HeaderValue,
    pub rewrite: Option<&'a HeaderRewrite>,
}

impl Answer<'_> {
    pub fn room(&self) -> usize {
        1 + self.rate_limit.len() + self.rewrite.map_or(0, |rw| rw.set.len() + rw.add.len())
    }

    pub fn apply(self, resp: &mut impl Fields) {
        strip_response_hop_by_hop(resp, self.status);
        if self.status.is_informational() || self.status == http::StatusCode::NO_CONTENT {
            // RFC 9110 §8.6: these never have one (nor a body).
            resp.remove(&header::CONTENT_LENGTH);
        } else {
            single_content_length(resp);
        }
        for (name, value) in self.rate_limit {
            resp.set_name(&name, value);
        }
        resp.set(&X_REQUEST_ID, "X-Request-Id", self.request_id);
        if let Some(rw) = self.rewrite {
            rewrite(resp, rw);
        }
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
    req: &mut impl Fields,
    client: Option<IpAddr>,
    proto: &'static str,
    host: Option<HeaderValue>,
) {
    let mut ip = Vec::with_capacity(48);
    if let Some(addr) = client {
        ip_text(addr, &mut ip);
        append_element(req, &X_FORWARDED_FOR, "X-Forwarded-For", &ip);
    }
    req.set(
        &X_FORWARDED_PROTO,
        "X-Forwarded-Proto",
        HeaderValue::from_static(proto),
    );
    if let Some(h) = &host {
        if !req.contains(&X_FORWARDED_HOST) {
            req.set(&X_FORWARDED_HOST, "X-Forwarded-Host", h.clone());
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
    append_element(req, &header::FORWARDED, "Forwarded", &element);
}

/// A route's `request_headers` or `response_headers`: remove, then set, then add.
pub fn rewrite(fields: &mut impl Fields, rw: &HeaderRewrite) {
    for name in &rw.remove {
        fields.remove(name);
    }
    for field in &rw.set {
        fields.set_field(field);
    }
    for field in &rw.add {
        fields.add_field(field);
    }
}

/// RFC 9110 §7.6.1: drop the upstream's connection-specific fields. A 101
/// Switching Protocols answer keeps `Connection`/`Upgrade`, which it needs.
pub fn strip_response_hop_by_hop(resp: &mut impl Fields, status: http::StatusCode) {
    if status == http::StatusCode::SWITCHING_PROTOCOLS {
        return;
    }
    // `keep-alive` and `close` are the usual tokens, and `keep-alive` is
    // removed below anyway: skipping them spares a name parse and a list.
    let nominated: Vec<HeaderName> = resp
        .values(&header::CONNECTION)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.eq_ignore_ascii_case("keep-alive") && !t.eq_ignore_ascii_case("close"))
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .filter(|n| !is_protected(n))
        .collect();
    for n in nominated {
        resp.remove(&n);
    }
    // One pass over the few names a response has finds the ones to remove
    // (usually just `Connection`) instead of a lookup per field.
    let mut present = [false; HOP_BY_HOP_FIELDS];
    resp.which_of(&RESPONSE_HOP_BY_HOP, &mut present);
    for (n, present) in RESPONSE_HOP_BY_HOP.iter().zip(present) {
        if present {
            resp.remove(n);
        }
    }
}

/// The request side of RFC 9110 §7.6.1, as Pingora's upstream request
/// policy strips it, for requests meshgate sends itself (hedging): the
/// fields `Connection` names, then the hop-by-hop ones.
pub fn strip_request_hop_by_hop(req: &mut RequestHeader) {
    strip_response_hop_by_hop(req, http::StatusCode::OK);
    for name in [
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        HeaderName::from_static("http2-settings"),
    ] {
        req.remove_header(&name);
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

/// A `Content-Length` the parser accepted in another form than one plain
/// number (repeated lines, a list such as `5, 5`, leading zeros; differing
/// values are refused with 400 before this) leaves as one plain number, so
/// no peer has to decide what the other forms mean (RFC 9110 §8.6).
pub fn single_content_length(msg: &mut impl Fields) {
    let length = {
        let mut values = msg.values(&header::CONTENT_LENGTH);
        let Some(first) = values.next() else {
            return;
        };
        let repeated = values.next().is_some();
        let b = first.as_bytes();
        let plain =
            !b.is_empty() && b.iter().all(u8::is_ascii_digit) && (b[0] != b'0' || b.len() == 1);
        if plain && !repeated {
            return;
        }
        length_of(first)
    };
    if let Some(n) = length {
        msg.set(
            &header::CONTENT_LENGTH,
            "Content-Length",
            HeaderValue::from(n),
        );
    }
}

/// RFC 9113 §8.2.3: an HTTP/2 client may send its cookies as several
/// `cookie` fields; an HTTP/1.1 server reads one `Cookie` line, so they are
/// joined with `; ` (frameworks that see several lines merge them with
/// `,` and lose the session).
fn single_cookie(req: &mut impl Fields) {
    if req.values(&header::COOKIE).nth(1).is_none() {
        return;
    }
    let one = joined(req, &header::COOKIE, b"; ", 0);
    // Joined valid values with `; ` are a valid value.
    if let Ok(v) = HeaderValue::from_maybe_shared(bytes::Bytes::from(one)) {
        req.set(&header::COOKIE, "Cookie", v);
    }
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

/// The rate-limit headers of draft-ietf-httpapi-ratelimit-headers, sent
/// with every answer of a rate-limited route.
pub const RATELIMIT_POLICY: http::HeaderName = http::HeaderName::from_static("ratelimit-policy");

pub const RATELIMIT: http::HeaderName = http::HeaderName::from_static("ratelimit");

#[cfg(test)]
mod tests {
    use super::*;

    /// A random spelling of a name from a pool that has the fields the
    /// edits look at, and a random value.
    struct Gen(fastrand::Rng);

    impl Gen {
        const NAMES: [&'static str; 18] = [
            "host",
            "x-forwarded-for",
            "forwarded",
            "x-forwarded-host",
            "x-forwarded-proto",
            "cookie",
            "content-length",
            "connection",
            "keep-alive",
            "te",
            "upgrade",
            "x-request-id",
            "x-meshgate-peer-identity",
            "x-secret",
            "user-agent",
            "set-cookie",
            "date",
            "ratelimit",
        ];
        const VALUES: [&'static str; 9] = [
            "1",
            "0",
            "a b",
            "close, x-secret",
            "keep-alive",
            "5, 5",
            "007",
            "for=10.0.0.1",
            "",
        ];

        fn name(&mut self) -> String {
            let n = Self::NAMES[self.0.usize(..Self::NAMES.len())];
            n.chars()
                .map(|c| {
                    if self.0.bool() {
                        c.to_ascii_uppercase()
                    } else {
                        c
                    }
                })
                .collect()
        }

        fn value(&mut self) -> HeaderValue {
            HeaderValue::from_static(Self::VALUES[self.0.usize(..Self::VALUES.len())])
        }

        fn lines(&mut self) -> Vec<(String, HeaderValue)> {
            (0..self.0.usize(0..12))
                .map(|_| (self.name(), self.value()))
                .collect()
        }

        fn field(&mut self) -> FieldValue {
            let spelled = self.name();
            FieldValue {
                name: HeaderName::from_bytes(spelled.as_bytes()).unwrap(),
                spelled: Bytes::from(spelled),
                value: self.value(),
            }
        }

        fn rewrite(&mut self) -> HeaderRewrite {
            HeaderRewrite {
                set: (0..self.0.usize(0..3)).map(|_| self.field()).collect(),
                add: (0..self.0.usize(0..3)).map(|_| self.field()).collect(),
                remove: (0..self.0.usize(0..3))
                    .map(|_| HeaderName::from_bytes(self.name().as_bytes()).unwrap())
                    .collect(),
            }
        }

        fn maybe(&mut self) -> Option<HeaderValue> {
            self.0.bool().then(|| self.value())
        }
    }

    /// The lane's list of `lines`: made one by one, or (`sep`) read back
    /// as ranges of a head that carries them with `sep` after each name
    /// (`": "` lays a line out as it is written again, the others do not).
    fn lane_list(lines: &[(String, HeaderValue)], keep_case: bool, sep: Option<&str>) -> FieldList {
        let Some(sep) = sep else {
            let mut list = FieldList::with_capacity(lines.len(), keep_case);
            for (n, v) in lines {
                list.append(Bytes::copy_from_slice(n.as_bytes()), v.clone());
            }
            return list;
        };
        let mut head = Vec::new();
        let mut ranges = Vec::new();
        for (n, v) in lines {
            let name = head.len()..head.len() + n.len();
            head.extend_from_slice(n.as_bytes());
            head.extend_from_slice(sep.as_bytes());
            ranges.push((name, head.len()..head.len() + v.len()));
            head.extend_from_slice(v.as_bytes());
            head.extend_from_slice(b"\r\n");
        }
        let mut list = FieldList::over(Bytes::from(head), lines.len(), keep_case);
        for (name, value) in ranges {
            list.append_read(name, value);
        }
        list
    }

    fn lane_wire(list: &FieldList) -> Vec<u8> {
        let mut out = Vec::new();
        list.write(&mut out);
        out
    }

    /// The forward and response stages' edits, made on Pingora's heads and
    /// on the lane's lists of the same lines, with names kept as sent and
    /// in lower case: the lines written are the same bytes.
    #[test]
    fn lane_fields_are_written_as_pingora_writes_them() {
        let mut gen = Gen(fastrand::Rng::with_seed(0x6669_656c));
        for case in 0..5_000 {
            let lines = gen.lines();
            let keep_case = case % 2 == 0;
            let sep = [None, Some(": "), Some(":"), Some(":\t")][gen.0.usize(..4)];
            let rewrite = gen.rewrite();
            let client: Option<IpAddr> = match gen.0.u8(..3) {
                0 => None,
                1 => Some("192.0.2.7".parse().unwrap()),
                _ => Some("2001:db8::1".parse().unwrap()),
            };
            let scheme = if gen.0.bool() { "http" } else { "https" };
            let (host, identity, upstream_host) = (gen.maybe(), gen.maybe(), gen.maybe());
            let forwarding = || Forwarding {
                client,
                scheme,
                host: host.clone(),
                identity: identity.clone(),
                request_id: HeaderValue::from_static("req-1"),
                rewrite: &rewrite,
                upstream_host: upstream_host.clone(),
            };
            let mut req = RequestHeader::build("GET", b"/", None).unwrap();
            for (n, v) in &lines {
                req.append_header(n.clone(), v.clone()).unwrap();
            }
            if keep_case {
                forwarding().apply(&mut req);
            } else {
                let room = forwarding().room();
                edit_plain_request(&mut req, room, |f| forwarding().apply(f));
            }
            let mut pingora = Vec::new();
            req.header_to_h1_wire(&mut pingora);
            let mut list = lane_list(&lines, keep_case, sep);
            forwarding().apply(&mut list);
            assert_eq!(
                String::from_utf8_lossy(&lane_wire(&list)),
                String::from_utf8_lossy(&pingora),
                "request {case} ({sep:?}): {lines:?} {rewrite:?}"
            );

            let status = [200u16, 101, 204, 304, 103, 503][gen.0.usize(..6)];
            let status = http::StatusCode::from_u16(status).unwrap();
            let rate_limit: Vec<(HeaderName, HeaderValue)> = if gen.0.bool() {
                vec![
                    (RATELIMIT_POLICY, HeaderValue::from_static("10;w=1")),
                    (RATELIMIT, HeaderValue::from_static("r=9;t=1")),
                    (header::RETRY_AFTER, HeaderValue::from_static("1")),
                ]
            } else {
                Vec::new()
            };
            let resp_rewrite = gen.0.bool().then_some(&rewrite);
            let answer = || Answer {
                status,
                rate_limit: rate_limit.clone(),
                request_id: HeaderValue::from_static("req-1"),
                rewrite: resp_rewrite,
            };
            let mut resp = ResponseHeader::build(status, None).unwrap();
            for (n, v) in &lines {
                resp.append_header(n.clone(), v.clone()).unwrap();
            }
            if keep_case {
                answer().apply(&mut resp);
            } else {
                let room = answer().room();
                edit_plain_response(&mut resp, room, |f| answer().apply(f));
            }
            let mut pingora = Vec::new();
            resp.header_to_h1_wire(&mut pingora);
            let mut list = lane_list(&lines, keep_case, sep);
            answer().apply(&mut list);
            assert_eq!(
                String::from_utf8_lossy(&lane_wire(&list)),
                String::from_utf8_lossy(&pingora),
                "response {case} {status} ({sep:?}): {lines:?} {rewrite:?}"
            );
        }
    }

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
        strip_response_hop_by_hop(&mut resp, http::StatusCode::OK);
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
            strip_response_hop_by_hop(&mut resp, http::StatusCode::OK);
            assert!(resp.headers.get(only).is_none(), "{only} kept");
            assert_eq!(resp.headers["server"], "app");
        }
        let mut resp = ResponseHeader::build(200, None).unwrap();
        for f in fields.iter().chain(&fields) {
            resp.append_header(*f, "x").unwrap();
        }
        strip_response_hop_by_hop(&mut resp, http::StatusCode::OK);
        assert!(resp.headers.is_empty(), "{:?}", resp.headers);
    }

    #[test]
    fn content_length_leaves_as_one_plain_number() {
        for (sent, out) in [
            (&["5"][..], "5"),
            (&["0"][..], "0"),
            (&["5", "5"][..], "5"),
            (&["5, 5"][..], "5"),
            (&["5,5,5"][..], "5"),
            (&["05"][..], "5"),
            (&["00000000000000000000005"][..], "5"),
        ] {
            for plain in [false, true] {
                let mut req = RequestHeader::build("POST", b"/", None).unwrap();
                for v in sent {
                    req.append_header("Content-Length", *v).unwrap();
                }
                if plain {
                    edit_plain_request(&mut req, 0, single_content_length);
                } else {
                    single_content_length(&mut req);
                }
                let lines: Vec<_> = req.headers.get_all("content-length").iter().collect();
                assert_eq!(lines, [out], "{sent:?}");
            }
        }
    }

    #[test]
    fn cookie_fields_are_joined_into_one_line() {
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        req.append_header("cookie", "session=abc").unwrap();
        single_cookie(&mut req);
        assert_eq!(req.headers["cookie"], "session=abc");
        req.append_header("cookie", "csrf=xyz").unwrap();
        req.append_header("cookie", "a=1").unwrap();
        single_cookie(&mut req);
        let lines: Vec<_> = req.headers.get_all("cookie").iter().collect();
        assert_eq!(lines, ["session=abc; csrf=xyz; a=1"]);
    }

    #[test]
    fn fields_meshgate_writes_are_title_case_on_the_wire() {
        let mut resp = ResponseHeader::build(429, None).unwrap();
        Answer {
            status: http::StatusCode::TOO_MANY_REQUESTS,
            rate_limit: vec![
                (RATELIMIT_POLICY, HeaderValue::from_static("\"p\";q=1;w=1")),
                (RATELIMIT, HeaderValue::from_static("\"p\";r=0;t=1")),
                (header::RETRY_AFTER, HeaderValue::from_static("1")),
            ],
            request_id: HeaderValue::from_static("id"),
            rewrite: None,
        }
        .apply(&mut resp);
        let mut out = Vec::new();
        resp.header_to_h1_wire(&mut out);
        let wire = String::from_utf8(out).unwrap();
        for name in [
            "RateLimit-Policy: ",
            "RateLimit: ",
            "Retry-After: ",
            "X-Request-Id: ",
        ] {
            assert!(
                wire.contains(&format!("\r\n{name}")) || wire.starts_with(name),
                "{wire}"
            );
        }
    }

    #[test]
    fn no_content_length_on_204_and_1xx() {
        for (status, kept) in [(204, false), (103, false), (200, true), (304, true)] {
            let mut resp = ResponseHeader::build(status, None).unwrap();
            resp.insert_header("content-length", "5").unwrap();
            let status = http::StatusCode::from_u16(status).unwrap();
            Answer {
                status,
                rate_limit: Vec::new(),
                request_id: HeaderValue::from_static("id"),
                rewrite: None,
            }
            .apply(&mut resp);
            assert_eq!(
                resp.headers.contains_key("content-length"),
                kept,
                "{status}"
            );
        }
    }

    fn wire(req: &RequestHeader) -> String {
        let mut out = Vec::new();
        req.header_to_h1_wire(&mut out);
        String::from_utf8(out).unwrap()
    }

    fn client_request(target: &[u8]) -> RequestHeader {
        let mut req = RequestHeader::build("GET", target, None).unwrap();
        req.append_header("Host", "api.example.com").unwrap();
        req.append_header("User-Agent", "t/1").unwrap();
        req.append_header("X-Forwarded-For", "10.0.0.1").unwrap();
        req.append_header("X-Meshgate-Peer-Identity", "forged")
            .unwrap();
        req.append_header("Content-Length", "0").unwrap();
        req.append_header("Content-Length", "0").unwrap();
        req
    }

    fn field(spelled: &'static str, value: &'static str) -> FieldValue {
        FieldValue {
            name: HeaderName::from_bytes(spelled.as_bytes()).unwrap(),
            spelled: bytes::Bytes::from_static(spelled.as_bytes()),
            value: HeaderValue::from_static(value),
        }
    }

    fn forwarding(rw: &HeaderRewrite) -> Forwarding<'_> {
        Forwarding {
            client: Some("192.0.2.7".parse().unwrap()),
            scheme: "https",
            host: Some(HeaderValue::from_static("api.example.com")),
            identity: None,
            request_id: HeaderValue::from_static("id-1"),
            rewrite: rw,
            upstream_host: None,
        }
    }

    #[test]
    fn both_header_cases_make_the_same_fields() {
        let rw = HeaderRewrite {
            set: vec![field("X-Via", "gw")],
            add: vec![field("x-tag", "a")],
            remove: vec![header::USER_AGENT],
        };
        let mut kept = client_request(b"/a?b=1");
        forwarding(&rw).apply(&mut kept);
        let mut plain = client_request(b"/a?b=1");
        let edits = forwarding(&rw);
        edit_plain_request(&mut plain, edits.room(), |fields| edits.apply(fields));

        let fields = |r: &RequestHeader| -> Vec<(String, String)> {
            r.headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_string()))
                .collect()
        };
        assert_eq!(fields(&kept), fields(&plain));
        assert_eq!(kept.headers["x-forwarded-for"], "10.0.0.1, 192.0.2.7");
        assert_eq!(kept.headers["x-request-id"], "id-1");
        assert_eq!(kept.headers.get_all("content-length").iter().count(), 1);
        assert!(!kept.headers.contains_key("x-meshgate-peer-identity"));
        assert!(!kept.headers.contains_key("user-agent"));
        assert_eq!(plain.raw_path(), b"/a?b=1");

        // The same fields, spelled two ways on the wire.
        let (kept, plain) = (wire(&kept), wire(&plain));
        assert!(
            kept.contains("\r\nX-Forwarded-For: 10.0.0.1, 192.0.2.7\r\n"),
            "{kept}"
        );
        assert!(kept.contains("\r\nX-Request-Id: id-1\r\n"), "{kept}");
        assert!(kept.starts_with("Host: api.example.com\r\n"), "{kept}");
        assert!(kept.contains("\r\nX-Via: gw\r\n"), "{kept}");
        assert!(kept.contains("\r\nx-tag: a\r\n"), "{kept}");
        assert!(
            plain.contains("\r\nx-forwarded-for: 10.0.0.1, 192.0.2.7\r\n"),
            "{plain}"
        );
        assert!(plain.contains("\r\nx-request-id: id-1\r\n"), "{plain}");
        assert!(plain.contains("\r\nx-via: gw\r\n"), "{plain}");
        assert!(plain.starts_with("Host: api.example.com\r\n"), "{plain}");
    }

    #[test]
    fn plain_edits_keep_the_target_and_the_reason_phrase() {
        let rw = HeaderRewrite::default();
        for target in [&b"http://api.example.com/a?b"[..], b"/x", b"*"] {
            let mut req = client_request(target);
            let edits = forwarding(&rw);
            edit_plain_request(&mut req, edits.room(), |fields| edits.apply(fields));
            assert_eq!(
                req.raw_path(),
                target,
                "{}",
                String::from_utf8_lossy(target)
            );
            assert!(!req.has_case());
        }
        let mut h2 = client_request(b"/g");
        h2.set_version(http::Version::HTTP_2);
        h2.set_send_end_stream(false);
        edit_plain_request(&mut h2, 0, |_| ());
        assert_eq!(h2.send_end_stream(), Some(false));

        let mut resp = ResponseHeader::build(200, None).unwrap();
        resp.set_reason_phrase(Some("Fine")).unwrap();
        resp.append_header("Connection", "keep-alive").unwrap();
        let edits = Answer {
            status: resp.status,
            rate_limit: Vec::new(),
            request_id: HeaderValue::from_static("id-2"),
            rewrite: None,
        };
        edit_plain_response(&mut resp, edits.room(), |fields| edits.apply(fields));
        assert_eq!(resp.get_reason_phrase(), Some("Fine"));
        assert!(!resp.has_case());
        assert!(!resp.headers.contains_key("connection"));
        assert_eq!(resp.headers["x-request-id"], "id-2");
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
