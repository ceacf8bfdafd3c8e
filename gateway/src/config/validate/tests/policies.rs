//! `[policies.NAME]`.

use super::*;

bad!(
    policy_unknown_on_route,
    format!(
        "{OK_LISTENER}[policies.orders]\ndefault = \"allow\"\n{OK_ROUTE}policies = [\"ordres\"]\n"
    ),
    8,
    "unknown policy `ordres`"
);

bad!(
    policy_default,
    format!("{OK_LISTENER}[policies.p]\ndefault = \"maybe\"\n"),
    4,
    "unknown default"
);

bad!(
    policy_mode,
    format!("{OK_LISTENER}[policies.p]\nmode = \"loud\"\n"),
    4,
    "unknown mode"
);

bad!(
    policy_empty_rule,
    format!("{OK_LISTENER}[policies.p]\nallow = [{{}}]\n"),
    4,
    "a rule without conditions"
);

bad!(
    policy_identity_pattern,
    format!("{OK_LISTENER}[policies.p]\nallow = [{{ identity = \"spiffe://*/web\" }}]\n"),
    4,
    "is not an identity pattern"
);

bad!(
    policy_source,
    format!("{OK_LISTENER}[policies.p]\ndeny = [{{ source = [\"10.0.0.0/8\", \"nope\"] }}]\n"),
    4,
    "is not an IP network"
);

bad!(
    policy_rule_unknown_key,
    format!("{OK_LISTENER}[policies.p]\nallow = [{{ path = \"/x\" }}]\n"),
    4,
    "unknown key `path`"
);

bad!(
    policy_identity_type,
    format!("{OK_LISTENER}[policies.p]\nallow = [{{ identity = 3 }}]\n"),
    4,
    "must be a string or a non-empty list"
);

#[test]
fn policies_parse_with_lists_and_defaults() {
    let cfg = parse(
        Path::new("t.toml"),
        &format!("{OK_LISTENER}[policies.p]\nallow = [{{ identity = [\"spiffe://a/*\", \"*.mesh\"], methods = [\"get\"], path_prefix = \"/o/\", headers = {{ \"x-env\" = \"prod\" }} }}, {{ source = \"10.0.0.0/8\" }}]\ndeny = [{{ source = [\"10.9.0.0/16\", \"192.0.2.1\"] }}]\n{OK_ROUTE}policies = [\"p\"]\n"),
    )
    .unwrap();
    let p = &cfg.policies[0];
    assert!(!p.default_allow);
    assert_eq!(p.mode, model::LimitMode::Enforce);
    assert_eq!(p.allow.len(), 2);
    assert_eq!(p.allow[0].identity.len(), 2);
    assert_eq!(p.allow[0].methods, vec![http::Method::GET]);
    assert_eq!(p.deny[0].source.len(), 2);
    assert_eq!(cfg.routes[0].policies, vec!["p".to_string()]);
}

bad!(
    rule_path_prefix_not_normal,
    format!("{OK_LISTENER}[policies.p]\ndeny = [{{ path_prefix = \"/%61dmin\" }}]\n"),
    4,
    "is not in normal form"
);

bad!(
    rule_empty_headers,
    format!("{OK_LISTENER}[policies.p]\nallow = [{{ headers = {{}} }}]\n"),
    4,
    "a rule without conditions"
);

bad!(
    rule_on_identity_header,
    format!("{OK_LISTENER}[policies.p]\nallow = [{{ headers = {{ \"x-meshgate-peer-identity\" = \"a\" }} }}]\n"),
    4,
    "cannot test x-meshgate-peer-identity"
);
