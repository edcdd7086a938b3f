//! The worker's metadata cache: stat results kept for the dataset's TTL (or forever for
//! immutable snapshots), bounded in entries.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::metrics::StateLabel;
use crate::metrics::WorkerMetrics;
use granary_store::source::{normalize_path, FileMeta, SourceStore};
use granary_store::units::MetadataTtl;
use granary_store::StoreError;

pub struct MetadataCache {
    source: SourceStore,
    ttl: MetadataTtl,
    max_entries: usize,
    entries: Mutex<HashMap<String, (FileMeta, Instant)>>,
    metrics: Arc<WorkerMetrics>,
}

impl MetadataCache {
    pub fn new(source: SourceStore, ttl: MetadataTtl, max_entries: usize, metrics: Arc<WorkerMetrics>) -> Self {
        MetadataCache {
            source,
            ttl,
            max_entries,
            entries: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    pub fn ttl(&self) -> MetadataTtl {
        self.ttl
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (FileMeta, Instant)>> {
        self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Metadata of `path`, from the cache while fresh; `refresh` goes to the source.
    pub async fn stat(&self, path: &str, refresh: bool) -> Result<FileMeta, StoreError> {
        let path = normalize_path(path)?;
        if !refresh {
            if let Some((meta, at)) = self.lock().get(&path) {
                if self.ttl.is_fresh(at.elapsed()) {
                    self.metrics
                        .metadata_requests
                        .get_or_create(&StateLabel { state: "hit" })
                        .inc();
                    return Ok(meta.clone());
                }
            }
        }
        self.metrics
            .metadata_requests
            .get_or_create(&StateLabel { state: "miss" })
            .inc();
        let meta = self.source.stat(&path).await?;
        self.insert(meta.clone());
        Ok(meta)
    }

    /// Records metadata learned elsewhere (a listing).
    pub fn insert(&self, meta: FileMeta) {
        if self.ttl == MetadataTtl::Expires(std::time::Duration::ZERO) {
            return;
        }
        let mut entries = self.lock();
        if entries.len() >= self.max_entries {
            let ttl = self.ttl;
            entries.retain(|_, (_, at)| ttl.is_fresh(at.elapsed()));
            if entries.len() >= self.max_entries {
                // Still full of fresh entries: start over rather than grow without bound.
                entries.clear();
            }
        }
        entries.insert(meta.path.clone(), (meta, Instant::now()));
    }
}
