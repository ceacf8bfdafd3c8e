//! Reading the document: its sections and entries, and serde's errors
//! rephrased in the config's own words.

use super::*;

const SECTIONS: &[&str] = &[
    "gateway",
    "admin",
    "telemetry",
    "listeners",
    "routes",
    "upstreams",
    "rate_limits",
    "redis",
    "certs",
    "policies",
    "egress",
    "resolver",
];

impl Validator {
    /// Replace `${VAR}` and `${VAR:-default}` in every string value with
    /// the environment's; an unset variable without a default is an error
    /// at the value. `$${` stands for a literal `${`.
    pub(super) fn substitute_env(&mut self, table: &mut DeTable<'_>) {
        for (_, value) in table.iter_mut() {
            self.substitute_value(value);
        }
    }

    fn substitute_value(&mut self, value: &mut Spanned<DeValue<'_>>) {
        let span = value.span();
        match value.get_mut() {
            DeValue::String(s) if s.contains('$') => {
                match expand_env(s, |name| std::env::var(name).ok()) {
                    Ok(out) => *s = std::borrow::Cow::Owned(out),
                    Err((message, fix)) => self.error(span, message, fix),
                }
            }
            DeValue::Array(items) => {
                for item in items.iter_mut() {
                    self.substitute_value(item);
                }
            }
            DeValue::Table(t) => self.substitute_env(t),
            _ => {}
        }
    }

    pub(super) fn read_sections(&mut self, root: &DeTable<'_>) -> RawFile {
        let mut raw = RawFile::default();
        for (key, value) in root {
            match key.get_ref().as_ref() {
                "gateway" => raw.gateway = self.de(value).unwrap_or_default(),
                "admin" => raw.admin = self.de(value).unwrap_or_default(),
                "telemetry" => raw.telemetry = self.de(value).unwrap_or_default(),
                "listeners" => raw.listeners = self.de_named(key, value),
                "routes" => raw.routes = self.de_named(key, value),
                "upstreams" => raw.upstreams = self.de_named(key, value),
                "rate_limits" => raw.rate_limits = self.de_named(key, value),
                "redis" => {
                    raw.redis_section = true;
                    raw.redis_at = key.span();
                    raw.redis = self.de(value);
                }
                "certs" => raw.certs = self.de_named(key, value),
                "policies" => raw.policies = self.de_named(key, value),
                "egress" => raw.egress = Some((key.span(), self.de(value))),
                "resolver" => raw.resolver = self.de(value),
                // Read by the loader, which put the files it names in this text.
                "include" => {}
                other => {
                    let fix = match suggest(other, SECTIONS) {
                        Some(s) => format!(
                            "did you mean [{s}]? Known sections: {}",
                            SECTIONS.join(", ")
                        ),
                        None => format!("remove it; known sections: {}", SECTIONS.join(", ")),
                    };
                    self.error(key.span(), format!("unknown section `{other}`"), fix);
                }
            }
        }
        raw
    }

    /// Deserialize one value, turning serde errors into diagnostics. An unknown
    /// key, or a key whose value has the wrong type, is reported, dropped, and
    /// the value tried again, so one mistake does not hide the table's other
    /// problems (or make references to it dangle).
    pub(super) fn de<T: DeserializeOwned>(&mut self, value: &Spanned<DeValue<'_>>) -> Option<T> {
        const MAX_DROPPED_KEYS: usize = 64;
        let mut owned = value.clone();
        owned.get_mut().make_owned();
        let mut dropped: Vec<String> = Vec::new();
        for _ in 0..MAX_DROPPED_KEYS {
            match T::deserialize(ValueDeserializer::from(owned.clone())) {
                Ok(t) => return Some(t),
                Err(e) => {
                    // A required key dropped for its type is reported already.
                    let missing = e
                        .message()
                        .strip_prefix("missing field `")
                        .map(|f| f.trim_end_matches('`'));
                    if missing.is_some_and(|f| dropped.iter().any(|d| d == f)) {
                        return None;
                    }
                    let span = e.span().unwrap_or(value.span());
                    let key = key_with_value_at(owned.get_ref(), &span);
                    let (message, fix) = explain_serde_error(e.message(), key.as_deref());
                    let unknown_key = message.starts_with("unknown key");
                    self.diags
                        .push(Diagnostic::new(span.clone(), message).fix(fix));
                    let retry = if unknown_key {
                        remove_key_at(owned.get_mut(), &span)
                    } else if missing.is_some() {
                        // Its span is the table missing the key: dropping
                        // that would check the rest as if it were absent.
                        false
                    } else {
                        match remove_key_with_value_at(owned.get_mut(), &span) {
                            Some(key) => {
                                dropped.push(key);
                                true
                            }
                            None => false,
                        }
                    };
                    if !retry {
                        return None;
                    }
                }
            }
        }
        None
    }

