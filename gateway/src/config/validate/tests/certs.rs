//! `[certs.NAME]`.

use super::*;

bad!(
    cert_file_missing,
    format!("{OK_LISTENER}[certs.edge]\ncert = \"/nonexistent/edge.pem\"\nkey = \"/nonexistent/edge.key\"\n"),
    4,
    "cannot read /nonexistent/edge.pem"
);
