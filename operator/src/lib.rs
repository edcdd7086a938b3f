//! Granary's Kubernetes operator: the `Dataset` and `CheckpointPolicy` resources, the
//! controllers that turn them into workers and volumes, prewarm and scheduling gates, and the
//! admission webhook that mounts them into training jobs.

pub mod api;
pub mod controller;
pub mod leader;
pub mod metrics;
pub mod resources;
pub mod run;
pub mod webhook;
