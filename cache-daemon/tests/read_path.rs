//! Reads through several workers against a real S3 server: bytes, placement, single flight,
//! changed files, corrupt blocks.

mod support;

use std::time::Duration;

use granary_cache::block::{block_count, BlockName};
use granary_store::units::MetadataTtl;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_byte_read_through_three_workers_equals_the_source() {
    let env = s3_env().await;
    // Sizes around block boundaries, an empty file, and a multi-block file.
    let sizes = [
        0usize,
        1,
        4095,
        BLOCK as usize,
        BLOCK as usize + 1,
        3 * BLOCK as usize - 7,
        1_000_000,
    ];
    for (i, size) in sizes.iter().enumerate() {
        env.put(&format!("ds/train/f{i}.bin"), &pattern(*size, i as u64)).await;
    }
    let workers = [
        start(env.config("ds")).await,
        start(env.config("ds")).await,
        start(env.config("ds")).await,
    ];
    let pool = pool(&[&workers[0], &workers[1], &workers[2]], 1);

    for (i, size) in sizes.iter().enumerate() {
        let got = read_all(&pool, &format!("/train/f{i}.bin")).await.expect("read");
        assert_eq!(got.len(), *size, "file {i}");
        assert!(got == pattern(*size, i as u64), "file {i} differs from the source");
    }
    // A range in the middle, crossing a block boundary.
    let info = pool.stat("/train/f6.bin", false).await.unwrap();
    let range = BLOCK - 100..BLOCK + 100;
    let chunks: Vec<bytes::Bytes> = futures::TryStreamExt::try_collect(pool.read_range(&info, range.clone(), 2))
        .await
        .unwrap();
    assert_eq!(
        chunks.concat(),
        pattern(1_000_000, 6)[range.start as usize..range.end as usize]
    );

    // Each block was fetched once, by its owner; the blocks spread over all three workers.
    let total_blocks: u64 = sizes.iter().map(|s| block_count(*s as u64, BLOCK)).sum();
    let stats = pool.stats().await;
    let misses: Vec<u64> = stats.iter().map(|(_, s)| s.as_ref().unwrap().misses).collect();
    assert_eq!(
        misses.iter().sum::<u64>(),
        total_blocks,
        "misses per worker: {misses:?}"
    );
    assert!(
        misses.iter().all(|m| *m > 0),
        "placement left a worker idle: {misses:?}"
    );

    // Placement is a function of the worker list alone: a second client agrees.
    let again = support::pool(&[&workers[0], &workers[1], &workers[2]], 1);
    for i in 0..16 {
        let name = BlockName::of("train/f6.bin", &info.version, i);
        assert_eq!(pool.owners(&name), again.owners(&name));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_concurrent_readers_of_a_cold_block_make_one_source_read() {
    let env = s3_env().await;
    env.put("ds/model.bin", &pattern(50_000, 1)).await;
    let worker = start(env.config("ds")).await;
    let pool = pool(&[&worker], 1);
    let info = pool.stat("/model.bin", false).await.unwrap();
    // Slow the store down so all readers arrive while the fetch is in flight.
    env.s3.set_get_delay(Duration::from_millis(300));
    env.s3.clear_log();

    let readers: Vec<_> = (0..32)
        .map(|_| {
            let pool = pool.clone();
            let info = info.clone();
            tokio::spawn(async move { pool.read_block(&info, 0, 0, 0).await })
        })
        .collect();
    for reader in readers {
        let (data, _) = reader.await.unwrap().expect("read");
        assert!(data[..] == pattern(50_000, 1)[..]);
    }
    assert_eq!(env.s3.object_gets("model.bin"), 1, "requests: {:?}", env.s3.requests());
    let stats = &pool.stats().await[0].1.as_ref().unwrap().clone();
    assert_eq!(stats.source_reads, 1);
    assert_eq!(stats.singleflight_shared, 31);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_source_file_is_served_with_its_new_bytes() {
    let env = s3_env().await;
    env.put("ds/labels.csv", &pattern(200_000, 1)).await;
    let mut config = env.config("ds");
    config.metadata_ttl = MetadataTtl::Expires(Duration::ZERO);
    let worker = start(config).await;
    let pool = pool(&[&worker], 1);
    assert!(read_all(&pool, "/labels.csv").await.unwrap() == pattern(200_000, 1));

    // Same size, new bytes: only the version tells them apart.
    env.put("ds/labels.csv", &pattern(200_000, 2)).await;
    assert!(read_all(&pool, "/labels.csv").await.unwrap() == pattern(200_000, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_block_file_is_detected_dropped_and_refetched() {
    let env = s3_env().await;
    env.put("ds/shard.tar", &pattern(3 * BLOCK as usize, 3)).await;
    let cache = env.cache_dir("cache");
    let mut config = env.config_with_disk("ds", &cache, 16 << 20, granary_cache::tiers::EvictionPolicy::Lru);
    config.memory_size = 0; // every read goes to the disk tier
    let worker = start(config).await;
    let pool = pool(&[&worker], 1);
    assert!(read_all(&pool, "/shard.tar").await.unwrap() == pattern(3 * BLOCK as usize, 3));

    worker.state.store.flush().await; // the blocks are written behind the reads
    let info = pool.stat("/shard.tar", false).await.unwrap();
    let path = block_file(&cache, &BlockName::of("shard.tar", &info.version, 1));
    let mut raw = std::fs::read(&path).expect("block file exists");
    let at = raw.len() - 1000;
    raw[at] ^= 0x40;
    std::fs::write(&path, raw).unwrap();
    env.s3.clear_log();

    assert!(read_all(&pool, "/shard.tar").await.unwrap() == pattern(3 * BLOCK as usize, 3));
    assert_eq!(
        env.s3.object_gets("shard.tar"),
        1,
        "only the corrupt block is fetched again"
    );
    let stats = pool.stats().await[0].1.clone().unwrap();
    assert_eq!(stats.corrupt_blocks, 1);
    // And the refetched copy is good: a third read is all disk hits.
    env.s3.clear_log();
    assert!(read_all(&pool, "/shard.tar").await.unwrap() == pattern(3 * BLOCK as usize, 3));
    assert_eq!(env.s3.object_gets("shard.tar"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_stream_entries_and_stat_is_cached_for_the_ttl() {
    use futures::TryStreamExt;
    let env = s3_env().await;
    for i in 0..2500 {
        env.put(&format!("ds/many/{i:05}.jpg"), b"x").await;
    }
    env.put("ds/many/sub/deep.jpg", b"deep").await;
    let worker = start(env.config("ds")).await; // metadata TTL 60s
    let pool = pool(&[&worker], 1);

    let flat: Vec<_> = pool.list("/many", false).await.unwrap().try_collect().await.unwrap();
    assert_eq!(
        flat.iter().filter(|f| !f.is_dir).count(),
        2500,
        "more than one 1000-entry batch"
    );
    assert!(
        flat.iter().any(|f| f.is_dir && f.path == "many/sub"),
        "subdirectories are listed"
    );
    let deep: Vec<_> = pool.list("/many", true).await.unwrap().try_collect().await.unwrap();
    assert!(deep.iter().any(|f| f.path == "many/sub/deep.jpg" && f.size == 4));
    match pool.list("/nowhere", false).await {
        Ok(s) => assert_eq!(s.try_collect::<Vec<_>>().await.unwrap().len(), 0),
        Err(e) => panic!("an empty prefix lists as empty: {e}"),
    }

    // Within the TTL a stat is served from the cache, even after the object changed...
    let before = pool.stat("/many/sub/deep.jpg", false).await.unwrap();
    env.put("ds/many/sub/deep.jpg", b"changed!").await;
    env.s3.clear_log();
    let cached = pool.stat("many/sub/deep.jpg/", false).await.unwrap();
    assert_eq!(cached.version, before.version);
    assert!(
        env.s3.requests().is_empty(),
        "a cached stat makes no request: {:?}",
        env.s3.requests()
    );
    // ...and a refresh goes to the store.
    let fresh = pool.stat("/many/sub/deep.jpg", true).await.unwrap();
    assert_ne!(fresh.version, before.version);
    assert_eq!(fresh.size, 8);
}

/// TCP connections of this process whose one end is `port`: (accepted by the worker,
/// TCP_NODELAY set).
fn connections_on(port: u16) -> Vec<(bool, bool)> {
    use std::os::fd::FromRawFd;
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd").expect("/proc/self/fd").flatten() {
        let Ok(fd) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let is_socket = std::fs::read_link(entry.path()).is_ok_and(|l| l.to_string_lossy().starts_with("socket:"));
        if !is_socket {
            continue;
        }
        // SAFETY: the fd is open in this process (listed just now); ManuallyDrop means this
        // view never closes it. A socket closed meanwhile only makes the calls below fail.
        let socket = std::mem::ManuallyDrop::new(unsafe { std::net::TcpStream::from_raw_fd(fd) });
        let (Ok(local), Ok(peer)) = (socket.local_addr(), socket.peer_addr()) else {
            continue;
        };
        if local.port() != port && peer.port() != port {
            continue;
        }
        found.push((local.port() == port, socket.nodelay().unwrap_or(false)));
    }
    found
}

/// Nagle's algorithm meeting delayed ACKs holds a small reply for about 40 ms: a first
/// epoch over small files ran at 0.07× of local disk. Both ends of every worker connection
/// must set TCP_NODELAY (the server's accepted sockets are not covered by tonic's option).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_ends_of_a_worker_connection_disable_nagle() {
    let env = s3_env().await;
    env.put("ds/a.bin", &pattern(1000, 1)).await;
    let worker = start(env.config("ds")).await;
    let pool = pool(&[&worker], 1);
    assert_eq!(read_all(&pool, "/a.bin").await.unwrap(), pattern(1000, 1));
    let connections = connections_on(worker.addr.port());
    assert!(
        connections.iter().any(|(accepted, _)| *accepted) && connections.iter().any(|(accepted, _)| !*accepted),
        "expected the client's and the worker's end of the connection: {connections:?}"
    );
    for (accepted, nodelay) in connections {
        let end = if accepted { "worker's accepted" } else { "client's" };
        assert!(nodelay, "the {end} socket has Nagle's algorithm on (TCP_NODELAY unset)");
    }
}

/// The test S3 server lists objects with their ETags, as S3 does (s3s-fs alone does not):
/// a worker's listing then needs no HEAD per entry, and the versions match a stat's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_carry_versions_so_a_listing_stats_nothing() {
    let env = s3_env().await;
    for i in 0..20 {
        env.put(&format!("ds/d/{i}.bin"), &pattern(100, i)).await;
    }
    let worker = start(env.config("ds")).await;
    let pool = pool(&[&worker], 1);
    env.s3.clear_log();
    let listed: Vec<_> = futures::StreamExt::collect::<Vec<_>>(pool.list("/d", false).await.unwrap()).await;
    assert_eq!(listed.len(), 20);
    let heads = env.s3.requests().iter().filter(|r| r.method == "HEAD").count();
    assert_eq!(heads, 0, "{:?}", env.s3.requests());
    for entry in listed {
        let entry = entry.unwrap();
        let stat = pool.stat(&entry.path, true).await.unwrap();
        assert_eq!(entry.version, stat.version, "{}", entry.path);
        assert!(entry.version.starts_with("etag:"), "{}", entry.version);
    }
}

/// Blocks larger than one gRPC message (1 MiB) arrive in several; they are appended in order
/// into the caller's buffer, which is cleared first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_of_several_messages_arrives_whole_and_in_order() {
    let env = s3_env().await;
    let data = pattern(8 << 20, 4);
    env.put("ds/big.bin", &data).await;
    let mut config = env.config("ds");
    config.block_size = (3 << 20) + 12345;
    let worker = start(config).await;
    let pool = pool(&[&worker], 1);
    assert!(read_all(&pool, "/big.bin").await.unwrap() == data);
    let info = pool.stat("/big.bin", false).await.unwrap();
    let mut out = vec![9u8; 100];
    pool.read_block_into(&info, 1, 0, 0, &mut out).await.unwrap();
    let bs = info.block_size as usize;
    assert!(out == data[bs..2 * bs], "block 1, whole, and nothing before it");
}
