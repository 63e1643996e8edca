//! The one crypto provider for every TLS connection, inbound and outbound.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;

/// ring, with its default suites, which are all AEAD (AES-GCM and ChaCha20-Poly1305 with
/// ECDHE); rustls implements no CBC or RC4 suites.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}
