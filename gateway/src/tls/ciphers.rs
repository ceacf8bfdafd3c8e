//! Which TLS 1.3 cipher suite a listener picks.
//!
//! BoringSSL's server default leaves the choice among AES-128-GCM,
//! AES-256-GCM and ChaCha20-Poly1305 to the client, and OpenSSL-based
//! clients (curl, Python, wrk, most service clients) list AES-256-GCM first.
//! That suite's key schedule and transcript run on SHA-384, which no x86 CPU
//! accelerates (and which BoringSSL computes without SIMD on AMD CPUs), where
//! AES-128-GCM's run on SHA-256 and its CPU extensions: SHA-384 was 14% of the
//! CPU of a TLS 1.3 handshake on the bench machine (`docs/performance.md`).
//!
//! So, on a host with AES instructions, listeners prefer AES-128-GCM (128-bit
//! security, like the X25519 or P-256 key exchange in front of it), then
//! AES-256-GCM, then ChaCha20-Poly1305. A client whose first TLS 1.3 suite is
//! ChaCha20 is saying it has no AES instructions of its own (Chrome and
//! BoringSSL clients order them so); it gets ChaCha20, as it would from
//! BoringSSL's default. On a host without AES instructions BoringSSL's own
//! order (ChaCha20 first) is left alone. TLS 1.2 suites are unchanged.

#![allow(
    unsafe_code,
    reason = "calls BoringSSL's C API where the boring crate has no safe wrapper"
)]

use boring::error::ErrorStack;
use boring::ssl::{ClientHello, SslContextBuilder, SslRef};
use foreign_types::ForeignTypeRef;

const AES_128_GCM_SHA256: u16 = 0x1301;
const AES_256_GCM_SHA384: u16 = 0x1302;
const CHACHA20_POLY1305_SHA256: u16 = 0x1303;

/// The listener's order: AES-128-GCM first.
const AES_FIRST: [u16; 3] = [
    AES_128_GCM_SHA256,
    AES_256_GCM_SHA384,
    CHACHA20_POLY1305_SHA256,
];
/// The order for a client that put ChaCha20 first.
const CHACHA_FIRST: [u16; 3] = [
    CHACHA20_POLY1305_SHA256,
    AES_128_GCM_SHA256,
    AES_256_GCM_SHA384,
];

/// Sets the TLS 1.3 preference described in the module docs on `builder`.
pub fn prefer_aes128(builder: &mut SslContextBuilder) -> Result<(), ErrorStack> {
    if !host_has_aes() {
        return Ok(());
    }
    // SAFETY: the builder owns a valid SSL_CTX for this call; the list is
    // copied by BoringSSL; a null `flags` means a strict order.
    super::ffi_result(unsafe {
        boring_sys::SSL_CTX_set1_tls13_ciphers(
            builder.as_ptr(),
            AES_FIRST.as_ptr(),
            std::ptr::null(),
            AES_FIRST.len(),
        )
    })?;
    builder.set_select_certificate_callback(|mut hello: ClientHello<'_>| {
        if chacha_first(hello.ciphers()) {
            // A failure leaves the listener's order, which still completes
            // the handshake; nothing to report to the client.
            let _ = set_for_connection(hello.ssl_mut(), &CHACHA_FIRST);
        }
        Ok(())
    });
    Ok(())
}

fn host_has_aes() -> bool {
    // SAFETY: reads BoringSSL's CPU capability flags; no arguments.
    unsafe { boring_sys::EVP_has_aes_hardware() == 1 }
}

fn set_for_connection(ssl: &mut SslRef, order: &[u16]) -> Result<(), ErrorStack> {
    // SAFETY: `ssl` is the live connection BoringSSL handed to the
    // ClientHello callback; the list is copied by BoringSSL.
    super::ffi_result(unsafe {
        boring_sys::SSL_set1_tls13_ciphers(
            ssl.as_ptr(),
            order.as_ptr(),
            std::ptr::null(),
            order.len(),
        )
    })
}

/// Whether the first TLS 1.3 suite in a ClientHello's cipher list (two bytes
/// each, GREASE and TLS 1.2 suites skipped) is ChaCha20-Poly1305.
fn chacha_first(suites: &[u8]) -> bool {
    suites
        .chunks_exact(2)
        .map(|s| u16::from_be_bytes([s[0], s[1]]))
        .find(|s| AES_FIRST.contains(s))
        == Some(CHACHA20_POLY1305_SHA256)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(suites: &[u16]) -> Vec<u8> {
        suites.iter().flat_map(|s| s.to_be_bytes()).collect()
    }

    #[test]
    fn the_first_tls13_suite_decides_past_grease_and_tls12_suites() {
        // Chrome without AES instructions: GREASE, then ChaCha20.
        assert!(chacha_first(&list(&[
            0x0a0a, 0x1303, 0x1301, 0x1302, 0xc02b
        ])));
        // OpenSSL's default order: AES-256 first.
        assert!(!chacha_first(&list(&[0x1302, 0x1303, 0x1301, 0xc02c])));
        // TLS 1.2 suites before any TLS 1.3 one do not count.
        assert!(!chacha_first(&list(&[0xcca9, 0xc02b, 0x1301, 0x1303])));
        assert!(chacha_first(&list(&[0xcca9, 0x1303])));
        // A TLS 1.2-only client, an empty or odd-length list.
        assert!(!chacha_first(&list(&[0xcca9, 0xc02b])));
        assert!(!chacha_first(&[]));
        assert!(!chacha_first(&[0x13]));
    }
}
