//! `include = ["conf.d/*.toml"]` at the top of a config file: the files it
//! names (globs, each sorted) are read after it as one document, so their
//! tables merge into the named tables (`[routes.api]` in an included file
//! is one more route). Everything downstream sees one text; [`Sources`]
//! maps each place in it back to its file, so errors name the file they
//! are in. A name defined in two files is an error naming both places.

use std::ops::Range;
use std::path::{Path, PathBuf};

use toml::de::{DeTable, DeValue};
use toml::Spanned;

use super::error::{ConfigError, Diagnostic, SourceFile, Sources};

/// Sections holding named entries (`[routes.NAME]`); the others are one
/// table each.
const NAMED: &[&str] = &[
    "listeners",
    "routes",
    "upstreams",
    "rate_limits",
    "certs",
    "policies",
];

/// The text to validate: `text` (the file at `path`) followed by the files
/// its `include` names.
pub fn assemble(path: &Path, text: &str) -> Result<Sources, ConfigError> {
    let mut sources = Sources::single(path, text);
    let (root, syntax) = DeTable::parse_recoverable(text);
    // A file that does not parse is reported as it is.
    if !syntax.is_empty() {
        return Ok(sources);
    }
    let root = root.into_inner();
    let Some((key, value)) = root.iter().find(|(k, _)| k.get_ref() == "include") else {
        return Ok(sources);
    };
    let base = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut diags = Vec::new();
    let files = included_files(key.span(), value, base, path, &mut diags);
    let mut names = Vec::new();
    defined_names(&root, 0, &mut names);
    for (file, at) in files {
        let body = match std::fs::read(&file).map(String::from_utf8) {
            Ok(Ok(body)) => body,
            Ok(Err(_)) => {
                diags.push(
                    Diagnostic::new(at, format!("included file {} is not UTF-8", file.display()))
                        .fix("re-save it as UTF-8 (TOML files are UTF-8)"),
                );
                continue;
            }
            Err(e) => {
                diags.push(
                    Diagnostic::new(
                        at,
                        format!("cannot read included file {}: {e}", file.display()),
                    )
                    .fix("check the path and its permissions"),
                );
                continue;
            }
        };
        if !sources.text.ends_with('\n') {
            sources.text.push('\n');
        }
        let start = sources.text.len();
        sources.text.push_str(&body);
        sources.files.push(SourceFile {
            path: file.clone(),
            start,
            len: body.len(),
        });
        check_included(&body, start, &mut names, &sources, &mut diags);
    }
    if diags.is_empty() {
        Ok(sources)
    } else {
        diags.sort_by_key(|d| d.span.as_ref().map_or(0, |s| s.start));
        Err(ConfigError::Invalid {
            path: path.to_path_buf(),
            sources,
            diagnostics: diags,
        })
    }
}

/// The files `include` names, in order, each with the span of the entry
/// that named it; problems go to `diags`.
fn included_files(
    key: Range<usize>,
    value: &Spanned<DeValue<'_>>,
    base: &Path,
    main: &Path,
    diags: &mut Vec<Diagnostic>,
) -> Vec<(PathBuf, Range<usize>)> {
    let DeValue::Array(items) = value.get_ref() else {
        diags.push(
            Diagnostic::new(key, "include is not a list of file names")
                .fix("write include = [\"conf.d/*.toml\"] (paths or globs, relative to this file)"),
        );
        return Vec::new();
    };
    let mut files: Vec<(PathBuf, Range<usize>)> = Vec::new();
    for item in items {
        let DeValue::String(pattern) = item.get_ref() else {
            diags.push(
                Diagnostic::new(item.span(), "include has an entry that is not a string")
                    .fix("write each entry as a path or glob in quotes, e.g. \"conf.d/*.toml\""),
            );
            continue;
        };
        let full = base.join(pattern.as_ref());
        let mut found = Vec::new();
        if pattern.contains(['*', '?', '[']) {
            match glob::glob(&full.to_string_lossy()) {
                Ok(paths) => found.extend(paths.filter_map(Result::ok).filter(|p| p.is_file())),
                Err(e) => diags.push(
                    Diagnostic::new(
                        item.span(),
                        format!("include has \"{pattern}\", which is not a valid glob: {e}"),
                    )
                    .fix("use *, ? and [...] as in a shell, e.g. \"conf.d/*.toml\""),
                ),
            }
            found.sort();
        } else if full.is_file() {
            found.push(full);
        } else {
            diags.push(
                Diagnostic::new(item.span(), format!("include names {}, which is not a file", full.display()))
                    .fix("check the path (relative to this file's directory), or use a glob such as \"conf.d/*.toml\", which may match nothing"),
            );
        }
        for f in found {
            let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
                (Ok(a), Ok(b)) => a == b,
                _ => a == b,
            };
            if same(&f, main) || files.iter().any(|(g, _)| same(g, &f)) {
                continue;
            }
            files.push((f, item.span()));
        }
    }
    files
}

