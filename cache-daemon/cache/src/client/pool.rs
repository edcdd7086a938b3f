//! The client of a set of workers: placement, failover, replica spread, the member set and
//! the calls the CLI, the node daemon, the operator and other workers (prewarm, fills) make.

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};
use tokio::sync::Semaphore;
use tonic::transport::{Channel, Endpoint};

use super::error::ClientError;
use super::placement;
use crate::block::{block_count, block_range, BlockName};
use crate::proto::cache_worker_client::CacheWorkerClient;
use crate::proto::{
    BlockRef, FileInfo, ListRequest, LoadProgress, LoadRequest, MembersRequest, ReadBlockRequest, StatRequest,
    StatsRequest, StatsResponse, Tier, WarmBlockRequest,
};
use granary_store::source::normalize_path;

/// Largest gRPC message accepted; a block is sent as one message up to 8 MiB.
pub const MAX_MESSAGE: usize = 16 << 20;
/// HTTP/2 frame size both ends accept.
pub const FRAME_SIZE: u32 = 1 << 20;

#[derive(Clone)]
struct WorkerConn {
    addr: String,
    client: CacheWorkerClient<Channel>,
    /// Block reads this pool has outstanding on the worker: the load that
    /// power-of-two-choices compares.
    in_flight: Arc<AtomicUsize>,
}

impl WorkerConn {
    fn connect(addr: &str) -> Result<Self, ClientError> {
        let channel = endpoint(addr)?.connect_lazy();
        let client = CacheWorkerClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        Ok(WorkerConn {
            addr: addr.to_string(),
            client,
            in_flight: Arc::new(AtomicUsize::new(0)),
        })
    }
}

/// Counts one read in flight on a worker for as long as it lives.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn enter(counter: &Arc<AtomicUsize>) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        InFlight(Arc::clone(counter))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Placement ranks workers by their address.
impl AsRef<str> for WorkerConn {
    fn as_ref(&self) -> &str {
        &self.addr
    }
}

/// A set of workers, addressed as `host:port`. Connections are made lazily, so an
/// unreachable worker costs nothing until a block it owns is read, and then fails over.
///
/// The set can change under running readers ([`WorkerPool::set_members`],
/// [`WorkerPool::follow_members`]): each call places its block over the set it started with,
/// and clones of a pool share one set.
#[derive(Clone)]
pub struct WorkerPool {
    members: Arc<ArcSwap<Vec<WorkerConn>>>,
    replicas: usize,
}

/// Parses `host-0:7070,host-1:7070` into addresses.
pub fn parse_worker_list(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

fn endpoint(addr: &str) -> Result<Endpoint, ClientError> {
    let bad = |reason: String| ClientError::BadAddress {
        addr: addr.to_string(),
        reason,
    };
    let uri = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    let endpoint = Endpoint::from_shared(uri).map_err(|e| bad(format!("{e}; expected host:port")))?;
    if endpoint.uri().port_u16().is_none() {
        return Err(bad("the port is missing; expected host:port, e.g. host-0:7070".into()));
    }
    Ok(endpoint
        .connect_timeout(Duration::from_secs(3))
        .tcp_nodelay(true)
        // Loopback and LAN links stall at HTTP/2's default 64 KiB windows.
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(32 << 20))
        // 16 KiB frames cost 256 frames per block; larger ones cut the per-frame work.
        .max_frame_size(Some(FRAME_SIZE))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true))
}

impl WorkerPool {
    pub fn new(addrs: &[String], replicas: usize) -> Result<Self, ClientError> {
        if addrs.is_empty() {
            return Err(ClientError::NoWorkers);
        }
        let workers = addrs
            .iter()
            .map(|addr| WorkerConn::connect(addr))
            .collect::<Result<Vec<_>, ClientError>>()?;
        Ok(WorkerPool {
            members: Arc::new(ArcSwap::from_pointee(workers)),
            replicas: replicas.max(1),
        })
    }

    pub fn addresses(&self) -> Vec<String> {
        self.members.load().iter().map(|w| w.addr.clone()).collect()
    }

