//! The filesystems' metric sets: dataset mounts and the node daemon (`granary_fuse_*`,
//! `granary_node_*`), and checkpoint volumes (`granary_checkpoint_*`).

pub mod checkpoint;
pub mod dataset;

pub use checkpoint::CheckpointMetrics;
pub use dataset::FuseMetrics;
