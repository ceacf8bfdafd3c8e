//! Configuration: file -> raw (serde) -> validated [`model::Config`].

pub mod error;
pub mod model;
mod raw;
mod syntax;
mod validate;

use std::path::Path;

pub use error::{ConfigError, Diagnostic};
pub use model::Config;

/// Read and validate a config file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
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

/// Validate config text; `path` names it in messages, and relative file
/// paths in it start at its directory.
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
    let base = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    match validate::validate(text, base) {
        Ok((mut config, warnings)) => {
            config.warnings = warnings
                .iter()
                .map(|w| error::render_one(path, text, w, error::Severity::Warning))
                .collect();
            Ok(config)
        }
        Err(diagnostics) => Err(ConfigError::Invalid {
            path: path.to_path_buf(),
            source_text: text.to_string(),
            diagnostics,
        }),
    }
}

#[cfg(test)]
mod tests;
