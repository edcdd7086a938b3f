//! The cache worker's Prometheus metrics. Names are prefixed `granary_`; the dashboards and
//! the metrics table in the README use exactly these.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TierLabel {
    pub tier: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabel {
    pub method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: &'static str,
}

pub const MEMORY: TierLabel = TierLabel { tier: "memory" };
pub const DISK: TierLabel = TierLabel { tier: "disk" };
pub const SOURCE: TierLabel = TierLabel { tier: "source" };

pub struct WorkerMetrics {
    pub hits: Family<TierLabel, Counter>,
    pub misses: Counter,
    pub served_bytes: Family<TierLabel, Counter>,
    pub source_reads: Counter,
    pub source_read_bytes: Counter,
    pub source_errors: Family<KindLabel, Counter>,
    pub used_bytes: Family<TierLabel, Gauge>,
    pub capacity_bytes: Family<TierLabel, Gauge>,
    pub blocks: Family<TierLabel, Gauge>,
    pub evictions: Family<TierLabel, Counter>,
    pub admissions_rejected: Family<TierLabel, Counter>,
    pub corrupt_blocks: Counter,
    pub disk_errors: Counter,
    pub singleflight_shared: Counter,
    pub disk_write_pending_bytes: Gauge,
    pub metadata_requests: Family<StateLabel, Counter>,
    pub listings: Family<StateLabel, Counter>,
    pub source_lists: Counter,
    pub peer_fills: Family<StateLabel, Counter>,
    pub peer_fill_bytes: Counter,
    pub request_duration: Family<MethodLabel, Histogram>,
    pub prewarm_files: Family<StateLabel, Gauge>,
    pub prewarm_bytes: Family<StateLabel, Gauge>,
    pub prewarm_running: Gauge,
}

impl WorkerMetrics {
    /// `source_lists` is the source store's own count of listing requests
    /// ([`granary_store::source::SourceStore::list_requests`]).
    pub fn register(registry: &mut Registry, source_lists: Counter) -> Self {
        let metrics = WorkerMetrics {
            hits: Family::default(),
            misses: Counter::default(),
            served_bytes: Family::default(),
            source_reads: Counter::default(),
            source_read_bytes: Counter::default(),
            source_errors: Family::default(),
            used_bytes: Family::default(),
            capacity_bytes: Family::default(),
            blocks: Family::default(),
            evictions: Family::default(),
            admissions_rejected: Family::default(),
            corrupt_blocks: Counter::default(),
            disk_errors: Counter::default(),
            singleflight_shared: Counter::default(),
            disk_write_pending_bytes: Gauge::default(),
            metadata_requests: Family::default(),
            listings: Family::default(),
            source_lists,
            peer_fills: Family::default(),
            peer_fill_bytes: Counter::default(),
            request_duration: Family::new_with_constructor(|| {
                // 50 µs .. ~26 s
                Histogram::new(exponential_buckets(0.00005, 2.0, 20))
            }),
            prewarm_files: Family::default(),
            prewarm_bytes: Family::default(),
            prewarm_running: Gauge::default(),
        };
        let r = registry;
        r.register(
            "granary_cache_hits",
            "Block reads served from a cache tier",
            metrics.hits.clone(),
        );
        r.register(
            "granary_cache_misses",
            "Block reads that had to go to the source store",
            metrics.misses.clone(),
        );
        r.register(
            "granary_cache_served_bytes",
            "Bytes served to clients and peers, by where they came from (memory, disk, source, peer)",
            metrics.served_bytes.clone(),
        );
        r.register(
            "granary_source_reads",
            "Range reads made to the source store",
            metrics.source_reads.clone(),
        );
        r.register(
            "granary_source_read_bytes",
            "Bytes read from the source store",
            metrics.source_read_bytes.clone(),
        );
        r.register(
            "granary_source_errors",
            "Failed source store operations, by kind",
            metrics.source_errors.clone(),
        );
        r.register(
            "granary_cache_used_bytes",
            "Bytes held by each cache tier",
            metrics.used_bytes.clone(),
        );
        r.register(
            "granary_cache_capacity_bytes",
            "Byte budget of each cache tier",
            metrics.capacity_bytes.clone(),
        );
        r.register(
            "granary_cache_blocks",
            "Blocks held by each cache tier",
            metrics.blocks.clone(),
        );
        r.register(
            "granary_cache_evictions",
            "Blocks evicted from each tier",
            metrics.evictions.clone(),
        );
        r.register(
            "granary_cache_admissions_rejected",
            "Blocks not admitted to a tier (pin policy full, or larger than the tier)",
            metrics.admissions_rejected.clone(),
        );
        r.register(
            "granary_cache_corrupt_blocks",
            "Block files found corrupt (checksum, length or name mismatch), dropped and refetched",
            metrics.corrupt_blocks.clone(),
        );
        r.register(
            "granary_cache_disk_errors",
            "Disk tier I/O failures; reads were served from the source instead",
            metrics.disk_errors.clone(),
        );
        r.register(
            "granary_singleflight_shared",
            "Misses that joined a source read already in flight for the same block",
            metrics.singleflight_shared.clone(),
        );
        r.register(
            "granary_cache_disk_write_pending_bytes",
            "Fetched bytes served already and still on their way to the disk tier",
            metrics.disk_write_pending_bytes.clone(),
        );
        r.register(
            "granary_metadata_requests",
            "Stat requests by metadata cache outcome (hit, miss)",
            metrics.metadata_requests.clone(),
        );
        r.register(
            "granary_listings",
            "Directory listings served, by outcome: hit (cached), shared (joined a listing being read), miss (read from the store)",
            metrics.listings.clone(),
        );
        r.register(
            "granary_source_lists",
            "Listing requests this worker sent to the source store, each page of a listing counted (a local directory listing is one)",
            metrics.source_lists.clone(),
        );
        r.register(
            "granary_peer_fills",
            "Misses this worker tried to fill from another worker before the store, by outcome (filled, missed, failed)",
            metrics.peer_fills.clone(),
        );
        r.register(
            "granary_peer_fill_bytes",
            "Bytes this worker filled from other workers instead of the store",
            metrics.peer_fill_bytes.clone(),
        );
        r.register(
            "granary_worker_request_duration_seconds",
            "Worker gRPC request latency by method",
            metrics.request_duration.clone(),
        );
        r.register(
            "granary_prewarm_files",
            "Files of the current or last prewarm, by state (total, done, failed)",
            metrics.prewarm_files.clone(),
        );
        r.register(
            "granary_prewarm_bytes",
            "Bytes of the current or last prewarm, by state (total, done)",
            metrics.prewarm_bytes.clone(),
        );
        r.register(
            "granary_prewarm_running",
            "Prewarms running on this worker",
            metrics.prewarm_running.clone(),
        );
        metrics
    }
}
