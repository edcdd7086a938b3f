//! The worker's gRPC service: request validation and translation onto the block store, the
//! metadata cache and the prewarm coordinator.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use super::listing_cache::Lookup;
use super::prewarm;
use super::status::{from_source, invalid, status};
use super::{Fill, WorkerState};
use crate::block::{block_count, block_range, BlockKey};
use crate::metrics::{MethodLabel, StateLabel, TierLabel};
use crate::proto::cache_worker_server::CacheWorker;
use crate::proto::{
    BlockChunk, BlockRef, FileInfo, ListRequest, ListResponse, LoadProgress, LoadRequest, MembersRequest,
    MembersResponse, ReadBlockRequest, StatRequest, StatsRequest, StatsResponse, TierStats, WarmBlockRequest,
    WarmBlockResponse,
};
use granary_store::source::{normalize_path, ListedEntry};

/// Bytes per streamed message. A client copies each message out as it arrives (a mount into
/// its pooled block buffer), so gRPC's receive buffer for a stream stays near this size and
/// is reused for the next message; a whole 4 MiB block as one message grew that buffer to
/// 8 MiB per block in flight, fresh memory outside the mount's budget.
const CHUNK: usize = 1 << 20;
/// Entries per List message.
const LIST_BATCH: usize = 1000;
/// Stats of listed entries made at once when the listing did not carry their versions.
const LIST_STATS_AT_ONCE: usize = 32;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

pub struct WorkerService {
    state: Arc<WorkerState>,
}

impl WorkerService {
    pub fn new(state: Arc<WorkerState>) -> Self {
        WorkerService { state }
    }

    fn observe(&self, method: &'static str, started: Instant) {
        self.state
            .metrics
            .request_duration
            .get_or_create(&MethodLabel { method })
            .observe(started.elapsed().as_secs_f64());
    }

    /// Checks a block reference against this worker and turns it into a key.
    fn block_key(&self, block: Option<BlockRef>) -> Result<(BlockKey, u64), Status> {
        let block = block.ok_or_else(|| invalid("the request has no block"))?;
        let block_size = self.state.store.block_size();
        if block.block_size != block_size {
            return Err(status(
                tonic::Code::FailedPrecondition,
                format!(
                    "block size mismatch: this worker cuts files into {block_size}-byte blocks, the request uses {}; \
                     all workers of a dataset must run with the same --block-size",
                    block.block_size
                ),
            ));
        }
        if block.version.is_empty() {
            return Err(invalid("the block has no file version; stat the file first"));
        }
        let count = block_count(block.file_size, block_size);
        if block.index >= count {
            return Err(invalid(format!(
                "block {} is past the end of {:?} ({} bytes, {count} blocks)",
                block.index, block.path, block.file_size
            )));
        }
        let path = normalize_path(&block.path).map_err(|e| from_source(&e))?;
        Ok((
            BlockKey {
                path,
                version: block.version,
                index: block.index,
            },
            block.file_size,
        ))
    }
}

fn tier_stats(usage: (u64, u64, u64)) -> TierStats {
    TierStats {
        used_bytes: usage.0,
        capacity_bytes: usage.1,
        blocks: usage.2,
        ..Default::default()
    }
}

#[tonic::async_trait]
impl CacheWorker for WorkerService {
    async fn stat(&self, request: Request<StatRequest>) -> Result<Response<FileInfo>, Status> {
        let started = Instant::now();
        let req = request.into_inner();
        let result = self.state.metadata.stat(&req.path, req.refresh).await;
        self.observe("stat", started);
        let meta = result.map_err(|e| from_source(&e))?;
        Ok(Response::new(FileInfo::from_meta(&meta, self.state.store.block_size())))
    }

    type ListStream = BoxStream<ListResponse>;

    async fn list(&self, request: Request<ListRequest>) -> Result<Response<Self::ListStream>, Status> {
        let req = request.into_inner();
        Ok(Response::new(
            list(Arc::clone(&self.state), &req.path, req.recursive).await?,
        ))
    }

    type ReadBlockStream = BoxStream<BlockChunk>;

