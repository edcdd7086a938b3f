//! Where the filesystem gets what it does not hold locally: the cache workers, or the source
//! store directly while the workers are unreachable. A failed worker call marks the workers
//! down for a moment; calls then go to the source, and after the pause the workers are tried
//! again, so reads return to them when they recover. The reader never sees the switch.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};

use super::block_buffers::BlockBuffer;
use super::error::FsError;
use crate::metrics::dataset::OriginLabel;
use crate::metrics::FuseMetrics;
use granary_cache::block::block_range;
use granary_cache::client::{ClientError, WorkerPool};
use granary_cache::proto::FileInfo;
use granary_store::source::{ListedEntry, SourceStore};

/// How long calls skip the workers after they failed.
const RETRY_WORKERS_AFTER: Duration = Duration::from_secs(2);

/// Where a block came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Local,
    ShortCircuit,
    Worker,
    Source,
}

impl Origin {
    pub fn label(self) -> OriginLabel {
        OriginLabel {
            origin: match self {
                Origin::Local => "local",
                Origin::ShortCircuit => "short_circuit",
                Origin::Worker => "worker",
                Origin::Source => "source",
            },
        }
    }
}

pub struct Remote {
    workers: Option<WorkerPool>,
    source: Option<SourceStore>,
    /// Block size of files described by the source directly (the workers say their own).
    block_size: u64,
    /// When the workers last failed, in milliseconds since `epoch` plus one; 0 while they
    /// answer. An atomic: every block read checks it.
    workers_down_at: AtomicU64,
    epoch: Instant,
    metrics: Arc<FuseMetrics>,
}

enum Route<'a> {
    Workers(&'a WorkerPool),
    Source,
}

impl Remote {
    pub fn new(
        workers: Option<WorkerPool>,
        source: Option<SourceStore>,
        block_size: u64,
        metrics: Arc<FuseMetrics>,
    ) -> Self {
        Remote {
            workers,
            source,
            block_size,
            workers_down_at: AtomicU64::new(0),
            epoch: Instant::now(),
            metrics,
        }
    }

