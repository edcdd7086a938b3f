//! The mount's memory bound under load: `granary-cache mount --max-memory` run inside a
//! memory cgroup limited just above its budget, many readers pulling far more data than the
//! budget through it. It must not be OOM-killed, and every byte must be right.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{fuse_possible, is_mounted, mounts_required, pattern, s3_env, start, BUCKET};

const BUDGET_MIB: u64 = 96;
/// What the process needs besides its budget: code, thread stacks, the allocator's slack,
/// the gRPC connections' buffers.
const OVERHEAD_MIB: u64 = 64;

/// A memory cgroup (v1 or v2) under this process's own, removed on drop.
struct MemoryCgroup {
    dir: PathBuf,
    v2: bool,
}

impl MemoryCgroup {
    fn create(limit: u64) -> Result<Self, String> {
        let own = std::fs::read_to_string("/proc/self/cgroup").map_err(|e| e.to_string())?;
        let (base, rel, v2) = if let Some(line) = own.lines().find(|l| l.split(':').nth(1) == Some("memory")) {
            (
                "/sys/fs/cgroup/memory",
                line.splitn(3, ':').nth(2).unwrap_or("/").to_string(),
                false,
            )
        } else if let Some(line) = own.lines().find(|l| l.starts_with("0::")) {
            ("/sys/fs/cgroup", line[3..].to_string(), true)
        } else {
            return Err("no memory cgroup found in /proc/self/cgroup".into());
        };
        let dir = Path::new(base)
            .join(rel.trim_start_matches('/'))
            .join(format!("granary-memtest-{}", std::process::id()));
        std::fs::create_dir(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
        let (file, value) = if v2 {
            ("memory.max", limit.to_string())
        } else {
            ("memory.limit_in_bytes", limit.to_string())
        };
        std::fs::write(dir.join(file), value).map_err(|e| format!("set {file}: {e}"))?;
        if !v2 {
            // No swap to hide in: the limit is the limit.
            let _ = std::fs::write(dir.join("memory.memsw.limit_in_bytes"), limit.to_string());
        }
        Ok(MemoryCgroup { dir, v2 })
    }

    fn add(&self, pid: u32) {
        std::fs::write(self.dir.join("cgroup.procs"), pid.to_string()).expect("move the mount into the cgroup");
    }

    fn oom_kills(&self) -> u64 {
        let (file, key) = if self.v2 {
            ("memory.events", "oom_kill")
        } else {
            ("memory.oom_control", "oom_kill")
        };
        std::fs::read_to_string(self.dir.join(file))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix(key)?.trim().parse().ok())
            .unwrap_or(0)
    }

    fn peak(&self) -> u64 {
        let file = if self.v2 {
            "memory.peak"
        } else {
            "memory.max_usage_in_bytes"
        };
        std::fs::read_to_string(self.dir.join(file))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_mount_stays_within_its_budget_under_a_cgroup_limit_just_above_it() {
    if !fuse_possible() {
        return;
    }
    let limit = (BUDGET_MIB + OVERHEAD_MIB) << 20;
    let cgroup = match MemoryCgroup::create(limit) {
        Ok(c) => c,
        Err(reason) if mounts_required() => panic!("GRANARY_REQUIRE_MOUNTS=1 but no memory cgroup: {reason}"),
        Err(reason) => {
            eprintln!("SKIP: cannot make a memory cgroup ({reason})");
            return;
        }
    };
    let env = s3_env().await;
    // 12 files of 24 MiB: readers pull 288 MiB, three times the budget, at once.
    let files: Vec<Vec<u8>> = (0..12).map(|i| pattern(24 << 20, 500 + i)).collect();
    for (i, data) in files.iter().enumerate() {
        env.put(&format!("mem/f{i:02}.bin"), data).await;
    }
    let mut worker_config = env.config("mem");
    worker_config.block_size = 4 << 20;
    worker_config.memory_size = 512 << 20;
    let workers = [start(worker_config.clone()).await, start(worker_config).await];
    let addrs: Vec<String> = workers.iter().map(|w| w.addr.to_string()).collect();
    let mnt = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_granary-cache"));
    cmd.arg("mount")
        .arg("--workers")
        .arg(addrs.join(","))
        .arg("--source")
        .arg(format!("s3://{BUCKET}/mem"))
        .arg("--max-memory")
        .arg(format!("{BUDGET_MIB}MiB"))
        .arg("--threads")
        .arg("8")
        .arg(mnt.path())
        .stdout(Stdio::null());
    for (k, v) in env.s3.options() {
        cmd.arg("--source-option").arg(format!("{k}={v}"));
    }
    let mut child = cmd.spawn().expect("start granary-cache mount");
    cgroup.add(child.id());
    let deadline = Instant::now() + Duration::from_secs(20);
    while !is_mounted(mnt.path()) {
        assert!(child.try_wait().unwrap().is_none(), "the mount exited early");
        assert!(Instant::now() < deadline, "the mount did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }

    let root = mnt.path().to_path_buf();
    let expected = files.clone();
    let readers: Vec<_> = (0..24)
        .map(|r| {
            let path = root.join(format!("f{:02}.bin", r % 12));
            let want = expected[r % 12].clone();
            std::thread::spawn(move || -> std::io::Result<bool> {
                use std::io::Read;
                let mut f = std::fs::File::open(&path)?;
                let mut got = Vec::with_capacity(want.len());
                let mut buf = vec![0u8; 1 << 20];
                loop {
                    let n = f.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    got.extend_from_slice(&buf[..n]);
                }
                Ok(got == want)
            })
        })
        .collect();
    // Errors are collected, not unwrapped, so the mount is cleaned up whatever happened.
    let results: Vec<std::io::Result<bool>> =
        tokio::task::spawn_blocking(move || readers.into_iter().map(|r| r.join().unwrap()).collect())
            .await
            .unwrap();
    let alive = child.try_wait().unwrap().is_none();
    let (oom_kills, peak) = (cgroup.oom_kills(), cgroup.peak());
    let _ = Command::new("umount").arg("-l").arg(mnt.path()).status();
    let _ = child.kill();
    let _ = child.wait();
    assert!(alive, "the mount died under load (oom kills: {oom_kills})");
    assert_eq!(oom_kills, 0);
    for (r, result) in results.into_iter().enumerate() {
        match result {
            Ok(true) => {}
            Ok(false) => panic!("reader {r} got wrong bytes"),
            Err(e) => panic!("reader {r} failed: {e}"),
        }
    }
    eprintln!(
        "peak memory of the mount's cgroup: {} MiB (budget {BUDGET_MIB} MiB, limit {} MiB)",
        peak >> 20,
        limit >> 20
    );
}
