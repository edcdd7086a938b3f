//! Metrics of checkpoint volumes (`granary_checkpoint_*`). The README's metrics table and the
//! Checkpoints dashboard use exactly these names. Gauges carry the target store's URI, so
//! one node daemon's volumes are told apart; counters are summed per process.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TargetLabel {
    pub target: String,
}

/// An upload failure: the target and why (`permission_denied`, `not_found`, `unavailable`,
/// `failed`, `local`), so an alert tells refused credentials from an outage.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UploadFailureLabel {
    pub target: String,
    pub reason: String,
}

pub struct CheckpointMetrics {
    pub pending_bytes: Family<TargetLabel, Gauge>,
    pub pending_files: Family<TargetLabel, Gauge>,
    pub oldest_pending_seconds: Family<TargetLabel, Gauge>,
    pub writeback_used_bytes: Family<TargetLabel, Gauge>,
    pub writeback_limit_bytes: Family<TargetLabel, Gauge>,
    pub uploaded_bytes: Counter,
    pub uploaded_files: Counter,
    /// Files whose parts were uploaded while they were written (finished at close).
    pub streamed_files: Counter,
    pub upload_seconds: Histogram,
    pub upload_retries: Counter,
    pub upload_failures: Family<UploadFailureLabel, Counter>,
    pub deleted_objects: Counter,
    pub commits: Counter,
    pub commit_latency_seconds: Histogram,
    pub retention_deleted: Counter,
    pub write_waits: Counter,
    pub evicted_bytes: Counter,
    pub fetched_bytes: Counter,
    pub broken_files: Counter,
}

impl CheckpointMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = CheckpointMetrics {
            pending_bytes: Family::default(),
            pending_files: Family::default(),
            oldest_pending_seconds: Family::default(),
            writeback_used_bytes: Family::default(),
            writeback_limit_bytes: Family::default(),
            uploaded_bytes: Counter::default(),
            uploaded_files: Counter::default(),
            streamed_files: Counter::default(),
            // 10 ms .. ~3 h
            upload_seconds: Histogram::new(exponential_buckets(0.01, 2.0, 20)),
            upload_retries: Counter::default(),
            upload_failures: Family::default(),
            deleted_objects: Counter::default(),
            commits: Counter::default(),
            commit_latency_seconds: Histogram::new(exponential_buckets(0.01, 2.0, 20)),
            retention_deleted: Counter::default(),
            write_waits: Counter::default(),
            evicted_bytes: Counter::default(),
            fetched_bytes: Counter::default(),
            broken_files: Counter::default(),
        };
        let r = registry.sub_registry_with_prefix("granary_checkpoint");
        r.register(
            "pending_bytes",
            "Bytes of closed files not yet in the target store",
            m.pending_bytes.clone(),
        );
        r.register(
            "pending_files",
            "Closed files not yet in the target store",
            m.pending_files.clone(),
        );
        r.register(
            "oldest_pending_seconds",
            "Age of the oldest closed file not yet in the target store",
            m.oldest_pending_seconds.clone(),
        );
        r.register(
            "writeback_used_bytes",
            "Bytes held in the write-back area (pending and kept copies)",
            m.writeback_used_bytes.clone(),
        );
        r.register(
            "writeback_limit_bytes",
            "Size of the write-back area (--writeback-size)",
            m.writeback_limit_bytes.clone(),
        );
        r.register(
            "uploaded_bytes",
            "Bytes uploaded to the target store",
            m.uploaded_bytes.clone(),
        );
        r.register(
            "uploaded_files",
            "Files uploaded to the target store",
            m.uploaded_files.clone(),
        );
        r.register(
            "streamed_files",
            "Files whose parts were uploaded while they were written, finished at close",
            m.streamed_files.clone(),
        );
        r.register(
            "upload_seconds",
            "Time to upload one file (parallel multipart)",
            m.upload_seconds.clone(),
        );
        r.register(
            "upload_retries",
            "Uploads and deletes that failed and were retried with backoff",
            m.upload_retries.clone(),
        );
        r.register(
            "upload_failures",
            "Failed uploads by target and reason (permission_denied: fix the volume's Secret or the bucket policy)",
            m.upload_failures.clone(),
        );
        r.register(
            "deleted_objects",
            "Objects deleted in the target store (removed or renamed files)",
            m.deleted_objects.clone(),
        );
        r.register(
            "commits",
            "Checkpoints committed (marker uploaded last)",
            m.commits.clone(),
        );
        r.register(
            "commit_latency_seconds",
            "From the marker file's close to the checkpoint committed in the store",
            m.commit_latency_seconds.clone(),
        );
        r.register(
            "retention_deleted",
            "Committed checkpoints deleted by retention (--keep-last)",
            m.retention_deleted.clone(),
        );
        r.register(
            "write_waits",
            "Writes that waited for room in the write-back area (backpressure)",
            m.write_waits.clone(),
        );
        r.register(
            "evicted_bytes",
            "Bytes of uploaded files dropped from the write-back area to make room",
            m.evicted_bytes.clone(),
        );
        r.register(
            "fetched_bytes",
            "Bytes copied from the target store into the write-back area (reads of files not held locally)",
            m.fetched_bytes.clone(),
        );
        r.register(
            "broken_files",
            "Files whose writes failed and which are therefore never uploaded",
            m.broken_files.clone(),
        );
        m
    }
}