    /// Replaces the member set; connections to workers that stay are kept. Returns whether
    /// the set changed. An empty list changes nothing: a worker without a member list says so.
    pub fn set_members(&self, addrs: &[String]) -> Result<bool, ClientError> {
        let mut wanted: Vec<&str> = addrs.iter().map(String::as_str).filter(|a| !a.is_empty()).collect();
        wanted.sort_unstable();
        wanted.dedup();
        if wanted.is_empty() {
            return Ok(false);
        }
        let current = self.members.load_full();
        let mut present: Vec<&str> = current.iter().map(|w| w.addr.as_str()).collect();
        present.sort_unstable();
        if present == wanted {
            return Ok(false);
        }
        let workers = wanted
            .iter()
            .map(|addr| match current.iter().find(|w| w.addr == *addr) {
                Some(kept) => Ok(kept.clone()),
                None => WorkerConn::connect(addr),
            })
            .collect::<Result<Vec<_>, ClientError>>()?;
        let added: Vec<&str> = wanted.iter().copied().filter(|a| !present.contains(a)).collect();
        let removed: Vec<&str> = present.iter().copied().filter(|a| !wanted.contains(a)).collect();
        tracing::debug!(?added, ?removed, members = workers.len(), "the worker set changed");
        self.members.store(Arc::new(workers));
        Ok(true)
    }

    /// Asks the workers for the current member set (the first that answers) and adopts it.
    /// Workers given no member list answer with none, and the set stays as it is.
    pub async fn refresh_members(&self) -> Result<bool, ClientError> {
        let workers = self.members.load_full();
        let answer = self
            .with_failover(&workers, 0..workers.len(), |mut w| async move {
                w.client
                    .members(MembersRequest {})
                    .await
                    .map(|r| r.into_inner())
                    .map_err(|s| ClientError::from_status(&w.addr, s))
            })
            .await?;
        self.set_members(&answer.workers)
    }

