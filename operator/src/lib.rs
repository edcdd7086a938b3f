//! Granary's Kubernetes operator: the `Dataset` and `CheckpointPolicy` resources, the
//! controllers that turn them into workers and volumes, prewarm and scheduling gates, and the
//! admission webhook that mounts them into training jobs.

pub mod api;
pub mod resources;
pub mod controller;
pub mod metrics;
pub mod webhook;
pub mod leader;
pub mod run;
