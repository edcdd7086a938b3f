//! The worker's gRPC API, generated from `proto/granary/worker/v1/worker.proto`.

#![allow(clippy::all)]

tonic::include_proto!("granary.worker.v1");

impl Tier {
    pub fn label(&self) -> &'static str {
        match self {
            Tier::Memory => "memory",
            Tier::Disk => "disk",
            Tier::Source => "source",
            Tier::Peer => "peer",
            Tier::Unspecified => "unspecified",
        }
    }
}

impl FileInfo {
    /// Source store metadata as the API describes a file, cut into `block_size` blocks.
    pub fn from_meta(meta: &granary_store::source::FileMeta, block_size: u64) -> Self {
        FileInfo {
            path: meta.path.clone(),
            is_dir: meta.is_dir,
            size: meta.size,
            version: meta.version.clone(),
            mtime_unix_nanos: meta.mtime_unix_nanos(),
            block_size,
        }
    }
}
