//! How the filesystem gets a block: memory, then the node-local file cache, then a
//! co-located worker's block files (short circuit), then the workers (or the source store
//! while they are down). Concurrent requests for one block share one fetch. Every block held
//! in memory holds a lease on the memory budget.

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;

use super::block_buffers::BlockBuffers;
use super::block_cache::BlockCache;
use super::error::FsError;
use super::local_files::{LoadSlot, LocalFileCache};
use super::memory_budget::{MemoryBudget, MemoryLease, Reclaim};
use super::remote::{Origin, Remote};
use crate::metrics::FuseMetrics;
use granary_cache::block::{block_range, BlockKey, BlockName};
use granary_cache::proto::FileInfo;
use granary_cache::singleflight::SingleFlight;
use granary_cache::tiers::read_block_file_into;

/// Blocks one file's fill into the node-local cache fetches at once (a load fills several
/// files at once besides).
const FILL_BLOCKS_IN_FLIGHT: usize = 4;

pub struct BlockFetcher {
    pub remote: Arc<Remote>,
    pub cache: BlockCache,
    pub budget: Arc<MemoryBudget>,
    buffers: Arc<BlockBuffers>,
    pub local: Option<Arc<LocalFileCache>>,
    /// Cache directories of workers on this node, read directly.
    pub short_circuit: Arc<[PathBuf]>,
    flights: Arc<SingleFlight<BlockName, FsError>>,
    pub metrics: Arc<FuseMetrics>,
}

/// What the budget may ask to shrink when a reader needs memory: the mount's free block
/// buffers first (they hold leases too), then its cached blocks.
struct MountCaches<'a> {
    buffers: &'a BlockBuffers,
    cache: &'a BlockCache,
}

impl Reclaim for MountCaches<'_> {
    fn reclaim(&self, bytes: u64) -> u64 {
        let freed = self.buffers.reclaim(bytes);
        if freed >= bytes {
            return freed;
        }
        freed + self.cache.reclaim(bytes - freed)
    }
}

fn block_len(file: &FileInfo, index: u64) -> u64 {
    let r = block_range(file.size, file.block_size.max(1), index);
    r.end - r.start
}

impl BlockFetcher {
    pub fn new(
        remote: Arc<Remote>,
        budget: Arc<MemoryBudget>,
        local: Option<Arc<LocalFileCache>>,
        short_circuit: Vec<PathBuf>,
        metrics: Arc<FuseMetrics>,
    ) -> Self {
        BlockFetcher {
            buffers: BlockBuffers::new(remote.block_size(), Arc::clone(&budget)),
            remote,
            cache: BlockCache::default(),
            budget,
            local,
            short_circuit: short_circuit.into(),
            flights: Arc::new(SingleFlight::default()),
            metrics,
        }
    }

    /// Block `index` of `file`, waiting for memory if the budget is exhausted.
    pub async fn block(self: &Arc<Self>, file: &FileInfo, index: u64) -> Result<Bytes, FsError> {
        let name = BlockName::of(&file.path, &file.version, index);
        if let Some(data) = self.cache.get(&name) {
            return Ok(data);
        }
        let this = Arc::clone(self);
        let file = file.clone();
        let (result, _) = self
            .flights
            .run(name, async move {
                let caches = MountCaches {
                    buffers: &this.buffers,
                    cache: &this.cache,
                };
                let lease = this.budget.reserve(block_len(&file, index), &caches).await;
                this.fetch(file, index, name, lease, true).await
            })
            .await;
        result
    }

    /// Memory for work that may be skipped (readahead, local copies): taken from free memory,
    /// else from cached blocks readers have taken (finished ones first), else not at all.
    /// Neither readers' memory nor blocks read ahead and not read yet are taken (taking
    /// those made a sequential read fetch some blocks twice).
    fn reserve_without_waiting(&self, len: u64) -> Option<MemoryLease> {
        self.budget.try_reserve(len).or_else(|| {
            let freed = self.buffers.reclaim(len);
            if freed < len {
                self.cache.reclaim_read(len - freed);
            }
            self.budget.try_reserve(len)
        })
    }

    /// Starts fetching block `index` ahead of the reader, if memory is free right now and it
    /// is not held or on its way already.
    pub fn prefetch(self: &Arc<Self>, file: &FileInfo, index: u64) {
        let name = BlockName::of(&file.path, &file.version, index);
        // Only new work takes memory: a block held or on its way is left alone (asking for
        // memory first would push out blocks the reader is about to use).
        if self.cache.contains(&name) || self.flights.in_flight(&name) {
            return;
        }
        // Readahead may push old cached blocks out, but never waits for memory.
        let Some(lease) = self.reserve_without_waiting(block_len(file, index)) else {
            return;
        };
        self.metrics.prefetched_blocks.inc();
        let this = Arc::clone(self);
        let file = file.clone();
        tokio::spawn(async move {
            let flights = Arc::clone(&this.flights);
            let (result, _) = flights.run(name, this.fetch(file, index, name, lease, false)).await;
            if let Err(e) = result {
                tracing::debug!(error = %e, "readahead failed; the reader will fetch the block itself");
            }
        });
    }

    async fn fetch(
        self: Arc<Self>,
        file: FileInfo,
        index: u64,
        name: BlockName,
        lease: MemoryLease,
        for_reader: bool,
    ) -> Result<Bytes, FsError> {
        // A reader may have fetched it between the caller's look and this flight.
        if let Some(data) = self.cache.get(&name) {
            return Ok(data);
        }
        let (data, origin) = self.fetch_uncached(&file, index).await?;
        if !matches!(origin, Origin::Local) {
            if let Some(local) = &self.local {
                // Only with memory to spare: the local copy is an optimisation.
                if let Some(write_lease) = self.reserve_without_waiting(data.len() as u64) {
                    local.store(&file, index, data.clone(), write_lease);
                }
            }
        }
        self.cache.insert(name, data.clone(), lease, for_reader);
        Ok(data)
    }