    /// Re-asks the member set every `period` until every clone of this pool is dropped.
    pub fn follow_members(&self, period: Duration) -> tokio::task::JoinHandle<()> {
        let members = Arc::downgrade(&self.members);
        let replicas = self.replicas;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(members) = members.upgrade() else { return };
                let pool = WorkerPool { members, replicas };
                match pool.refresh_members().await {
                    Ok(true) => tracing::info!(workers = ?pool.addresses(), "following the workers' new member set"),
                    Ok(false) => {}
                    Err(e) => tracing::debug!(error = %e, "could not refresh the worker set; keeping the current one"),
                }
            }
        })
    }

    pub fn replicas(&self) -> usize {
        self.replicas
    }

    /// The owners of a block, best first, for placement checks and tests.
    pub fn owners(&self, name: &BlockName) -> Vec<String> {
        let workers = self.members.load();
        placement::owners(&workers, name, self.replicas)
            .into_iter()
            .map(|i| workers[i].addr.clone())
            .collect()
    }

    /// Runs `call` on the candidates (indices into `workers`) in order until one answers (an
    /// answer may be an error such as NotFound); only an unreachable worker moves on.
    async fn with_failover<T, F, Fut>(
        &self,
        workers: &[WorkerConn],
        candidates: impl IntoIterator<Item = usize>,
        mut call: F,
    ) -> Result<T, ClientError>
    where
        F: FnMut(WorkerConn) -> Fut,
        Fut: std::future::Future<Output = Result<T, ClientError>>,
    {
        let mut last = ClientError::NoWorkers;
        for i in candidates {
            match call(workers[i].clone()).await {
                Err(e) if e.is_worker_failure() => {
                    tracing::debug!(error = %e, "worker unreachable, trying the next");
                    last = e;
                }
                other => return other,
            }
        }
        Err(last)
    }

    /// Workers to ask about a path's metadata: its owner first, so each worker caches the
    /// metadata (and the listing) of a share of the paths. "/a/b" and "a/b/" are one path.
    fn metadata_candidates(workers: &[WorkerConn], path: &str) -> Vec<usize> {
        let normalized = normalize_path(path).unwrap_or_else(|_| path.to_string());
        placement::rank(workers, &BlockName::of(&normalized, "", u64::MAX))
    }

    /// Metadata of a path, from the worker that owns the path's metadata.
    pub async fn stat(&self, path: &str, refresh: bool) -> Result<FileInfo, ClientError> {
        let workers = self.members.load_full();
        let candidates = Self::metadata_candidates(&workers, path);
        self.with_failover(&workers, candidates, |mut w| async move {
            w.client
                .stat(StatRequest {
                    path: path.to_string(),
                    refresh,
                })
                .await
                .map(|r| r.into_inner())
                .map_err(|s| ClientError::from_status(&w.addr, s))
        })
        .await
    }

    /// Entries under a directory, streamed.
    pub async fn list(
        &self,
        path: &str,
        recursive: bool,
    ) -> Result<impl Stream<Item = Result<FileInfo, ClientError>> + Send + 'static, ClientError> {
        let workers = self.members.load_full();
        let candidates = Self::metadata_candidates(&workers, path);
        let (addr, stream) = self
            .with_failover(&workers, candidates, |mut w| async move {
                let stream = w
                    .client
                    .list(ListRequest {
                        path: path.to_string(),
                        recursive,
                    })
                    .await
                    .map_err(|s| ClientError::from_status(&w.addr, s))?
                    .into_inner();
                Ok((w.addr, stream))
            })
            .await?;
        Ok(stream
            .map_err(move |s| ClientError::from_status(&addr, s))
            .map_ok(|batch| futures::stream::iter(batch.entries.into_iter().map(Ok)))
            .try_flatten())
    }

    fn block_ref(file: &FileInfo, index: u64) -> BlockRef {
        BlockRef {
            path: file.path.clone(),
            version: file.version.clone(),
            file_size: file.size,
            block_size: file.block_size,
            index,
        }
    }

    fn block_name(file: &FileInfo, index: u64) -> BlockName {
        BlockName::of(&file.path, &file.version, index)
    }

    /// Reads `length` bytes at `offset` inside block `index` of `file` (length 0: to the
    /// block's end) from the block's owner, failing over to the next when it is unreachable.
    pub async fn read_block(
        &self,
        file: &FileInfo,
        index: u64,
        offset: u64,
        length: u64,
    ) -> Result<(Bytes, Tier), ClientError> {
        let block = block_range(file.size, file.block_size.max(1), index);
        let available = (block.end - block.start).saturating_sub(offset);
        let mut data = Vec::with_capacity(if length == 0 { available } else { length.min(available) } as usize);
        let tier = self.read_block_into(file, index, offset, length, &mut data).await?;
        Ok((Bytes::from(data), tier))
    }

    /// [`Self::read_block`], into `out` (cleared first; left empty on an error, and a
    /// failover fills a new buffer). Each message is copied out as it arrives, so gRPC's receive buffer is
    /// reused across the block's messages instead of growing to hold them all.
    pub async fn read_block_into(
        &self,
        file: &FileInfo,
        index: u64,
        offset: u64,
        length: u64,
        out: &mut Vec<u8>,
    ) -> Result<Tier, ClientError> {
        let block = Self::block_ref(file, index);
        let workers = self.members.load_full();
        let ranked = placement::rank(&workers, &Self::block_name(file, index));
        let candidates = spread_over_replicas(&workers, ranked, self.replicas);
        let (tier, filled) = self
            .with_failover(&workers, candidates, |mut w| {
                // Each attempt fills the caller's buffer afresh (a failover starts over).
                let mut buffer = std::mem::take(&mut *out);
                buffer.clear();
                let request = ReadBlockRequest {
                    block: Some(block.clone()),
                    offset,
                    length,
                    ..ReadBlockRequest::default()
                };
                async move {
                    let _busy = InFlight::enter(&w.in_flight);
                    let failed = |s| ClientError::from_status(&w.addr, s);
                    let stream = w.client.read_block(request).await.map_err(failed)?.into_inner();
                    let tier = receive_block(stream, &mut buffer).await.map_err(failed)?;
                    Ok((tier, buffer))
                }
            })
            .await?;
        *out = filled;
        Ok(tier)
    }

    /// Reads a byte range of a file, fetching up to `parallelism` blocks at once, in order.
    pub fn read_range(
        &self,
        file: &FileInfo,
        range: Range<u64>,
        parallelism: usize,
    ) -> impl Stream<Item = Result<Bytes, ClientError>> + Send + 'static {
        let pool = self.clone();
        let file = file.clone();
        let end = range.end.min(file.size);
        let start = range.start.min(end);
        let block_size = file.block_size.max(1);
        let first = start / block_size;
        let last = if end == start {
            first
        } else {
            (end - 1) / block_size + 1
        };
        // `parallelism` fetches run at once, but finished blocks waiting for an earlier, slower
        // one do not count against it: the reorder window is twice as large.
        let fetching = Arc::new(Semaphore::new(parallelism.max(1)));
        futures::stream::iter(first..last)
            .map(move |index| {
                let pool = pool.clone();
                let file = file.clone();
                let fetching = Arc::clone(&fetching);
                async move {
                    let _permit = fetching.acquire_owned().await;
                    let block = block_range(file.size, block_size, index);
                    let from = start.max(block.start) - block.start;
                    let to = end.min(block.end) - block.start;
                    pool.read_block(&file, index, from, to - from)
                        .await
                        .map(|(data, _)| data)
                }
            })
            .buffered(2 * parallelism.max(1))
    }

    /// Makes sure a block is cached on each of its `replicas` owners: the first reachable
    /// workers in rendezvous order, which is where readers will look for it.
    pub async fn warm_block(&self, file: &FileInfo, index: u64) -> Result<(u64, Tier), ClientError> {
        let block = Self::block_ref(file, index);
        let mut warmed = 0usize;
        let mut result: Option<(u64, Tier)> = None;
        let mut last_error = ClientError::NoWorkers;
        let workers = self.members.load_full();
        for i in placement::rank(&workers, &Self::block_name(file, index)) {
            if warmed == self.replicas {
                break;
            }
            let mut w = workers[i].clone();
            let answer = w
                .client
                .warm_block(WarmBlockRequest {
                    block: Some(block.clone()),
                })
                .await
                .map(|r| r.into_inner())
                .map_err(|s| ClientError::from_status(&w.addr, s));
            match answer {
                Ok(done) => {
                    warmed += 1;
                    // A block that came from the source on any replica counts as fetched.
                    let fetched = matches!(result, Some((_, Tier::Source)));
                    result = Some((done.bytes, if fetched { Tier::Source } else { done.tier() }));
                }
                Err(e) if e.is_worker_failure() => last_error = e,
                Err(e) => return Err(e),
            }
        }
        result.ok_or(last_error)
    }

    /// Starts a prewarm of `path` over all the pool's workers, coordinated by the first
    /// reachable one; progress streams back.
    pub async fn load(
        &self,
        path: &str,
        parallelism: u32,
    ) -> Result<impl Stream<Item = Result<LoadProgress, ClientError>> + Send + 'static, ClientError> {
        let workers = self.members.load_full();
        let addrs: Vec<String> = workers.iter().map(|w| w.addr.clone()).collect();
        let replicas = self.replicas as u32;
        let (addr, stream) = self
            .with_failover(&workers, 0..workers.len(), |mut w| {
                let request = LoadRequest {
                    path: path.to_string(),
                    workers: addrs.clone(),
                    replicas,
                    parallelism,
                };
                async move {
                    let stream = w
                        .client
                        .load(request)
                        .await
                        .map_err(|s| ClientError::from_status(&w.addr, s))?
                        .into_inner();
                    Ok((w.addr, stream))
                }
            })
            .await?;
        Ok(stream.map_err(move |s| ClientError::from_status(&addr, s)))
    }

    /// Stats of every worker, each with its own result.
    pub async fn stats(&self) -> Vec<(String, Result<StatsResponse, ClientError>)> {
        let workers = self.members.load_full();
        let calls = workers.iter().cloned().map(|mut w| async move {
            let result = w
                .client
                .stats(StatsRequest {})
                .await
                .map(|r| r.into_inner())
                .map_err(|s| ClientError::from_status(&w.addr, s));
            (w.addr, result)
        });
        futures::future::join_all(calls).await
    }

    /// One block straight from the worker at `addr`, for a worker filling its cache from a
    /// peer: `Ok(None)` when `cached_only` and the peer does not hold it. The address need
    /// not be a member of this pool's set (a worker's owner before a membership change).
    pub async fn read_block_from(
        &self,
        addr: &str,
        block: BlockRef,
        cached_only: bool,
    ) -> Result<Option<(Bytes, Tier)>, ClientError> {
        let known = self.members.load().iter().find(|w| w.addr == addr).cloned();
        let mut w = match known {
            Some(w) => w,
            None => WorkerConn::connect(addr)?,
        };
        let request = ReadBlockRequest {
            block: Some(block),
            from_peer: true,
            cached_only,
            ..ReadBlockRequest::default()
        };
        let failed = |s| ClientError::from_status(addr, s);
        let stream = match w.client.read_block(request).await {
            Ok(r) => r.into_inner(),
            Err(s) => {
                return match failed(s) {
                    ClientError::NotFound(_) if cached_only => Ok(None),
                    e => Err(e),
                }
            }
        };
        let mut data = Vec::new();
        let tier = receive_block(stream, &mut data).await.map_err(failed)?;
        Ok(Some((Bytes::from(data), tier)))
    }

    /// Number of blocks of a file as the workers cut it.
    pub fn blocks_of(file: &FileInfo) -> u64 {
        block_count(file.size, file.block_size.max(1))
    }
}

