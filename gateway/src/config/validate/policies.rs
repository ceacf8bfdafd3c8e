//! `[policies.NAME]`: authorization rules.

use super::*;

impl Validator {
    /// `"10.0.0.0/8"`, or a bare address meaning just that host.
    pub(super) fn cidr(&mut self, c: &Spanned<String>) -> Option<ipnet::IpNet> {
        let s = c.get_ref().trim();
        match s
            .parse::<ipnet::IpNet>()
            .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        {
            Ok(net) => Some(net),
            Err(_) => {
                self.error(
                    c.span(),
                    format!("\"{s}\" is not an IP network"),
                    "write a CIDR such as \"10.0.0.0/8\" or \"2001:db8::/32\", or a single address",
                );
                None
            }
        }
    }

    /// A string or a list of strings, each with its span.
    pub(super) fn string_or_list(
        &mut self,
        v: &Spanned<toml::Value>,
        what: &str,
    ) -> Vec<Spanned<String>> {
        match v.get_ref() {
            toml::Value::String(s) => vec![Spanned::new(v.span(), s.clone())],
            toml::Value::Array(items) if !items.is_empty() && items.iter().all(|i| i.is_str()) => {
                items
                    .iter()
                    .filter_map(|i| i.as_str())
                    .map(|s| Spanned::new(v.span(), s.to_string()))
                    .collect()
            }
            _ => {
                self.error(
                    v.span(),
                    format!("`{what}` must be a string or a non-empty list of strings"),
                    format!("write {what} = \"...\" or {what} = [\"...\", \"...\"]"),
                );
                Vec::new()
            }
        }
    }

    pub(super) fn rule(&mut self, r: &Spanned<RawRule>) -> Option<AuthzRule> {
        let before = self.diags.len();
        let raw = r.get_ref();
        let mut rule = AuthzRule::default();
        if let Some(v) = &raw.identity {
            for s in self.string_or_list(v, "identity") {
                match crate::types::identity::IdentityPattern::parse(s.get_ref()) {
                    Some(p) => rule.identity.push(p),
                    None => self.error(
                        s.span(),
                        format!("identity \"{}\" is not an identity pattern", s.get_ref()),
                        "write a SPIFFE ID or DNS name, exact or with a trailing `*` (\"spiffe://prod.example/ns/web/*\") or a leading `*.`",
                    ),
                }
            }
        }
        if let Some(v) = &raw.source {
            for s in self.string_or_list(v, "source") {
                if let Some(net) = self.cidr(&s) {
                    rule.source.push(net);
                }
            }
        }
        if let Some(ms) = &raw.methods {
            rule.methods = self.method_list(ms);
        }
        if let Some(p) = &raw.path_prefix {
            if self.abs_path(p, "path_prefix") {
                rule.path_prefix = Some(p.get_ref().clone());
            }
        }
        if let Some(hs) = &raw.headers {
            for (k, v) in hs.get_ref() {
                if k.get_ref().eq_ignore_ascii_case("x-meshgate-peer-identity") {
                    self.error(
                        k.span(),
                        "a rule cannot test x-meshgate-peer-identity: in a request it is whatever the client sent",
                        "use identity = \"...\" to match the verified client certificate",
                    );
                    continue;
                }
                if let Some(pair) = self.header_pair(k, v) {
                    rule.headers.push(pair);
                }
            }
        }
        if raw.identity.is_none()
            && raw.source.is_none()
            && raw.methods.is_none()
            && raw.path_prefix.is_none()
            && raw.headers.as_ref().is_none_or(|h| h.get_ref().is_empty())
        {
            self.error(
                r.span(),
                "a rule without conditions matches every request",
                "give it identity, source, methods, path_prefix or headers; to allow everything use default = \"allow\"",
            );
        }
        (self.diags.len() == before).then_some(rule)
    }
}