    /// A table of named entries (`[routes.NAME]`): each entry on its own, so one
    /// bad entry does not hide the problems of the others.
    pub(super) fn de_named<T: DeserializeOwned>(
        &mut self,
        section_key: &Spanned<std::borrow::Cow<'_, str>>,
        value: &Spanned<DeValue<'_>>,
    ) -> Vec<(Spanned<String>, T)> {
        let section = section_key.get_ref();
        let Some(table) = value.get_ref().as_table() else {
            self.error(
                value.span(),
                format!("`{section}` must be a table of named entries"),
                format!("write entries as [{section}.NAME]"),
            );
            return Vec::new();
        };
        let mut out = Vec::new();
        for (name, entry) in table {
            let name = spanned_key(name);
            self.entries
                .push((section.to_string(), name.get_ref().clone()));
            if !valid_name(name.get_ref()) {
                self.error(
                    name.span(),
                    format!("invalid name `{}` in [{section}]", name.get_ref()),
                    "use letters, digits, `_` and `-` only (it becomes a metric label)",
                );
            }
            if !entry.get_ref().is_table() {
                self.error(
                    entry.span(),
                    format!("[{section}.{}] must be a table", name.get_ref()),
                    format!(
                        "write it as a [{section}.{}] table with its keys below",
                        name.get_ref()
                    ),
                );
                continue;
            }
            if let Some(t) = self.de(entry) {
                out.push((name, t));
            }
        }
        out
    }
}

/// Remove the key whose span is `span`, searching nested tables.
pub(super) fn remove_key_at(value: &mut DeValue<'_>, span: &Range<usize>) -> bool {
    match value {
        DeValue::Table(t) => {
            if t.keys().any(|k| k.span() == *span) {
                *t = std::mem::take(t)
                    .into_iter()
                    .filter(|(k, _)| k.span() != *span)
                    .collect();
                return true;
            }
            t.iter_mut().any(|(_, v)| remove_key_at(v.get_mut(), span))
        }
        DeValue::Array(a) => a.iter_mut().any(|v| remove_key_at(v.get_mut(), span)),
        _ => false,
    }
}

/// The name of the key (at any depth of tables) whose value is at `span`.
pub(super) fn key_with_value_at(value: &DeValue<'_>, span: &Range<usize>) -> Option<String> {
    let DeValue::Table(t) = value else {
        return None;
    };
    t.iter().find_map(|(k, v)| {
        if v.span() == *span {
            Some(k.get_ref().to_string())
        } else {
            key_with_value_at(v.get_ref(), span)
        }
    })
}

/// Remove the key (at any depth of tables) whose value is at `span`; its
/// name. Values in arrays are left: without them the array could be wrong
/// in a new way.
pub(super) fn remove_key_with_value_at(
    value: &mut DeValue<'_>,
    span: &Range<usize>,
) -> Option<String> {
    let DeValue::Table(t) = value else {
        return None;
    };
    if let Some(key) = t
        .iter()
        .find(|(_, v)| v.span() == *span)
        .map(|(k, _)| k.get_ref().to_string())
    {
        *t = std::mem::take(t)
            .into_iter()
            .filter(|(_, v)| v.span() != *span)
            .collect();
        return Some(key);
    }
    t.iter_mut()
        .find_map(|(_, v)| remove_key_with_value_at(v.get_mut(), span))
}

/// Reword serde's messages for people editing a file, and suggest a fix.
pub(super) fn explain_serde_error(msg: &str, key: Option<&str>) -> (String, String) {
    let msg = msg.trim();
    if let Some(rest) = msg.strip_prefix("unknown field `") {
        if let Some((field, expected)) = rest.split_once("`, expected ") {
            let known: Vec<&str> = expected
                .trim_start_matches("one of ")
                .split(", ")
                .map(|s| s.trim_matches('`'))
                .collect();
            let fix = match suggest(field, &known) {
                Some(s) => format!("did you mean `{s}`?"),
                None => format!("remove it; allowed keys: {}", known.join(", ")),
            };
            return (format!("unknown key `{field}`"), fix);
        }
        if let Some((field, _)) = rest.split_once('`') {
            return (
                format!("unknown key `{field}`"),
                "remove it; this table takes no keys".to_string(),
            );
        }
    }
    if let Some(rest) = msg.strip_prefix("missing field `") {
        let field = rest.trim_end_matches('`');
        return (
            format!("missing required key `{field}`"),
            format!("add `{field} = ...`; see docs/config.md"),
        );
    }
    if let Some((found, expected)) = msg
        .strip_prefix("invalid type: ")
        .and_then(|rest| rest.split_once(", expected "))
    {
        return explain_type(key, found, expected);
    }
    (
        msg.to_string(),
        "see docs/config.md for this key".to_string(),
    )
}

