//! The admission stage: whether a request head may be served at all, by
//! its listener's limits and by the rules of HTTP a gateway must hold to
//! (what meshgate decides on must be what the upstream is sent). Plain
//! functions over the head, tested on their own below; the driver answers
//! the refusal.

use http::header;
use pingora::http::RequestHeader;

use super::ctx::Failure;
use crate::config::model::ListenerLimits;

/// Why a head is refused: the failure answered, and the
/// `meshgate_downstream_rejected_total` reason it counts as, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    pub failure: Failure,
    pub reason: Option<&'static str>,
}

/// Admit `req` under `limits`, or say why not: first the listener's limits,
/// then the target and authority's form, then (HTTP/1.1) a `Host`.
pub fn admit(req: &RequestHeader, limits: &ListenerLimits) -> Result<(), Refused> {
    if let Some((failure, reason)) = over_limits(req, limits) {
        return Err(Refused {
            failure,
            reason: Some(reason),
        });
    }
    let bad = Refused {
        failure: Failure::BadRequest,
        reason: None,
    };
    if !target_is_usable(req) || !method_and_host_are_plain(req) {
        return Err(bad);
    }
    // RFC 9112 §3.2: an HTTP/1.1 request without Host is refused.
    if req.version == http::Version::HTTP_11 && request_host(req).is_none() {
        return Err(bad);
    }
    Ok(())
}

/// The first listener limit the request head breaks, with its metric reason.
pub(super) fn over_limits(
    req: &RequestHeader,
    limits: &ListenerLimits,
) -> Option<(Failure, &'static str)> {
    // As sent: the parsed URI can be shorter (absolute forms).
    let uri_len = req
        .raw_path()
        .len()
        .max(req.uri.path_and_query().map_or(0, |p| p.as_str().len()));
    if uri_len > limits.max_uri_bytes {
        return Some((Failure::UriTooLong, "uri_length"));
    }
    if req.headers.len() > limits.max_request_headers {
        return Some((Failure::HeadersTooLarge, "header_count"));
    }
    // As on the wire: "name: value\r\n" per field, plus the request line.
    let bytes = req.method.as_str().len()
        + uri_len
        + 12
        + req
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 4)
            .sum::<usize>();
    if bytes > limits.max_request_header_bytes {
        return Some((Failure::HeadersTooLarge, "header_bytes"));
    }
    None
}

/// Whether meshgate may route this request target: what it decides on
/// (`uri`) must be exactly what the upstream would be sent (the raw target).
/// Origin-form (`/path`), the absolute form of http/https and `*` for
/// OPTIONS qualify; other forms (`x:/admin`, `admin/x`) or targets the URI
/// parser could only read lossily would reach the upstream as sent while
/// meshgate saw `/`. Paths with `\` or `..;`/`.;` segments (read as `/` or
/// `..` by some servers) are refused too.
pub(super) fn target_is_usable(req: &RequestHeader) -> bool {
    let raw = req.raw_path();
    let consistent = if req.version == http::Version::HTTP_2 {
        // :path is checked by the HTTP/2 layer and has no other form.
        true
    } else if !req.raw_path_is_utf8() {
        false
    } else if raw.starts_with(b"/") {
        req.uri.path_and_query().map(|p| p.as_str().as_bytes()) == Some(raw)
    } else if raw == b"*" {
        req.method == http::Method::OPTIONS
    } else if raw.starts_with(b"http://") || raw.starts_with(b"https://") {
        http::Uri::try_from(raw).is_ok_and(|u| u.path_and_query() == req.uri.path_and_query())
    } else {
        false
    };
    let path = req.uri.path();
    consistent && !path.contains('\\') && !has_dot_segment_with_params(path)
}

/// Whether `path` has a `.;…` or `..;…` segment, which some servers read
/// as `.` or `..` (refused, whichever driver reads the request).
pub(crate) fn has_dot_segment_with_params(path: &str) -> bool {
    path.contains(';')
        && path
            .split('/')
            .any(|seg| seg.contains(';') && matches!(seg.split(';').next(), Some("." | "..")))
}