    /// Block size of files described by the source directly.
    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// Workers unless they failed a moment ago and a source is there to fall back to.
    fn route(&self) -> Result<Route<'_>, FsError> {
        match (&self.workers, &self.source) {
            (Some(workers), Some(_)) => {
                let down_at = self.workers_down_at.load(Ordering::Relaxed);
                let down = down_at != 0 && self.now_ms() - down_at < RETRY_WORKERS_AFTER.as_millis() as u64;
                Ok(if down { Route::Source } else { Route::Workers(workers) })
            }
            (Some(workers), None) => Ok(Route::Workers(workers)),
            (None, Some(_)) => Ok(Route::Source),
            (None, None) => Err(FsError::Io {
                path: String::new(),
                cause: "neither workers nor a source store are configured".into(),
            }),
        }
    }

    /// Decides what a worker error means: `Ok(())` to fall back to the source, or the error.
    fn worker_failed(&self, path: &str, err: ClientError) -> Result<(), FsError> {
        if err.is_worker_failure() && self.source.is_some() {
            if self.workers_down_at.swap(self.now_ms(), Ordering::Relaxed) == 0 {
                tracing::warn!(error = %err, "the cache workers are unreachable; reading from the source store directly until they return");
            }
            return Ok(());
        }
        Err(FsError::from_client(path, err))
    }

    fn worker_answered(&self) {
        // A load first: the common case (they never failed) writes nothing.
        if self.workers_down_at.load(Ordering::Relaxed) != 0 && self.workers_down_at.swap(0, Ordering::Relaxed) != 0 {
            tracing::info!("the cache workers answer again; reads go through them");
        }
    }

    fn source(&self) -> Result<&SourceStore, FsError> {
        self.source.as_ref().ok_or_else(|| FsError::Io {
            path: String::new(),
            cause: "no source store configured".into(),
        })
    }

    /// Metadata of `path` ("" is the root), as the workers have it cached.
    pub async fn stat(&self, path: &str) -> Result<FileInfo, FsError> {
        self.stat_with(path, false).await
    }

    /// Metadata of `path` from the store itself (the workers refresh their cache).
    pub async fn stat_fresh(&self, path: &str) -> Result<FileInfo, FsError> {
        self.stat_with(path, true).await
    }

    async fn stat_with(&self, path: &str, refresh: bool) -> Result<FileInfo, FsError> {
        if let Route::Workers(workers) = self.route()? {
            match workers.stat(path, refresh).await {
                Ok(info) => {
                    self.worker_answered();
                    return Ok(info);
                }
                Err(e) => self.worker_failed(path, e)?,
            }
        }
        let meta = self
            .source()?
            .stat(path)
            .await
            .map_err(|e| FsError::from_source(path, e))?;
        Ok(FileInfo::from_meta(&meta, self.block_size))
    }

    /// The entries of directory `path`, streamed.
    pub async fn list(&self, path: &str) -> Result<BoxStream<'static, Result<FileInfo, FsError>>, FsError> {
        if let Route::Workers(workers) = self.route()? {
            match workers.list(path, false).await {
                Ok(stream) => {
                    self.worker_answered();
                    let dir = path.to_string();
                    return Ok(stream.map_err(move |e| FsError::from_client(&dir, e)).boxed());
                }
                Err(e) => self.worker_failed(path, e)?,
            }
        }
        let source = self.source()?.clone();
        let block_size = self.block_size;
        let dir = path.to_string();
        let listing = source
            .list(path, false)
            .await
            .map_err(|e| FsError::from_source(path, e))?;
        Ok(listing
            .map(move |entry| {
                let source = source.clone();
                let dir = dir.clone();
                async move {
                    let meta = match entry.map_err(|e| FsError::from_source(&dir, e))? {
                        ListedEntry::Known(meta) => meta,
                        ListedEntry::NeedsStat(path) => {
                            source.stat(&path).await.map_err(|e| FsError::from_source(&path, e))?
                        }
                    };
                    Ok(FileInfo::from_meta(&meta, block_size))
                }
            })
            .buffered(32)
            .boxed())
    }

    /// Whether reads go to the workers now (they are configured and not marked down).
    pub fn uses_workers(&self) -> bool {
        matches!(self.route(), Ok(Route::Workers(_)))
    }

    /// Asks the block's owners to cache block `index` of `file` (no bytes come back).
    pub async fn warm(&self, file: &FileInfo, index: u64) -> Result<(), FsError> {
        match self.route()? {
            Route::Workers(workers) => {
                self.metrics.warmed_ahead.inc();
                workers
                    .warm_block(file, index)
                    .await
                    .map(|_| ())
                    .map_err(|e| FsError::from_client(&file.path, e))
            }
            Route::Source => Ok(()),
        }
    }

    /// Block `index` of `file`, whole; from a worker it is copied into `buffer`.
    pub async fn read_block(
        &self,
        file: &FileInfo,
        index: u64,
        mut buffer: BlockBuffer,
    ) -> Result<(Bytes, Origin), FsError> {
        if let Route::Workers(workers) = self.route()? {
            match workers.read_block_into(file, index, 0, 0, buffer.as_mut()).await {
                Ok(_tier) => {
                    self.worker_answered();
                    return Ok((buffer.freeze(), Origin::Worker));
                }
                Err(e) => self.worker_failed(&file.path, e)?,
            }
        }
        drop(buffer);
        let range = block_range(file.size, file.block_size.max(1), index);
        let data = self
            .source()?
            .read_range(&file.path, &file.version, range)
            .await
            .map_err(|e| FsError::from_source(&file.path, e))?;
        if self.workers.is_some() {
            self.metrics.fallback_reads.inc();
        }
        Ok((data, Origin::Source))
    }
}
