//! The mutating admission webhook: `granary.dev/mounts` on a PyTorchJob, TrainJob or Pod
//! becomes PVC volumes, volumeMounts and (for Datasets prewarmed before scheduling) the
//! scheduling gate the operator lifts; an inline csi volume naming a Dataset or
//! CheckpointPolicy becomes its PVC ([`inline`], when allowed). On Datasets and CheckpointPolicies it denies what their
//! schema cannot check (`api::validate`), with the field and the fix.

pub mod inject;
pub mod inline;
pub mod mounts;
pub mod review;
pub mod server;
pub mod tls;
pub mod trainjob;
