//! The cache worker: a gRPC server over a tiered block cache of one source store.

mod block_store;
mod listing_cache;
mod metadata_cache;
mod peers;
mod prewarm;
mod service;
mod status;
mod write_behind;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::server::TcpIncoming;

pub use block_store::{BlockStore, Fill};
pub use listing_cache::ListingCache;
pub use metadata_cache::MetadataCache;
pub use peers::{parse_members, Peers};

use crate::client::{FRAME_SIZE, MAX_MESSAGE};
use crate::metrics::WorkerMetrics;
use crate::proto::cache_worker_server::CacheWorkerServer;
use crate::tiers::{DiskTier, EvictionPolicy, MemoryTier};
use granary_store::source::{SourceConfigError, SourceStore, SourceTuning};
use granary_store::units::MetadataTtl;

/// Everything a worker is started with.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub source: String,
    pub source_options: BTreeMap<String, String>,
    pub source_tuning: SourceTuning,
    pub listen: SocketAddr,
    pub metrics_listen: Option<SocketAddr>,
    /// No disk tier when `None`.
    pub cache_dir: Option<PathBuf>,
    pub cache_size: u64,
    pub memory_size: u64,
    pub block_size: u64,
    pub eviction: EvictionPolicy,
    pub metadata_ttl: MetadataTtl,
    pub metadata_max_entries: usize,
    pub load_parallelism: usize,
    /// The dataset's workers, `host:port` each, as clients address them (static).
    pub members: Vec<String>,
    /// A file holding the member set, re-read every `members_refresh` (the operator keeps it
    /// current as the dataset scales); wins over `members`.
    pub members_file: Option<PathBuf>,
    pub members_refresh: Duration,
    /// This worker's own address in the member set.
    pub advertise: Option<String>,
}

impl WorkerConfig {
    /// A configuration with the defaults for everything but the source and listen address.
    pub fn new(source: impl Into<String>, listen: SocketAddr) -> Self {
        WorkerConfig {
            source: source.into(),
            source_options: BTreeMap::new(),
            source_tuning: SourceTuning::default(),
            listen,
            metrics_listen: None,
            cache_dir: None,
            cache_size: 0,
            memory_size: 1 << 30,
            block_size: crate::block::DEFAULT_BLOCK_SIZE,
            eviction: EvictionPolicy::Lru,
            metadata_ttl: MetadataTtl::Expires(Duration::from_secs(60)),
            metadata_max_entries: 1_000_000,
            load_parallelism: 16,
            members: Vec::new(),
            members_file: None,
            members_refresh: Duration::from_secs(5),
            advertise: None,
        }
    }
}

/// Why a worker could not start; each names the fix.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Source(#[from] SourceConfigError),
    #[error("cannot use the cache directory {dir}: {source}; give --cache-dir a writable directory")]
    CacheDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--cache-size must be given (and above 0) with --cache-dir")]
    NoCacheSize,
    #[error("--cache-size was given without --cache-dir: give the disk tier a directory, or drop --cache-size")]
    NoCacheDir,
    #[error("--source-timeout must be above 0: every store request would time out")]
    SourceTimeout,
    #[error("--block-size must be between 64KiB and 64MiB, not {0} bytes")]
    BlockSize(u64),
    #[error("--members or --members-file was given without --advertise: give this worker's own address as the member set lists it, e.g. --advertise ds-worker-0.ds-workers.ns.svc:7070")]
    NoAdvertise,
    #[error(
        "cannot read the member set from {path}: {source}; give --members-file a readable file of host:port lines"
    )]
    MembersFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("bad member set: {0}")]
    BadMembers(#[from] crate::client::ClientError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// What the gRPC service and prewarm share.
pub struct WorkerState {
    pub store: Arc<BlockStore>,
    pub metadata: MetadataCache,
    pub listings: ListingCache,
    pub metrics: Arc<WorkerMetrics>,
    pub eviction: EvictionPolicy,
    pub load_parallelism: usize,
    /// The other workers, when this worker was given a member set.
    pub peers: Option<Arc<Peers>>,
}

/// A started worker. Dropping it does not stop it; call [`RunningWorker::shutdown`].
pub struct RunningWorker {
    pub addr: SocketAddr,
    pub metrics_addr: Option<SocketAddr>,
    pub state: Arc<WorkerState>,
    shutdown: watch::Sender<bool>,
    server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    metrics_server: Option<tokio::task::JoinHandle<()>>,
}

impl RunningWorker {
    /// Stops serving and waits for the server to end.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.shutdown.send(true);
        self.server.await??;
        // Blocks fetched but not yet on disk would be fetched again after a restart.
        self.state.store.flush().await;
        if let Some(m) = self.metrics_server {
            m.await?;
        }
        Ok(())
    }

    /// Waits until the server ends by itself (it only does on an error).
    pub async fn wait(&mut self) -> anyhow::Result<()> {
        (&mut self.server).await??;
        Ok(())
    }
}

