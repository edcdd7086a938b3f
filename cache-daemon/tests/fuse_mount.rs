//! The FUSE read path over real mounts: a real S3-protocol server, real workers on real
//! sockets, the kernel's FUSE driver. Mandatory in CI (GRANARY_REQUIRE_MOUNTS=1).

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use granary_cache::worker::WorkerConfig;
use granary_fs::dataset::DatasetMount;
use granary_store::units::MetadataTtl;
use support::{block_files, fuse_possible, pattern, pool, s3_env, start, BLOCK, BUCKET};

/// Writes `files` (path, bytes) under `root`.
fn write_tree(root: &Path, files: &[(String, Vec<u8>)]) {
    for (path, data) in files {
        let full = root.join(path);
        std::fs::create_dir_all(full.parent().unwrap()).unwrap();
        std::fs::write(full, data).unwrap();
    }
}

/// A tree with nested directories, empty files and sizes around block boundaries.
fn odd_tree() -> Vec<(String, Vec<u8>)> {
    let sizes = [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 7, 100_000];
    let mut files = Vec::new();
    for (i, size) in sizes.iter().enumerate() {
        files.push((format!("train/shard-{i:02}.bin"), pattern(*size as usize, i as u64 + 1)));
    }
    files.push(("train/nested/deeper/still/leaf.txt".into(), b"leaf\n".to_vec()));
    files.push(("ünïcødé/日本語 ファイル.txt".into(), pattern(777, 99)));
    files.push(("empty-dir-sibling/file".into(), Vec::new()));
    files
}

