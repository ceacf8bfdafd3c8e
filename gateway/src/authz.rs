//! Authorization: `[policies.NAME]` that routes list. A policy denies a
//! request when a `deny` rule matches it; otherwise allows it when an
//! `allow` rule matches; otherwise applies its `default`. A request must be
//! allowed by every policy of its route. Shadow policies count and log what
//! they would deny but never block. Evaluation is pure and unit-tested.

use std::net::IpAddr;

use http::{HeaderMap, Method};

use crate::config::model::{AuthzPolicy, AuthzRule, LimitMode};
use crate::telemetry::metrics::metrics;

/// What a rule can look at.
pub struct Subject<'a> {
    /// The client certificate's identity (mTLS listeners).
    pub identity: Option<&'a str>,
    /// The client's IP, behind `trusted_proxies` like rate limiting.
    pub source: Option<IpAddr>,
    pub method: &'a Method,
    pub path: &'a str,
    pub headers: &'a HeaderMap,
}

fn matches(rule: &AuthzRule, s: &Subject<'_>) -> bool {
    (rule.identity.is_empty()
        || s.identity
            .is_some_and(|id| rule.identity.iter().any(|p| p.matches(id))))
        && (rule.source.is_empty()
            || s.source
                .is_some_and(|ip| rule.source.iter().any(|net| net.contains(&ip))))
        && (rule.methods.is_empty() || rule.methods.contains(s.method))
        && rule
            .path_prefix
            .as_deref()
            .is_none_or(|p| s.path.starts_with(p))
        && rule
            .headers
            .iter()
            .all(|(name, value)| s.headers.get_all(name).iter().any(|v| v == value))
}

/// Whether `policy` allows the request (its mode aside).
pub fn allows(policy: &AuthzPolicy, s: &Subject<'_>) -> bool {
    if policy.deny.iter().any(|r| matches(r, s)) {
        return false;
    }
    policy.allow.iter().any(|r| matches(r, s)) || policy.default_allow
}

/// The outcome across a route's policies.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    /// The first enforcing policy that denied the request.
    pub denied: Option<String>,
    /// Shadow policies that would have denied it.
    pub shadow_denied: Vec<String>,
}