    async fn read_block(&self, request: Request<ReadBlockRequest>) -> Result<Response<Self::ReadBlockStream>, Status> {
        let started = Instant::now();
        let req = request.into_inner();
        let (key, file_size) = self.block_key(req.block)?;
        let block_len = {
            let r = block_range(file_size, self.state.store.block_size(), key.index);
            r.end - r.start
        };
        if req.offset > block_len {
            return Err(invalid(format!(
                "offset {} is past the block's {block_len} bytes",
                req.offset
            )));
        }
        let result = if req.cached_only {
            self.state.store.read_cached(&key).await.ok_or_else(|| {
                status(
                    tonic::Code::NotFound,
                    format!("block {} of {:?} is not cached here", key.index, key.path),
                )
            })
        } else {
            let fill = if req.from_peer {
                Fill::SourceOnly
            } else {
                Fill::PeersThenSource
            };
            self.state
                .store
                .read(&key, file_size, fill)
                .await
                .map_err(|e| from_source(&e))
        };
        self.observe("read_block", started);
        let (data, tier) = result?;
        let end = if req.length == 0 {
            data.len()
        } else {
            (req.offset.saturating_add(req.length)).min(data.len() as u64) as usize
        };
        let data = data.slice((req.offset as usize).min(end)..end);
        self.state
            .metrics
            .served_bytes
            .get_or_create(&TierLabel { tier: tier.label() })
            .inc_by(data.len() as u64);
        let mut chunks = Vec::with_capacity(data.len() / CHUNK + 1);
        let mut at = 0;
        loop {
            let next = (at + CHUNK).min(data.len());
            chunks.push(Ok(BlockChunk {
                data: data.slice(at..next),
                tier: if at == 0 { tier as i32 } else { 0 },
            }));
            at = next;
            if at >= data.len() {
                break;
            }
        }
        Ok(Response::new(Box::pin(futures::stream::iter(chunks))))
    }

    async fn warm_block(&self, request: Request<WarmBlockRequest>) -> Result<Response<WarmBlockResponse>, Status> {
        let started = Instant::now();
        let (key, file_size) = self.block_key(request.into_inner().block)?;
        let result = self.state.store.read(&key, file_size, Fill::PeersThenSource).await;
        self.observe("warm_block", started);
        let (data, tier) = result.map_err(|e| from_source(&e))?;
        Ok(Response::new(WarmBlockResponse {
            bytes: data.len() as u64,
            tier: tier as i32,
        }))
    }

    type LoadStream = BoxStream<LoadProgress>;

    async fn load(&self, request: Request<LoadRequest>) -> Result<Response<Self::LoadStream>, Status> {
        let stream = prewarm::start(Arc::clone(&self.state), request.into_inner())?;
        Ok(Response::new(Box::pin(stream)))
    }

    async fn members(&self, _request: Request<MembersRequest>) -> Result<Response<MembersResponse>, Status> {
        Ok(Response::new(match &self.state.peers {
            Some(peers) => MembersResponse {
                workers: peers.members(),
                this_worker: peers.me().to_string(),
            },
            None => MembersResponse::default(),
        }))
    }

    async fn stats(&self, _request: Request<StatsRequest>) -> Result<Response<StatsResponse>, Status> {
        let state = &self.state;
        let m = &state.metrics;
        let mut memory = tier_stats(state.store.memory_usage());
        let mut disk = tier_stats(state.store.disk_usage());
        for (stats, label) in [(&mut memory, crate::metrics::MEMORY), (&mut disk, crate::metrics::DISK)] {
            stats.hits = m.hits.get_or_create(&label).get();
            stats.bytes_served = m.served_bytes.get_or_create(&label).get();
            stats.evictions = m.evictions.get_or_create(&label).get();
            stats.admissions_rejected = m.admissions_rejected.get_or_create(&label).get();
        }
        Ok(Response::new(StatsResponse {
            source: state.store.source().uri().to_string(),
            block_size: state.store.block_size(),
            eviction: state.eviction.as_str().to_string(),
            memory: Some(memory),
            disk: Some(disk),
            misses: m.misses.get(),
            source_reads: m.source_reads.get(),
            source_bytes_read: m.source_read_bytes.get(),
            corrupt_blocks: m.corrupt_blocks.get(),
            disk_errors: m.disk_errors.get(),
            singleflight_shared: m.singleflight_shared.get(),
            disk_write_pending_bytes: state.store.pending_write_bytes(),
        }))
    }
}

