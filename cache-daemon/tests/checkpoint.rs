//! Checkpoint volumes over real mounts and a real S3-protocol server on loopback: the bytes
//! that reach the store, the marker's order, crash recovery with the real binary and
//! kill -9, store outages, backpressure, retention, local restores, and bad input.
//! Mandatory in CI (GRANARY_REQUIRE_MOUNTS=1).

mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use granary_fs::checkpoint::{self, CheckpointMount, CheckpointMountError, MountedCheckpoint};
use granary_fs::metrics::CheckpointMetrics;
use granary_store::source::SourceTuning;
use support::{fuse_possible, pattern, s3_env, S3Env, BUCKET};

const MIB: u64 = 1 << 20;

fn config(env: &S3Env, prefix: &str, writeback: &Path, size: u64) -> CheckpointMount {
    let mut c = CheckpointMount::new(format!("s3://{BUCKET}/{prefix}"), writeback.to_path_buf(), size);
    c.target_options = env.s3.options().into_iter().collect();
    c.target_tuning = SourceTuning {
        retries: 1,
        timeout: Duration::from_secs(10),
    };
    c.commit_marker = Some(".metadata".into());
    c.upload.part_size = 5 * MIB;
    c.upload.concurrency = 8;
    c.listing_ttl = Duration::from_millis(500);
    c
}

struct Ckpt {
    dir: tempfile::TempDir,
    mounted: Option<MountedCheckpoint>,
    registry: prometheus_client::registry::Registry,
}

impl Ckpt {
    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn mounted(&self) -> &MountedCheckpoint {
        self.mounted.as_ref().expect("mounted")
    }

