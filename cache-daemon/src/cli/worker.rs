//! `granary-cache worker`: serve a tiered block cache of one source store over gRPC.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use granary_cache::tiers::EvictionPolicy;
use granary_cache::worker::{self, WorkerConfig};
use granary_store::source::SourceTuning;
use granary_store::units::{ByteSize, MetadataTtl};

use super::parse_key_value;

#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// The source store: s3://bucket/prefix, fs:///path (gcs://, azblob://, oss://, webhdfs://
    /// when built with their features).
    #[arg(long, env = "GRANARY_SOURCE")]
    pub source: String,
    /// A source store option, repeatable: endpoint=http://minio:9000, region=us-east-1,
    /// access_key_id=…, secret_access_key=…, anonymous=true, credentials=auto. AWS_*
    /// environment variables are read too. GRANARY_SOURCE_OPTIONS holds one KEY=VALUE per
    /// line, so values may hold commas.
    #[arg(long = "source-option", value_name = "KEY=VALUE", value_parser = parse_key_value,
          env = "GRANARY_SOURCE_OPTIONS", value_delimiter = '\n')]
    pub source_options: Vec<(String, String)>,
    /// A directory whose files are store options named after the file (a mounted Secret:
    /// access_key_id, secret_access_key, session_token), so credentials stay out of argv.
    #[arg(long, env = "GRANARY_SOURCE_SECRET_DIR")]
    pub source_secret_dir: Option<PathBuf>,
    /// gRPC address to serve on.
    #[arg(long, env = "GRANARY_LISTEN", default_value = "0.0.0.0:7070")]
    pub listen: SocketAddr,
    /// Prometheus metrics, /healthz and /readyz.
    #[arg(long, env = "GRANARY_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Directory of the disk tier (a PVC in Kubernetes); indexed at start, so restarts are warm.
    #[arg(long, env = "GRANARY_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Byte budget of the disk tier, never exceeded: 200GiB.
    #[arg(long, env = "GRANARY_CACHE_SIZE", default_value = "0")]
    pub cache_size: ByteSize,
    /// Byte budget of the memory tier.
    #[arg(long, env = "GRANARY_MEMORY_SIZE", default_value = "1GiB")]
    pub memory_size: ByteSize,
    /// Block size; every worker of a dataset must use the same.
    #[arg(long, env = "GRANARY_BLOCK_SIZE", default_value = "4MiB")]
    pub block_size: ByteSize,
    /// lru evicts the least recently used blocks; pin admits until full and never evicts
    /// (best for shuffled epochs that read everything once each).
    #[arg(long, env = "GRANARY_EVICTION", value_enum, default_value = "lru")]
    pub eviction: EvictionPolicy,
    /// How long stat results are cached: 60s, 5m, 0s, or never (immutable snapshots).
    #[arg(long, env = "GRANARY_METADATA_TTL", default_value = "60s")]
    pub metadata_ttl: MetadataTtl,
    /// Most metadata entries kept.
    #[arg(long, default_value_t = 1_000_000)]
    pub metadata_max_entries: usize,
    /// Blocks a prewarm fetches at once, unless the request says otherwise.
    #[arg(long, env = "GRANARY_LOAD_PARALLELISM", default_value_t = 16)]
    pub load_parallelism: usize,
    /// Retries of a failed source request before it is reported.
    #[arg(long, default_value_t = 3)]
    pub source_retries: usize,
    /// Timeout of one source request.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub source_timeout: std::time::Duration,
    /// Every worker of the dataset, comma-separated host:port, as clients address them. With a
    /// member set, a worker fills blocks it does not own from their owner (replicas cost no
    /// store reads) and tells clients the set, so they follow it as it changes.
    #[arg(long, env = "GRANARY_MEMBERS", value_name = "HOST:PORT,...", value_delimiter = ',')]
    pub members: Vec<String>,
    /// A file of the member set (host:port per line or comma-separated), re-read every
    /// --members-refresh: the operator keeps it current as the dataset scales.
    #[arg(long, env = "GRANARY_MEMBERS_FILE", conflicts_with = "members")]
    pub members_file: Option<PathBuf>,
    /// How often --members-file is re-read.
    #[arg(long, env = "GRANARY_MEMBERS_REFRESH", default_value = "5s", value_parser = humantime::parse_duration)]
    pub members_refresh: std::time::Duration,
    /// This worker's own address as the member set lists it (required with a member set).
    #[arg(long, env = "GRANARY_ADVERTISE", value_name = "HOST:PORT")]
    pub advertise: Option<String>,
}

pub async fn run(args: WorkerArgs) -> anyhow::Result<()> {
    let mut config = WorkerConfig::new(args.source, args.listen);
    config.source_options = args.source_options.into_iter().collect();
    if let Some(dir) = &args.source_secret_dir {
        for (key, value) in read_secret_dir(dir)? {
            config.source_options.insert(key, value);
        }
    }
    config.source_tuning = SourceTuning {
        retries: args.source_retries,
        timeout: args.source_timeout,
    };
    config.metrics_listen = args.metrics_listen;
    config.cache_dir = args.cache_dir;
    config.cache_size = args.cache_size.0;
    config.memory_size = args.memory_size.0;
    config.block_size = args.block_size.0;
    config.eviction = args.eviction;
    config.metadata_ttl = args.metadata_ttl;
    config.metadata_max_entries = args.metadata_max_entries;
    config.load_parallelism = args.load_parallelism;
    config.members = args.members;
    config.members_file = args.members_file;
    config.members_refresh = args.members_refresh;
    config.advertise = args.advertise;

    let mut running = worker::start(config).await.context("the worker could not start")?;
    tokio::select! {
        result = running.wait() => result.context("the gRPC server stopped"),
        _ = super::shutdown_signal() => {
            tracing::info!("shutting down");
            running.shutdown().await
        }
    }
}

/// Store options from a mounted Secret: one file per key. Kubernetes' `..data` links and
/// dot-files are skipped; a trailing newline (as `kubectl create secret --from-file` leaves)
/// is dropped.
fn read_secret_dir(dir: &std::path::Path) -> anyhow::Result<Vec<(String, String)>> {
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("reading the source secret directory {}", dir.display()))?;
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("reading {}", dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || entry.path().is_dir() {
            continue;
        }
        let value = std::fs::read_to_string(entry.path())
            .with_context(|| format!("reading the secret key {name} in {}", dir.display()))?;
        out.push((name, value.trim_end_matches(['\n', '\r']).to_string()));
    }
    Ok(out)
}