/// A name a file defines (`routes.api`, `gateway`), and where.
struct Defined {
    name: String,
    at: Range<usize>,
}

/// The names `root` defines, its spans moved by `offset`.
fn defined_names(root: &DeTable<'_>, offset: usize, out: &mut Vec<Defined>) {
    for (key, value) in root {
        let section = key.get_ref().as_ref();
        if section == "include" {
            continue;
        }
        let shift = |r: Range<usize>| r.start + offset..r.end + offset;
        match value.get_ref() {
            DeValue::Table(entries) if NAMED.contains(&section) => {
                for (name, _) in entries.iter() {
                    out.push(Defined {
                        name: format!("{section}.{}", name.get_ref()),
                        at: shift(name.span()),
                    });
                }
            }
            _ => out.push(Defined {
                name: section.to_string(),
                at: shift(key.span()),
            }),
        }
    }
}

/// An included file holds tables only (a key before its first table would
/// join the table the file before it ended in), has no `include` of its
/// own, and defines no name defined before it.
fn check_included(
    body: &str,
    start: usize,
    names: &mut Vec<Defined>,
    sources: &Sources,
    diags: &mut Vec<Diagnostic>,
) {
    let mut offset = 0;
    for line in body.split_inclusive('\n') {
        let trimmed = line.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            offset += line.len();
            continue;
        }
        if !trimmed.starts_with('[') {
            let at = start + offset + (line.len() - trimmed.len());
            let key = trimmed.split(['=', ' ']).next().unwrap_or("").trim();
            let message = if key == "include" {
                "include is read in the main config file only".to_string()
            } else {
                format!("`{key}` is outside any table in an included file")
            };
            diags.push(Diagnostic::new(at..at + trimmed.trim_end().len(), message).fix(
                "an included file holds tables only: put it under its [section] (include is for the main file)",
            ));
            // Its names would be misread; the error above comes first.
            return;
        }
        break;
    }
    let (root, syntax) = DeTable::parse_recoverable(body);
    if !syntax.is_empty() {
        // The whole text's parse reports it, in this file.
        return;
    }
    let mut here = Vec::new();
    defined_names(root.get_ref(), start, &mut here);
    for d in here {
        if let Some(first) = names.iter().find(|n| n.name == d.name) {
            diags.push(
                Diagnostic::new(
                    d.at.clone(),
                    format!(
                        "[{}] is defined twice: here and at {}",
                        d.name,
                        sources.place(first.at.start)
                    ),
                )
                .fix("keep one: rename one of them, or remove it from one file"),
            );
        } else {
            names.push(d);
        }
    }
}

/// The merged config as TOML, `${VAR}` replaced, each table under a
/// comment naming the `file:line` it came from; secrets in URLs are shown
/// as `***` (`meshgate check --print`).
pub fn print(sources: &Sources) -> String {
    let Some(root) = super::validate::substituted(&sources.text) else {
        return String::new();
    };
    let mut out = String::new();
    for (key, value) in &root {
        let section = key.get_ref().as_ref();
        if section == "include" {
            continue;
        }
        match value.get_ref() {
            DeValue::Table(entries) if NAMED.contains(&section) => {
                for (name, entry) in entries.iter() {
                    let mut inner = toml::Table::new();
                    inner.insert(name.get_ref().to_string(), plain(entry));
                    let mut outer = toml::Table::new();
                    outer.insert(section.to_string(), toml::Value::Table(inner));
                    emit(&mut out, sources, name.span().start, &outer);
                }
            }
            _ => {
                let mut outer = toml::Table::new();
                outer.insert(section.to_string(), plain(value));
                emit(&mut out, sources, key.span().start, &outer);
            }
        }
    }
    out
}

/// A document value as a plain TOML value.
fn plain(value: &Spanned<DeValue<'_>>) -> toml::Value {
    let mut owned = value.clone();
    owned.get_mut().make_owned();
    serde::Deserialize::deserialize(toml::de::ValueDeserializer::from(owned))
        .unwrap_or(toml::Value::String(String::new()))
}

