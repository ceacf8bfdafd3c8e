//! Failed handshakes counted by the fatal alert that ended them
//! (`meshgate_tls_handshake_errors_total`).
//!
//! BoringSSL reports alerts through the context's info callback, which it
//! also calls at every step of every handshake (about 24 times each). The
//! callback is installed raw, not through `boring`'s closure wrapper: that
//! wrapper finds its closure under a process-wide mutex on each of those
//! calls, which every worker thread's handshakes would contend on. Here a
//! call that is not an alert returns at once, and an alert reads the
//! listener's name from the context's own extra data.

#![allow(
    unsafe_code,
    reason = "calls BoringSSL's C API where the boring crate has no safe wrapper"
)]

use std::os::raw::c_int;
use std::sync::OnceLock;

use boring::error::ErrorStack;
use boring::ex_data::Index;
use boring::ssl::{SslContext, SslContextBuilder, SslRef};
use foreign_types::ForeignTypeRef;

use crate::telemetry::metrics::metrics;

/// Values of the `reason` label: the fatal alert meshgate sent, or `peer_`
/// and the one the client sent.
pub const HANDSHAKE_ERROR_REASONS: &[&str] = &[
    "protocol_version",
    "handshake_failure",
    "no_application_protocol",
    "certificate_required",
    "bad_certificate",
    "unknown_ca",
    "certificate_expired",
    "decode_error",
    "other",
    "peer_bad_certificate",
    "peer_unknown_ca",
    "peer_certificate_expired",
    "peer_other",
    // Before the handshake proper (tls/hello.rs).
    "timeout",
    "plain_http",
];

/// Where each listener's context keeps the listener's name.
static LISTENER_NAME: OnceLock<Index<SslContext, Box<str>>> = OnceLock::new();

/// Count the fatal alerts of handshakes on `builder`'s listener under its
/// name.
pub fn count(builder: &mut SslContextBuilder, listener: &str) -> Result<(), ErrorStack> {
    let index = match LISTENER_NAME.get() {
        Some(index) => *index,
        None => {
            // Two listeners set up at once may each allocate an index; the
            // loser's stays unused, which costs one slot.
            let index = SslContext::new_ex_index()?;
            *LISTENER_NAME.get_or_init(|| index)
        }
    };
    builder.set_ex_data(index, listener.into());
    // SAFETY: the builder owns a valid SSL_CTX; `on_info` has the signature
    // BoringSSL calls and lives for the whole program.
    unsafe { boring_sys::SSL_CTX_set_info_callback(builder.as_ptr(), Some(on_info)) };
    Ok(())
}

unsafe extern "C" fn on_info(ssl: *const boring_sys::SSL, mode: c_int, value: c_int) {
    let from_peer = match mode {
        boring_sys::SSL_CB_READ_ALERT => true,
        boring_sys::SSL_CB_WRITE_ALERT => false,
        _ => return,
    };
    // An alert's value is its level in the high byte, its code in the low.
    if value >> 8 != boring_sys::SSL3_AL_FATAL {
        return;
    }
    let Some(index) = LISTENER_NAME.get() else {
        return;
    };
    // SAFETY: BoringSSL passes the connection the call is about, alive for
    // the call; it is only read.
    let ssl = unsafe { SslRef::from_ptr(ssl.cast_mut()) };
    let Some(listener) = ssl.ssl_context().ex_data(*index) else {
        return;
    };
    metrics()
        .tls_handshake_errors
        .with_label_values(&[listener, reason(value & 0xff, from_peer)])
        .inc();
}

/// The `reason` label of an alert `code` (RFC 8446 §6).
fn reason(code: c_int, from_peer: bool) -> &'static str {
    use boring_sys::{
        SSL_AD_BAD_CERTIFICATE, SSL_AD_CERTIFICATE_EXPIRED, SSL_AD_CERTIFICATE_REQUIRED,
        SSL_AD_DECODE_ERROR, SSL_AD_HANDSHAKE_FAILURE, SSL_AD_NO_APPLICATION_PROTOCOL,
        SSL_AD_PROTOCOL_VERSION, SSL_AD_UNKNOWN_CA,
    };
    match (from_peer, code) {
        (false, SSL_AD_PROTOCOL_VERSION) => "protocol_version",
        (false, SSL_AD_HANDSHAKE_FAILURE) => "handshake_failure",
        (false, SSL_AD_NO_APPLICATION_PROTOCOL) => "no_application_protocol",
        // TLS 1.3's "no client certificate".
        (false, SSL_AD_CERTIFICATE_REQUIRED) => "certificate_required",
        (false, SSL_AD_BAD_CERTIFICATE) => "bad_certificate",
        (false, SSL_AD_UNKNOWN_CA) => "unknown_ca",
        (false, SSL_AD_CERTIFICATE_EXPIRED) => "certificate_expired",
        (false, SSL_AD_DECODE_ERROR) => "decode_error",
        (false, _) => "other",
        (true, SSL_AD_BAD_CERTIFICATE) => "peer_bad_certificate",
        (true, SSL_AD_UNKNOWN_CA) => "peer_unknown_ca",
        (true, SSL_AD_CERTIFICATE_EXPIRED) => "peer_certificate_expired",
        (true, _) => "peer_other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_is_a_listed_label_value() {
        for code in 0..=255 {
            for from_peer in [false, true] {
                let r = reason(code, from_peer);
                assert!(
                    HANDSHAKE_ERROR_REASONS.contains(&r),
                    "{code} {from_peer}: {r}"
                );
            }
        }
    }
}