/// Opens the tiers (indexing what is on disk), binds the ports and starts serving.
pub async fn start(config: WorkerConfig) -> Result<RunningWorker, StartError> {
    if !(64 << 10..=64 << 20).contains(&config.block_size) {
        return Err(StartError::BlockSize(config.block_size));
    }
    if config.source_tuning.timeout.is_zero() {
        return Err(StartError::SourceTimeout);
    }
    let source = SourceStore::open(&config.source, &config.source_options, &config.source_tuning)?;

    let mut registry = Registry::default();
    let metrics = Arc::new(WorkerMetrics::register(&mut registry, source.list_requests()));
    let registry = Arc::new(registry);
    let peers = open_peers(&config, &metrics).await?;

    let disk = match &config.cache_dir {
        None if config.cache_size > 0 => return Err(StartError::NoCacheDir),
        None => None,
        Some(_) if config.cache_size == 0 => return Err(StartError::NoCacheSize),
        Some(dir) => {
            let (dir, size, policy) = (dir.clone(), config.cache_size, config.eviction);
            let opened = tokio::task::spawn_blocking(move || DiskTier::open(&dir, size, policy))
                .await
                .map_err(std::io::Error::other)
                .and_then(|r| r);
            let (tier, report) = opened.map_err(|source| StartError::CacheDir {
                dir: config.cache_dir.clone().unwrap_or_default(),
                source,
            })?;
            tracing::info!(
                blocks = report.blocks,
                bytes = report.bytes,
                dropped = report.dropped,
                "indexed the disk tier"
            );
            Some(tier)
        }
    };
    let memory = MemoryTier::new(config.memory_size, config.eviction);
    let store = Arc::new(BlockStore::new(
        source.clone(),
        config.block_size,
        memory,
        disk,
        peers.clone(),
        Arc::clone(&metrics),
    ));
    let state = Arc::new(WorkerState {
        store,
        metadata: MetadataCache::new(
            source.clone(),
            config.metadata_ttl,
            config.metadata_max_entries,
            Arc::clone(&metrics),
        ),
        listings: ListingCache::new(config.metadata_ttl, config.metadata_max_entries),
        metrics,
        eviction: config.eviction,
        load_parallelism: config.load_parallelism,
        peers: peers.clone(),
    });

    let (shutdown, shutdown_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    if let (Some(peers), Some(path)) = (&peers, &config.members_file) {
        tokio::spawn(follow_members_file(
            Arc::clone(peers),
            path.clone(),
            config.members_refresh,
            stopped(shutdown_rx.clone()),
        ));
    }
    let ready = Arc::new(AtomicBool::new(false));
    let (metrics_addr, metrics_server) = match config.metrics_listen {
        None => (None, None),
        Some(addr) => {
            let (bound, handle) =
                granary_process::metrics_http::serve(addr, registry, Arc::clone(&ready), stopped(shutdown_rx.clone()))
                    .await
                    .map_err(|source| StartError::Listen { addr, source })?;
            (Some(bound), Some(handle))
        }
    };

    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| StartError::Listen {
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| StartError::Listen {
        addr: config.listen,
        source,
    })?;
    let service = CacheWorkerServer::new(service::WorkerService::new(Arc::clone(&state)))
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let server = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(32 << 20))
        .max_frame_size(Some(FRAME_SIZE))
        .add_service(service)
        // `tcp_nodelay` above applies only to listeners tonic binds itself; an accepted
        // connection without it meets Nagle and delayed ACKs, about 40 ms per small read.
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            stopped(shutdown_rx),
        );
    let server = tokio::spawn(server);
    ready.store(true, Ordering::Release);
    tracing::info!(%addr, source = %config.source, "cache worker serving");

    // Say early, not on the first read, when the store cannot be reached; keep serving the
    // cache either way. The root's stat is answered without a request, and a listing sends
    // none until its first entry is asked for: the probe reads that entry.
    let probe = source.clone();
    tokio::spawn(async move {
        match probe_store(&probe).await {
            Ok(()) => tracing::info!(source = %probe.uri(), "the source store answers"),
            Err(e) => tracing::warn!(
                source = %probe.uri(),
                error = %e,
                "the source store is not reachable now; cached blocks are still served. \
                 Check the endpoint, the credentials and the network from this pod"
            ),
        }
    });

    Ok(RunningWorker {
        addr,
        metrics_addr,
        state,
        shutdown,
        server,
        metrics_server,
    })
}

