//! The process's one TLS crypto provider, and opendal's HTTP transport built on it.
//!
//! Every TLS client and server of Granary (opendal's HTTP client to S3-protocol stores, kube's
//! client to the API server, the webhook's listener) is rustls, and the dependency tree is
//! built with `ring` only (opendal's transport with `rustls-no-provider`, kube with `ring`):
//! with no default provider installed, rustls panics at the first client it builds ("Could
//! not automatically determine the process-level CryptoProvider"), and without its default
//! transport opendal refuses every HTTP request ("default HTTP transport is not installed").
//! Each binary calls [`install`] first thing in `main`; the store constructors call it too, so
//! library users and tests are covered.

/// Installs `ring` as the process-wide rustls provider and opendal's reqwest transport as its
/// default HTTP transport. Idempotent: what is installed already (by an earlier call, or by
/// someone else first) is left as it is.
pub fn install() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Err means another thread installed one between the check and here: that is fine,
        // there is one provider either way.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
    // First install wins, later calls are no-ops; the reqwest client is built lazily, after
    // the provider above.
    opendal_http_transport_reqwest::install_default();
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_provider_is_installed_and_a_second_call_keeps_it() {
        super::install();
        let first = rustls::crypto::CryptoProvider::get_default().expect("installed");
        super::install();
        let second = rustls::crypto::CryptoProvider::get_default().expect("still installed");
        assert!(std::sync::Arc::ptr_eq(first, second));
    }
}
