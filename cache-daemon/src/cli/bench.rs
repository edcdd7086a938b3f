//! `granary-cache bench`: in one run, on the same machine, reads of the same data
//! - from a local file (page cache warm) and through the workers warm: the warm ratio;
//! - straight from the store with parallel range reads and through the workers cold: the
//!   cold ratio;
//! - 64 KiB objects through the workers warm, in files per second.
//!
//! It writes its data into the store under a fresh prefix (so the first read is cold) and
//! removes it afterwards unless told to keep it.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::Args;
use futures::{StreamExt, TryStreamExt};
use granary_cache::block::block_range;
use granary_store::source::{SourceStore, SourceTuning};
use granary_store::units::ByteSize;

use super::{parse_key_value, WorkersArgs};

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub workers: WorkersArgs,
    /// The workers' source store (the bench writes its data there).
    #[arg(long, env = "GRANARY_SOURCE")]
    pub source: String,
    #[arg(long = "source-option", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub source_options: Vec<(String, String)>,
    /// Directory for the local copy of the large file (the local-disk baseline).
    #[arg(long)]
    pub local_dir: PathBuf,
    /// Size of the large file.
    #[arg(long, default_value = "1GiB")]
    pub file_size: ByteSize,
    /// Number of small objects.
    #[arg(long, default_value_t = 2000)]
    pub small_files: usize,
    /// Size of each small object.
    #[arg(long, default_value = "64KiB")]
    pub small_size: ByteSize,
    /// Reads in flight, for the client and for the direct store reads alike.
    #[arg(long, default_value_t = 16)]
    pub parallelism: usize,
    /// Block size for the direct reads; use the workers' --block-size.
    #[arg(long, default_value = "4MiB")]
    pub block_size: ByteSize,
    /// Keep the bench data in the store.
    #[arg(long)]
    pub keep: bool,
    /// Print the results as JSON too.
    #[arg(long)]
    pub json: bool,
}

/// Deterministic incompressible bytes (xorshift), so no layer can cheat with zeros.
fn fill(buf: &mut [u8], seed: u64) {
    let mut x = seed | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let bytes = x.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
}

fn mb_per_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / 1e6 / elapsed.as_secs_f64().max(1e-9)
}