/// Methods are case-sensitive (RFC 9110 §9.1), but common frameworks
/// (Flask, Django) upper-case what they get, so `delete` would pass a policy
/// on `DELETE` and still delete: a method with lower-case letters is refused,
/// as NGINX does. The authority must be one host and port (RFC 3986 §3.2.2)
/// in one `Host` line (RFC 9112 §3.2): quotes, spaces, slashes, user info or
/// a second line would reach the upstream's `Host`-based logic and
/// `X-Forwarded-Host` differently from what meshgate routed on.
pub(super) fn method_and_host_are_plain(req: &RequestHeader) -> bool {
    if req.method.as_str().bytes().any(|b| b.is_ascii_lowercase()) {
        return false;
    }
    let mut hosts = req.headers.get_all(header::HOST).iter();
    let (first, second) = (hosts.next(), hosts.next());
    if second.is_some() || first.is_some_and(|h| !is_host_and_port(h.as_bytes())) {
        return false;
    }
    req.uri
        .authority()
        .is_none_or(|a| is_host_and_port(a.as_str().as_bytes()))
}

/// A `close` in a second or later `Connection` line: Pingora reads the
/// first line only, but the lines are one list (RFC 9110 §5.3), and a
/// client that sent `close` must not have a later pipelined request served.
pub(super) fn asks_to_close(req: &RequestHeader) -> bool {
    let mut lines = req.headers.get_all(header::CONNECTION).iter();
    lines.next();
    lines.any(|line| {
        line.as_bytes()
            .split(|&b| b == b',')
            .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"close"))
    })
}

/// `host [ ":" port ]`: an IP literal in brackets, or a reg-name (an IPv4
/// address is one) without `,` (no DNS name has one, and `X-Forwarded-Host`
/// readers split on it); the port all digits.
pub(crate) fn is_host_and_port(b: &[u8]) -> bool {
    let (host, port) = if b.first() == Some(&b'[') {
        match b.iter().position(|&c| c == b']') {
            Some(end) => b.split_at(end + 1),
            None => return false,
        }
    } else {
        match b.iter().rposition(|&c| c == b':') {
            Some(colon) => b.split_at(colon),
            None => (b, &b[b.len()..]),
        }
    };
    let port_ok = match port.split_first() {
        None => true,
        Some((b':', digits)) => digits.iter().all(u8::is_ascii_digit),
        Some(_) => false,
    };
    let host_ok = match host {
        [b'[', inner @ .., b']'] => {
            !inner.is_empty()
                && inner.iter().all(|&c| {
                    c.is_ascii_alphanumeric()
                        || matches!(c, b':' | b'.' | b'%' | b'-' | b'_' | b'~')
                })
        }
        reg_name => reg_name.iter().all(|&c| {
            c.is_ascii_alphanumeric()
                || matches!(
                    c,
                    // unreserved, sub-delims but `,`, pct-encoded
                    b'-' | b'.'
                        | b'_'
                        | b'~'
                        | b'!'
                        | b'$'
                        | b'&'
                        | b'\''
                        | b'('
                        | b')'
                        | b'*'
                        | b'+'
                        | b';'
                        | b'='
                        | b'%'
                )
        }),
    };
    port_ok && host_ok
}

