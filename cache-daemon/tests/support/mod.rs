//! What the integration tests share: a real S3 server on loopback with a bucket, workers
//! started in-process on real sockets, and data that cannot be mistaken for other data.

#![allow(dead_code)]

pub mod s3;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use granary_cache::block::BlockName;
use granary_cache::client::WorkerPool;
use granary_cache::tiers::EvictionPolicy;
use granary_cache::worker::{self, RunningWorker, WorkerConfig};
use granary_store::source::{SourceStore, SourceTuning};
use granary_store::units::MetadataTtl;

pub const BUCKET: &str = "datasets";
pub const BLOCK: u64 = 64 << 10;

pub struct S3Env {
    pub s3: s3::S3TestServer,
    pub store: SourceStore,
    pub dir: tempfile::TempDir,
}

pub async fn s3_env() -> S3Env {
    let dir = tempfile::tempdir().expect("tempdir");
    let s3 = s3::S3TestServer::start(&dir.path().join("s3"), "127.0.0.1:0".parse().unwrap())
        .await
        .expect("start the S3 server");
    s3.create_bucket(BUCKET).expect("bucket");
    let options: BTreeMap<_, _> = s3.options().into_iter().collect();
    let store = SourceStore::open(&format!("s3://{BUCKET}/"), &options, &SourceTuning::default()).expect("store");
    S3Env { s3, store, dir }
}

impl S3Env {
    /// Writes an object through the S3 protocol.
    pub async fn put(&self, key: &str, data: &[u8]) {
        self.store
            .operator()
            .write(key, data.to_vec())
            .await
            .expect("put object");
    }

    pub fn cache_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A worker config for `s3://datasets/<prefix>` with small blocks and no disk tier.
    pub fn config(&self, prefix: &str) -> WorkerConfig {
        let mut config = WorkerConfig::new(format!("s3://{BUCKET}/{prefix}"), "127.0.0.1:0".parse().unwrap());
        config.source_options = self.s3.options().into_iter().collect();
        config.source_tuning = SourceTuning {
            retries: 1,
            timeout: Duration::from_secs(10),
        };
        config.block_size = BLOCK;
        config.memory_size = 64 << 20;
        config.metadata_ttl = MetadataTtl::Expires(Duration::from_secs(60));
        config
    }

    pub fn config_with_disk(&self, prefix: &str, dir: &Path, size: u64, eviction: EvictionPolicy) -> WorkerConfig {
        let mut config = self.config(prefix);
        config.cache_dir = Some(dir.to_path_buf());
        config.cache_size = size;
        config.eviction = eviction;
        config
    }
}

pub async fn start(config: WorkerConfig) -> RunningWorker {
    worker::start(config).await.expect("start a worker")
}

pub fn pool(workers: &[&RunningWorker], replicas: usize) -> WorkerPool {
    let addrs: Vec<String> = workers.iter().map(|w| w.addr.to_string()).collect();
    WorkerPool::new(&addrs, replicas).expect("pool")
}

/// Bytes that differ per file and per position, so a block served for the wrong file or at
/// the wrong offset never compares equal.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Reads a whole file through the workers.
pub async fn read_all(pool: &WorkerPool, path: &str) -> Result<Vec<u8>, granary_cache::client::ClientError> {
    use futures::TryStreamExt;
    let info = pool.stat(path, false).await?;
    let chunks: Vec<bytes::Bytes> = pool.read_range(&info, 0..info.size, 4).try_collect().await?;
    Ok(chunks.concat())
}

/// Bytes the files under `dir` take, in whole 4 KiB units (what `du` would say, roughly).
pub fn disk_usage(dir: &Path) -> u64 {
    let mut total = 0;
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    for entry in entries.flatten() {
        let path = entry.path();
        match entry.metadata() {
            Ok(md) if md.is_dir() => total += disk_usage(&path),
            Ok(md) => total += md.len().div_ceil(4096) * 4096,
            Err(_) => {}
        }
    }
    total
}

/// Paths of the block files in a worker's cache dir.
pub fn block_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let Ok(shards) = std::fs::read_dir(dir.join("blocks")) else {
        return files;
    };
    for shard in shards.flatten() {
        if let Ok(entries) = std::fs::read_dir(shard.path()) {
            files.extend(entries.flatten().map(|e| e.path()));
        }
    }
    files
}

pub fn block_file(dir: &Path, name: &BlockName) -> PathBuf {
    let file_name = name.file_name();
    dir.join("blocks").join(&file_name[..2]).join(file_name)
}

