//! Config diagnostics: every problem found in a file, each with where and how to fix it.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// Byte range in the source, when the problem has a place.
    pub span: Option<Range<usize>>,
    pub message: String,
    /// What to change; shown on its own line so it stands out.
    pub fix: Option<String>,
}

impl Diagnostic {
    pub fn new(span: impl Into<Option<Range<usize>>>, message: impl Into<String>) -> Self {
        Diagnostic {
            span: span.into(),
            message: message.into(),
            fix: None,
        }
    }

    pub fn fix(mut self, fix: impl Into<String>) -> Self {
        self.fix = Some(fix.into());
        self
    }
}

/// The text a config was validated from: its file, then each file it
/// includes, one after the other; a byte offset in `text` belongs to one
/// of them.
#[derive(Clone, PartialEq, Eq)]
pub struct Sources {
    pub text: String,
    /// In order of `start`; the first is the main file.
    pub files: Vec<SourceFile>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceFile {
    pub path: PathBuf,
    /// Where its text begins in [`Sources::text`].
    pub start: usize,
    pub len: usize,
}

/// The text may hold passwords (Redis URLs): debug output shows its size.
impl fmt::Debug for Sources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sources")
            .field("text", &format_args!("<{} bytes>", self.text.len()))
            .field("files", &self.files)
            .finish()
    }
}

impl Sources {
    /// One file's text.
    pub fn single(path: &Path, text: &str) -> Self {
        Sources {
            text: text.to_string(),
            files: vec![SourceFile {
                path: path.to_path_buf(),
                start: 0,
                len: text.len(),
            }],
        }
    }

    /// The file an offset of `text` is in, that file's text, and the
    /// offset in it.
    pub fn locate(&self, offset: usize) -> (&Path, &str, usize) {
        let file = self
            .files
            .iter()
            .rev()
            .find(|f| f.start <= offset)
            .or(self.files.first());
        match file {
            Some(f) => {
                let end = (f.start + f.len).min(self.text.len());
                let text = self.text.get(f.start..end).unwrap_or("");
                (
                    &f.path,
                    text,
                    offset.saturating_sub(f.start).min(text.len()),
                )
            }
            None => (Path::new(""), &self.text, offset),
        }
    }

    /// `file:line:col` of an offset.
    pub fn place(&self, offset: usize) -> String {
        let (path, text, local) = self.locate(offset);
        let (line, col) = line_col(text, local);
        format!("{}:{line}:{col}", path.display())
    }
}

/// Why a config could not be loaded: the file could not be read, or it holds
/// one or more problems. Rendered with file:line:col for each.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read config file: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", render(.path, .sources, .diagnostics))]
    Invalid {
        path: PathBuf,
        sources: Sources,
        diagnostics: Vec<Diagnostic>,
    },
}

impl ConfigError {
    /// The problems, empty for a read error.
    pub fn diagnostics(&self) -> &[Diagnostic] {
        match self {
            ConfigError::Read { .. } => &[],
            ConfigError::Invalid { diagnostics, .. } => diagnostics,
        }
    }
}

/// 1-based line and column (in characters) of a byte offset.
pub fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(src.len());
    let before = &src[..floor_char_boundary(src, offset)];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = before[line_start..].chars().count() + 1;
    (line, col)
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// How bad a diagnostic is: an error refuses the file, a warning does not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Warning,
}

/// One diagnostic with its place (`file:line:col: warning: ...`, in the
/// file of `sources` it is in; the main file when it has no place), the
/// line it points at and its fix.
pub fn render_one(sources: &Sources, diag: &Diagnostic, severity: Severity) -> String {
    DiagnosticDisplay {
        sources,
        diag,
        severity,
    }
    .to_string()
}

fn render(path: &Path, sources: &Sources, diags: &[Diagnostic]) -> String {
    let mut out = String::new();
    for d in diags {
        out.push_str(&render_one(sources, d, Severity::Error));
        out.push('\n');
    }
    let n = diags.len();
    out.push_str(&format!(
        "{}: {} error{} found",
        path.display(),
        n,
        if n == 1 { "" } else { "s" }
    ));
    out
}

struct DiagnosticDisplay<'a> {
    sources: &'a Sources,
    diag: &'a Diagnostic,
    severity: Severity,
}

impl fmt::Display for DiagnosticDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let severity = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        match &self.diag.span {
            Some(span) => {
                let (path, src, local) = self.sources.locate(span.start);
                let (line, col) = line_col(src, local);
                write!(
                    f,
                    "{}:{}:{}: {severity}: {}",
                    path.display(),
                    line,
                    col,
                    self.diag.message
                )?;
                if let Some(text) = src.lines().nth(line - 1) {
                    // Error output ends up in logs: no passwords in it.
                    write!(f, "\n    | {}", super::model::redact_secrets(text))?;
                }
            }
            None => write!(
                f,
                "{}: {severity}: {}",
                self.sources.locate(0).0.display(),
                self.diag.message
            )?,
        }
        if let Some(fix) = &self.diag.fix {
            write!(f, "\n    = fix: {fix}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_from_one() {
        let src = "a = 1\nbé = 2\n";
        assert_eq!(line_col(src, 0), (1, 1));
        assert_eq!(line_col(src, 6), (2, 1));
        // 'é' is two bytes but one column.
        assert_eq!(line_col(src, 9), (2, 3));
        assert_eq!(line_col(src, 1000), (3, 1));
    }

    #[test]
    fn render_names_file_line_col_and_fix() {
        let err = ConfigError::Invalid {
            path: "gw.toml".into(),
            sources: Sources::single(Path::new("gw.toml"), "x = 1\ny = 2\n"),
            diagnostics: vec![Diagnostic::new(6..7, "bad y").fix("remove y")],
        };
        let text = err.to_string();
        assert!(text.contains("gw.toml:2:1: error: bad y"), "{text}");
        assert!(text.contains("| y = 2"), "{text}");
        assert!(text.contains("= fix: remove y"), "{text}");
        assert!(text.ends_with("1 error found"), "{text}");
    }

    #[test]
    fn an_offset_in_an_included_file_is_placed_there() {
        let mut sources = Sources::single(Path::new("gw.toml"), "x = 1\n");
        sources.text.push_str("\n[a]\ny = 2\n");
        sources.files.push(SourceFile {
            path: "conf.d/a.toml".into(),
            start: 7,
            len: 10,
        });
        assert_eq!(sources.place(0), "gw.toml:1:1");
        assert_eq!(sources.place(11), "conf.d/a.toml:2:1");
        let err = ConfigError::Invalid {
            path: "gw.toml".into(),
            sources,
            diagnostics: vec![Diagnostic::new(11..12, "bad y")],
        };
        let text = err.to_string();
        assert!(text.contains("conf.d/a.toml:2:1: error: bad y"), "{text}");
        assert!(text.contains("| y = 2"), "{text}");
    }
}
