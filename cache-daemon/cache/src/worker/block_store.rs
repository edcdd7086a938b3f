//! The worker's read path for one block: memory tier, then disk tier, then a peer that holds
//! or owns it ([`super::peers`]), then the source store (one fetch per block however many
//! readers miss at once), storing what was fetched in both tiers. A failing disk never fails
//! a read: it degrades to the source, with a log line and a metric.

use std::sync::Arc;

use bytes::Bytes;

use crate::block::{block_range, BlockKey, BlockName};
use crate::metrics::WorkerMetrics;
use crate::metrics::{KindLabel, TierLabel, DISK, MEMORY};
use crate::proto::Tier;
use crate::singleflight::SingleFlight;
use crate::tiers::{DiskRead, DiskTier, DiskWrite, MemoryTier};
use granary_store::source::SourceStore;
use granary_store::StoreError;

use super::peers::Peers;
use super::write_behind::WriteBehind;

/// Bytes of fetched blocks that may wait for the disk tier before fetches wait for the disk.
pub const WRITE_BEHIND_BUDGET: u64 = 256 << 20;

pub struct BlockStore {
    source: SourceStore,
    block_size: u64,
    memory: MemoryTier,
    disk: Option<DiskTier>,
    write_behind: WriteBehind,
    /// Misses that may be filled from a peer.
    peer_flights: Arc<SingleFlight<BlockName, StoreError, (Bytes, Tier)>>,
    /// Misses read from the store: requests from peers, and every miss of a block this worker
    /// owns, so an owner's clients and its replicas share one store read.
    flights: Arc<SingleFlight<BlockName, StoreError, (Bytes, Tier)>>,
    peers: Option<Arc<Peers>>,
    metrics: Arc<WorkerMetrics>,
}

/// Where a miss may be filled from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// A client's read: from a peer (the block's owner), else the store.
    PeersThenSource,
    /// A peer's read: from the store only.
    SourceOnly,
}

fn error_kind(e: &StoreError) -> &'static str {
    e.kind().label()
}

impl BlockStore {
    pub fn new(
        source: SourceStore,
        block_size: u64,
        memory: MemoryTier,
        disk: Option<DiskTier>,
        peers: Option<Arc<Peers>>,
        metrics: Arc<WorkerMetrics>,
    ) -> Self {
        let store = BlockStore {
            source,
            block_size,
            memory,
            disk,
            write_behind: WriteBehind::new(WRITE_BEHIND_BUDGET),
            peer_flights: Arc::new(SingleFlight::default()),
            flights: Arc::new(SingleFlight::default()),
            peers,
            metrics,
        };
        store.update_usage_gauges();
        store
    }

    pub fn source(&self) -> &SourceStore {
        &self.source
    }

    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    pub fn memory_usage(&self) -> (u64, u64, u64) {
        self.memory.usage()
    }

    pub fn disk_usage(&self) -> (u64, u64, u64) {
        self.disk.as_ref().map(DiskTier::usage).unwrap_or((0, 0, 0))
    }

    fn update_usage_gauges(&self) {
        for (label, (used, capacity, blocks)) in [(MEMORY, self.memory_usage()), (DISK, self.disk_usage())] {
            self.metrics.used_bytes.get_or_create(&label).set(used as i64);
            self.metrics.capacity_bytes.get_or_create(&label).set(capacity as i64);
            self.metrics.blocks.get_or_create(&label).set(blocks as i64);
        }
        self.metrics
            .disk_write_pending_bytes
            .set(self.write_behind.pending_bytes() as i64);
    }

    pub fn pending_write_bytes(&self) -> u64 {
        self.write_behind.pending_bytes()
    }

    /// Waits until every fetched block has reached the disk tier (or been refused by it).
    pub async fn flush(&self) {
        self.write_behind.flush().await;
    }

    fn admit_to_memory(&self, name: BlockName, data: Bytes) {
        if let Some(outcome) = self.memory.insert(name, data) {
            self.count_admission(MEMORY, outcome.admitted, outcome.evicted);
        }
    }

    fn count_admission(&self, tier: TierLabel, admitted: bool, evicted: usize) {
        if admitted {
            self.metrics.evictions.get_or_create(&tier).inc_by(evicted as u64);
        } else {
            self.metrics.admissions_rejected.get_or_create(&tier).inc();
        }
    }