/// Lets the cold read's aftermath finish before a warm measurement: the workers' write-behind
/// and the kernel's writeback of the dirty pages, which would otherwise take CPU from it.
async fn settle(pool: &granary_cache::client::WorkerPool) {
    for _ in 0..600 {
        let pending: u64 = pool
            .stats()
            .await
            .iter()
            .filter_map(|(_, s)| s.as_ref().ok())
            .map(|s| s.disk_write_pending_bytes)
            .sum();
        if pending == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = tokio::task::spawn_blocking(|| {
        // SAFETY: sync(2) takes no arguments and only flushes dirty pages.
        unsafe { libc::sync() }
    })
    .await;
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let pool = args.workers.pool().await?;
    let options = args.source_options.iter().cloned().collect();
    let store =
        SourceStore::open(&args.source, &options, &SourceTuning::default()).context("cannot open the source store")?;
    let op = store.operator().clone();
    let run_id = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let prefix = format!("granary-bench-{run_id}");
    let large = format!("{prefix}/large.bin");
    let size = args.file_size.0;
    let p = args.parallelism.max(1);

    // The large file: locally and in the store.
    std::fs::create_dir_all(&args.local_dir).with_context(|| format!("creating {}", args.local_dir.display()))?;
    let local_path = args.local_dir.join("granary-bench-large.bin");
    eprintln!(
        "writing {} to {} and {}/{large}",
        ByteSize(size),
        local_path.display(),
        args.source
    );
    {
        let mut local =
            std::fs::File::create(&local_path).with_context(|| format!("creating {}", local_path.display()))?;
        let mut writer = op
            .writer_with(&large)
            .chunk(16 << 20)
            .concurrent(4)
            .await
            .context("cannot write to the store")?;
        let mut buf = vec![0u8; 8 << 20];
        let mut written = 0u64;
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        while written < size {
            let n = ((size - written) as usize).min(buf.len());
            fill(&mut buf[..n], seed);
            seed = seed.wrapping_add(1);
            local.write_all(&buf[..n])?;
            writer
                .write(buf[..n].to_vec())
                .await
                .context("writing the bench file to the store")?;
            written += n as u64;
        }
        writer.close().await.context("completing the bench file in the store")?;
        local.sync_all()?;
    }

    // Local read, page cache warm (read it once to warm it).
    let local_read = |path: PathBuf| -> std::io::Result<(u64, u64)> {
        let mut f = std::fs::File::open(path)?;
        let mut buf = vec![0u8; 4 << 20];
        let (mut total, mut sum) = (0u64, 0u64);
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                return Ok((total, sum));
            }
            sum = sum.wrapping_add(buf[n - 1] as u64);
            total += n as u64;
        }
    };
    let lp = local_path.clone();
    tokio::task::spawn_blocking(move || local_read(lp)).await??;
    let started = Instant::now();
    let lp = local_path.clone();
    let (n, _) = tokio::task::spawn_blocking(move || local_read(lp)).await??;
    let local_mbs = mb_per_s(n, started.elapsed());

    // Direct parallel range reads of the store.
    let bs = args.block_size.0;
    let blocks = size.div_ceil(bs);
    let started = Instant::now();
    let direct: u64 = futures::stream::iter(0..blocks)
        .map(|i| {
            let op = op.clone();
            let large = large.clone();
            async move {
                let r = block_range(size, bs, i);
                op.read_with(&large).range(r).await.map(|b| b.len() as u64)
            }
        })
        .buffer_unordered(p)
        .try_fold(0u64, |acc, n| async move { Ok(acc + n) })
        .await
        .context("direct read from the store")?;
    let direct_mbs = mb_per_s(direct, started.elapsed());

    // Through the workers: cold, then warm.
    let info = pool.stat(&large, true).await.context("stat through the workers")?;
    let through = |label: &'static str| {
        let pool = pool.clone();
        let info = info.clone();
        async move {
            let started = Instant::now();
            let got: u64 = pool
                .read_range(&info, 0..info.size, p)
                .try_fold(0u64, |acc, b| async move { Ok(acc + b.len() as u64) })
                .await
                .with_context(|| format!("{label} read through the workers"))?;
            if got != size {
                bail!("{label} read returned {got} of {size} bytes");
            }
            Ok::<f64, anyhow::Error>(mb_per_s(got, started.elapsed()))
        }
    };
    let cold_mbs = through("cold").await?;
    settle(&pool).await;
    let warm_mbs = through("warm").await?;

    // Small objects: write, prewarm, list, then read them all warm.
    let small_dir = format!("{prefix}/small");
    let small_size = args.small_size.0 as usize;
    eprintln!(
        "writing {} objects of {}",
        args.small_files,
        ByteSize(small_size as u64)
    );
    futures::stream::iter(0..args.small_files)
        .map(|i| {
            let op = op.clone();
            let path = format!("{small_dir}/{:03}/{i:06}.bin", i % 100);
            async move {
                let mut data = vec![0u8; small_size];
                fill(&mut data, i as u64 + 1);
                op.write(&path, data).await.map(|_| ())
            }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<()>>()
        .await
        .context("writing the small objects")?;
    let mut load = std::pin::pin!(pool.load(&small_dir, 0).await.context("prewarming the small objects")?);
    while let Some(update) = load.next().await {
        let update = update?;
        if update.files_failed > 0 {
            bail!("prewarm of the small objects failed: {:?}", update.new_failures);
        }
        if update.finished {
            break;
        }
    }
    let files: Vec<_> = pool
        .list(&small_dir, true)
        .await?
        .try_filter(|f| futures::future::ready(!f.is_dir))
        .try_collect()
        .await
        .context("listing the small objects")?;
    let files = Arc::new(files);
    settle(&pool).await;
    let started = Instant::now();
    let read_all: u64 = futures::stream::iter(0..files.len())
        .map(|i| {
            let pool = pool.clone();
            let files = Arc::clone(&files);
            async move { pool.read_block(&files[i], 0, 0, 0).await.map(|(b, _)| b.len() as u64) }
        })
        .buffer_unordered(p)
        .try_fold(0u64, |acc, n| async move { Ok(acc + n) })
        .await
        .context("reading the small objects")?;
    let elapsed = started.elapsed();
    let small_per_s = files.len() as f64 / elapsed.as_secs_f64().max(1e-9);
    if read_all != (files.len() * small_size) as u64 || files.len() != args.small_files {
        bail!("small object read returned {read_all} bytes for {} files", files.len());
    }

    if !args.keep {
        let _ = op.delete_with(&format!("{prefix}/")).recursive(true).await;
        let _ = std::fs::remove_file(&local_path);
    }

    println!(
        "granary-cache bench: {} file, {} x {} objects, {} reads in flight, workers {}",
        ByteSize(size),
        args.small_files,
        ByteSize(small_size as u64),
        p,
        pool.addresses().join(",")
    );
    println!("{:<46} {:>12} {:>8}", "read", "MB/s", "ratio");
    println!(
        "{:<46} {:>12.0} {:>8}",
        "local file (page cache warm)", local_mbs, "1.00"
    );
    println!(
        "{:<46} {:>12.0} {:>8.2}",
        "through the workers, warm",
        warm_mbs,
        warm_mbs / local_mbs
    );
    println!(
        "{:<46} {:>12.0} {:>8}",
        "store, direct parallel range reads", direct_mbs, "1.00"
    );
    println!(
        "{:<46} {:>12.0} {:>8.2}",
        "through the workers, cold",
        cold_mbs,
        cold_mbs / direct_mbs
    );
    println!(
        "{:<46} {:>12.0} {:>8}",
        "64 KiB objects through the workers, warm (files/s)", small_per_s, ""
    );
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "file_bytes": size, "parallelism": p,
                "local_warm_mbs": local_mbs, "workers_warm_mbs": warm_mbs, "warm_ratio": warm_mbs / local_mbs,
                "store_direct_mbs": direct_mbs, "workers_cold_mbs": cold_mbs, "cold_ratio": cold_mbs / direct_mbs,
                "small_files": args.small_files, "small_warm_files_per_s": small_per_s,
            })
        );
    }
    Ok(())
}