fn emit(out: &mut String, sources: &Sources, at: usize, table: &toml::Table) {
    let place = sources.place(at);
    // `file:line`: the column is the name's, not the table's.
    let place = place.rsplit_once(':').map_or(place.as_str(), |(p, _)| p);
    out.push_str(&format!("# from {place}\n"));
    let text = toml::to_string(table).unwrap_or_default();
    for line in text.lines() {
        out.push_str(&super::model::redact_secrets(line));
        out.push('\n');
    }
    out.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAIN: &str = "include = [\"conf.d/*.toml\"]\n[listeners.public]\nbind = \"127.0.0.1:8080\"\n[upstreams.api]\nendpoints = [\"127.0.0.1:9001\"]\n";

    /// A directory with `gw.toml` (`main`) and `conf.d/NAME` files.
    fn files(main: &str, included: &[(&str, &str)]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("conf.d")).unwrap();
        for (name, text) in included {
            std::fs::write(dir.path().join("conf.d").join(name), text).unwrap();
        }
        let path = dir.path().join("gw.toml");
        std::fs::write(&path, main).unwrap();
        (dir, path)
    }

    fn load(path: &Path) -> Result<crate::config::Loaded, ConfigError> {
        crate::config::load(path)
    }

    #[test]
    fn included_tables_merge_in_glob_order_and_count_in_the_hash() {
        let (dir, path) = files(
            MAIN,
            &[
                (
                    "20-b.toml",
                    "[routes.b]\npath = \"/b\"\nupstream = \"api\"\n",
                ),
                (
                    "10-a.toml",
                    "# first\n[routes.a]\npath = \"/a\"\nupstream = \"api\"\n",
                ),
                ("notes.txt", "not toml"),
            ],
        );
        let c = load(&path).unwrap();
        let routes: Vec<&str> = c.routes.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(routes, ["a", "b"]);
        let hash = c.source_hash.clone();
        std::fs::write(
            dir.path().join("conf.d/20-b.toml"),
            "[routes.b]\npath = \"/bb\"\nupstream = \"api\"\n",
        )
        .unwrap();
        assert_ne!(
            load(&path).unwrap().source_hash,
            hash,
            "an included file changed"
        );
        let printed = c.print();
        assert!(printed.contains("# from "), "{printed}");
        assert!(
            printed.contains("conf.d/10-a.toml:2\n[routes.a]"),
            "{printed}"
        );
        assert!(
            printed.contains("gw.toml:2\n[listeners.public]"),
            "{printed}"
        );
    }

    #[test]
    fn errors_in_included_files_name_them() {
        let (_dir, path) = files(
            MAIN,
            &[("a.toml", "[routes.a]\npath = \"/a\"\nupstream = \"nope\"\n")],
        );
        let e = load(&path).unwrap_err().to_string();
        assert!(
            e.contains("conf.d/a.toml:3:12: error: route `a` names unknown upstream `nope`"),
            "{e}"
        );
    }

    #[test]
    fn a_name_defined_twice_is_an_error_naming_both_places() {
        let (_dir, path) = files(
            &format!("{MAIN}[routes.a]\npath = \"/a\"\nupstream = \"api\"\n"),
            &[(
                "a.toml",
                "\n[routes.a]\npath = \"/x\"\nupstream = \"api\"\n[gateway]\nname = \"x\"\n",
            )],
        );
        let e = load(&path).unwrap_err().to_string();
        assert!(
            e.contains("conf.d/a.toml:2:9: error: [routes.a] is defined twice: here and at ")
                && e.contains("gw.toml:6:9"),
            "{e}"
        );
        assert!(e.contains("1 error found"), "{e}");
    }

    #[test]
    fn an_included_file_holds_tables_only_and_includes_nothing() {
        for (body, says) in [
            (
                "name = \"x\"\n[routes.a]\npath = \"/a\"\n",
                "`name` is outside any table in an included file",
            ),
            (
                "include = [\"more/*.toml\"]\n",
                "include is read in the main config file only",
            ),
        ] {
            let (_dir, path) = files(MAIN, &[("a.toml", body)]);
            let e = load(&path).unwrap_err().to_string();
            assert!(
                e.contains(&format!("conf.d/a.toml:1:1: error: {says}")),
                "{e}"
            );
        }
    }

    #[test]
    fn include_names_files_that_exist() {
        let (_dir, path) = files(
            &MAIN.replace("\"conf.d/*.toml\"", "\"conf.d/missing.toml\", 3"),
            &[],
        );
        let e = load(&path).unwrap_err().to_string();
        assert!(e.contains("gw.toml:1:12: error: include names "), "{e}");
        assert!(e.contains("missing.toml, which is not a file"), "{e}");
        assert!(
            e.contains("include has an entry that is not a string"),
            "{e}"
        );
        // A glob that matches nothing is fine: conf.d may be empty.
        let (_dir, path) = files(MAIN, &[]);
        assert!(load(&path).is_ok());
    }

    #[test]
    fn an_unset_variable_in_an_included_file_is_placed_there() {
        let (_dir, path) = files(
            MAIN,
            &[(
                "a.toml",
                "[routes.a]\npath = \"/a\"\nupstream = \"${MESHGATE_TEST_UNSET_UPSTREAM}\"\n",
            )],
        );
        let e = load(&path).unwrap_err().to_string();
        assert!(e.contains("conf.d/a.toml:3:12: error:"), "{e}");
        assert!(e.contains("MESHGATE_TEST_UNSET_UPSTREAM"), "{e}");
    }
}