/// A tmpfs of exactly `size` bytes mounted at a directory: the kernel refuses any write past
/// it, so a cache that ever exceeds its budget sees ENOSPC.
pub struct Tmpfs {
    pub dir: PathBuf,
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// Whether tests that need real mounts must run (CI sets it) rather than skip.
pub fn mounts_required() -> bool {
    std::env::var("GRANARY_REQUIRE_MOUNTS").is_ok_and(|v| v == "1")
}

/// Mounts a tmpfs of `size` bytes at `dir`, or says why it cannot and returns `None`; under
/// `GRANARY_REQUIRE_MOUNTS=1` a failure fails the test instead.
pub fn tmpfs(dir: &Path, size: u64) -> Option<Tmpfs> {
    std::fs::create_dir_all(dir).expect("mount point");
    let out = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(dir)
        .output();
    let reason = match out {
        Ok(out) if out.status.success() => return Some(Tmpfs { dir: dir.to_path_buf() }),
        Ok(out) => String::from_utf8_lossy(&out.stderr).trim().to_string(),
        Err(e) => e.to_string(),
    };
    if mounts_required() {
        panic!(
            "GRANARY_REQUIRE_MOUNTS=1 but a tmpfs cannot be mounted at {}: {reason}",
            dir.display()
        );
    }
    eprintln!(
        "SKIP (kernel-enforced part): cannot mount a tmpfs ({reason}); run as root to check the budget with the kernel"
    );
    None
}

/// Whether FUSE mounts can be made here; says why not and returns false (a skip), or under
/// `GRANARY_REQUIRE_MOUNTS=1` fails the test.
pub fn fuse_possible() -> bool {
    let reason = if !Path::new("/dev/fuse").exists() {
        Some("/dev/fuse does not exist".to_string())
    // SAFETY: geteuid only reads the process's credentials.
    } else if unsafe { libc::geteuid() } != 0 {
        Some("not running as root".to_string())
    } else {
        None
    };
    match reason {
        None => true,
        Some(reason) if mounts_required() => {
            panic!("GRANARY_REQUIRE_MOUNTS=1 but FUSE mounts are impossible: {reason}")
        }
        Some(reason) => {
            eprintln!("SKIP: FUSE mount test needs root and /dev/fuse ({reason})");
            false
        }
    }
}

/// A dataset mounted in this process; unmounted when dropped.
pub struct TestMount {
    pub dir: tempfile::TempDir,
    pub metrics: std::sync::Arc<granary_fs::metrics::FuseMetrics>,
    pub registry: std::sync::Arc<prometheus_client::registry::Registry>,
    mounted: Option<granary_fs::dataset::MountedFs>,
}

impl TestMount {
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The Prometheus text of the mount's metrics.
    pub fn metrics_text(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("encode");
        out
    }

    /// A counter's value summed over the label sets whose text contains `labels`.
    pub fn counter(&self, name: &str, labels: &str) -> f64 {
        self.metrics_text()
            .lines()
            .filter(|l| l.starts_with(name) && l.contains(labels) && !l.starts_with('#'))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

impl Drop for TestMount {
    fn drop(&mut self) {
        if let Some(m) = self.mounted.take() {
            let _ = m.unmount();
        }
    }
}

/// Mounts `config` on a fresh directory with a `max_memory` budget. Blocking: call it from
/// a multi-thread runtime with `spawn_blocking` or `block_in_place`.
pub fn mount(config: granary_fs::dataset::DatasetMount, max_memory: u64) -> TestMount {
    let dir = tempfile::tempdir().expect("mountpoint");
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = std::sync::Arc::new(granary_fs::metrics::FuseMetrics::register(&mut registry));
    let resources = granary_fs::dataset::MountResources::new(max_memory, std::sync::Arc::clone(&metrics));
    let mounted =
        granary_fs::dataset::mount(&config, dir.path(), &resources, tokio::runtime::Handle::current()).expect("mount");
    TestMount {
        dir,
        metrics,
        registry: std::sync::Arc::new(registry),
        mounted: Some(mounted),
    }
}

/// How many mounts sit at `path` (from /proc/self/mountinfo).
pub fn mounts_at(path: &Path) -> usize {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let wanted = path.to_string_lossy().replace(' ', "\\040");
    info.lines()
        .filter(|l| l.split(' ').nth(4) == Some(wanted.as_str()))
        .count()
}

pub fn is_mounted(path: &Path) -> bool {
    mounts_at(path) > 0
}