fn run(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().expect("run a command");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn s3_mount_config(env: &support::S3Env, prefix: &str, workers: &[String]) -> DatasetMount {
    let mut config = DatasetMount::new(workers.to_vec(), Some(format!("s3://{BUCKET}/{prefix}")));
    config.source_options = env.s3.options().into_iter().collect();
    config.block_size = BLOCK;
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_generated_tree_over_three_workers_reads_back_identical() {
    if !fuse_possible() {
        return;
    }
    let env = s3_env().await;
    let tree = odd_tree();
    let expected = env.dir.path().join("expected");
    write_tree(&expected, &tree);
    for (path, data) in &tree {
        env.put(&format!("ds/{path}"), data).await;
    }
    let workers = [
        start(env.config("ds")).await,
        start(env.config("ds")).await,
        start(env.config("ds")).await,
    ];
    let addrs: Vec<String> = workers.iter().map(|w| w.addr.to_string()).collect();
    let config = s3_mount_config(&env, "ds", &addrs);
    let mount = tokio::task::spawn_blocking(move || support::mount(config, 256 << 20))
        .await
        .unwrap();
    let mnt = mount.path().to_path_buf();
    let exp = expected.clone();
    tokio::task::spawn_blocking(move || {
        // diff compares names, types and every byte.
        run(Command::new("diff").arg("-r").arg(&exp).arg(&mnt));
        // What common tools need: ls -l, find, du, cp -a.
        let ls = run(Command::new("ls").arg("-l").arg(mnt.join("train")));
        assert!(String::from_utf8_lossy(&ls.stdout).contains("shard-03.bin"));
        let find = run(Command::new("find").arg(&mnt).arg("-type").arg("f"));
        assert_eq!(String::from_utf8_lossy(&find.stdout).lines().count(), tree.len());
        let du = run(Command::new("du").arg("-sb").arg(&mnt));
        let total: u64 = tree.iter().map(|(_, d)| d.len() as u64).sum();
        let du_bytes: u64 = String::from_utf8_lossy(&du.stdout)
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(du_bytes >= total, "du -sb says {du_bytes}, the files hold {total}");
        let copy = exp.parent().unwrap().join("copy");
        run(Command::new("cp").arg("-a").arg(&mnt).arg(&copy));
        run(Command::new("diff").arg("-r").arg(&exp).arg(&copy));
        // Errors a reader can act on.
        let missing = std::fs::metadata(mnt.join("train/no-such-file")).unwrap_err();
        assert_eq!(missing.raw_os_error(), Some(libc::ENOENT));
        let write = std::fs::OpenOptions::new()
            .write(true)
            .open(mnt.join("train/shard-01.bin"))
            .unwrap_err();
        assert_eq!(write.raw_os_error(), Some(libc::EROFS));
        let create = std::fs::write(mnt.join("new-file"), b"x").unwrap_err();
        assert_eq!(create.raw_os_error(), Some(libc::EROFS));
    })
    .await
    .unwrap();
    assert!(mount.counter("granary_fuse_read_bytes_total", "origin=\"worker\"") > 0.0);
    assert_eq!(mount.counter("granary_fuse_fallback_reads_total", ""), 0.0);
    drop(mount);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_directory_of_100k_entries_is_listed_whole_and_then_served_from_the_cache() {
    if !fuse_possible() {
        return;
    }
    // An fs:// source: the S3 test server lists without ETags, which would cost a HEAD per
    // entry and only measure the test server.
    let src = tempfile::tempdir().unwrap();
    let many = src.path().join("many");
    std::fs::create_dir(&many).unwrap();
    for i in 0..100_000 {
        std::fs::write(many.join(format!("sample-{i:06}.jpg")), []).unwrap();
    }
    std::fs::write(many.join("sample-000042.jpg"), b"forty-two").unwrap();
    let uri = format!("fs://{}", src.path().display());
    let mut worker_config = granary_cache::worker::WorkerConfig::new(uri.clone(), "127.0.0.1:0".parse().unwrap());
    worker_config.block_size = BLOCK;
    let worker = start(worker_config).await;
    let mut config = DatasetMount::new(vec![worker.addr.to_string()], Some(uri));
    config.metadata_ttl = MetadataTtl::Expires(Duration::from_secs(600));
    let mount = tokio::task::spawn_blocking(move || support::mount(config, 512 << 20))
        .await
        .unwrap();
    let mnt = mount.path().join("many");
    let listed = {
        let mnt = mnt.clone();
        tokio::task::spawn_blocking(move || {
            let names: Vec<String> = std::fs::read_dir(&mnt)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            assert_eq!(std::fs::read(mnt.join("sample-000042.jpg")).unwrap(), b"forty-two");
            names
        })
        .await
        .unwrap()
    };
    assert_eq!(listed.len(), 100_000);
    let unique: std::collections::HashSet<_> = listed.iter().collect();
    assert_eq!(unique.len(), 100_000, "no entry twice, none lost");

    // The kernel forgets its dentries; a walk + stat of every entry comes back to the daemon
    // and is answered from its cache, without one request to the workers.
    let remote_before = mount.counter("granary_fuse_metadata_requests_total", "origin=\"remote\"");
    let cached_before = mount.counter("granary_fuse_metadata_requests_total", "origin=\"cache\"");
    drop_kernel_caches();
    let listings_before = mount.counter("granary_fuse_ops_total", "op=\"readdirplus\"");
    let mnt2 = mnt.clone();
    let stated = tokio::task::spawn_blocking(move || {
        let mut n = 0;
        for entry in std::fs::read_dir(&mnt2).unwrap() {
            let md = std::fs::metadata(entry.unwrap().path()).unwrap();
            assert!(md.is_file());
            n += 1;
        }
        n
    })
    .await
    .unwrap();
    assert_eq!(stated, 100_000);
    assert!(
        mount.counter("granary_fuse_ops_total", "op=\"readdirplus\"") > listings_before,
        "the kernel listed the directory again"
    );
    // Lookups by name, without a listing first: each answered from the cache, and a name
    // missing from the complete listing is known missing without asking.
    drop_kernel_caches();
    let mnt3 = mnt.clone();
    tokio::task::spawn_blocking(move || {
        for i in (0..100_000).step_by(97) {
            assert!(std::fs::metadata(mnt3.join(format!("sample-{i:06}.jpg")))
                .unwrap()
                .is_file());
        }
        let missing = std::fs::metadata(mnt3.join("sample-999999.jpg")).unwrap_err();
        assert_eq!(missing.raw_os_error(), Some(libc::ENOENT));
    })
    .await
    .unwrap();
    let remote_after = mount.counter("granary_fuse_metadata_requests_total", "origin=\"remote\"");
    assert_eq!(
        remote_after,
        remote_before,
        "the second walk asked the workers {} times",
        remote_after - remote_before
    );
    let cached = mount.counter("granary_fuse_metadata_requests_total", "origin=\"cache\"") - cached_before;
    assert!(cached >= 1000.0, "the daemon answered only {cached} lookups itself");
    drop(mount);
    drop(worker);
}

fn drop_kernel_caches() {
    // 2: dentries and inodes, so the kernel asks the filesystem again.
    std::fs::write("/proc/sys/vm/drop_caches", "2").expect("drop the kernel's caches (needs root)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_readers_of_the_same_and_of_different_files_get_their_bytes() {
    if !fuse_possible() {
        return;
    }
    let env = s3_env().await;
    let files: Vec<(String, Vec<u8>)> = (0..6)
        .map(|i| (format!("f{i}.bin"), pattern(2 * 1024 * 1024 + i * 4099, 40 + i as u64)))
        .collect();
    for (path, data) in &files {
        env.put(&format!("cc/{path}"), data).await;
    }
    let workers = [start(env.config("cc")).await, start(env.config("cc")).await];
    let addrs: Vec<String> = workers.iter().map(|w| w.addr.to_string()).collect();
    let config = s3_mount_config(&env, "cc", &addrs);
    // A small budget, so readers also contend for memory.
    let mount = tokio::task::spawn_blocking(move || support::mount(config, 64 << 20))
        .await
        .unwrap();
    let mnt = mount.path().to_path_buf();
    let mut readers = Vec::new();
    for r in 0..12 {
        // Half the readers share file 0; the others read one file each.
        let (name, data) = if r % 2 == 0 {
            files[0].clone()
        } else {
            files[r / 2].clone()
        };
        let path = mnt.join(&name);
        readers.push(std::thread::spawn(move || {
            use std::io::Read;
            let mut f = std::fs::File::open(&path).unwrap();
            let mut got = Vec::new();
            // Odd read sizes, so reads straddle block edges.
            let mut buf = vec![0u8; 50_000 + r * 333];
            loop {
                let n = f.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            assert!(got == data, "reader {r} of {name} got wrong bytes");
        }));
    }
    tokio::task::spawn_blocking(move || readers.into_iter().for_each(|r| r.join().unwrap()))
        .await
        .unwrap();
    drop(mount);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_workers_mid_read_falls_back_to_the_source_without_an_error() {
    if !fuse_possible() {
        return;
    }
    let env = s3_env().await;
    let data = pattern(8 * 1024 * 1024, 7);
    env.put("kill/big.bin", &data).await;
    let workers = vec![start(env.config("kill")).await, start(env.config("kill")).await];
    let addrs: Vec<String> = workers.iter().map(|w| w.addr.to_string()).collect();
    let mut config = s3_mount_config(&env, "kill", &addrs);
    config.max_readahead = BLOCK; // keep the reader ahead of the cache, not the other way round
    let mount = tokio::task::spawn_blocking(move || support::mount(config, 64 << 20))
        .await
        .unwrap();
    let path = mount.path().join("big.bin");
    let (progress_tx, progress_rx) = std::sync::mpsc::channel::<()>();
    let (go_on_tx, go_on_rx) = std::sync::mpsc::channel::<()>();
    let reader = std::thread::spawn(move || {
        use std::io::Read;
        let mut f = std::fs::File::open(&path).unwrap();
        let mut got = Vec::new();
        let mut buf = vec![0u8; 128 << 10];
        loop {
            let n = f.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
            if got.len() == 1 << 20 {
                // A quarter in: let the test kill the workers, then read on.
                progress_tx.send(()).unwrap();
                go_on_rx.recv().unwrap();
            }
        }
        got
    });
    tokio::task::spawn_blocking(move || progress_rx.recv().unwrap())
        .await
        .unwrap();
    for w in workers {
        w.shutdown().await.unwrap();
    }
    go_on_tx.send(()).unwrap();
    let got = tokio::task::spawn_blocking(move || reader.join().unwrap())
        .await
        .unwrap();
    assert!(got == data, "the bytes read across the failover differ");
    assert!(
        mount.counter("granary_fuse_fallback_reads_total", "") > 0.0,
        "the rest came from the source store directly"
    );
    drop(mount);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_store_outage_behind_the_workers_is_eio_with_the_cause_logged() {
    if !fuse_possible() {
        return;
    }
    let env = s3_env().await;
    env.put("down/a.bin", &pattern(1000, 1)).await;
    let worker = start(env.config("down")).await;
    let config = s3_mount_config(&env, "down", &[worker.addr.to_string()]);
    let mount = tokio::task::spawn_blocking(move || support::mount(config, 64 << 20))
        .await
        .unwrap();
    let path: PathBuf = mount.path().join("a.bin");
    // Attributes are known first; then the store goes away before the data is read.
    let p = path.clone();
    tokio::task::spawn_blocking(move || assert_eq!(std::fs::metadata(&p).unwrap().len(), 1000))
        .await
        .unwrap();
    env.s3.set_outage(true);
    let err = tokio::task::spawn_blocking(move || std::fs::read(&path).unwrap_err())
        .await
        .unwrap();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(mount.counter("granary_fuse_op_errors_total", "errno=\"5\"") >= 1.0);
    env.s3.set_outage(false);
    drop(mount);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_locally_complete_file_is_read_by_the_kernel_through_passthrough() {
    if !fuse_possible() {
        return;
    }
    // Why an open was not passthrough is a warning of the mount's: show it with the failure.
    let _ = tracing_subscriber::fmt()
        .with_env_filter("granary_fs=info")
        .with_test_writer()
        .try_init();
    let env = s3_env().await;
    let data = pattern(5 * BLOCK as usize + 123, 11);
    env.put("pt/shard.bin", &data).await;
    let worker = start(env.config("pt")).await;
    let mut config = s3_mount_config(&env, "pt", &[worker.addr.to_string()]);
    let local = env.dir.path().join("node-cache");
    config.local_cache = Some((local.clone(), 64 << 20));
    let mount = tokio::task::spawn_blocking(move || support::mount(config, 64 << 20))
        .await
        .unwrap();
    let path = mount.path().join("shard.bin");

    // The first reader goes through the daemon and keeps its file open while the local copy
    // completes; opens meanwhile must still work (the kernel refuses mixed modes with EIO).
    let p = path.clone();
    let held = tokio::task::spawn_blocking(move || {
        let f = std::fs::File::open(&p).unwrap();
        assert!(std::fs::read(&p).unwrap() == data_of(&p, &f));
        f
    })
    .await
    .unwrap();
    let files_dir = local.join("files");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::fs::read_dir(&files_dir).map(|d| d.count()).unwrap_or(0) == 0 {
        assert!(std::time::Instant::now() < deadline, "the local copy never completed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let p = path.clone();
    let expected = data.clone();
    tokio::task::spawn_blocking(move || {
        assert!(
            std::fs::read(&p).unwrap() == expected,
            "read while another open is cached"
        )
    })
    .await
    .unwrap();
    assert_eq!(mount.counter("granary_fuse_opens_total", "origin=\"passthrough\""), 0.0);
    let released = || mount.counter("granary_fuse_ops_total", "op=\"release\"");
    let opened = mount.counter("granary_fuse_opens_total", "");
    drop(held);

    // Every open closed: the next one is passthrough, and it reads correct bytes with the
    // store and the workers gone, because the kernel reads the local file. The kernel sends
    // the last RELEASE after close() returns: wait for it to reach the daemon.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while released() < opened {
        assert!(
            std::time::Instant::now() < deadline,
            "the kernel never released the held handle"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    worker.shutdown().await.unwrap();
    env.s3.set_outage(true);
    let replied_before = mount.counter("granary_fuse_reply_bytes_total", "");
    let p = path.clone();
    let got = tokio::task::spawn_blocking(move || {
        std::fs::write("/proc/sys/vm/drop_caches", "1").unwrap();
        std::fs::read(&p).unwrap()
    })
    .await
    .unwrap();
    assert!(got == data, "passthrough bytes differ");
    assert_eq!(mount.counter("granary_fuse_opens_total", "origin=\"passthrough\""), 1.0);
    assert_eq!(
        mount.counter("granary_fuse_reply_bytes_total", ""),
        replied_before,
        "passthrough reads never pass through the daemon"
    );
    drop(mount);
}

/// Reads a file's bytes through an already open handle.
fn data_of(_path: &Path, f: &std::fs::File) -> Vec<u8> {
    use std::io::Read;
    let mut out = Vec::new();
    let mut f = f;
    f.read_to_end(&mut out).unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sequential_read_fetches_each_block_about_once_under_a_small_budget() {
    if !fuse_possible() {
        return;
    }
    let env = s3_env().await;
    // 48 MiB in 64 KiB blocks, through a 64 MiB budget (56 MiB for blocks): readahead runs
    // far ahead, and must not evict what the reader is about to read.
    let data = pattern(48 << 20, 21);
    env.put("seq/shard.bin", &data).await;
    let worker = start(env.config("seq")).await;
    let config = s3_mount_config(&env, "seq", &[worker.addr.to_string()]);
    let mount = tokio::task::spawn_blocking(move || support::mount(config, 64 << 20))
        .await
        .unwrap();
    let path = mount.path().join("shard.bin");
    let got = tokio::task::spawn_blocking(move || std::fs::read(path).unwrap())
        .await
        .unwrap();
    assert!(got == data);
    let fetched = mount.counter("granary_fuse_read_bytes_total", "");
    assert!(
        mount.counter("granary_fuse_prefetched_blocks_total", "") > 0.0,
        "readahead ran"
    );
    // The kernel's reads of one stream run concurrently: a block finished by one read may be
    // wanted by another still on its way; it is demoted, not dropped, so it is not fetched
    // twice (blocks were: 1.04-1.10x of the file before).
    assert!(
        fetched <= 1.03 * data.len() as f64,
        "{fetched} bytes fetched for a {} byte file: blocks are fetched twice",
        data.len()
    );
    drop(mount);
}

/// The file a loader stat'ed (or listed) is replaced in the store before it opens it: the
/// mount's and the worker's cached metadata name a version the store no longer has. The
/// fresh open reads the new bytes, with the new size, and does not fail with ESTALE.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_file_replaced_after_it_was_stated_is_read_whole_in_its_new_version() {
    if !fuse_possible() {
        return;
    }
    let env = s3_env().await;
    env.put("changing/sample.bin", &pattern(100_000, 1)).await;
    let worker = start(env.config("changing")).await;
    let config = s3_mount_config(&env, "changing", &[worker.addr.to_string()]);
    let mount = tokio::task::spawn_blocking(move || support::mount(config, 64 << 20))
        .await
        .unwrap();
    let path = mount.path().join("sample.bin");
    let listed = std::fs::read_dir(mount.path()).unwrap().count();
    assert_eq!(listed, 1);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 100_000);
    // Larger, so a reader held to the old size would come up short.
    let new = pattern(300_000, 2);
    env.put("changing/sample.bin", &new).await;
    let read = tokio::task::spawn_blocking(move || std::fs::read(path)).await.unwrap();
    let got = read.expect("a fresh open of the replaced file reads it (no ESTALE)");
    assert_eq!(got.len(), new.len(), "the new size is read");
    assert!(got == new, "the new version's bytes");
    assert_eq!(mount.counter("granary_fuse_reopened_changed_total", ""), 1.0);
    drop(mount);
}

/// After a prewarm, a small file's block sits in a co-located worker's block files: its first
/// open copies it into the node-local cache and hands it to the kernel (passthrough), so a
/// prewarmed epoch reads like a warm one, with no read entering the daemon.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_prewarmed_small_file_opens_through_passthrough_at_its_first_open() {
    if !fuse_possible() {
        return;
    }
    let env = s3_env().await;
    let small = pattern(BLOCK as usize - 10, 5);
    env.put("pre/s.jpg", &small).await;
    env.put("pre/big.bin", &pattern(3 * BLOCK as usize, 6)).await;
    let cache_dir = env.cache_dir("worker-disk");
    let worker =
        start(env.config_with_disk("pre", &cache_dir, 64 << 20, granary_cache::tiers::EvictionPolicy::Lru)).await;
    let pool = pool(&[&worker], 1);
    let mut load = std::pin::pin!(pool.load("/", 4).await.expect("load"));
    while let Some(progress) = futures::StreamExt::next(&mut load).await {
        progress.expect("progress");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while block_files(&cache_dir).len() < 4 {
        assert!(
            std::time::Instant::now() < deadline,
            "the worker never wrote its block files"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut config = s3_mount_config(&env, "pre", &[worker.addr.to_string()]);
    config.local_cache = Some((env.dir.path().join("node-cache"), 64 << 20));
    config.short_circuit = vec![cache_dir.clone()];
    let mount = tokio::task::spawn_blocking(move || support::mount(config, 64 << 20))
        .await
        .unwrap();
    let path = mount.path().join("s.jpg");
    let got = tokio::task::spawn_blocking(move || std::fs::read(path).unwrap())
        .await
        .unwrap();
    assert!(got == small, "the bytes of the prewarmed file");
    assert_eq!(
        mount.counter("granary_fuse_opens_total", "origin=\"passthrough\""),
        1.0,
        "{}",
        mount.metrics_text()
    );
    assert_eq!(
        mount.counter("granary_fuse_reply_bytes_total", ""),
        0.0,
        "no read entered the daemon"
    );
    // A file of several blocks is read through the daemon (its copy is made block by block).
    let big = mount.path().join("big.bin");
    let read = tokio::task::spawn_blocking(move || std::fs::read(big).unwrap())
        .await
        .unwrap();
    assert!(read == pattern(3 * BLOCK as usize, 6));
    assert_eq!(mount.counter("granary_fuse_opens_total", "origin=\"passthrough\""), 1.0);
    drop(mount);
}

/// Eight mounts (eight nodes) list one directory of 200,000 entries at once, over two
/// workers: the store is listed once. The directory's owner reads it once and streams it to
/// every mount as it arrives; the others join that read or find it cached.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_mounts_listing_one_directory_of_200k_entries_list_the_store_once() {
    if !fuse_possible() {
        return;
    }
    const ENTRIES: usize = 200_000;
    let src = tempfile::tempdir().unwrap();
    let many = src.path().join("many");
    std::fs::create_dir(&many).unwrap();
    for i in 0..ENTRIES {
        std::fs::write(many.join(format!("s-{i:06}")), []).unwrap();
    }
    let uri = format!("fs://{}", src.path().display());
    let mut workers = Vec::new();
    for _ in 0..2 {
        let mut config = granary_cache::worker::WorkerConfig::new(uri.clone(), "127.0.0.1:0".parse().unwrap());
        config.block_size = BLOCK;
        workers.push(start(config).await);
    }
    let addrs: Vec<String> = workers.iter().map(|w| w.addr.to_string()).collect();
    let mut mounts = Vec::new();
    for _ in 0..8 {
        let mut config = DatasetMount::new(addrs.clone(), Some(uri.clone()));
        config.metadata_ttl = MetadataTtl::Expires(Duration::from_secs(600));
        mounts.push(
            tokio::task::spawn_blocking(move || support::mount(config, 256 << 20))
                .await
                .unwrap(),
        );
    }
    let lists_before: u64 = workers.iter().map(|w| w.state.metrics.source_lists.get()).sum();
    let started = std::time::Instant::now();
    let walks: Vec<_> = mounts
        .iter()
        .map(|m| {
            let dir = m.path().join("many");
            tokio::task::spawn_blocking(move || {
                let mut n = 0;
                for entry in std::fs::read_dir(&dir).unwrap() {
                    let entry = entry.unwrap();
                    if n % 1000 == 0 {
                        assert!(entry.metadata().unwrap().is_file());
                    }
                    n += 1;
                }
                n
            })
        })
        .collect();
    for walk in walks {
        assert_eq!(walk.await.unwrap(), ENTRIES);
    }
    let lists: u64 = workers.iter().map(|w| w.state.metrics.source_lists.get()).sum::<u64>() - lists_before;
    let outcome = |state: &'static str| -> u64 {
        workers
            .iter()
            .map(|w| {
                w.state
                    .metrics
                    .listings
                    .get_or_create(&granary_cache::metrics::StateLabel { state })
                    .get()
            })
            .sum()
    };
    println!(
        "8 mounts listed {ENTRIES} entries each in {:?}: {lists} store listing(s); listings served: {} miss, {} shared, {} hit",
        started.elapsed(),
        outcome("miss"),
        outcome("shared"),
        outcome("hit")
    );
    assert_eq!(lists, 1, "one listing of the store for eight mounts");
    assert_eq!(outcome("miss"), 1);
    assert_eq!(
        outcome("shared") + outcome("hit"),
        7,
        "the other mounts joined or hit the cache"
    );
    drop(mounts);
    drop(workers);
}

/// Where the replaced file of [`a_file_replaced_while_open_is_never_read_as_a_mix_of_versions`]
/// lives: a local directory or the S3 server.
enum ChangingSource {
    Fs(tempfile::TempDir),
    S3(Box<support::S3Env>),
}

impl ChangingSource {
    fn uri(&self) -> String {
        match self {
            ChangingSource::Fs(dir) => format!("fs://{}", dir.path().display()),
            ChangingSource::S3(_) => format!("s3://{BUCKET}/mix"),
        }
    }

    fn options(&self) -> std::collections::BTreeMap<String, String> {
        match self {
            ChangingSource::Fs(_) => Default::default(),
            ChangingSource::S3(env) => env.s3.options().into_iter().collect(),
        }
    }

    /// Puts `data` at `name`: on a local directory as a new file renamed over the old one,
    /// as a dataset tool replaces a file.
    async fn replace(&self, name: &str, data: &[u8]) {
        match self {
            ChangingSource::Fs(dir) => {
                let tmp = dir.path().join(format!(".{name}.tmp"));
                std::fs::write(&tmp, data).unwrap();
                std::fs::rename(&tmp, dir.path().join(name)).unwrap();
            }
            ChangingSource::S3(env) => env.put(&format!("mix/{name}"), data).await,
        }
    }
}

/// The reported scenario, with default block size and TTLs: open an 8 MiB file through the
/// mount and read its first MiB; a second later the file is replaced in the source by a new
/// file of the same size; the open handle reads on; then a fresh open reads it whole. Every
/// read gets bytes of one version only: the held handle the old bytes or ESTALE, the fresh
/// open the old file or the new one, whole. (It read the first 4 MiB old and the rest new:
/// the handle moved to the new version while the kernel's page cache held the old one's.)
async fn a_file_replaced_while_open_is_never_read_as_a_mix_of_versions(source: ChangingSource) {
    use std::io::{Read, Seek};
    const SIZE: usize = 8 << 20;
    let old = pattern(SIZE, 71);
    let new = pattern(SIZE, 72);
    source.replace("sample.bin", &old).await;
    let mut worker_config = WorkerConfig::new(source.uri(), "127.0.0.1:0".parse().unwrap());
    worker_config.source_options = source.options();
    let worker = start(worker_config).await;
    let mut config = DatasetMount::new(vec![worker.addr.to_string()], Some(source.uri()));
    config.source_options = source.options();
    let mount = tokio::task::spawn_blocking(move || support::mount(config, 256 << 20))
        .await
        .unwrap();
    let path = mount.path().join("sample.bin");

    let p = path.clone();
    let mut held = tokio::task::spawn_blocking(move || {
        let mut f = std::fs::File::open(&p).unwrap();
        let mut first = vec![0; 1 << 20];
        f.read_exact(&mut first).unwrap();
        assert!(first == old[..1 << 20], "the first MiB is the old file's");
        f
    })
    .await
    .unwrap();
    // The report replaced the file a second later; the readahead of the first read has then
    // ended, and it had not reached block 1 (the held handle got ESTALE). Replaced at once,
    // it is the same: nothing of block 1 is fetched before the handle reads on.
    source.replace("sample.bin", &new).await;

    let (old2, new2) = (pattern(SIZE, 71), pattern(SIZE, 72));
    let p = path.clone();
    tokio::task::spawn_blocking(move || {
        // The held handle: the old file's remaining bytes, or ESTALE.
        let mut rest = Vec::new();
        match held.read_to_end(&mut rest) {
            Ok(_) => assert!(rest == old2[1 << 20..], "the held handle read bytes of another version"),
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::ESTALE), "{e}"),
        }
        held.rewind().unwrap();
        // Fresh opens, while the old handle is still open and after it is closed.
        for round in ["with the old handle open", "after it closed"] {
            if round == "after it closed" {
                drop(std::mem::replace(&mut held, std::fs::File::open("/dev/null").unwrap()));
            }
            match std::fs::read(&p) {
                Ok(got) => {
                    let first_new = got.chunks(1 << 20).zip(old2.chunks(1 << 20)).position(|(a, b)| a != b);
                    assert!(
                        got == old2 || got == new2,
                        "a fresh open {round} read a mix of versions: {} bytes, old up to MiB {first_new:?}",
                        got.len()
                    );
                }
                Err(e) => assert_eq!(e.raw_os_error(), Some(libc::ESTALE), "{e}"),
            }
        }
        // Once the old handle is gone and the change is known, the new file is read.
        let got = std::fs::read(&p).expect("a fresh open after the change reads the file");
        assert!(got == new2, "the new version, whole");
    })
    .await
    .unwrap();
    drop(mount);
    drop(worker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_file_replaced_in_a_local_source_while_open_is_never_read_as_a_mix() {
    if !fuse_possible() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    a_file_replaced_while_open_is_never_read_as_a_mix_of_versions(ChangingSource::Fs(dir)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_file_replaced_in_an_s3_source_while_open_is_never_read_as_a_mix() {
    if !fuse_possible() {
        return;
    }
    let env = s3_env().await;
    a_file_replaced_while_open_is_never_read_as_a_mix_of_versions(ChangingSource::S3(Box::new(env))).await;
}

/// Runs `granary-cache load --mount <mount> [path]`; the mount is served by this process, so
/// the command runs beside the runtime, not on it.
async fn load_onto_node(mount: &Path, path: Option<&str>) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_granary-cache"));
    cmd.arg("load").arg("--mount").arg(mount).env_remove("GRANARY_WORKERS");
    if let Some(path) = path {
        cmd.arg(path);
    }
    tokio::task::spawn_blocking(move || cmd.output().expect("run granary-cache load --mount"))
        .await
        .unwrap()
}

/// `granary-cache load --mount`: a dataset loaded onto the node is read by the kernel
/// (passthrough) from every file's first open, with no byte through the daemon, the workers
/// and the store gone. Running it again fetches nothing; a node cache too small keeps the
/// files that fit (in path order) and says which stay on the workers (exit 3); bad input
/// names the fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dataset_loaded_onto_the_node_is_read_through_passthrough_from_its_first_open() {
    if !fuse_possible() {
        return;
    }
    let env = s3_env().await;
    let files: Vec<(String, Vec<u8>)> = vec![
        ("train/a/0.bin".into(), pattern(5 * BLOCK as usize + 17, 1)),
        ("train/a/1.bin".into(), pattern(3 * BLOCK as usize, 2)),
        ("train/b/small.jpg".into(), pattern(1000, 3)),
        ("train/empty".into(), Vec::new()),
        ("val/x.bin".into(), pattern(2 * BLOCK as usize, 4)),
    ];
    for (path, data) in &files {
        env.put(&format!("node/{path}"), data).await;
    }
    let worker = start(env.config("node")).await;
    let mut config = s3_mount_config(&env, "node", &[worker.addr.to_string()]);
    config.local_cache = Some((env.dir.path().join("node-cache"), 64 << 20));
    let small_config = {
        let mut c = config.clone();
        // Room for 0.bin (6 blocks) and not for 1.bin beside it.
        c.local_cache = Some((env.dir.path().join("small-node-cache"), 8 * BLOCK));
        c
    };
    let mount = tokio::task::spawn_blocking(move || support::mount(config, 64 << 20))
        .await
        .unwrap();

    let out = load_onto_node(mount.path(), Some("/train")).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("4 files"), "{stderr}");
    let filled = mount.counter("granary_fuse_node_fill_bytes_total", "");
    assert_eq!(
        filled,
        (8 * BLOCK + 17 + 1000) as f64,
        "each byte of /train fetched once"
    );
    assert_eq!(
        mount.counter("granary_fuse_reply_bytes_total", ""),
        0.0,
        "nothing read through the mount"
    );

    // Resumable: a second run finds everything there.
    let out = load_onto_node(mount.path(), Some("train")).await;
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(mount.counter("granary_fuse_node_fill_bytes_total", ""), filled);

    // The node is on its own now: the kernel reads the loaded files.
    worker.shutdown().await.unwrap();
    env.s3.set_outage(true);
    let root = mount.path().to_path_buf();
    let expected = files.clone();
    tokio::task::spawn_blocking(move || {
        std::fs::write("/proc/sys/vm/drop_caches", "1").unwrap();
        for (path, data) in expected.iter().filter(|(p, _)| p.starts_with("train/")) {
            let got = std::fs::read(root.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
            assert!(&got == data, "{path}: the loaded bytes");
        }
    })
    .await
    .unwrap();
    assert_eq!(
        mount.counter("granary_fuse_opens_total", "origin=\"passthrough\""),
        3.0,
        "every non-empty loaded file opens through passthrough: {}",
        mount.metrics_text()
    );
    assert_eq!(
        mount.counter("granary_fuse_reply_bytes_total", ""),
        0.0,
        "no read entered the daemon"
    );
    env.s3.set_outage(false);
    drop(mount);

    // A node cache of 8 blocks: 0.bin (6 blocks) is loaded first (path order), 1.bin (3) does
    // not fit beside it and stays on the workers, small.jpg and val/x.bin (2) fit after it.
    let worker = start(env.config("node")).await;
    let mut small_config = small_config;
    small_config.workers = vec![worker.addr.to_string()];
    let small = tokio::task::spawn_blocking(move || support::mount(small_config, 64 << 20))
        .await
        .unwrap();
    let out = load_onto_node(small.path(), None).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("files (") && stderr.contains("do not fit") && stderr.contains("--cache-size"),
        "{stderr}"
    );
    assert_eq!(
        small.counter("granary_fuse_node_fills_total", "result=\"no_room\""),
        1.0
    );
    assert!(stderr.contains("1 files (192KiB) do not fit"), "{stderr}");
    let (root, a0) = (small.path().to_path_buf(), files[0].1.clone());
    tokio::task::spawn_blocking(move || assert!(std::fs::read(root.join("train/a/0.bin")).unwrap() == a0))
        .await
        .unwrap();
    assert_eq!(small.counter("granary_fuse_opens_total", "origin=\"passthrough\""), 1.0);
    drop(small);

    // Bad input: not a mount, and a mount without a node-local cache.
    let out = load_onto_node(env.dir.path(), None).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("nothing is mounted on this directory"), "{stderr}");
    let bare = s3_mount_config(&env, "node", &[worker.addr.to_string()]);
    let bare = tokio::task::spawn_blocking(move || support::mount(bare, 64 << 20))
        .await
        .unwrap();
    let out = load_onto_node(bare.path(), None).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("no node-local cache") && stderr.contains("--cache-dir"),
        "{stderr}"
    );
    drop(bare);
}
