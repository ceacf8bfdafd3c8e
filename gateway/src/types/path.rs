//! Request paths in the one form routing, authorization and upstreams see.

/// The path as routing, authorization and the upstream see it: percent-
/// encoded unreserved characters decoded (`%41` is `A`, `%2e` is `.`), dot
/// segments removed (RFC 3986 §5.2.4: `/a/./b/../c` is `/a/c`, nothing climbs
/// above `/`) and runs of `/` merged. These are the equivalences upstream
/// servers apply, so a rule on `/admin` cannot be walked around with
/// `/x/../admin`, `/%61dmin` or `//admin`. Encoded `/` (`%2F`) and other
/// reserved characters stay encoded. `None` when the path is already normal.
pub fn normalize_path(path: &str) -> Option<String> {
    let bytes = path.as_bytes();
    // `*` (OPTIONS *) and anything not a path are left alone.
    if !path.starts_with('/') {
        return None;
    }
    let suspicious = bytes.contains(&b'%') || path.contains("//") || path.contains("/.");
    if !suspicious {
        return None;
    }
    // Decode %XX only where XX is an unreserved character; bytes otherwise
    // kept as they are (only ASCII changes, so the result stays UTF-8).
    let mut out_bytes: Vec<u8> = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%'
            && i + 2 < bytes.len()
            && bytes[i + 1].is_ascii_hexdigit()
            && bytes[i + 2].is_ascii_hexdigit())
        .then(|| std::str::from_utf8(&bytes[i + 1..i + 3]).ok())
        .flatten()
        .and_then(|h| u8::from_str_radix(h, 16).ok());
        match escaped {
            Some(v) if v.is_ascii_alphanumeric() || matches!(v, b'-' | b'.' | b'_' | b'~') => {
                out_bytes.push(v);
                i += 3;
            }
            Some(v) => {
                // Reserved stays escaped, upper-case hex (RFC 3986 §6.2.2.1).
                out_bytes.extend_from_slice(format!("%{v:02X}").as_bytes());
                i += 3;
            }
            None => {
                out_bytes.push(bytes[i]);
                i += 1;
            }
        }
    }
    let decoded = String::from_utf8(out_bytes).unwrap_or_else(|_| path.to_string());
    // Remove dot segments and merge empty segments.
    let trailing = decoded.ends_with('/')
        || decoded.ends_with("/.")
        || decoded.ends_with("/..")
        || decoded == "."
        || decoded == "..";
    let mut out: Vec<&str> = Vec::new();
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let mut normal = String::with_capacity(decoded.len() + 1);
    for seg in &out {
        normal.push('/');
        normal.push_str(seg);
    }
    if normal.is_empty() || (trailing && !normal.ends_with('/')) {
        normal.push('/');
    }
    (normal != path).then_some(normal)
}
