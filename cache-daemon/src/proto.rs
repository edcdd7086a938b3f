//! The worker's gRPC API, generated from `proto/granary/worker/v1/worker.proto`.

#![allow(clippy::all)]

tonic::include_proto!("granary.worker.v1");

impl Tier {
    pub fn label(&self) -> &'static str {
        match self {
            Tier::Memory => "memory",
            Tier::Disk => "disk",
            Tier::Source => "source",
            Tier::Unspecified => "unspecified",
        }
    }
}
