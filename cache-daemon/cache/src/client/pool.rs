//! The client of a set of workers: placement, failover, and the calls the CLI, the node
//! daemon, the operator and other workers (prewarm) make.

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};
use tokio::sync::Semaphore;
use tonic::transport::{Channel, Endpoint};

use super::error::ClientError;
use super::placement;
use crate::block::{block_count, block_range, BlockName};
use crate::proto::cache_worker_client::CacheWorkerClient;
use crate::proto::{
    BlockRef, FileInfo, ListRequest, LoadProgress, LoadRequest, ReadBlockRequest, StatRequest, StatsRequest,
    StatsResponse, Tier, WarmBlockRequest,
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
}

/// Placement ranks workers by their address.
impl AsRef<str> for WorkerConn {
    fn as_ref(&self) -> &str {
        &self.addr
    }
}

/// A set of workers, addressed as `host:port`. Connections are made lazily, so an
/// unreachable worker costs nothing until a block it owns is read, and then fails over.
#[derive(Clone)]
pub struct WorkerPool {
    workers: Vec<WorkerConn>,
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
            .map(|addr| {
                let channel = endpoint(addr)?.connect_lazy();
                let client = CacheWorkerClient::new(channel)
                    .max_decoding_message_size(MAX_MESSAGE)
                    .max_encoding_message_size(MAX_MESSAGE);
                Ok(WorkerConn {
                    addr: addr.clone(),
                    client,
                })
            })
            .collect::<Result<Vec<_>, ClientError>>()?;
        Ok(WorkerPool {
            workers,
            replicas: replicas.max(1),
        })
    }

    pub fn addresses(&self) -> Vec<String> {
        self.workers.iter().map(|w| w.addr.clone()).collect()
    }

    pub fn replicas(&self) -> usize {
        self.replicas
    }

    /// The owners of a block, best first, for placement checks and tests.
    pub fn owners(&self, name: &BlockName) -> Vec<String> {
        placement::owners(&self.workers, name, self.replicas)
            .into_iter()
            .map(|i| self.workers[i].addr.clone())
            .collect()
    }

    /// Workers to try for a block, as indices: its owners first, then the rest in rendezvous
    /// order (where the block moves if an owner is gone). Nothing is cloned here: this runs
    /// for every block read.
    fn candidates(&self, name: &BlockName) -> Vec<usize> {
        placement::rank(&self.workers, name)
    }

    /// Runs `call` on the candidates in order until one answers (an answer may be an error
    /// such as NotFound); only an unreachable worker moves on to the next.
    async fn with_failover<T, F, Fut>(
        &self,
        candidates: impl IntoIterator<Item = usize>,
        mut call: F,
    ) -> Result<T, ClientError>
    where
        F: FnMut(WorkerConn) -> Fut,
        Fut: std::future::Future<Output = Result<T, ClientError>>,
    {
        let mut last = ClientError::NoWorkers;
        for i in candidates {
            match call(self.workers[i].clone()).await {
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
    /// metadata of a share of the paths. "/a/b" and "a/b/" are the same path.
    fn metadata_candidates(&self, path: &str) -> Vec<usize> {
        let normalized = normalize_path(path).unwrap_or_else(|_| path.to_string());
        self.candidates(&BlockName::of(&normalized, "", u64::MAX))
    }

    /// Metadata of a path, from the worker that owns the path's metadata.
    pub async fn stat(&self, path: &str, refresh: bool) -> Result<FileInfo, ClientError> {
        let candidates = self.metadata_candidates(path);
        self.with_failover(candidates, |mut w| async move {
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
        let candidates = self.metadata_candidates(path);
        let (addr, stream) = self
            .with_failover(candidates, |mut w| async move {
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
        let candidates = self.candidates(&Self::block_name(file, index));
        let (tier, filled) = self
            .with_failover(candidates, |mut w| {
                // Each attempt fills the caller's buffer afresh (a failover starts over).
                let mut buffer = std::mem::take(&mut *out);
                buffer.clear();
                let request = ReadBlockRequest {
                    block: Some(block.clone()),
                    offset,
                    length,
                };
                async move {
                    let failed = |s| ClientError::from_status(&w.addr, s);
                    let mut stream = w.client.read_block(request).await.map_err(failed)?.into_inner();
                    let mut tier = Tier::Unspecified;
                    while let Some(chunk) = stream.message().await.map_err(failed)? {
                        if tier == Tier::Unspecified {
                            tier = chunk.tier();
                        }
                        buffer.extend_from_slice(&chunk.data);
                    }
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
        for i in self.candidates(&Self::block_name(file, index)) {
            if warmed == self.replicas {
                break;
            }
            let mut w = self.workers[i].clone();
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
        let addrs = self.addresses();
        let replicas = self.replicas as u32;
        let (addr, stream) = self
            .with_failover(0..self.workers.len(), |mut w| {
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
        let calls = self.workers.iter().cloned().map(|mut w| async move {
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

    /// Number of blocks of a file as the workers cut it.
    pub fn blocks_of(file: &FileInfo) -> u64 {
        block_count(file.size, file.block_size.max(1))
    }
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
    async fn an_address_without_a_port_is_refused() {
        let err = WorkerPool::new(&["host-0".to_string()], 1).err().map(|e| e.to_string());
        assert!(err.unwrap_or_default().contains("port is missing"));
    }
}