/// The request's authority as sent: `:authority` (HTTP/2, absolute-form) or
/// `Host`, port included.
pub(crate) fn request_host(req: &RequestHeader) -> Option<&str> {
    req.uri
        .authority()
        .map(|a| a.as_str())
        .or_else(|| req.headers.get(header::HOST).and_then(|h| h.to_str().ok()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: ListenerLimits = ListenerLimits {
        max_connections: None,
        max_request_header_bytes: 300,
        max_request_headers: 4,
        max_uri_bytes: 40,
        idle_timeout: std::time::Duration::from_secs(60),
        header_read_timeout: None,
        handshake_timeout: std::time::Duration::from_secs(10),
        max_requests_per_connection: 1000,
        body_read_timeout: std::time::Duration::from_secs(30),
    };

    fn head(
        method: &str,
        target: &str,
        version: http::Version,
        headers: &[(&str, &str)],
    ) -> RequestHeader {
        let mut req = RequestHeader::build(method, target.as_bytes(), None).unwrap();
        req.set_version(version);
        for (k, v) in headers {
            req.append_header(k.to_string(), *v).unwrap();
        }
        req
    }

    #[test]
    fn heads_are_admitted_or_refused_with_the_right_failure() {
        use http::Version;
        let ok: Result<(), Failure> = Ok(());
        let bad = Err(Failure::BadRequest);
        let host: &[(&str, &str)] = &[("host", "api.example")];
        let long_path = format!("/{}", "a".repeat(50));
        let big = "v".repeat(300);
        let cases: Vec<(&str, RequestHeader, Result<(), Failure>)> = vec![
            ("plain", head("GET", "/x", Version::HTTP_11, host), ok),
            (
                "HTTP/1.1 without Host",
                head("GET", "/x", Version::HTTP_11, &[]),
                bad,
            ),
            (
                "HTTP/1.0 without Host",
                head("GET", "/x", Version::HTTP_10, &[]),
                ok,
            ),
            (
                "lower-case method",
                head("get", "/x", Version::HTTP_11, host),
                bad,
            ),
            (
                "two Host lines",
                head(
                    "GET",
                    "/x",
                    Version::HTTP_11,
                    &[("host", "a"), ("host", "b")],
                ),
                bad,
            ),
            (
                "Host with a space",
                head("GET", "/x", Version::HTTP_11, &[("host", "a b")]),
                bad,
            ),
            (
                "Host with a comma",
                head("GET", "/x", Version::HTTP_11, &[("host", "a,b")]),
                bad,
            ),
            (
                "Host with user info",
                head("GET", "/x", Version::HTTP_11, &[("host", "u@a")]),
                bad,
            ),
            (
                "Host and port",
                head("GET", "/x", Version::HTTP_11, &[("host", "a:8080")]),
                ok,
            ),
            (
                "IPv6 Host",
                head("GET", "/x", Version::HTTP_11, &[("host", "[::1]:80")]),
                ok,
            ),
            (
                "a backslash",
                head("GET", "/a\\b", Version::HTTP_11, host),
                bad,
            ),
            (
                "a `..;` segment",
                head("GET", "/..;/admin", Version::HTTP_11, host),
                bad,
            ),
            (
                "`*` for OPTIONS",
                head("OPTIONS", "*", Version::HTTP_11, host),
                ok,
            ),
            ("`*` for GET", head("GET", "*", Version::HTTP_11, host), bad),
            (
                "absolute form",
                head("GET", "http://api.example/x", Version::HTTP_11, host),
                ok,
            ),
            (
                "relative target",
                head("GET", "x/y", Version::HTTP_11, host),
                bad,
            ),
            (
                "URI over the limit",
                head("GET", &long_path, Version::HTTP_11, host),
                Err(Failure::UriTooLong),
            ),
            (
                "too many fields",
                head(
                    "GET",
                    "/x",
                    Version::HTTP_11,
                    &[
                        ("host", "a"),
                        ("a", "1"),
                        ("b", "2"),
                        ("c", "3"),
                        ("d", "4"),
                    ],
                ),
                Err(Failure::HeadersTooLarge),
            ),
            (
                "too many bytes",
                head(
                    "GET",
                    "/x",
                    Version::HTTP_11,
                    &[("host", "a"), ("big", &big)],
                ),
                Err(Failure::HeadersTooLarge),
            ),
        ];
        for (what, req, want) in cases {
            let got = admit(&req, &LIMITS).map_err(|r| r.failure);
            assert_eq!(got, want, "{what}");
        }
    }

    #[test]
    fn limit_refusals_name_their_metric_reason() {
        use http::Version;
        let long_path = format!("/{}", "a".repeat(50));
        let req = head("GET", &long_path, Version::HTTP_11, &[("host", "a")]);
        assert_eq!(admit(&req, &LIMITS).unwrap_err().reason, Some("uri_length"));
        let req = head(
            "GET",
            "/",
            Version::HTTP_11,
            &[
                ("host", "a"),
                ("a", "1"),
                ("b", "2"),
                ("c", "3"),
                ("d", "4"),
            ],
        );
        assert_eq!(
            admit(&req, &LIMITS).unwrap_err().reason,
            Some("header_count")
        );
        let req = head("GET", "/", Version::HTTP_11, &[]);
        assert_eq!(admit(&req, &LIMITS).unwrap_err().reason, None);
    }

    #[test]
    fn a_close_in_any_connection_line_is_seen() {
        let first = head(
            "GET",
            "/",
            http::Version::HTTP_11,
            &[("connection", "keep-alive")],
        );
        assert!(!asks_to_close(&first), "only later lines are this check's");
        let later = head(
            "GET",
            "/",
            http::Version::HTTP_11,
            &[("connection", "keep-alive"), ("connection", "foo, Close")],
        );
        assert!(asks_to_close(&later));
    }
}
