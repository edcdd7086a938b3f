//! Granary's two FUSE filesystems and what they share.
//!
//! - [`dataset`]: a dataset as a read-only POSIX directory, read through the cache workers
//!   (or the source store while they are down), with readahead, a memory budget and a
//!   node-local file cache.
//! - [`checkpoint`]: a read-write checkpoint volume whose writes land in a node-local
//!   write-back area and reach the target store in the background, committed with a marker.
//! - [`fs_core`]: what both are built on; [`metrics`]: what they count.
//!
//! Not here: which volumes a node mounts and their restart hand-over (granary-node), the
//! block cache (granary-cache), store access (granary-store).

pub mod checkpoint;
pub mod dataset;
pub mod fs_core;
pub mod metrics;
