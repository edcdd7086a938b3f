//! `Dataset` (granary.dev/v1alpha1): a source store cached by a set of workers, prewarmed on
//! request, and published as a PVC named after the Dataset.

// Each `printcolumn(...)` repeats `type_`, which clippy takes for a duplicated attribute.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{ByteQuantity, StoreRef};

/// Condition types of a Dataset's status.
pub const SOURCE_REACHABLE: &str = "SourceReachable";
pub const WORKERS_READY: &str = "WorkersReady";
pub const PREWARMED: &str = "Prewarmed";

#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "granary.dev",
    version = "v1alpha1",
    kind = "Dataset",
    namespaced,
    status = "DatasetStatus",
    shortname = "gds",
    category = "granary",
    doc = "A source store cached on the cluster's nodes and mounted into training pods through the PVC of the same name.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Workers", type_ = "string", json_path = ".status.workersSummary"),
    printcolumn(name = "Prewarm", type_ = "string", json_path = ".status.prewarm.summary"),
    printcolumn(name = "Source", type_ = "string", json_path = ".spec.source.uri", priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct DatasetSpec {
    /// The store the data is read from.
    pub source: StoreRef,
    /// How much to cache and where.
    #[serde(default)]
    pub cache: CacheSpec,
    /// What to load into the cache before (or while) training runs.
    #[serde(default)]
    pub prewarm: PrewarmSpec,
    /// Where the cache workers run.
    #[serde(default, skip_serializing_if = "WorkerPlacement::is_empty")]
    pub placement: WorkerPlacement,
    /// The granary image of the workers; the operator's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CacheSpec {
    /// Cache workers (StatefulSet replicas); blocks are spread over them.
    #[serde(default = "default_workers")]
    #[schemars(range(min = 1, max = 1024))]
    pub workers: i32,
    /// Block size, the same on every worker: 4Mi suits multi-GB shards and small samples alike.
    #[serde(default = "default_block_size")]
    pub block_size: ByteQuantity,
    /// Memory and/or disk, per worker.
    #[serde(default = "default_tiers")]
    #[schemars(length(min = 1, max = 2))]
    pub tiers: Vec<CacheTier>,
    /// LRU evicts least recently used blocks; Pin admits until full and never evicts (best for
    /// shuffled epochs that read everything once each).
    #[serde(default)]
    pub eviction: Eviction,
    /// Workers each block is cached on; more for files hundreds of pods read at once.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 1, max = 16))]
    pub replicas: i32,
    /// How long file metadata is cached: `60s`, `5m`, `never` for immutable snapshots.
    #[serde(default = "default_metadata_ttl", rename = "metadataTTL")]
    #[schemars(regex(pattern = r"^(never|[0-9]+(ms|s|m|h))$"))]
    pub metadata_ttl: String,
}

impl Default for CacheSpec {
    fn default() -> Self {
        CacheSpec {
            workers: default_workers(),
            block_size: default_block_size(),
            tiers: default_tiers(),
            eviction: Eviction::default(),
            replicas: default_replicas(),
            metadata_ttl: default_metadata_ttl(),
        }
    }
}

fn default_workers() -> i32 {
    1
}
fn default_block_size() -> ByteQuantity {
    ByteQuantity::new("4Mi")
}
fn default_tiers() -> Vec<CacheTier> {
    vec![CacheTier {
        medium: Medium::Memory,
        size: ByteQuantity::new("1Gi"),
        storage_class_name: None,
    }]
}
fn default_replicas() -> i32 {
    1
}
fn default_metadata_ttl() -> String {
    "60s".into()
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CacheTier {
    pub medium: Medium,
    /// Bytes of this tier per worker.
    pub size: ByteQuantity,
    /// Disk tier: the StorageClass of each worker's PVC (the cluster default when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Medium {
    Memory,
    Disk,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum Eviction {
    #[default]
    #[serde(rename = "LRU")]
    Lru,
    Pin,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PrewarmSpec {
    /// Paths under the source to load (directories recursively); `/` is everything.
    #[serde(default = "default_prewarm_paths")]
    pub paths: Vec<String>,
    /// BeforeScheduling holds pods that mount the Dataset (scheduling gate) until it is loaded;
    /// Background loads while they run; None loads on demand only.
    #[serde(default)]
    pub policy: PrewarmPolicy,
    /// Blocks fetched at once per worker (the worker's default when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1024))]
    pub parallelism: Option<i32>,
    /// Also load the data onto the nodes that read it. PodNodes: every pod mounting the
    /// Dataset gets an init container that fills its node's node-local cache with the
    /// prewarm paths (`granary-cache load --mount`), so its containers start with the data
    /// on their node, read by the kernel (passthrough); what does not fit stays on the
    /// workers. Needs the node daemons' node-local cache (chart value node.localCacheSize).
    #[serde(default, skip_serializing_if = "NodePrewarm::is_none")]
    pub on_nodes: NodePrewarm,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum NodePrewarm {
    /// The data stays on the workers; nodes keep what their reads copy.
    #[default]
    None,
    /// Loaded onto each node that runs a pod mounting the Dataset, before its containers start.
    PodNodes,
}

impl NodePrewarm {
    fn is_none(&self) -> bool {
        *self == NodePrewarm::None
    }
}

impl Default for PrewarmSpec {
    fn default() -> Self {
        PrewarmSpec {
            paths: default_prewarm_paths(),
            policy: PrewarmPolicy::default(),
            parallelism: None,
            on_nodes: NodePrewarm::None,
        }
    }
}

fn default_prewarm_paths() -> Vec<String> {
    vec!["/".into()]
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum PrewarmPolicy {
    BeforeScheduling,
    #[default]
    Background,
    None,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkerPlacement {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// The worker container's resources; memory defaults to the memory tier plus 512Mi.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
}

impl WorkerPlacement {
    fn is_empty(&self) -> bool {
        self == &WorkerPlacement::default()
    }
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum DatasetPhase {
    #[default]
    Pending,
    Prewarming,
    Ready,
    Failed,
}

impl std::fmt::Display for DatasetPhase {
    /// As it is spelled in `status.phase`, for Events and logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DatasetPhase::Pending => "Pending",
            DatasetPhase::Prewarming => "Prewarming",
            DatasetPhase::Ready => "Ready",
            DatasetPhase::Failed => "Failed",
        })
    }
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatasetStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<DatasetPhase>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default)]
    pub workers_ready: i32,
    #[serde(default)]
    pub workers_desired: i32,
    /// `ready/desired`, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers_summary: Option<String>,
    /// Files and bytes under the prewarm paths, as the last prewarm listed them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_bytes: Option<u64>,
    /// Bytes held by the workers (every tier, replicas counted once each).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prewarm: Option<PrewarmStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PrewarmStatus {
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// Of bytes_done, fetched from the source (the rest was cached already, e.g. by an
    /// earlier, interrupted attempt).
    pub bytes_from_source: u64,
    pub files_done: u64,
    pub files_total: u64,
    pub failures: u64,
    /// The listing is complete, so `bytesTotal`/`filesTotal` are final; before, they count
    /// what has been listed so far and the summary says so.
    #[serde(default)]
    pub listing_done: bool,
    /// The first few failed files with their errors.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed_files: Vec<String>,
    /// Attempts so far; an interrupted attempt is resumed by the next, which skips what is cached.
    pub attempts: u32,
    /// The spec (source, paths, cache) this prewarm was for; a change starts a new prewarm.
    pub spec_hash: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished: Option<Time>,
    /// The last attempt's error, when it did not finish.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// `42% (3.1/7.4 GiB)` for `kubectl get`; while listing, `listing: 0.06 GiB of 0.07+ GiB listed so far`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
}
