//! One test per validation message: each bad config yields that message at
//! the right line, with a fix. A file per section, as in the validator.

use std::path::Path;

use crate::config::*;

const OK_LISTENER: &str = "[listeners.public]\nbind = \"127.0.0.1:18080\"\n";
const OK_UPSTREAM: &str = "[upstreams.u]\nendpoints = [\"127.0.0.1:9\"]\n";

const OK_ROUTE: &str = "[routes.r]\npath_prefix = \"/\"\nrespond = { body = \"ok\" }\n";

fn diags(src: &str) -> Vec<Diagnostic> {
    match parse(Path::new("t.toml"), src) {
        Ok(_) => panic!("config unexpectedly valid:\n{src}"),
        Err(e) => e.diagnostics().to_vec(),
    }
}

/// Assert that `src` has an error containing `needle` on `line` (1-based),
/// carrying a fix.
fn expect(src: &str, line: usize, needle: &str) {
    let all = diags(src);
    let found = all
        .iter()
        .find(|d| d.message.contains(needle))
        .unwrap_or_else(|| {
            panic!(
                "no error containing `{needle}`; got: {:#?}",
                all.iter().map(|d| &d.message).collect::<Vec<_>>()
            )
        });
    let span = found.span.clone().expect("error has a location");
    assert_eq!(
        error::line_col(src, span.start).0,
        line,
        "`{needle}` on the wrong line"
    );
    assert!(
        found.fix.as_deref().is_some_and(|f| !f.is_empty()),
        "`{needle}` has no fix"
    );
}

macro_rules! bad {
    ($name:ident, $src:expr, $line:expr, $needle:expr) => {
        #[test]
        fn $name() {
            expect(AsRef::<str>::as_ref(&$src), $line, $needle);
        }
    };
}

fn with_route(route: &str) -> String {
    format!("{OK_LISTENER}{OK_UPSTREAM}[routes.r]\n{route}")
}

fn with_upstream(body: &str) -> String {
    format!("{OK_LISTENER}[upstreams.x]\n{body}")
}

mod certs;
mod document;
mod egress;
mod listeners;
mod policies;
mod rate_limits;
mod routes;
mod settings;
mod upstreams;
