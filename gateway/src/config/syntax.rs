//! TOML syntax errors in the config's words. The parser reports a table
//! written twice as "duplicate key", once for its header and once for each
//! key under it; a person needs one error naming the table and where it
//! was first defined.

use std::ops::Range;

use super::error::{line_col, Diagnostic};

/// A `[table]` or `[[array]]` header line.
struct Header {
    /// Where the line starts and where the table's keys end (the next header).
    body: Range<usize>,
    /// The dotted name, quotes and spaces removed: `routes.api`.
    path: String,
    array: bool,
}

/// One diagnostic per problem: `(span, parser message)` pairs in, in order.
pub fn diagnostics(src: &str, errors: Vec<(Option<Range<usize>>, String)>) -> Vec<Diagnostic> {
    let headers = headers(src);
    let mut out = Vec::new();
    // Bodies of tables already reported as duplicates: the parser's
    // "duplicate key" for each of their keys adds nothing.
    let mut reported: Vec<Range<usize>> = Vec::new();
    for (span, message) in errors {
        let message = message.trim();
        let at = span.as_ref().map_or(0, |s| s.start);
        if message == "duplicate key" {
            if reported.iter().any(|r| r.contains(&at)) {
                continue;
            }
            if let Some(d) = duplicate(src, &headers, span.clone(), &mut reported) {
                out.push(d);
                continue;
            }
        }
        out.push(
            Diagnostic::new(span, format!("TOML syntax: {message}"))
                .fix("fix the TOML syntax at this place (https://toml.io)"),
        );
    }
    out
}

/// The diagnostic for a "duplicate key" at `span`: a table defined twice,
/// or a key set twice in one table.
fn duplicate(
    src: &str,
    headers: &[Header],
    span: Option<Range<usize>>,
    reported: &mut Vec<Range<usize>>,
) -> Option<Diagnostic> {
    let at = span.as_ref()?.start;
    let current = headers.iter().rposition(|h| h.body.start <= at);
    let line_of = |offset: usize| line_col(src, offset).0;
    // The span points into a header line: the whole table is the duplicate.
    if let Some(h) = current.map(|i| &headers[i]) {
        let header_line_end = src[h.body.start..]
            .find('\n')
            .map_or(src.len(), |n| h.body.start + n);
        if at < header_line_end && !h.array {
            let first = headers
                .iter()
                .find(|o| o.path == h.path && !o.array && o.body.start < h.body.start)?;
            reported.push(h.body.clone());
            // At the header, not the name inside it the parser points at.
            let header = h.body.start + (header_line_end - h.body.start)
                - src[h.body.start..header_line_end].trim_start().len();
            return Some(
                Diagnostic::new(
                    header..header_line_end,
                    format!(
                        "table [{}] is defined twice (first at line {})",
                        h.path,
                        line_of(first.body.start)
                    ),
                )
                .fix(format!(
                    "a table may be written once: merge the two [{}] tables, or rename one of them",
                    h.path
                )),
            );
        }
    }
    // A key set twice in one table: find its first line there.
    let key: String = src[at..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '"' | '\''))
        .collect();
    let key = key.trim_matches(|c| c == '"' || c == '\'');
    if key.is_empty() {
        return None;
    }
    let (table, body_start) = match current.map(|i| &headers[i]) {
        Some(h) => (format!("[{}]", h.path), h.body.start),
        None => ("the top level".to_string(), 0),
    };
    let first = (body_start == 0)
        .then_some(0)
        .into_iter()
        .chain(
            src[body_start..at]
                .match_indices('\n')
                .map(|(n, _)| body_start + n + 1),
        )
        .find(|&line| {
            let rest = src[line..].trim_start();
            rest.strip_prefix(key)
                .or_else(|| {
                    rest.strip_prefix('"')
                        .and_then(|r| r.strip_prefix(key))
                        .and_then(|r| r.strip_prefix('"'))
                })
                .is_some_and(|r| r.trim_start().starts_with('='))
        });
    let message = match first {
        Some(line) => format!(
            "`{key}` is set twice in {table} (first at line {})",
            line_of(line)
        ),
        None => format!("`{key}` is set twice in {table}"),
    };
    Some(Diagnostic::new(span, message).fix(format!("keep one `{key} = ...` line")))
}

/// Every table header in `src`, in order.
fn headers(src: &str) -> Vec<Header> {
    let mut out: Vec<Header> = Vec::new();
    let mut offset = 0;
    for line in src.split_inclusive('\n') {
        let start = offset;
        offset += line.len();
        let text = line.trim_start();
        let (array, inner) = if let Some(rest) = text.strip_prefix("[[") {
            (true, rest.split("]]").next())
        } else if let Some(rest) = text.strip_prefix('[') {
            (false, rest.split(']').next())
        } else {
            continue;
        };
        let Some(inner) = inner else { continue };
        let path = inner
            .split('.')
            .map(|part| part.trim().trim_matches(|c| c == '"' || c == '\''))
            .collect::<Vec<_>>()
            .join(".");
        if let Some(prev) = out.last_mut() {
            prev.body.end = start;
        }
        out.push(Header {
            body: start..src.len(),
            path,
            array,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use toml::de::DeTable;

    fn check(src: &str) -> Vec<String> {
        let (_, errors) = DeTable::parse_recoverable(src);
        let errors = errors
            .into_iter()
            .map(|e| (e.span(), e.message().to_string()))
            .collect();
        diagnostics(src, errors)
            .into_iter()
            .map(|d| d.message)
            .collect()
    }

    #[test]
    fn a_table_defined_twice_is_one_error_naming_the_first() {
        let src = "[routes.api]\nrespond = { body = \"a\" }\nupstream = \"x\"\n\n[routes.other]\nrespond = {}\n\n[ routes . \"api\" ]\nrespond = { body = \"b\" }\nupstream = \"y\"\n";
        assert_eq!(
            check(src),
            ["table [routes.api] is defined twice (first at line 1)"]
        );
    }

    #[test]
    fn a_key_set_twice_names_its_table_and_first_line() {
        let src = "[listeners.public]\nbind = \"127.0.0.1:1\"\ndirection = \"ingress\"\nbind = \"127.0.0.1:2\"\n";
        assert_eq!(
            check(src),
            ["`bind` is set twice in [listeners.public] (first at line 2)"]
        );
        let top = "include = 1\ninclude = 2\n";
        assert_eq!(
            check(top),
            ["`include` is set twice in the top level (first at line 1)"]
        );
    }

    #[test]
    fn other_syntax_errors_keep_the_parser_message() {
        let found = check("[listeners.public\nbind = 1\n");
        assert!(
            found.iter().all(|m| m.starts_with("TOML syntax: ")),
            "{found:?}"
        );
    }
}
