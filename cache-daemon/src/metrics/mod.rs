//! Prometheus metrics: the worker's metric set and the HTTP endpoint serving them.

pub mod checkpoint;
pub mod fuse;
pub mod http;
pub mod worker;

pub use checkpoint::CheckpointMetrics;
pub use fuse::FuseMetrics;
pub use worker::WorkerMetrics;
