//! The mutating admission webhook: `granary.dev/mounts` on a PyTorchJob, TrainJob or Pod
//! becomes PVC volumes, volumeMounts and (for Datasets prewarmed before scheduling) the
//! scheduling gate the operator lifts.

pub mod inject;
pub mod mounts;
pub mod review;
pub mod server;
pub mod tls;
