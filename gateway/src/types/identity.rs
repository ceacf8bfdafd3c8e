//! Identity patterns: what a peer's certificate must say it is.

/// An identity pattern: exact, `prefix*` (`spiffe://prod.example/ns/web/*`),
/// or `*.suffix` (one DNS label: `*.mesh.example`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentityPattern {
    Exact(String),
    Prefix(String),
    /// Stored with its leading dot: `.mesh.example`.
    DnsWildcard(String),
}

impl IdentityPattern {
    /// `None` for a pattern with `*` anywhere but the end or a leading `*.`.
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim();
        if s.is_empty() || s == "*" {
            return None;
        }
        if let Some(rest) = s.strip_prefix("*.") {
            if rest.is_empty() || rest.contains('*') {
                return None;
            }
            return Some(IdentityPattern::DnsWildcard(format!(
                ".{}",
                rest.to_ascii_lowercase()
            )));
        }
        match s.strip_suffix('*') {
            Some(prefix) if !prefix.contains('*') => Some(IdentityPattern::Prefix(prefix.into())),
            Some(_) => None,
            None if s.contains('*') => None,
            None => Some(IdentityPattern::Exact(s.to_string())),
        }
    }

    pub fn matches(&self, identity: &str) -> bool {
        match self {
            IdentityPattern::Exact(e) => {
                identity == e || (is_dns_like(e) && identity.eq_ignore_ascii_case(e))
            }
            IdentityPattern::Prefix(p) => identity.starts_with(p.as_str()),
            IdentityPattern::DnsWildcard(suffix) => {
                // DNS names only: not `spiffe://x.mesh.example`.
                if !is_dns_like(identity) || identity.contains(':') {
                    return false;
                }
                let id = identity.to_ascii_lowercase();
                id.strip_suffix(suffix.as_str())
                    .is_some_and(|label| !label.is_empty() && !label.contains('.'))
            }
        }
    }

    pub fn as_text(&self) -> String {
        match self {
            IdentityPattern::Exact(e) => e.clone(),
            IdentityPattern::Prefix(p) => format!("{p}*"),
            IdentityPattern::DnsWildcard(s) => format!("*{s}"),
        }
    }
}

/// DNS names compare case-insensitively; URIs (SPIFFE IDs) do not.
fn is_dns_like(s: &str) -> bool {
    !s.contains("://")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_patterns() {
        let p = IdentityPattern::parse("spiffe://prod.example/ns/web/*").unwrap();
        assert!(p.matches("spiffe://prod.example/ns/web/sa/frontend"));
        assert!(!p.matches("spiffe://prod.example/ns/webhooks/sa/x"));
        assert!(!p.matches("spiffe://other.example/ns/web/sa/frontend"));

        let e = IdentityPattern::parse("spiffe://prod.example/ns/orders/sa/api").unwrap();
        assert!(e.matches("spiffe://prod.example/ns/orders/sa/api"));
        assert!(!e.matches("spiffe://prod.example/ns/orders/sa/api2"));
        assert!(!e.matches("SPIFFE://prod.example/ns/orders/sa/api"));

        let d = IdentityPattern::parse("*.mesh.example").unwrap();
        assert!(!d.matches("spiffe://x.mesh.example"));
        assert!(!d.matches("urn:evil.mesh.example"));
        assert!(d.matches("orders.mesh.example"));
        assert!(d.matches("Orders.Mesh.Example"));
        assert!(!d.matches("a.b.mesh.example"));
        assert!(!d.matches("mesh.example"));

        let n = IdentityPattern::parse("orders.mesh").unwrap();
        assert!(n.matches("ORDERS.mesh"));

        for bad in ["", "*", "a*b", "*.", "*.a*", "spiffe://*/x"] {
            assert_eq!(IdentityPattern::parse(bad), None, "{bad}");
        }
    }
}
