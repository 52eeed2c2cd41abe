//! TLS crypto: the tree compiles exactly one rustls provider, `ring`, and builds every TLS
//! configuration with it explicitly. rustls' `builder()` panics when two providers are compiled
//! in; `cargo tree -i aws-lc-rs` must stay empty (CI checks it).

use std::sync::Arc;

use rustls::crypto::CryptoProvider;

/// The ring provider.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Installs ring as the process-wide default (for HTTP clients built without an explicit
/// configuration). Harmless when a default is already installed.
pub fn install_default_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