    /// Reads one whole block of a file of `file_size` bytes.
    pub async fn read(
        self: &Arc<Self>,
        key: &BlockKey,
        file_size: u64,
        fill: Fill,
    ) -> Result<(Bytes, Tier), StoreError> {
        let name = key.name();
        if let Some(hit) = self.read_cached(key).await {
            return Ok(hit);
        }
        self.metrics.misses.inc();
        let sources = match (&self.peers, fill) {
            (Some(peers), Fill::PeersThenSource) => peers.sources(&name),
            _ => Vec::new(),
        };
        let this = Arc::clone(self);
        let key = key.clone();
        let flights = if sources.is_empty() {
            &self.flights
        } else {
            &self.peer_flights
        };
        let (result, shared) = flights
            .run(name, async move { this.fetch(name, key, file_size, sources).await })
            .await;
        if shared {
            self.metrics.singleflight_shared.inc();
        }
        result
    }

    /// A block from this worker's tiers only, counted as a hit; `None` on a miss.
    pub async fn read_cached(&self, key: &BlockKey) -> Option<(Bytes, Tier)> {
        let name = key.name();
        if let Some(data) = self.memory.get(&name) {
            self.metrics.hits.get_or_create(&MEMORY).inc();
            return Some((data, Tier::Memory));
        }
        if let Some(data) = self.write_behind.get(&name) {
            self.metrics.hits.get_or_create(&MEMORY).inc();
            return Some((data, Tier::Memory));
        }
        if let Some(disk) = &self.disk {
            match disk.read(name, key).await {
                DiskRead::Hit(data) => {
                    self.metrics.hits.get_or_create(&DISK).inc();
                    self.admit_to_memory(name, data.clone());
                    self.update_usage_gauges();
                    return Some((data, Tier::Disk));
                }
                DiskRead::Miss => {}
                DiskRead::Corrupt(reason) => {
                    self.metrics.corrupt_blocks.inc();
                    tracing::warn!(block = %name, path = %key.path, index = key.index, %reason,
                        "dropped a corrupt cached block; fetching it again");
                }
                DiskRead::Failed(error) => {
                    self.metrics.disk_errors.inc();
                    tracing::warn!(block = %name, path = %key.path, %error,
                        "the disk tier failed to read a block; serving it from the source");
                }
            }
        }
        None
    }

    /// Fetches a block from the first of `sources` (peers) that has it, else from the store;
    /// puts it in memory and hands it to the disk tier in the background. It stays readable
    /// (memory or pending) until it is on disk, so a reader arriving after the flight ends
    /// finds it.
    async fn fetch(
        self: Arc<Self>,
        name: BlockName,
        key: BlockKey,
        file_size: u64,
        sources: Vec<(String, bool)>,
    ) -> Result<(Bytes, Tier), StoreError> {
        let from_peer = match (&self.peers, sources.is_empty()) {
            (Some(peers), false) => peers.fill(&sources, &key, file_size, self.block_size).await,
            _ => None,
        };
        let (data, tier) = match from_peer {
            Some(data) => (data, Tier::Peer),
            None => (self.read_source(&key, file_size).await?, Tier::Source),
        };
        self.admit_to_memory(name, data.clone());
        if self.disk.is_some() {
            let pending = self.write_behind.begin(name, data.clone()).await;
            let this = Arc::clone(&self);
            let block = data.clone();
            tokio::spawn(async move {
                this.store_on_disk(name, &key, block).await;
                this.write_behind.finish(&name, pending);
                this.update_usage_gauges();
            });
        }
        self.update_usage_gauges();
        Ok((data, tier))
    }

    async fn read_source(&self, key: &BlockKey, file_size: u64) -> Result<Bytes, StoreError> {
        let range = block_range(file_size, self.block_size, key.index);
        self.metrics.source_reads.inc();
        match self.source.read_range(&key.path, &key.version, range).await {
            Ok(data) => {
                self.metrics.source_read_bytes.inc_by(data.len() as u64);
                Ok(data)
            }
            Err(e) => {
                self.metrics
                    .source_errors
                    .get_or_create(&KindLabel { kind: error_kind(&e) })
                    .inc();
                Err(e)
            }
        }
    }

    async fn store_on_disk(&self, name: BlockName, key: &BlockKey, data: Bytes) {
        let Some(disk) = &self.disk else { return };
        match disk.write(name, key, data).await {
            DiskWrite::Stored { evicted } => self.count_admission(DISK, true, evicted),
            DiskWrite::Rejected => self.count_admission(DISK, false, 0),
            DiskWrite::Failed(error) => {
                self.metrics.disk_errors.inc();
                tracing::warn!(block = %name, path = %key.path, %error,
                    "the disk tier failed to store a block (full or failing disk); it is served from the source");
            }
        }
    }
}
