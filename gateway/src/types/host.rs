//! Host names and host patterns, as the config writes them and requests
//! carry them.

use std::fmt;

/// A host pattern in `[egress.allow] hosts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    Exact(String),
    /// `*.example.com`: exactly one more label, as in certificate wildcards.
    /// Stored with its leading dot.
    OneLabel(String),
    /// `**.example.com`: one or more labels. Stored with its leading dot.
    AnyDepth(String),
}

impl HostPattern {
    /// The pattern, or why it is not one.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim().to_ascii_lowercase();
        let s = s.strip_suffix('.').unwrap_or(&s);
        // None: exact; Some(false): `*.`; Some(true): `**.`.
        let (wild, rest) = if let Some(rest) = s.strip_prefix("**.") {
            (Some(true), rest)
        } else if let Some(rest) = s.strip_prefix("*.") {
            (Some(false), rest)
        } else {
            (None, s)
        };
        if rest.contains('*') {
            return Err("`*` may only open a pattern, as `*.` or `**.`".into());
        }
        if rest.parse::<std::net::IpAddr>().is_ok() {
            return Err(
                "an IP address cannot be verified by name; list the host name and pin it with [egress] resolve"
                    .into(),
            );
        }
        check_dns_name(rest)?;
        let Some(any_depth) = wild else {
            return Ok(HostPattern::Exact(rest.to_string()));
        };
        if !rest.contains('.') {
            return Err(format!(
                "a wildcard over a top-level domain (`*.{rest}`) allows too much"
            ));
        }
        let suffix = format!(".{rest}");
        Ok(if any_depth {
            HostPattern::AnyDepth(suffix)
        } else {
            HostPattern::OneLabel(suffix)
        })
    }

    /// Whether `host` (already [`normalize_dns_host`]d) matches.
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Exact(e) => host == e,
            HostPattern::OneLabel(suffix) => host
                .strip_suffix(suffix.as_str())
                .is_some_and(|label| !label.is_empty() && !label.contains('.')),
            HostPattern::AnyDepth(suffix) => host
                .strip_suffix(suffix.as_str())
                .is_some_and(|labels| !labels.is_empty() && !labels.ends_with('.')),
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Exact(e) => f.write_str(e),
            HostPattern::OneLabel(s) => write!(f, "*{s}"),
            HostPattern::AnyDepth(s) => write!(f, "**{s}"),
        }
    }
}

/// A DNS name meshgate will look up and verify: letters, digits, `-` and `_`
/// in labels of 1 to 63 bytes, at most 253 bytes, and a last label that is not
/// a number (resolvers read `2130706433`, `127.1` or `0x7f.0x1` as addresses).
pub fn check_dns_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the host name is empty".into());
    }
    if name.len() > 253 {
        return Err("the host name is longer than 253 bytes".into());
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(format!("`{name}` has an empty or over-long label"));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(format!(
                "`{name}` has characters a host name cannot have (letters, digits, `-`, `_` and dots only)"
            ));
        }
    }
    let last = name.rsplit('.').next().unwrap_or(name);
    let hex = last
        .strip_prefix("0x")
        .is_some_and(|h| h.bytes().all(|b| b.is_ascii_hexdigit()));
    if hex || last.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("`{name}` reads as a numeric address, not a name"));
    }
    Ok(())
}

/// Why a host is not a DNS name meshgate will look up and verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotAName {
    /// An IP address (or a bracketed IPv6 literal).
    IpLiteral,
    /// Not a host name (bad characters, empty or over-long labels, numeric).
    Malformed,
}

/// A host as name checks compare it: ASCII lower case, one trailing dot
/// removed, a plain DNS name (no IP literal, no user info, no escapes).
pub fn normalize_dns_host(raw: &str) -> Result<String, NotAName> {
    let host = raw.strip_suffix('.').unwrap_or(raw).to_ascii_lowercase();
    let bracketed = host.starts_with('[');
    if bracketed || host.parse::<std::net::IpAddr>().is_ok() {
        return Err(NotAName::IpLiteral);
    }
    check_dns_name(&host).map_err(|_| NotAName::Malformed)?;
    Ok(host)
}