/// "invalid type: integer `30`, expected a string" in the config's words:
/// what the key takes, what it got, and the line rewritten as it should be.
pub(super) fn explain_type(key: Option<&str>, found: &str, expected: &str) -> (String, String) {
    // serde writes the value it found as `integer `30``, `string "4"`,
    // `boolean `true``, or only the kind (`sequence`, `map`).
    let (kind, literal) = match found.split_once(' ') {
        Some((kind, lit)) => (kind, lit.trim_matches(|c| c == '`' || c == '"')),
        None => (found, ""),
    };
    let got = match kind {
        "integer" | "floating" => format!("the number {literal}"),
        "string" => format!("the string \"{literal}\""),
        "boolean" => format!("`{literal}`"),
        "sequence" => "a list".to_string(),
        "map" => "a table".to_string(),
        _ => found.to_string(),
    };
    let k = key.unwrap_or("this key");
    let (wanted, fix) = match expected {
        e if e.starts_with(crate::config::raw::EXPECTED_DURATION) => (
            "a duration with a unit, in quotes".to_string(),
            match kind {
                "integer" | "floating" => {
                    format!("write {k} = \"{literal}s\" (a duration needs a unit: ms, s, m or h)")
                }
                _ => format!("write a duration such as {k} = \"30s\" or \"500ms\""),
            },
        ),
        e if e.starts_with(crate::config::raw::EXPECTED_TOGGLE) => (
            "`false`, `true` or a table".to_string(),
            format!("write {k} = false to turn it off, or {k} = {{ ... }} with its settings (docs/config.md)"),
        ),
        "a string" => (
            "a string, in quotes".to_string(),
            if literal.is_empty() {
                format!("write {k} = \"...\"")
            } else {
                format!("put the value in quotes: {k} = \"{literal}\"")
            },
        ),
        "i64" | "i32" | "u64" | "u32" | "u16" | "u8" | "usize" => (
            "a whole number".to_string(),
            match literal.trim().parse::<i64>() {
                Ok(n) if kind == "string" => format!("write {k} = {n}, without quotes"),
                _ => format!("write a whole number without quotes, e.g. {k} = 4"),
            },
        ),
        "f64" | "f32" => (
            "a number".to_string(),
            format!("write a number without quotes, e.g. {k} = 0.5"),
        ),
        "a boolean" => (
            "true or false".to_string(),
            format!("write {k} = true or {k} = false, without quotes"),
        ),
        "a sequence" => (
            "a list".to_string(),
            if kind == "string" {
                format!("write it in brackets: {k} = [\"{literal}\"]")
            } else {
                format!("write a list in brackets, e.g. {k} = [\"a\", \"b\"]")
            },
        ),
        e if e.starts_with("struct ") || e == "a map" => (
            "a table".to_string(),
            format!("write {k} = {{ ... }} with the keys docs/config.md lists"),
        ),
        other => (
            other.to_string(),
            "see docs/config.md for this key".to_string(),
        ),
    };
    (format!("`{k}` must be {wanted}, not {got}"), fix)
}

/// `text` with `${NAME}` and `${NAME:-default}` replaced through `lookup`
/// (a default also stands in for an empty value, as in a shell), and `$${`
/// kept as `${`. An error with its fix otherwise.
pub(super) fn expand_env(
    text: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<String, (String, String)> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at..];
        if let Some(escaped) = after.strip_prefix("$${") {
            out.push_str("${");
            rest = escaped;
            continue;
        }
        let Some(inner) = after.strip_prefix("${") else {
            out.push('$');
            rest = &after[1..];
            continue;
        };
        let Some(end) = inner.find('}') else {
            return Err((
                format!("`{after}` has no closing `}}`"),
                "write ${NAME} or ${NAME:-default}; $${ for a literal ${".into(),
            ));
        };
        let reference = &inner[..end];
        let (name, default) = match reference.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (reference, None),
        };
        let valid = name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err((
                format!("`${{{reference}}}` does not name an environment variable"),
                "a name is letters, digits and _, not starting with a digit: ${REDIS_URL}".into(),
            ));
        }
        match (lookup(name).filter(|v| !v.is_empty()), default) {
            (Some(v), _) => out.push_str(&v),
            (None, Some(d)) => out.push_str(d),
            (None, None) => {
                return Err((
                    format!("environment variable {name} (in `${{{name}}}`) is not set"),
                    format!(
                        "set {name} for the process (systemd: Environment= or EnvironmentFile=; a container: -e), or give a default: ${{{name}:-...}}"
                    ),
                ))
            }
        }
        rest = &inner[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod env_tests {
    use super::expand_env;

    fn env(name: &str) -> Option<String> {
        match name {
            "NODE" => Some("edge-7".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn references_defaults_and_escapes() {
        assert_eq!(expand_env("gw-${NODE}", env).unwrap(), "gw-edge-7");
        assert_eq!(expand_env("${NODE}${NODE}", env).unwrap(), "edge-7edge-7");
        assert_eq!(
            expand_env("${NONE:-10.0.0.1:8080}", env).unwrap(),
            "10.0.0.1:8080"
        );
        assert_eq!(expand_env("${EMPTY:-x}", env).unwrap(), "x");
        assert_eq!(expand_env("${NODE:-x}", env).unwrap(), "edge-7");
        assert_eq!(
            expand_env("cost: $5, $${NODE}", env).unwrap(),
            "cost: $5, ${NODE}"
        );
        assert!(expand_env("${NONE}", env).unwrap_err().0.contains("NONE"));
        assert!(expand_env("${NODE", env).is_err());
        assert!(expand_env("${1X}", env).is_err());
        assert!(expand_env("${}", env).is_err());
    }
}
