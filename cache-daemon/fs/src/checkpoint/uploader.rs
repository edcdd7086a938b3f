//! The background uploader: takes closed files and removals from the tracker and applies
//! them to the target store, several files at once, each as a parallel multipart upload.
//! Failures are retried with backoff for as long as it takes (a store outage delays uploads,
//! it never drops them). A marker's upload commits its checkpoint, which runs retention.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use super::retention;
use super::store_view::StoreView;
use super::streaming::Streams;
use super::tracker::{parent_of, Tracker, Work};
use crate::metrics::checkpoint::{CheckpointMetrics, TargetLabel, UploadFailureLabel};
use granary_store::target::{TargetStore, TransferError};
use granary_store::{ErrorKind, Retry};

#[derive(Debug, Clone)]
pub struct UploadTuning {
    /// Parts in flight, over all files.
    pub concurrency: usize,
    pub part_size: u64,
    /// Committed checkpoints kept in the store (0: all).
    pub keep_last: usize,
}

impl UploadTuning {
    /// Files uploaded at once: up to 4, sharing the part concurrency, so many small files
    /// overlap their round trips and a single big one still gets every part slot.
    fn files_at_once(&self) -> usize {
        self.concurrency.clamp(1, 4)
    }

    pub(super) fn parts_per_file(&self) -> usize {
        self.concurrency.div_ceil(self.files_at_once()).max(1)
    }
}

const GAUGE_PERIOD: Duration = Duration::from_millis(500);

pub struct Uploader {
    /// Files whose parts went up while they were written: finished, not uploaded again.
    pub streams: Option<Arc<Streams>>,
    pub tracker: Arc<Tracker>,
    pub target: TargetStore,
    pub view: Arc<StoreView>,
    pub tuning: UploadTuning,
    pub metrics: Arc<CheckpointMetrics>,
    pub health: Arc<UploadHealth>,
}

/// Whether the target refuses this volume's uploads for a reason retrying cannot cure
/// (refused credentials, a missing bucket), with the message that says what to fix; the
/// node daemon shows it as the volume's condition. Uploads keep retrying, so a fixed Secret
/// (rotated in) or bucket policy lets them through, which clears it.
#[derive(Debug, Default)]
pub struct UploadHealth {
    refusal: std::sync::Mutex<Option<String>>,
}

impl UploadHealth {
    /// Why uploads are refused, while they are.
    pub fn refusal(&self) -> Option<String> {
        self.refusal.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Records a refusal; true when it is new (so it is logged once, not per retry).
    fn refused(&self, message: String) -> bool {
        self.refusal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(message)
            .is_none()
    }

    fn accepted(&self) -> bool {
        self.refusal.lock().unwrap_or_else(|p| p.into_inner()).take().is_some()
    }
}

impl Uploader {
    fn label(&self) -> TargetLabel {
        TargetLabel {
            target: self.target.uri().to_string(),
        }
    }

    /// Counts a failed upload by its kind; a permanent one becomes the volume's condition.
    fn upload_failed(&self, path: &str, size: u64, error: &TransferError) {
        self.metrics.upload_retries.inc();
        let reason = match error {
            TransferError::Local { .. } => "local",
            TransferError::Store(e) => e.kind().label(),
        };
        self.metrics
            .upload_failures
            .get_or_create(&UploadFailureLabel {
                target: self.target.uri().to_string(),
                reason: reason.to_string(),
            })
            .inc();
        match error {
            // Refused credentials come back "persistent" from opendal's retry layer, so the
            // kind decides as much as the retry status.
            TransferError::Store(e) if e.kind() == ErrorKind::PermissionDenied || e.retry() == Retry::Permanent => {
                let message = format!(
                    "uploads to {} are refused: {e}; fix the volume's Secret (it is applied to the running mount within a minute) or the bucket and its policy; uploads retry meanwhile and resume by themselves",
                    self.target.uri()
                );
                if self.health.refused(message.clone()) {
                    tracing::error!(path, size, reason, "{message}");
                } else {
                    tracing::debug!(path, size, reason, error = %e, "upload still refused");
                }
            }
            _ => tracing::warn!(path, size, error = %error, "upload failed; retrying later"),
        }
    }