/// Appends a block's streamed messages to `out` as each arrives; the tier is on the first.
async fn receive_block(
    mut stream: tonic::Streaming<crate::proto::BlockChunk>,
    out: &mut Vec<u8>,
) -> Result<Tier, tonic::Status> {
    let mut tier = Tier::Unspecified;
    while let Some(chunk) = stream.message().await? {
        if tier == Tier::Unspecified {
            tier = chunk.tier();
        }
        out.extend_from_slice(&chunk.data);
    }
    Ok(tier)
}

/// Power of two choices over a block's replicas: of two owners picked at random, the one with
/// fewer reads in flight from this pool goes first, so many readers of one hot block spread
/// over all its replicas; the rest follow in rendezvous order, for failover.
fn spread_over_replicas(workers: &[WorkerConn], mut ranked: Vec<usize>, replicas: usize) -> Vec<usize> {
    let owners = replicas.min(ranked.len());
    if owners < 2 {
        return ranked;
    }
    let a = fastrand::usize(..owners);
    let mut b = fastrand::usize(..owners - 1);
    if b >= a {
        b += 1;
    }
    let load = |i: usize| workers[ranked[i]].in_flight.load(Ordering::Relaxed);
    let pick = if load(b) < load(a) { b } else { a };
    let chosen = ranked.remove(pick);
    ranked.insert(0, chosen);
    ranked
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_lists_and_addresses_are_checked() {
        assert_eq!(parse_worker_list("a:1, b:2,,"), vec!["a:1", "b:2"]);
        assert!(matches!(WorkerPool::new(&[], 1), Err(ClientError::NoWorkers)));
    }

    #[tokio::test]
    async fn reads_spread_over_the_replicas_and_away_from_the_busy_one() {
        let addrs: Vec<String> = (0..5).map(|i| format!("w{i}:7070")).collect();
        let pool = WorkerPool::new(&addrs, 4).unwrap();
        let workers = pool.members.load_full();
        let ranked = vec![3, 1, 4, 0, 2];
        let mut first = [0usize; 5];
        for _ in 0..4000 {
            let order = spread_over_replicas(&workers, ranked.clone(), 4);
            let mut sorted = order.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, vec![0, 1, 2, 3, 4], "every worker stays a candidate");
            assert_eq!(order[4], 2, "the non-replica stays last");
            first[order[0]] += 1;
        }
        assert_eq!(first[2], 0);
        for i in [3, 1, 4, 0] {
            assert!((800..1200).contains(&first[i]), "uneven spread: {first:?}");
        }
        // The top owner busy: it goes first only when both picks are it, which they never are.
        workers[3].in_flight.store(5, Ordering::Relaxed);
        let busy_first = (0..1000)
            .filter(|_| spread_over_replicas(&workers, ranked.clone(), 4)[0] == 3)
            .count();
        assert_eq!(
            busy_first, 0,
            "two distinct owners are compared, and the busy one loses"
        );
        assert_eq!(
            spread_over_replicas(&workers, ranked.clone(), 1),
            ranked,
            "one replica: rank order"
        );
    }

    #[tokio::test]
    async fn a_new_member_set_keeps_the_connections_of_the_workers_that_stay() {
        let pool = WorkerPool::new(&["b:1".to_string(), "a:1".to_string()], 1).unwrap();
        let kept = Arc::clone(&pool.members.load()[1].in_flight);
        assert!(
            !pool.set_members(&["a:1".into(), "b:1".into()]).unwrap(),
            "same set, other order"
        );
        assert!(!pool.set_members(&[]).unwrap(), "no list keeps the set");
        assert!(pool.set_members(&["c:1".into(), "a:1".into()]).unwrap());
        assert_eq!(pool.addresses(), vec!["a:1", "c:1"]);
        assert!(Arc::ptr_eq(&kept, &pool.members.load()[0].in_flight));
        let clone = pool.clone();
        pool.set_members(&["d:1".into()]).unwrap();
        assert_eq!(clone.addresses(), vec!["d:1"], "clones share the set");
    }

    #[tokio::test]
    async fn an_address_without_a_port_is_refused() {
        let err = WorkerPool::new(&["host-0".to_string()], 1).err().map(|e| e.to_string());
        assert!(err.unwrap_or_default().contains("port is missing"));
    }
}
