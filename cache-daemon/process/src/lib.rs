//! What every Granary binary does the same way: its logging flags and subscriber, its
//! shutdown signal, and its Prometheus `/metrics` and readiness endpoint.
//!
//! Not here: the metric sets themselves, which belong to the crate whose behaviour they count.

pub mod logging;
pub mod metrics_http;
pub mod shutdown;