    fn metric(&self, name: &str) -> f64 {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("encode");
        out.lines()
            .filter(|l| !l.starts_with('#') && l.split([' ', '{']).next() == Some(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    async fn drain(&self) {
        assert!(
            self.mounted().drain(Duration::from_secs(120)).await,
            "uploads did not finish within 120s"
        );
    }

    async fn unmount(mut self) {
        if let Some(m) = self.mounted.take() {
            m.unmount().await.expect("unmount");
        }
    }
}

impl Drop for Ckpt {
    fn drop(&mut self) {
        if self.mounted.is_some() {
            let _ = granary_fs::dataset::detach(self.dir.path());
        }
    }
}

fn try_mount(config: CheckpointMount) -> Result<Ckpt, CheckpointMountError> {
    // The mount's log, shown with a failing test's output.
    let _ = tracing_subscriber::fmt()
        .with_env_filter("granary_cache=info")
        .with_test_writer()
        .try_init();
    let dir = tempfile::tempdir().expect("mountpoint");
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Arc::new(CheckpointMetrics::register(&mut registry));
    let runtime = tokio::runtime::Handle::current();
    let mounted = tokio::task::block_in_place(|| checkpoint::mount(&config, dir.path(), metrics, runtime))?;
    Ok(Ckpt {
        dir,
        mounted: Some(mounted),
        registry,
    })
}

fn mount(config: CheckpointMount) -> Ckpt {
    try_mount(config).expect("mount the checkpoint volume")
}

/// Writes `data` to `path` in 1 MiB writes, as torch.save does, off the async runtime.
fn write_file(path: &Path, data: &[u8]) {
    tokio::task::block_in_place(|| {
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        let mut f = std::fs::File::create(path).expect("create");
        for chunk in data.chunks(MIB as usize) {
            f.write_all(chunk).expect("write");
        }
    })
}

/// The object's bytes as the S3 server stores them.
fn stored(env: &S3Env, key: &str) -> Option<Vec<u8>> {
    std::fs::read(env.s3.root.join(BUCKET).join(key)).ok()
}

/// Keys under `prefix` as the S3 protocol lists them.
async fn listed(env: &S3Env, prefix: &str) -> Vec<String> {
    let mut keys: Vec<String> = env
        .store
        .operator()
        .list_with(&format!("{prefix}/"))
        .recursive(true)
        .await
        .expect("list")
        .into_iter()
        .map(|e| e.path().to_string())
        .filter(|p| !p.ends_with('/'))
        .collect();
    keys.sort();
    keys
}

/// A DCP-like checkpoint: shards of assorted sizes (some multipart), then `.metadata` written
/// to a temporary name and renamed, as torch.distributed.checkpoint does.
fn dcp_checkpoint(root: &Path, step: u32, shard_sizes: &[usize]) -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    for (i, size) in shard_sizes.iter().enumerate() {
        let name = format!("step_{step}/__{i}_0.distcp");
        let data = pattern(*size, u64::from(step) * 100 + i as u64);
        write_file(&root.join(&name), &data);
        files.push((name, data));
    }
    let meta = format!("metadata of step {step}").into_bytes();
    let tmp = root.join(format!("step_{step}/.metadata.tmp"));
    write_file(&tmp, &meta);
    tokio::task::block_in_place(|| std::fs::rename(&tmp, root.join(format!("step_{step}/.metadata")))).expect("rename");
    files.push((format!("step_{step}/.metadata"), meta));
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dcp_checkpoint_and_a_large_file_reach_the_store_whole_with_the_marker_last() {
    if !fuse_possible() {
        return;
    }
    let env = s3_env().await;
    let wb = env.dir.path().join("writeback");
    let ckpt = mount(config(&env, "run", &wb, 4 << 30));
    let sizes = [
        0,
        1,
        4096,
        5 * MIB as usize + 1,
        12 * MIB as usize,
        700_001,
        3 * MIB as usize,
        17,
    ];
    let files = dcp_checkpoint(ckpt.path(), 1, &sizes);

    // A torch.save-like 1 GiB file: written in place, with a seek back to patch its header.
    let big = ckpt.path().join("model.pt");
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    tokio::task::block_in_place(|| {
        let mut f = std::fs::File::create(&big).expect("create");
        for i in 0..128u64 {
            let mut chunk = pattern(8 * MIB as usize, 1000 + i);
            if i == 0 {
                chunk[..8].copy_from_slice(b"PATCHED!");
            }
            if i == 0 {
                f.write_all(&pattern(8 * MIB as usize, 1000)).expect("write");
            } else {
                f.write_all(&chunk).expect("write");
            }
            hasher.update(&chunk);
        }
        use std::os::unix::fs::FileExt;
        f.write_all_at(b"PATCHED!", 0).expect("patch");
    });
    let big_hash = hasher.digest();

    // The mount lists local files before they are uploaded.
    let listed_now: Vec<String> = std::fs::read_dir(ckpt.path().join("step_1"))
        .expect("readdir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(listed_now.len(), sizes.len() + 1, "{listed_now:?}");

    ckpt.drain().await;
    for (key, data) in &files {
        let got = stored(&env, &format!("run/{key}")).unwrap_or_else(|| panic!("{key} missing in the store"));
        assert!(
            got == *data,
            "{key}: the store's bytes differ ({} vs {} bytes)",
            got.len(),
            data.len()
        );
    }
    let stored_big = stored(&env, "run/model.pt").expect("model.pt in the store");
    assert_eq!(stored_big.len() as u64, 1 << 30);
    assert_eq!(
        xxhash_rust::xxh3::xxh3_64(&stored_big),
        big_hash,
        "model.pt differs in the store"
    );
    drop(stored_big);

    // The marker became visible after every other object of its checkpoint.
    let order = env.s3.completed_writes();
    let position = |key: &str| order.iter().rposition(|p| p.ends_with(key));
    let marker_at = position("run/step_1/.metadata").expect("marker written");
    for (key, _) in files.iter().filter(|(k, _)| !k.ends_with(".metadata")) {
        let at = position(&format!("run/{key}")).unwrap_or_else(|| panic!("{key} never written"));
        assert!(at < marker_at, "{key} became visible after the marker: {order:?}");
    }
    // The temporary name is gone from the store; nothing else is there.
    let mut expected: Vec<String> = files.iter().map(|(k, _)| format!("run/{k}")).collect();
    expected.push("run/model.pt".into());
    expected.sort();
    assert_eq!(listed(&env, "run").await, expected);

    // Removing an uploaded file removes its object.
    tokio::task::block_in_place(|| std::fs::remove_file(ckpt.path().join("step_1/__7_0.distcp"))).expect("unlink");
    ckpt.drain().await;
    assert!(
        stored(&env, "run/step_1/__7_0.distcp").is_none(),
        "unlinked file still in the store"
    );
    assert!(ckpt.metric("granary_checkpoint_commits_total") >= 1.0);
    assert!(ckpt.metric("granary_checkpoint_uploaded_bytes_total") >= (1u64 << 30) as f64);
    ckpt.unmount().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_store_outage_delays_uploads_and_a_full_area_makes_writers_wait_not_fail() {
    if !fuse_possible() {
        return;
    }
    let env = s3_env().await;
    let wb = env.dir.path().join("writeback");
    let ckpt = mount(config(&env, "outage", &wb, 40 * MIB));
    env.s3.set_outage(true);
    // Two files fit; the third needs room that only uploads can make.
    let a = pattern(15 * MIB as usize, 1);
    let b = pattern(15 * MIB as usize, 2);
    let c = pattern(15 * MIB as usize, 3);
    write_file(&ckpt.path().join("a.bin"), &a);
    write_file(&ckpt.path().join("b.bin"), &b);
    let third = {
        let path = ckpt.path().join("c.bin");
        let c = c.clone();
        std::thread::spawn(move || {
            let started = Instant::now();
            let mut f = std::fs::File::create(&path)?;
            f.write_all(&c)?;
            drop(f);
            Ok::<_, std::io::Error>(started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !third.is_finished(),
        "the third file should wait for room while the store is down"
    );
    assert!(stored(&env, "outage/a.bin").is_none());
    assert!(ckpt.metric("granary_checkpoint_pending_bytes") >= (30 * MIB) as f64);
    assert!(
        ckpt.metric("granary_checkpoint_upload_retries_total") >= 1.0,
        "failed uploads are retried"
    );
    assert!(ckpt.metric("granary_checkpoint_write_waits_total") >= 1.0);

    env.s3.set_outage(false);
    let waited = tokio::task::block_in_place(|| third.join())
        .expect("writer thread")
        .expect("the waiting write succeeds once uploads make room");
    assert!(waited >= Duration::from_secs(3));
    ckpt.drain().await;
    assert!(stored(&env, "outage/a.bin") == Some(a), "a.bin");
    assert!(stored(&env, "outage/b.bin") == Some(b), "b.bin");
    assert!(stored(&env, "outage/c.bin") == Some(c), "c.bin");
    ckpt.unmount().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retention_keeps_the_last_n_and_the_latest_restores_without_store_reads() {
    if !fuse_possible() {
        return;
    }
    let env = s3_env().await;
    let wb = env.dir.path().join("writeback");
    let mut cfg = config(&env, "keep", &wb, 1 << 30);
    cfg.upload.keep_last = 2;
    let ckpt = mount(cfg);
    let mut last = Vec::new();
    for step in 1..=4 {
        last = dcp_checkpoint(ckpt.path(), step, &[2 * MIB as usize, 6 * MIB as usize, 1000]);
        ckpt.drain().await;
    }
    let keys = listed(&env, "keep").await;
    let dirs: std::collections::BTreeSet<&str> = keys.iter().filter_map(|k| k.split('/').nth(1)).collect();
    assert_eq!(
        dirs.into_iter().collect::<Vec<_>>(),
        vec!["step_3", "step_4"],
        "{keys:?}"
    );
    assert_eq!(keys.len(), 8, "two whole checkpoints: {keys:?}");
    let shown: Vec<String> = {
        let mut v: Vec<String> = std::fs::read_dir(ckpt.path())
            .expect("readdir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(shown, vec!["step_3", "step_4"]);

    // A restore of the latest reads the local copy: not one object GET.
    env.s3.clear_log();
    for (key, data) in &last {
        let got = tokio::task::block_in_place(|| std::fs::read(ckpt.path().join(key))).expect("read back");
        assert!(got == *data, "{key} read back differs");
    }
    assert_eq!(env.s3.object_gets("keep/"), 0, "restore read from the store");
    ckpt.unmount().await;

    // After a remount with an empty write-back area, step_3 is read from the store.
    let wb2 = env.dir.path().join("writeback-2");
    let mut cfg = config(&env, "keep", &wb2, 1 << 30);
    cfg.upload.keep_last = 2;
    let fresh = mount(cfg);
    let data = tokio::task::block_in_place(|| std::fs::read(fresh.path().join("step_3/__1_0.distcp"))).expect("read");
    assert!(
        data == pattern(6 * MIB as usize, 301),
        "store-only file read back differs"
    );
    assert!(env.s3.object_gets("keep/step_3/__1_0.distcp") > 0);
    fresh.unmount().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_file_written_in_order_uploads_its_parts_before_close_and_a_rewrite_falls_back() {
    if !fuse_possible() {
        return;
    }
    let env = s3_env().await;
    let wb = env.dir.path().join("writeback");
    let ckpt = mount(config(&env, "stream", &wb, 1 << 30));
    let big = pattern(64 * MIB as usize, 77);
    let parts_sent = || {
        env.s3
            .requests()
            .iter()
            .filter(|r| r.method == "PUT" && r.path.ends_with("stream/big.pt") && r.query.contains("partNumber"))
            .count()
    };
    // Written in order and held open: the parts already whole go up meanwhile.
    let path = ckpt.path().join("big.pt");
    let file = tokio::task::block_in_place(|| {
        let mut f = std::fs::File::create(&path).expect("create");
        for chunk in big.chunks(MIB as usize) {
            f.write_all(chunk).expect("write");
        }
        f
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while parts_sent() < 8 {
        assert!(
            Instant::now() < deadline,
            "only {} parts sent before close",
            parts_sent()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(stored(&env, "stream/big.pt").is_none(), "nothing visible before close");
    drop(file);
    ckpt.drain().await;
    assert!(
        stored(&env, "stream/big.pt").as_deref() == Some(big.as_slice()),
        "the streamed object differs"
    );
    assert_eq!(ckpt.metric("granary_checkpoint_streamed_files_total"), 1.0);
    let parts = parts_sent();
    assert!(
        parts <= 13,
        "each of the 13 parts sent once, not uploaded again after close: {parts}"
    );

    // A rewrite of bytes already sent: the stream is dropped, the file goes up whole after close.
    let rewritten = tokio::task::block_in_place(|| {
        let mut data = pattern(24 * MIB as usize, 78);
        let mut f = std::fs::File::create(ckpt.path().join("rewritten.pt")).expect("create");
        f.write_all(&data).expect("write");
        // Past the kernel's cache: the daemon has the bytes, and streams the whole parts.
        f.sync_data().expect("fsync");
        use std::io::{Seek, SeekFrom};
        f.seek(SeekFrom::Start(MIB)).expect("seek");
        f.write_all(&[9u8; 4096]).expect("rewrite");
        data[MIB as usize..MIB as usize + 4096].fill(9);
        drop(f);
        data
    });
    ckpt.drain().await;
    assert!(
        stored(&env, "stream/rewritten.pt").as_deref() == Some(rewritten.as_slice()),
        "a rewritten file must reach the store as last written"
    );
    assert_eq!(
        ckpt.metric("granary_checkpoint_streamed_files_total"),
        1.0,
        "not streamed"
    );
    ckpt.unmount().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_ranks_restore_store_only_shards_in_parallel_each_copied_once() {
    if !fuse_possible() {
        return;
    }
    let env = s3_env().await;
    let shards: Vec<(String, Vec<u8>)> = (0..8u64)
        .map(|r| (format!("step_9/__{r}_0.distcp"), pattern(4 * MIB as usize, 900 + r)))
        .collect();
    for (key, data) in &shards {
        env.put(&format!("restore/{key}"), data).await;
    }
    let wb = env.dir.path().join("writeback");
    let ckpt = mount(config(&env, "restore", &wb, 1 << 30));
    // Every GET waits, as over a remote link: copies made one after another would add up.
    env.s3.set_get_delay(Duration::from_millis(200));
    env.s3.clear_log();
    let root = ckpt.path().to_path_buf();
    let one = Instant::now();
    let first = tokio::task::block_in_place(|| std::fs::read(root.join(&shards[0].0))).expect("read one");
    let one = one.elapsed();
    assert!(first == shards[0].1);
    let started = Instant::now();
    let read: Vec<Vec<u8>> = tokio::task::block_in_place(|| {
        std::thread::scope(|s| {
            let handles: Vec<_> = shards[1..]
                .iter()
                .chain(shards[..1].iter())
                .map(|(key, _)| {
                    let path = root.join(key);
                    s.spawn(move || std::fs::read(path).expect("restore a shard"))
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("rank")).collect()
        })
    });
    let all = started.elapsed();
    for ((key, data), got) in shards[1..].iter().chain(shards[..1].iter()).zip(&read) {
        assert!(got == data, "{key} restored differs");
        // One copy per file (a 4 MiB object is one ranged GET of a 5 MiB part).
        assert_eq!(
            env.s3.object_gets(&format!("restore/{key}")),
            1,
            "{key} copied more than once"
        );
    }
    println!("restore of 1 store-only shard: {one:?}; of 7 more by 8 threads at once: {all:?} (one GET waits 200 ms)");
    env.s3.set_get_delay(Duration::ZERO);
    ckpt.unmount().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_targets_and_a_write_back_area_too_small_fail_clearly_and_store_nothing_partial() {
    if !fuse_possible() {
        return;
    }
    let env = s3_env().await;
    let wb = env.dir.path().join("writeback");

    // Credentials that may not write.
    let mut refused = config(&env, "x", &wb, 64 * MIB);
    refused
        .target_options
        .insert("secret_access_key".into(), "wrong".into());
    let err = try_mount(refused)
        .err()
        .expect("a target that refuses writes is refused at mount");
    assert!(matches!(err, CheckpointMountError::TargetNotWritable(_)), "{err}");
    assert!(err.to_string().contains("credentials"), "{err}");
    assert!(stored(&env, "x").is_none());

    let mut huge = config(&env, "x", &wb, 1 << 60);
    huge.commit_marker = None;
    let err = try_mount(huge).err().expect("an area larger than the disk is refused");
    assert!(err.to_string().contains("--writeback-size"), "{err}");

    let ckpt = mount(config(&env, "small", &wb, 8 * MIB));
    // A second volume on the same write-back area would share its journal.
    let err = try_mount(config(&env, "small", &wb, 8 * MIB))
        .err()
        .expect("one owner per area");
    assert!(matches!(err, CheckpointMountError::WritebackInUse(_)), "{err}");
    let path = ckpt.path().join("too-big.pt");
    let result = tokio::task::block_in_place(|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&path)?;
        for _ in 0..12 {
            f.write_all(&pattern(MIB as usize, 9))?;
        }
        f.sync_all()
    });
    let err = result.expect_err("a file larger than the area cannot be written");
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    // The application cleans up its failed file (as torch.save's caller would); the room
    // it held is free again.
    tokio::task::block_in_place(|| std::fs::remove_file(&path)).expect("remove the failed file");
    write_file(&ckpt.path().join("fits.pt"), &pattern(MIB as usize, 10));
    ckpt.drain().await;
    assert!(stored(&env, "small/fits.pt").is_some());
    assert!(
        stored(&env, "small/too-big.pt").is_none(),
        "a truncated object reached the store"
    );
    assert!(ckpt.metric("granary_checkpoint_broken_files_total") >= 1.0);
    ckpt.unmount().await;
}

/// Runs `granary-cache mount --checkpoint` as its own process.
fn spawn_mount(env: &S3Env, mountpoint: &Path, writeback: &Path, log: &Path) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_granary-cache"));
    cmd.args(["mount", "--checkpoint", "--target", &format!("s3://{BUCKET}/crash")])
        .arg("--writeback-dir")
        .arg(writeback)
        .args([
            "--writeback-size",
            "1GiB",
            "--commit-marker",
            ".metadata",
            "--part-size",
            "5MiB",
            "--upload-concurrency",
            "2",
        ]);
    for (k, v) in env.s3.options() {
        cmd.arg("--target-option").arg(format!("{k}={v}"));
    }
    cmd.arg(mountpoint)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("log file"))
        .spawn()
        .expect("start granary-cache mount")
}

fn wait_mounted(mountpoint: &Path, child: &mut Child, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !support::is_mounted(mountpoint) {
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "the mount exited with {status}: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(Instant::now() < deadline, "not mounted within 30s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_during_uploads_then_a_restart_delivers_every_closed_file_marker_last() {
    if !fuse_possible() {
        return;
    }
    let env = s3_env().await;
    let mountpoint: PathBuf = env.dir.path().join("mnt");
    let wb = env.dir.path().join("writeback");
    let log = env.dir.path().join("mount.log");
    std::fs::create_dir_all(&mountpoint).expect("mountpoint");
    // A slow store, so the kill lands while uploads run.
    env.s3.set_write_delay(Duration::from_millis(300));
    let mut child = spawn_mount(&env, &mountpoint, &wb, &log);
    tokio::task::block_in_place(|| wait_mounted(&mountpoint, &mut child, &log));
    let files = dcp_checkpoint(&mountpoint, 7, &[6 * MIB as usize; 8]);

    // Kill once some objects are complete and others are not.
    let deadline = Instant::now() + Duration::from_secs(60);
    while env
        .s3
        .completed_writes()
        .iter()
        .filter(|p| p.contains("/crash/"))
        .count()
        < 2
    {
        assert!(Instant::now() < deadline, "no upload completed within 60s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().expect("kill -9");
    let _ = child.wait();
    let before = listed(&env, "crash").await;
    assert!(
        before.len() < files.len(),
        "the kill came too late to test anything: {before:?}"
    );
    assert!(
        !before.iter().any(|k| k.ends_with("/.metadata")),
        "marker visible before its shards: {before:?}"
    );

    env.s3.set_write_delay(Duration::ZERO);
    let mut child = spawn_mount(&env, &mountpoint, &wb, &log);
    tokio::task::block_in_place(|| wait_mounted(&mountpoint, &mut child, &log));
    let deadline = Instant::now() + Duration::from_secs(120);
    while stored(&env, "crash/step_7/.metadata").is_none() {
        assert!(
            Instant::now() < deadline,
            "uploads did not resume: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (key, data) in &files {
        assert!(
            stored(&env, &format!("crash/{key}")).as_deref() == Some(data.as_slice()),
            "{key} differs after the restart"
        );
    }
    let mut expected: Vec<String> = files.iter().map(|(k, _)| format!("crash/{k}")).collect();
    expected.sort();
    assert_eq!(listed(&env, "crash").await, expected, "no extra or partial objects");
    let order = env.s3.completed_writes();
    let marker_at = order
        .iter()
        .rposition(|p| p.ends_with("crash/step_7/.metadata"))
        .expect("marker");
    for (key, _) in files.iter().filter(|(k, _)| !k.ends_with(".metadata")) {
        let at = order
            .iter()
            .rposition(|p| p.ends_with(&format!("crash/{key}")))
            .expect("written");
        assert!(at < marker_at, "{key} after the marker");
    }
    // The files are still readable through the restarted mount.
    let back = tokio::task::block_in_place(|| std::fs::read(mountpoint.join("step_7/__3_0.distcp"))).expect("read");
    assert!(back == files[3].1);
    // SAFETY: kill only sends a signal to the child we started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = tokio::task::block_in_place(|| child.wait()).expect("wait");
    assert!(
        status.success(),
        "clean exit on SIGTERM: {status}: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_posix_subset_checkpoint_writers_use_behaves_as_on_a_local_disk() {
    if !fuse_possible() {
        return;
    }
    let env = s3_env().await;
    let wb = env.dir.path().join("writeback");
    let ckpt = mount(config(&env, "posix", &wb, 1 << 30));
    let root = ckpt.path().to_path_buf();
    tokio::task::block_in_place(|| {
        // Truncate, then extend with a write past the end (a hole reads as zeros).
        std::fs::write(root.join("t.bin"), pattern(3 * MIB as usize, 1)).expect("write");
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(root.join("t.bin"))
            .expect("open");
        f.set_len(1000).expect("truncate");
        use std::os::unix::fs::FileExt;
        f.write_all_at(b"tail", 5000).expect("write past the end");
        drop(f);
        // Rename over an existing file (torch.save's tmp -> final).
        std::fs::write(root.join("model.pt"), b"old").expect("write");
        std::fs::write(root.join("model.pt.tmp"), b"new model").expect("write");
        std::fs::rename(root.join("model.pt.tmp"), root.join("model.pt")).expect("rename over");
        // Directories: a non-empty one cannot be removed, an empty one can.
        std::fs::create_dir_all(root.join("d/sub")).expect("mkdir");
        std::fs::write(root.join("d/sub/f"), b"f").expect("write");
        let err = std::fs::remove_dir(root.join("d/sub")).expect_err("not empty");
        assert_eq!(err.raw_os_error(), Some(libc::ENOTEMPTY));
        std::fs::create_dir(root.join("empty")).expect("mkdir");
        std::fs::remove_dir(root.join("empty")).expect("rmdir");
    });
    ckpt.drain().await;
    assert!(stored(&env, "posix/d/sub/f").is_some());
    // A whole directory renamed after its files were uploaded (HF Trainer's
    // tmp-checkpoint-N -> checkpoint-N): the objects follow it.
    tokio::task::block_in_place(|| std::fs::rename(root.join("d"), root.join("d2"))).expect("rename a directory");
    ckpt.drain().await;
    let mut expected_t = pattern(3 * MIB as usize, 1);
    expected_t.truncate(1000);
    expected_t.resize(5000, 0);
    expected_t.extend_from_slice(b"tail");
    assert!(stored(&env, "posix/t.bin") == Some(expected_t), "t.bin in the store");
    assert_eq!(stored(&env, "posix/model.pt").as_deref(), Some(&b"new model"[..]));
    assert_eq!(
        listed(&env, "posix").await,
        vec!["posix/d2/sub/f", "posix/model.pt", "posix/t.bin"],
        "temporary and old names are gone from the store"
    );
    // A file only the store has: visible, readable, and not renameable (EXDEV, as across
    // filesystems: `mv` copies instead).
    env.put("posix/remote-only.bin", b"from elsewhere").await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    tokio::task::block_in_place(|| {
        let names: Vec<String> = std::fs::read_dir(&root)
            .expect("readdir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.contains(&"remote-only.bin".to_string()), "{names:?}");
        let err = std::fs::rename(root.join("remote-only.bin"), root.join("moved.bin")).expect_err("EXDEV");
        assert_eq!(err.raw_os_error(), Some(libc::EXDEV));
        assert_eq!(
            std::fs::read(root.join("remote-only.bin")).expect("read"),
            b"from elsewhere"
        );
    });
    ckpt.unmount().await;
}
