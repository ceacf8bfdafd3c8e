//! Configuration: file -> raw (serde) -> validated [`model::Config`].

pub mod error;
pub mod model;
mod raw;
mod validate;

use std::path::Path;

pub use error::{ConfigError, Diagnostic};
pub use model::Config;

/// Read and validate a config file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(path, &text)
}

/// Validate config text; `path` names it in messages, and relative file
/// paths in it start at its directory.
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
    let base = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    validate::validate(text, base).map_err(|diagnostics| ConfigError::Invalid {
        path: path.to_path_buf(),
        source_text: text.to_string(),
        diagnostics,
    })
}

#[cfg(test)]
mod tests;
