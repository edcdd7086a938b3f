//! Load (prewarm) over several workers: everything lands on its owners, progress adds up,
//! failures are named and do not stop the rest, replicas are honoured.

mod support;

use futures::StreamExt;
use granary_cache::proto::LoadProgress;
use support::*;

async fn run_load(pool: &granary_cache::client::WorkerPool, path: &str) -> (LoadProgress, Vec<String>) {
    let mut stream = std::pin::pin!(pool.load(path, 8).await.expect("start load"));
    let mut failed = Vec::new();
    let mut last = LoadProgress::default();
    while let Some(update) = stream.next().await {
        let update = update.expect("progress");
        assert!(update.bytes_done <= update.bytes_total || !update.listing_done);
        failed.extend(update.new_failures.iter().map(|f| format!("{}: {}", f.path, f.error)));
        last = update;
    }
    assert!(last.finished, "the stream ends with a finished report");
    (last, failed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prewarm_caches_every_block_on_its_owner_so_reads_touch_no_store() {
    let env = s3_env().await;
    let mut total = 0u64;
    for d in 0..3 {
        for i in 0..10 {
            let size = 1000 * (i + 1) + (d * 70_000) as usize;
            total += size as u64;
            env.put(&format!("ds/train/{d}/{i}.jpg"), &pattern(size, d * 100 + i as u64))
                .await;
        }
    }
    env.put("ds/val/skip.jpg", &pattern(10, 0)).await;
    let workers = [start(env.config("ds")).await, start(env.config("ds")).await];
    let pool = pool(&[&workers[0], &workers[1]], 1);

    let (last, failed) = run_load(&pool, "/train").await;
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!((last.files_total, last.files_done, last.files_failed), (30, 30, 0));
    assert_eq!(last.bytes_total, total);
    assert_eq!(last.bytes_done, total);
    assert_eq!(last.bytes_from_source, total);

    env.s3.clear_log();
    for d in 0..3 {
        for i in 0..10 {
            let size = 1000 * (i + 1) + (d * 70_000) as usize;
            let got = read_all(&pool, &format!("/train/{d}/{i}.jpg")).await.unwrap();
            assert!(got == pattern(size, d * 100 + i as u64));
        }
    }
    assert_eq!(env.s3.object_gets("/"), 0, "reads after a prewarm are all hits");

    // A second prewarm finds everything cached and fetches nothing.
    let (again, _) = run_load(&pool, "/train").await;
    assert_eq!(again.bytes_done, total);
    assert_eq!(again.bytes_from_source, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_file_is_reported_by_name_and_the_rest_still_load() {
    let env = s3_env().await;
    for i in 0..6 {
        env.put(&format!("ds/data/{i}.bin"), &pattern(100_000, i)).await;
    }
    let workers = [start(env.config("ds")).await, start(env.config("ds")).await];
    let pool = pool(&[&workers[0], &workers[1]], 1);
    env.s3.fail_gets_containing(Some("data/3.bin"));

    let (last, failed) = run_load(&pool, "/data").await;
    assert_eq!((last.files_total, last.files_done, last.files_failed), (6, 5, 1));
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert!(failed[0].starts_with("data/3.bin: "), "{failed:?}");
    assert!(failed[0].contains("unreachable"), "the reason is given: {failed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_put_each_block_on_that_many_workers() {
    let env = s3_env().await;
    env.put("ds/model.safetensors", &pattern(10 * BLOCK as usize, 5)).await;
    let workers = [
        start(env.config("ds")).await,
        start(env.config("ds")).await,
        start(env.config("ds")).await,
    ];
    let pool = pool(&[&workers[0], &workers[1], &workers[2]], 2);
    let (last, failed) = run_load(&pool, "/model.safetensors").await;
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(last.files_done, 1);
    let blocks: u64 = pool
        .stats()
        .await
        .iter()
        .map(|(_, s)| s.as_ref().unwrap().memory.unwrap().blocks)
        .sum();
    assert_eq!(blocks, 20, "10 blocks, 2 replicas each");
    assert_eq!(env.s3.object_gets("model.safetensors"), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listing_that_fails_midway_is_reported_once_and_the_listed_files_load() {
    let env = s3_env().await;
    for i in 0..1500 {
        env.put(&format!("ds/big/{i:05}.bin"), b"sample").await;
    }
    let worker = start(env.config("ds")).await;
    let pool = pool(&[&worker], 1);
    // S3 lists 1000 keys a page: the first page arrives, the second fails.
    env.s3.fail_list_continuations(true);

    let (last, failed) = tokio::time::timeout(std::time::Duration::from_secs(60), run_load(&pool, "/big"))
        .await
        .expect("a failed listing ends the load rather than retrying it forever");
    assert_eq!(last.files_done, 1000, "the first page was loaded");
    assert_eq!(last.files_failed, 1);
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert!(failed[0].starts_with("big: listing stopped"), "{failed:?}");
}

fn store_listings(env: &S3Env) -> usize {
    env.s3
        .requests()
        .iter()
        .filter(|r| r.method == "GET" && r.query.contains("list-type"))
        .count()
}

async fn listed(pool: &granary_cache::client::WorkerPool, dir: &str) -> Vec<String> {
    let stream = pool.list(dir, false).await.expect("list");
    let mut names: Vec<String> = stream.map(|e| e.expect("entry").path).collect().await;
    names.sort();
    names
}

/// After a prewarm, a fresh mount's walk is answered by the workers' listing caches: no
/// listing reaches the store. Without one, eight nodes listing one directory make one
/// store listing, not eight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_are_listed_once_for_every_node_and_a_prewarm_lists_them_ahead() {
    let env = s3_env().await;
    for d in 0..3 {
        for i in 0..5 {
            env.put(&format!("ds/train/{d}/{i}.jpg"), &pattern(100, i)).await;
        }
    }
    for i in 0..4 {
        env.put(&format!("ds/val/{i}.jpg"), &pattern(100, i)).await;
    }
    let workers = [start(env.config("ds")).await, start(env.config("ds")).await];
    let (_, failed) = run_load(&pool(&[&workers[0], &workers[1]], 1), "/train").await;
    assert!(failed.is_empty(), "{failed:?}");

    let listed_before = store_listings(&env);
    env.s3.clear_log();
    let nodes: Vec<_> = (0..8).map(|_| pool(&[&workers[0], &workers[1]], 1)).collect();
    for node in &nodes {
        assert_eq!(listed(node, "/train").await, ["train/0", "train/1", "train/2"]);
        for d in 0..3 {
            assert_eq!(listed(node, &format!("/train/{d}")).await.len(), 5);
        }
    }
    assert_eq!(
        store_listings(&env),
        0,
        "the prewarm listed every directory: {:?}",
        env.s3.requests()
    );

    // Not prewarmed: the first node's listing is the only one the store sees.
    for node in &nodes {
        assert_eq!(listed(node, "/val").await.len(), 4);
    }
    assert_eq!(store_listings(&env), 1);
    let source_lists: u64 = workers.iter().map(|w| w.state.metrics.source_lists.get()).sum();
    let hits: u64 = workers
        .iter()
        .map(|w| {
            w.state
                .metrics
                .listings
                .get_or_create(&granary_cache::metrics::StateLabel { state: "hit" })
                .get()
        })
        .sum();
    assert_eq!(
        hits,
        8 * 4 + 7,
        "every listing after the first of each directory is a hit"
    );
    // The workers count what the store received: the start-up probes, the prewarm's walk,
    // its four directory listings, /val, every page of each.
    assert_eq!(source_lists as usize, listed_before + store_listings(&env));
    assert!(source_lists > 1 + 4, "{source_lists}");
}

/// A listing of more entries than the store sends in one page costs one request per page,
/// and the workers' `granary_source_lists_total` counts each, as the store saw them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_page_of_a_listing_counts_as_a_store_listing_request() {
    let env = s3_env().await;
    for i in 0..1_100 {
        env.put(&format!("pages/big/{i:04}"), b"x").await;
    }
    let worker = start(env.config("pages")).await;
    // The start-up probe's listing is done before the count starts.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while store_listings(&env) == 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    env.s3.clear_log();
    let before = worker.state.metrics.source_lists.get();
    let nodes: Vec<_> = (0..4).map(|_| pool(&[&worker], 1)).collect();
    for node in &nodes {
        assert_eq!(listed(node, "/big").await.len(), 1_100);
    }
    let pages = store_listings(&env);
    assert!(pages >= 2, "1,100 keys take more than one page: {pages}");
    assert_eq!(
        (worker.state.metrics.source_lists.get() - before) as usize,
        pages,
        "one count per request the store saw"
    );
}
