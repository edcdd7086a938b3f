//! What every Granary binary does the same way: its logging flags and subscriber, its
//! shutdown signal, its Prometheus `/metrics` and readiness endpoint, and the append-only
//! log its local state survives crashes in.
//!
//! Not here: the metric sets themselves, which belong to the crate whose behaviour they count.

pub mod append_log;
pub mod logging;
pub mod metrics_http;
pub mod shutdown;
