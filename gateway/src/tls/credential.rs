//! A certificate chain and its key as one BoringSSL credential, built when
//! the files are loaded.
//!
//! Per handshake a listener hands BoringSSL the credentials that fit the
//! client's SNI, in preference order; BoringSSL takes the first one the
//! client can verify (its signature algorithms, its TLS version), so an
//! RSA-only client gets the RSA certificate of a name served with ECDSA and
//! RSA. Adding a credential takes a reference: the certificate is neither
//! re-encoded nor its key re-checked per handshake, as setting a certificate
//! and key on the connection did. `boring` does not wrap credentials, hence
//! the FFI here.

#![allow(
    unsafe_code,
    reason = "calls BoringSSL's C API where the boring crate has no safe wrapper"
)]

use std::ptr::NonNull;

use boring::error::ErrorStack;
use boring::pkey::{PKeyRef, Private};
use boring::ssl::SslRef;
use boring::x509::X509;
use foreign_types::ForeignTypeRef;

/// An immutable, reference-counted `SSL_CREDENTIAL`.
pub struct Credential(NonNull<boring_sys::SSL_CREDENTIAL>);

// SAFETY: the credential is not changed after `new`, and BoringSSL counts its
// references atomically, so it may be shared and dropped from any thread.
unsafe impl Send for Credential {}
unsafe impl Sync for Credential {}

impl Credential {
    /// The credential for `chain` (leaf first) and `key`. Fails as BoringSSL
    /// would fail the handshake: a key type TLS cannot use, an ECDSA leaf
    /// whose key usage forbids signing, a key that is not the leaf's.
    pub fn new(chain: &[X509], key: &PKeyRef<Private>) -> Result<Credential, ErrorStack> {
        // SAFETY: a fresh credential or null (an allocation failure).
        let cred = NonNull::new(unsafe { boring_sys::SSL_CREDENTIAL_new_x509() })
            .ok_or_else(ErrorStack::get)?;
        let cred = Credential(cred);
        let mut buffers = Vec::with_capacity(chain.len());
        for cert in chain {
            let der = cert.to_der()?;
            // SAFETY: BoringSSL copies `der` into a new buffer (no pool).
            let buffer = unsafe {
                boring_sys::CRYPTO_BUFFER_new(der.as_ptr(), der.len(), std::ptr::null_mut())
            };
            match NonNull::new(buffer) {
                Some(b) => buffers.push(Buffer(b)),
                None => return Err(ErrorStack::get()),
            }
        }
        let ptrs: Vec<*mut boring_sys::CRYPTO_BUFFER> =
            buffers.iter().map(|b| b.0.as_ptr()).collect();
        // SAFETY: `cred` and every buffer are live; BoringSSL takes its own
        // references to the buffers and to the key.
        unsafe {
            super::ffi_result(boring_sys::SSL_CREDENTIAL_set1_cert_chain(
                cred.0.as_ptr(),
                ptrs.as_ptr(),
                ptrs.len(),
            ))?;
            super::ffi_result(boring_sys::SSL_CREDENTIAL_set1_private_key(
                cred.0.as_ptr(),
                key.as_ptr(),
            ))?;
        }
        Ok(cred)
    }

    /// Offers this credential on `ssl` (after those offered before it).
    pub fn offer(&self, ssl: &mut SslRef) -> Result<(), ErrorStack> {
        // SAFETY: both are live; BoringSSL takes its own reference.
        super::ffi_result(unsafe { boring_sys::SSL_add1_credential(ssl.as_ptr(), self.0.as_ptr()) })
    }
}

impl Drop for Credential {
    fn drop(&mut self) {
        // SAFETY: this handle's reference, released once.
        unsafe { boring_sys::SSL_CREDENTIAL_free(self.0.as_ptr()) }
    }
}

/// A `CRYPTO_BUFFER` reference, released on drop.
struct Buffer(NonNull<boring_sys::CRYPTO_BUFFER>);

impl Drop for Buffer {
    fn drop(&mut self) {
        // SAFETY: this handle's reference, released once.
        unsafe { boring_sys::CRYPTO_BUFFER_free(self.0.as_ptr()) }
    }
}
