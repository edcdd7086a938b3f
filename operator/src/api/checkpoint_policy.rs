//! `CheckpointPolicy` (granary.dev/v1alpha1): where a job's checkpoints must end up and how
//! they get there, published as the PVC `<name>-checkpoint`.

// Each `printcolumn(...)` repeats `type_`, which clippy takes for a duplicated attribute.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{ByteQuantity, StoreRef};

pub const TARGET_REACHABLE: &str = "TargetReachable";
pub const READY: &str = "Ready";
/// False while a checkpoint's marker waits on a node that stopped reporting (likely lost).
pub const COMMITS_FLOWING: &str = "CommitsFlowing";
/// False while some node reports the target refusing its uploads (bad credentials, no
/// bucket): retrying cannot cure it, the Secret or the bucket must be fixed.
pub const UPLOADS_ACCEPTED: &str = "UploadsAccepted";

#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "granary.dev",
    version = "v1alpha1",
    kind = "CheckpointPolicy",
    namespaced,
    status = "CheckpointPolicyStatus",
    shortname = "gcp",
    category = "granary",
    doc = "Where checkpoints written into the PVC <name>-checkpoint must end up: written to node-local memory or NVMe, uploaded in the background, committed atomically.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Latest", type_ = "string", json_path = ".status.latestCheckpoint"),
    printcolumn(name = "Committed", type_ = "integer", json_path = ".status.committedCount"),
    printcolumn(name = "Target", type_ = "string", json_path = ".spec.target.uri", priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointPolicySpec {
    /// The store checkpoints must reach.
    pub target: StoreRef,
    /// The node-local write-back area checkpoints land in before they are uploaded.
    #[serde(default)]
    pub local_cache: LocalCache,
    /// The file whose appearance commits its directory (`.metadata` for PyTorch DCP,
    /// `_COMPLETE`); without it every closed file is uploaded on its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[^/]+$"))]
    pub commit_marker: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<Retention>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload: Option<UploadSpec>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LocalCache {
    /// Disk (the node daemon's state disk, or `hostPath`) survives a node daemon restart and
    /// a reboot; Memory (the host's /dev/shm) is faster and lost with the node.
    #[serde(default)]
    pub medium: LocalMedium,
    /// Bytes of checkpoints waiting for upload per node; writers wait, never fail, when full.
    #[serde(default = "default_local_size")]
    pub size: ByteQuantity,
    /// A host directory for the write-back area, e.g. an NVMe mount (`/mnt/nvme0/granary`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^/"))]
    pub host_path: Option<String>,
}

impl Default for LocalCache {
    fn default() -> Self {
        LocalCache {
            medium: LocalMedium::Disk,
            size: default_local_size(),
            host_path: None,
        }
    }
}

fn default_local_size() -> ByteQuantity {
    ByteQuantity::new("50Gi")
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum LocalMedium {
    Memory,
    #[default]
    Disk,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Retention {
    /// Committed checkpoints kept in the store, oldest deleted first; 0 keeps all.
    #[schemars(range(min = 0))]
    pub keep_last: i32,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UploadSpec {
    /// Multipart parts in flight per volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 256))]
    pub concurrency: Option<i32>,
    /// Multipart part size (5Mi at least, for S3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part_size: Option<ByteQuantity>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointPolicyStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The newest committed checkpoint directory in the target (by its marker).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_checkpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_committed_at: Option<Time>,
    #[serde(default)]
    pub committed_count: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Checkpoints written (their marker closed) but not committed: some node's files are
    /// not in the store yet. From the commit coordinator.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub incomplete: Vec<IncompleteCheckpoint>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IncompleteCheckpoint {
    /// The checkpoint directory.
    pub dir: String,
    /// Seconds its marker has waited.
    pub waiting_seconds: u64,
    pub waiting_for: Vec<PendingNode>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PendingNode {
    pub node: String,
    /// Its files of the checkpoint not yet in the store, and one of them.
    pub pending_files: u64,
    pub example: String,
    /// Seconds since the node last reported; a node silent for over a minute is likely lost.
    pub silent_seconds: u64,
}