    /// Runs until `stop` resolves and nothing is running (what is pending stays in the
    /// journal for the next start).
    pub async fn run(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut running: JoinSet<()> = JoinSet::new();
        let label = self.label();
        self.metrics
            .writeback_limit_bytes
            .get_or_create(&label)
            .set(self.tracker.limit() as i64);
        if let Some(marker) = self.tracker.marker() {
            // Which checkpoint is newest, so its local copy is kept.
            match retention::enforce(&self.target, &self.tracker, marker, 0).await {
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "cannot list the committed checkpoints yet"),
            }
        }
        // Often enough that a held upload (the grace after close, a retry) starts on time.
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        // The gauges scan every file: twice a second is plenty for a scrape.
        let mut published: Option<Instant> = None;
        loop {
            let free = self.tuning.files_at_once().saturating_sub(running.len());
            for work in self.tracker.take_work(free) {
                let me = Arc::clone(&self);
                running.spawn(async move { me.perform(work).await });
            }
            let stopping = *stop.borrow() && running.is_empty();
            if stopping || published.is_none_or(|t| t.elapsed() >= GAUGE_PERIOD) {
                self.publish_gauges(&label);
                published = Some(Instant::now());
            }
            if stopping {
                return;
            }
            tokio::select! {
                _ = self.tracker.work_ready.notified() => {}
                Some(_) = running.join_next(), if !running.is_empty() => {}
                _ = tick.tick() => {}
                _ = stop.changed() => {}
            }
        }
    }

    fn publish_gauges(&self, label: &TargetLabel) {
        let pending = self.tracker.pending();
        self.metrics
            .pending_bytes
            .get_or_create(label)
            .set(pending.bytes as i64);
        self.metrics
            .pending_files
            .get_or_create(label)
            .set(pending.files as i64);
        self.metrics
            .oldest_pending_seconds
            .get_or_create(label)
            .set(pending.oldest.map_or(0, |d| d.as_secs() as i64));
        self.metrics
            .writeback_used_bytes
            .get_or_create(label)
            .set(self.tracker.used() as i64);
    }

    async fn perform(&self, work: Work) {
        match work {
            Work::Upload { path, seq, size } => self.upload(path, seq, size).await,
            Work::Delete { path, seq } => {
                let result = self.target.delete(&path).await;
                if let Err(e) = &result {
                    self.metrics.upload_retries.inc();
                    tracing::warn!(path, error = %e, "deleting from the target store failed; retrying later");
                } else {
                    self.metrics.deleted_objects.inc();
                    self.view.invalidate_parent(&path);
                }
                if let Err(e) = self.tracker.delete_finished(&path, seq, result.is_ok()) {
                    tracing::error!(path, error = %e, "cannot write the journal");
                }
            }
        }
    }

    async fn upload(&self, path: String, seq: u64, size: u64) {
        let started = Instant::now();
        let local = self.tracker.local_path(&path);
        let streamed = match &self.streams {
            Some(streams) => streams.finish(&path, size).await,
            None => None,
        };
        let result = match streamed {
            Some(Ok(bytes)) => {
                self.metrics.streamed_files.inc();
                Ok(bytes)
            }
            other => {
                if let Some(Err(e)) = other {
                    tracing::debug!(path, error = %e, "the streaming upload failed; uploading the file whole");
                }
                self.target
                    .upload(&path, &local, self.tuning.part_size, self.tuning.parts_per_file())
                    .await
            }
        };
        let ok = match &result {
            Ok(bytes) => {
                self.metrics.uploaded_bytes.inc_by(*bytes);
                self.metrics.uploaded_files.inc();
                self.metrics.upload_seconds.observe(started.elapsed().as_secs_f64());
                tracing::debug!(path, bytes, seconds = started.elapsed().as_secs_f64(), "uploaded");
                true
            }
            Err(TransferError::Local { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                // Removed or renamed meanwhile; the tracker holds the newer state.
                tracing::debug!(path, "file went away before its upload");
                false
            }
            Err(e) => {
                self.upload_failed(&path, size, e);
                false
            }
        };
        if ok && self.health.accepted() {
            tracing::info!(path, target = self.target.uri(), "the target accepts uploads again");
        }
        let commit_started = ok.then(|| self.tracker.closed_at(&path)).flatten();
        let commits = ok && self.tracker.marks_commit(&path);
        if commits {
            // Not idle until retention is done, though the upload is.
            self.tracker.committing(true);
        }
        if let Err(e) = self.tracker.upload_finished(&path, seq, ok) {
            tracing::error!(path, error = %e, "cannot write the journal");
        }
        if !ok {
            return;
        }
        self.view.invalidate_parent(&path);
        if commits {
            self.committed(&path, commit_started).await;
            self.tracker.committing(false);
        }
    }

    async fn committed(&self, marker_path: &str, closed_at: Option<Instant>) {
        let dir = parent_of(marker_path).to_string();
        self.metrics.commits.inc();
        if let Some(t) = closed_at {
            self.metrics.commit_latency_seconds.observe(t.elapsed().as_secs_f64());
        }
        tracing::info!(checkpoint = dir, "checkpoint committed in the target store");
        self.tracker.set_latest_commit(Some(dir));
        let Some(marker) = self.tracker.marker() else { return };
        match retention::enforce(&self.target, &self.tracker, marker, self.tuning.keep_last).await {
            Ok(deleted) => {
                self.metrics.retention_deleted.inc_by(deleted.len() as u64);
                for dir in deleted {
                    self.view.invalidate_tree(&dir);
                }
            }
            Err(e) => tracing::warn!(error = %e, "retention failed; it runs again after the next commit"),
        }
    }
}