/// The entries under `path` (a directory's own, or everything below it), in batches. A
/// directory's listing comes from the listing cache while fresh; otherwise one read of the
/// store fills it, streamed to the client that started it and to every client that asks
/// meanwhile, and is kept once complete. A recursive listing streams from the store.
pub(super) async fn list(
    state: Arc<WorkerState>,
    path: &str,
    recursive: bool,
) -> Result<BoxStream<ListResponse>, Status> {
    let dir = normalize_path(path).map_err(|e| from_source(&e))?;
    if recursive {
        let batches = store_listing(Arc::clone(&state), &dir, true).await?;
        return Ok(Box::pin(batches.map(|batch| {
            batch
                .map(|entries| ListResponse { entries })
                .map_err(|e| from_source(&e))
        })));
    }
    let outcome = |label: &'static str| state.metrics.listings.get_or_create(&StateLabel { state: label }).inc();
    let filling = match state.listings.lookup(&dir) {
        Lookup::Cached(entries) => {
            outcome("hit");
            let batches: Vec<Result<ListResponse, Status>> = entries
                .chunks(LIST_BATCH)
                .map(|batch| {
                    Ok(ListResponse {
                        entries: batch.to_vec(),
                    })
                })
                .collect();
            return Ok(Box::pin(futures::stream::iter(batches)));
        }
        Lookup::Joined(filling) => {
            outcome("shared");
            filling
        }
        Lookup::Started(filling) => {
            outcome("miss");
            // A task of its own: the listing goes on for the others if this client leaves.
            let (state, dir, fill) = (Arc::clone(&state), dir.clone(), Arc::clone(&filling));
            tokio::spawn(async move {
                let listed_at = Instant::now();
                let end = match store_listing(Arc::clone(&state), &dir, false).await {
                    Ok(batches) => {
                        let mut batches = std::pin::pin!(batches);
                        let mut end = Ok(());
                        while let Some(batch) = batches.next().await {
                            match batch {
                                Ok(entries) => fill.push(entries),
                                Err(e) => {
                                    let status = from_source(&e);
                                    end = Err((status.code(), status.message().to_string()));
                                    break;
                                }
                            }
                        }
                        end
                    }
                    Err(e) => Err((e.code(), e.message().to_string())),
                };
                state.listings.finish(&dir, &fill, end, listed_at);
            });
            filling
        }
    };
    let stream = futures::stream::unfold(Some((filling, 0usize)), |cursor| async move {
        let (filling, from) = cursor?;
        match filling.next(from, LIST_BATCH).await {
            (entries, None) => {
                let next = from + entries.len();
                Some((Ok(ListResponse { entries }), Some((filling, next))))
            }
            (_, Some(Ok(()))) => None,
            (_, Some(Err((code, message)))) => Some((Err(status(code, message)), None)),
        }
    });
    Ok(Box::pin(stream))
}

/// A listing read from the store, in batches; entries without a version get one by a stat.
async fn store_listing(
    state: Arc<WorkerState>,
    dir: &str,
    recursive: bool,
) -> Result<impl Stream<Item = Result<Vec<FileInfo>, granary_store::StoreError>> + Send + 'static, Status> {
    let block_size = state.store.block_size();
    let listing = state
        .store
        .source()
        .list(dir, recursive)
        .await
        .map_err(|e| from_source(&e))?;
    let entries = listing.map(move |entry| {
        let state = Arc::clone(&state);
        async move {
            let meta = match entry {
                Ok(ListedEntry::Known(meta)) => meta,
                Ok(ListedEntry::NeedsStat(path)) => state.metadata.stat(&path, false).await?,
                Err(e) => return Err(e),
            };
            if !meta.is_dir {
                state.metadata.insert(meta.clone());
            }
            Ok(FileInfo::from_meta(&meta, block_size))
        }
    });
    // Stores whose listings lack the version (no ETag) cost a stat per entry; run them
    // concurrently, in order.
    Ok(entries
        .buffered(LIST_STATS_AT_ONCE)
        .chunks(LIST_BATCH)
        .map(|batch| batch.into_iter().collect::<Result<Vec<_>, _>>()))
}
