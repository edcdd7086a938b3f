//! The custom resources (group `granary.dev`, version `v1alpha1`), their CRDs generated from
//! these types, and the checks the OpenAPI schema cannot express.

pub mod checkpoint_policy;
pub mod common;
pub mod crd;
pub mod dataset;
pub mod validate;

pub use checkpoint_policy::{CheckpointPolicy, CheckpointPolicySpec, CheckpointPolicyStatus};
pub use dataset::{Dataset, DatasetSpec, DatasetStatus};

/// Group of every Granary resource, annotation and label.
pub const GROUP: &str = "granary.dev";
