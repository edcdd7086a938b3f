//! Prometheus metrics: the worker's metric set and the HTTP endpoint serving them.

pub mod http;
pub mod worker;

pub use worker::WorkerMetrics;