async fn read_members(path: &std::path::Path) -> Result<Vec<String>, StartError> {
    tokio::fs::read_to_string(path)
        .await
        .map(|text| parse_members(&text))
        .map_err(|source| StartError::MembersFile {
            path: path.to_path_buf(),
            source,
        })
}

/// The member set the worker starts with (a file wins over a list), or none.
async fn open_peers(config: &WorkerConfig, metrics: &Arc<WorkerMetrics>) -> Result<Option<Arc<Peers>>, StartError> {
    let members = match &config.members_file {
        Some(path) => read_members(path).await?,
        None if config.members.is_empty() => return Ok(None),
        None => parse_members(&config.members.join(",")),
    };
    let me = config.advertise.clone().ok_or(StartError::NoAdvertise)?;
    if members.is_empty() {
        // An empty file is a member set not written yet: this worker alone until it is.
        tracing::warn!(file = ?config.members_file, "the member set is empty; serving as the only member until it is written");
        return Ok(Some(Arc::new(Peers::new(me.clone(), vec![me], Arc::clone(metrics))?)));
    }
    Ok(Some(Arc::new(Peers::new(me, members, Arc::clone(metrics))?)))
}

/// Re-reads the member file every `period`. Kubernetes updates a mounted ConfigMap by
/// swapping a symlink, so a read sees the old set or the new one, never half of each.
async fn follow_members_file(
    peers: Arc<Peers>,
    path: PathBuf,
    period: Duration,
    stopped: impl std::future::Future<Output = ()>,
) {
    let mut stopped = std::pin::pin!(stopped);
    let mut tick = tokio::time::interval(period.max(Duration::from_millis(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut stopped => return,
            _ = tick.tick() => {}
        }
        match read_members(&path).await {
            Ok(members) => {
                peers.update(members);
            }
            Err(e) => tracing::warn!(error = %e, "keeping the current member set"),
        }
    }
}

/// One real request to the store: the first entry (or the end) of the root's listing.
async fn probe_store(source: &SourceStore) -> Result<(), granary_store::StoreError> {
    use futures::StreamExt;
    let mut listing = std::pin::pin!(source.list("", false).await?);
    match listing.next().await {
        Some(Err(e)) => Err(e),
        _ => Ok(()),
    }
}