/// Check every policy (each counts its decision); all enforcing ones must allow.
pub fn check<'p>(policies: impl Iterator<Item = &'p AuthzPolicy>, s: &Subject<'_>) -> Verdict {
    let mut verdict = Verdict::default();
    for p in policies {
        let allowed = allows(p, s);
        let outcome = match (allowed, p.mode) {
            (true, _) => "allowed",
            (false, LimitMode::Enforce) => "denied",
            (false, LimitMode::Shadow) => "shadow_denied",
        };
        metrics()
            .authz_decisions
            .with_label_values(&[p.name.as_str(), outcome])
            .inc();
        match (allowed, p.mode) {
            (false, LimitMode::Enforce) if verdict.denied.is_none() => {
                verdict.denied = Some(p.name.clone())
            }
            (false, LimitMode::Shadow) => verdict.shadow_denied.push(p.name.clone()),
            _ => {}
        }
    }
    verdict
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::identity::IdentityPattern;

    fn rule() -> AuthzRule {
        AuthzRule::default()
    }

    fn policy(allow: Vec<AuthzRule>, deny: Vec<AuthzRule>, default_allow: bool) -> AuthzPolicy {
        AuthzPolicy {
            name: "p".into(),
            allow,
            deny,
            default_allow,
            mode: LimitMode::Enforce,
        }
    }

    struct Req {
        identity: Option<&'static str>,
        source: &'static str,
        method: Method,
        path: &'static str,
        headers: HeaderMap,
    }

    impl Req {
        fn new(identity: Option<&'static str>, method: Method, path: &'static str) -> Self {
            Req {
                identity,
                source: "10.1.2.3",
                method,
                path,
                headers: HeaderMap::new(),
            }
        }
        fn subject(&self) -> Subject<'_> {
            Subject {
                identity: self.identity,
                source: self.source.parse().ok(),
                method: &self.method,
                path: self.path,
                headers: &self.headers,
            }
        }
    }

    const WEB: &str = "spiffe://prod.example/ns/web/sa/frontend";

    fn orders_internal() -> AuthzPolicy {
        let web = AuthzRule {
            identity: vec![IdentityPattern::parse("spiffe://prod.example/ns/web/*").unwrap()],
            methods: vec![Method::GET, Method::POST],
            path_prefix: Some("/orders/".into()),
            ..rule()
        };
        let health = AuthzRule {
            source: vec!["10.0.0.0/8".parse().unwrap()],
            path_prefix: Some("/healthz".into()),
            ..rule()
        };
        policy(vec![web, health], vec![], false)
    }

    #[test]
    fn allow_rules_need_every_condition() {
        let p = orders_internal();
        let ok = |r: Req| allows(&p, &r.subject());
        assert!(ok(Req::new(Some(WEB), Method::GET, "/orders/7")));
        assert!(ok(Req::new(Some(WEB), Method::POST, "/orders/")));
        assert!(!ok(Req::new(Some(WEB), Method::DELETE, "/orders/7")));
        assert!(!ok(Req::new(Some(WEB), Method::GET, "/admin")));
        assert!(!ok(Req::new(
            Some("spiffe://prod.example/ns/batch/sa/x"),
            Method::GET,
            "/orders/7"
        )));
        assert!(!ok(Req::new(None, Method::GET, "/orders/7")));
        // The health rule: by source, no identity needed.
        assert!(ok(Req::new(None, Method::GET, "/healthz")));
        let mut outside = Req::new(None, Method::GET, "/healthz");
        outside.source = "192.0.2.1";
        assert!(!ok(outside));
    }

    #[test]
    fn deny_wins_over_allow_and_default_applies_last() {
        let block_admin = AuthzRule {
            path_prefix: Some("/orders/admin".into()),
            ..rule()
        };
        let mut p = orders_internal();
        p.deny = vec![block_admin];
        assert!(!allows(
            &p,
            &Req::new(Some(WEB), Method::GET, "/orders/admin/x").subject()
        ));
        assert!(allows(
            &p,
            &Req::new(Some(WEB), Method::GET, "/orders/1").subject()
        ));

        let open = policy(vec![], vec![], true);
        assert!(allows(&open, &Req::new(None, Method::GET, "/").subject()));
        let closed = policy(vec![], vec![], false);
        assert!(!allows(
            &closed,
            &Req::new(None, Method::GET, "/").subject()
        ));
    }

    #[test]
    fn header_conditions_match_any_value_exactly() {
        let p = policy(
            vec![AuthzRule {
                headers: vec![(
                    http::HeaderName::from_static("x-env"),
                    http::HeaderValue::from_static("prod"),
                )],
                ..rule()
            }],
            vec![],
            false,
        );
        let mut r = Req::new(None, Method::GET, "/");
        assert!(!allows(&p, &r.subject()));
        r.headers.append("x-env", "staging".parse().unwrap());
        assert!(!allows(&p, &r.subject()));
        r.headers.append("x-env", "prod".parse().unwrap());
        assert!(allows(&p, &r.subject()));
    }

    #[test]
    fn every_enforcing_policy_must_allow_and_shadow_never_blocks() {
        let closed = policy(vec![], vec![], false);
        let mut shadow = closed.clone();
        shadow.name = "trial".into();
        shadow.mode = LimitMode::Shadow;
        let open = AuthzPolicy {
            name: "open".into(),
            ..policy(vec![], vec![], true)
        };
        let r = Req::new(None, Method::GET, "/");
        let v = check([&open, &shadow].into_iter(), &r.subject());
        assert_eq!(v.denied, None);
        assert_eq!(v.shadow_denied, vec!["trial".to_string()]);
        let v = check([&open, &closed, &shadow].into_iter(), &r.subject());
        assert_eq!(v.denied.as_deref(), Some("p"));
    }
}
