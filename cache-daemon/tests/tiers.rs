//! The disk tier: warm across restarts, and never over its budget under either policy.

mod support;

use granary_cache::tiers::EvictionPolicy;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_worker_serves_its_disk_tier_without_source_reads() {
    let env = s3_env().await;
    for i in 0..5 {
        env.put(&format!("ds/train/{i}.bin"), &pattern(300_000, i)).await;
    }
    let cache = env.cache_dir("worker-0");
    let config = env.config_with_disk("ds", &cache, 64 << 20, EvictionPolicy::Lru);
    let worker = start(config.clone()).await;
    let first = pool(&[&worker], 1);
    for i in 0..5 {
        assert!(read_all(&first, &format!("/train/{i}.bin")).await.unwrap() == pattern(300_000, i));
    }
    worker.shutdown().await.unwrap();

    let worker = start(config).await;
    let second = pool(&[&worker], 1);
    env.s3.clear_log();
    for i in 0..5 {
        assert!(read_all(&second, &format!("/train/{i}.bin")).await.unwrap() == pattern(300_000, i));
    }
    assert_eq!(env.s3.object_gets("train/"), 0, "requests: {:?}", env.s3.requests());
    let stats = second.stats().await[0].1.clone().unwrap();
    assert_eq!(stats.source_reads, 0);
    assert_eq!(
        stats.disk.unwrap().hits,
        5 * 5,
        "5 files of 5 blocks each, all from disk"
    );
}

/// Reads a working set twice the disk budget, with readers in parallel. Where it can, the
/// cache directory is a tmpfs of exactly the budget, so the kernel itself refuses (and the
/// worker counts as a disk error) any write that would take the cache past it.
async fn churn(eviction: EvictionPolicy) -> (granary_cache::proto::StatsResponse, u64, u64, bool) {
    let env = s3_env().await;
    let budget: u64 = 1 << 20;
    let files = 8u64; // 8 files x 4 blocks x 64 KiB = 2 MiB = twice the budget
    for i in 0..files {
        env.put(&format!("ds/{i}.bin"), &pattern(4 * BLOCK as usize, i)).await;
    }
    let cache = env.cache_dir("cache");
    let mount = tmpfs(&cache, budget);
    let mut config = env.config_with_disk("ds", &cache, budget, eviction);
    config.memory_size = 0;
    let worker = start(config).await;
    let pool = pool(&[&worker], 1);

    for _pass in 0..2 {
        let readers: Vec<_> = (0..files)
            .map(|i| {
                let pool = pool.clone();
                tokio::spawn(async move { (i, read_all(&pool, &format!("/{i}.bin")).await) })
            })
            .collect();
        for reader in readers {
            let (i, got) = reader.await.unwrap();
            assert!(got.unwrap() == pattern(4 * BLOCK as usize, i), "file {i}");
        }
        // Blocks are written behind the reads; let the first pass land before the second.
        worker.state.store.flush().await;
    }
    let stats = pool.stats().await[0].1.clone().unwrap();
    let on_disk = disk_usage(&cache);
    worker.shutdown().await.unwrap();
    (stats, on_disk, budget, mount.is_some())
}

/// Runs [`churn`] and checks the budget held: by the kernel (no refused write) where the
/// cache is on a tmpfs of the budget's size, and by the files left on disk.
async fn churn_within_budget(eviction: EvictionPolicy) -> granary_cache::proto::TierStats {
    let (stats, on_disk, budget, kernel_checked) = churn(eviction).await;
    if kernel_checked {
        assert_eq!(
            stats.disk_errors, 0,
            "a write went past the budget: the tmpfs refused it"
        );
    }
    assert!(
        on_disk <= budget,
        "{on_disk} bytes on disk, over the {budget}-byte budget"
    );
    let disk = stats.disk.unwrap();
    assert!(disk.used_bytes <= budget);
    disk
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lru_stays_within_the_disk_budget_by_evicting() {
    let disk = churn_within_budget(EvictionPolicy::Lru).await;
    assert!(disk.evictions > 0, "a working set twice the budget must evict");
    assert!(
        disk.used_bytes > disk.capacity_bytes / 2,
        "the budget is used, not wasted: {}",
        disk.used_bytes
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pin_stays_within_the_disk_budget_without_evicting() {
    let disk = churn_within_budget(EvictionPolicy::Pin).await;
    assert_eq!(disk.evictions, 0, "pin never evicts");
    assert!(disk.admissions_rejected > 0, "pin refuses what does not fit");
    // What was pinned in the first pass is served from disk in the second.
    assert_eq!(disk.hits, disk.blocks, "every pinned block hit once in the second pass");
    assert!(
        disk.blocks >= 12,
        "the budget holds at least 12 blocks with headers: {}",
        disk.blocks
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_degrades_to_the_source_with_a_metric_not_an_error() {
    let env = s3_env().await;
    for i in 0..4 {
        env.put(&format!("ds/{i}.bin"), &pattern(4 * BLOCK as usize, i)).await;
    }
    // The cache is told it has 16 MiB, but the disk under it holds 200 KiB: writes fail.
    let cache = env.cache_dir("cache");
    let Some(_mount) = tmpfs(&cache, 200 << 10) else { return };
    let mut config = env.config_with_disk("ds", &cache, 16 << 20, EvictionPolicy::Lru);
    config.memory_size = 0;
    let worker = start(config).await;
    let pool = pool(&[&worker], 1);
    for pass in 0..2 {
        for i in 0..4 {
            let got = read_all(&pool, &format!("/{i}.bin")).await;
            assert!(
                got.expect("reads never fail because of the disk") == pattern(4 * BLOCK as usize, i),
                "pass {pass}"
            );
        }
    }
    worker.state.store.flush().await;
    let stats = pool.stats().await[0].1.clone().unwrap();
    assert!(stats.disk_errors > 0, "the failing writes are counted");
    let disk = stats.disk.unwrap();
    assert!(disk.blocks >= 2, "what fits is still cached: {}", disk.blocks);
    assert!(
        disk.used_bytes <= 200 << 10,
        "failed writes are not accounted: {}",
        disk.used_bytes
    );
}
