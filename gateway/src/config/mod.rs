//! Configuration: file -> raw (serde) -> validated [`model::Config`], with
//! what the files it names held beside it ([`Material`]).

pub mod error;
mod include;
pub mod material;
pub mod model;
mod raw;
mod resolve;
mod syntax;
mod validate;

use std::path::Path;

pub use error::{ConfigError, Diagnostic, Sources};
pub use material::Material;
pub use model::Config;

/// A valid config and what its files held when it was loaded.
#[derive(Debug)]
pub struct Loaded {
    pub config: Config,
    pub material: Material,
    /// The text it came from, with the included files in it.
    pub sources: Sources,
}

impl std::ops::Deref for Loaded {
    type Target = Config;
    fn deref(&self) -> &Config {
        &self.config
    }
}

impl Loaded {
    /// The merged config as TOML with the file each table came from
    /// (`meshgate check --print`).
    pub fn print(&self) -> String {
        include::print(&self.sources)
    }

    /// Everything `check` warns about and `run`/reload log: the file's own
    /// warnings, then the certificates'.
    pub fn warnings(&self, now: std::time::SystemTime) -> Vec<String> {
        let mut out = self.config.warnings.clone();
        out.extend(self.material.warnings(&self.config, now));
        out
    }
}

/// The config file's JSON Schema (`meshgate schema`), made from the file
/// format's own types.
pub fn schema() -> String {
    let schema = schemars::schema_for!(raw::RawRoot);
    let mut value = schema.to_value();
    drop_null(&mut value);
    serde_json::to_string_pretty(&value).unwrap_or_default() + "\n"
}

/// TOML has no null: an optional key is one that is left out, so the
/// `null` alternatives the schema generator gives every `Option` would
/// only have editors offer a value no file can hold.
fn drop_null(v: &mut serde_json::Value) {
    use serde_json::Value;
    match v {
        Value::Object(map) => {
            if let Some(Value::Array(types)) = map.get_mut("type") {
                types.retain(|t| t != "null");
                if let [only] = types.as_slice() {
                    let only = only.clone();
                    map.insert("type".into(), only);
                }
            }
            for key in ["anyOf", "oneOf"] {
                if let Some(Value::Array(alternatives)) = map.get_mut(key) {
                    alternatives.retain(|a| a.get("type").is_none_or(|t| t != "null"));
                    if let [only] = alternatives.as_slice() {
                        let only = only.clone();
                        map.remove(key);
                        if let Value::Object(inner) = only {
                            for (k, v) in inner {
                                map.entry(k).or_insert(v);
                            }
                        }
                    }
                }
            }
            if map.get("default").is_some_and(Value::is_null) {
                map.remove("default");
            }
            map.values_mut().for_each(drop_null);
        }
        Value::Array(items) => items.iter_mut().for_each(drop_null),
        _ => {}
    }
}

/// Read and validate a config file, and look up the host names it names.
/// This does blocking I/O (files, the system resolver): an async caller
/// runs it with `spawn_blocking`.
pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
    let bytes = std::fs::read(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let text = String::from_utf8(bytes).map_err(|e| {
        // Where the file stops being UTF-8: the text before it is.
        let good = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        let (line, col) = error::line_col(std::str::from_utf8(good).unwrap_or(""), good.len());
        ConfigError::Read {
            path: path.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("line {line}, column {col}: not UTF-8 (TOML files are UTF-8; re-save the file as UTF-8)"),
            ),
        }
    })?;
    parse(path, &text)
}

/// Validate config text, with the files its `include` names; `path`
/// names it in messages, and relative paths in it (and `include`
/// patterns) start at its directory.
pub fn parse(path: &Path, text: &str) -> Result<Loaded, ConfigError> {
    let sources = include::assemble(path, text)?;
    let base = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let outcome = validate::validate(&sources.text, base);
    let mut config = outcome.config;
    let mut diagnostics = outcome.errors;
    diagnostics.extend(resolve::endpoints(config.as_mut(), &outcome.lookups));
    match config {
        Some(mut config) if diagnostics.is_empty() => {
            let mut warnings = outcome.warnings;
            warnings.sort_by_key(|d| d.span.as_ref().map_or(0, |s| s.start));
            config.warnings = warnings
                .iter()
                .map(|w| error::render_one(&sources, w, error::Severity::Warning))
                .collect();
            Ok(Loaded {
                config,
                material: outcome.material,
                sources,
            })
        }
        _ => {
            diagnostics.sort_by_key(|d| d.span.as_ref().map_or(0, |s| s.start));
            Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                sources,
                diagnostics,
            })
        }
    }
}