    /// Fills the node-local cache with all of `file` (a load onto the node): its blocks not
    /// there yet are fetched (memory, a co-located worker's files, the workers) and written
    /// to the local file, without entering the mount's block cache. Says whether it is
    /// complete (false: nothing to fill, an empty file); `NoRoom` when it does not fit.
    pub async fn fill_local(self: &Arc<Self>, file: &FileInfo) -> Result<bool, FsError> {
        use futures::StreamExt;
        match self.reserve_local(file)? {
            Some(LoadSlot::Admitted) => {}
            Some(_) => return Ok(true),
            None => return Ok(false),
        }
        let Some(local) = self.local.as_ref() else {
            return Err(FsError::NoNodeCache);
        };
        let blocks = granary_cache::block::block_count(file.size, file.block_size.max(1));
        let missing = (0..blocks).filter(|&index| !local.has_block(file, index));
        let mut fills = futures::stream::iter(missing.map(|index| self.fill_block(local, file, index)))
            .buffer_unordered(FILL_BLOCKS_IN_FLIGHT);
        while let Some(filled) = fills.next().await {
            filled?;
        }
        match local.open_complete(file) {
            Some(_) => Ok(true),
            None => Err(FsError::Io {
                path: file.path.clone(),
                cause: "the local copy is not complete after every block was written (evicted meanwhile?)".into(),
            }),
        }
    }

    /// Reserves room for all of `file` in the node-local cache (a load's first step):
    /// `Complete` when it is there already, `None` for an empty file, `NoRoom` when it does
    /// not fit beside the files loaded before it.
    pub fn reserve_local(&self, file: &FileInfo) -> Result<Option<LoadSlot>, FsError> {
        let local = self.local.as_ref().ok_or(FsError::NoNodeCache)?;
        if file.size == 0 {
            return Ok(None);
        }
        match local.begin_load(file) {
            Ok(LoadSlot::NoRoom) => Err(FsError::NoRoom(file.path.clone())),
            Ok(slot) => Ok(Some(slot)),
            Err(e) => Err(FsError::Io {
                path: file.path.clone(),
                cause: format!("the node-local cache: {e}"),
            }),
        }
    }

    async fn fill_block(&self, local: &Arc<LocalFileCache>, file: &FileInfo, index: u64) -> Result<(), FsError> {
        let name = BlockName::of(&file.path, &file.version, index);
        let caches = MountCaches {
            buffers: &self.buffers,
            cache: &self.cache,
        };
        // Held until the block is written: what is resident stays within the budget.
        let (data, _lease) = match self.cache.get(&name) {
            Some(data) => (data, None),
            None => {
                let lease = self.budget.reserve(block_len(file, index), &caches).await;
                let (data, _) = self.fetch_uncached(file, index).await?;
                (data, Some(lease))
            }
        };
        let len = data.len() as u64;
        if !local.write_now(file, index, data).await {
            return Err(FsError::Io {
                path: file.path.clone(),
                cause: "writing to the node-local cache failed (the cause is logged)".into(),
            });
        }
        self.metrics.node_fill_bytes.inc_by(len);
        Ok(())
    }

    /// Block `index` of `file` if it is on this node without a request: in memory, or in a
    /// co-located worker's block files.
    pub async fn block_on_node(&self, file: &FileInfo, index: u64) -> Option<Bytes> {
        let name = BlockName::of(&file.path, &file.version, index);
        if let Some(data) = self.cache.get(&name) {
            return Some(data);
        }
        self.short_circuit(file, index).await
    }

    async fn short_circuit(&self, file: &FileInfo, index: u64) -> Option<Bytes> {
        if self.short_circuit.is_empty() {
            return None;
        }
        let len = block_len(file, index) as usize;
        let key = BlockKey {
            path: file.path.clone(),
            version: file.version.clone(),
            index,
        };
        let dirs = Arc::clone(&self.short_circuit);
        let buffers = Arc::clone(&self.buffers);
        tokio::task::spawn_blocking(move || {
            dirs.iter()
                .find_map(|dir| read_block_file_into(dir, &key, buffers.take(len + 4096)))
        })
        .await
        .ok()
        .flatten()
    }

    /// Block `index` from wherever it is outside memory, counted by where it came from.
    async fn fetch_uncached(&self, file: &FileInfo, index: u64) -> Result<(Bytes, Origin), FsError> {
        let (data, origin) = self.fetch_from_tiers(file, index).await?;
        self.metrics
            .read_bytes
            .get_or_create(&origin.label())
            .inc_by(data.len() as u64);
        self.metrics.block_fetches.get_or_create(&origin.label()).inc();
        Ok((data, origin))
    }

    async fn fetch_from_tiers(&self, file: &FileInfo, index: u64) -> Result<(Bytes, Origin), FsError> {
        let len = block_len(file, index) as usize;
        if let Some(local) = &self.local {
            if let Some(data) = local.read_block(file, index, self.buffers.take(len)).await {
                return Ok((data, Origin::Local));
            }
        }
        if let Some(data) = self.short_circuit(file, index).await {
            return Ok((data, Origin::ShortCircuit));
        }
        // A worker's block is copied message by message into a pooled buffer: the memory
        // held is the memory counted, and gRPC's receive buffer is reused.
        let len = block_len(file, index) as usize;
        self.remote.read_block(file, index, self.buffers.take(len)).await
    }
}
