//! A cluster of cache workers on one machine, as `granary-cache worker` processes on real
//! sockets: the member set changes under running readers, a worker is killed with SIGKILL,
//! and many clients read one hot file. What each worker did is read from its /metrics.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use granary_cache::block::BlockName;
use granary_cache::client::{placement, WorkerPool};
use support::*;

/// `n` distinct free loopback addresses: all are held until all are found, so none repeats.
fn free_addresses(n: usize) -> Vec<String> {
    let listeners: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("a free port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("address").to_string())
        .collect()
}

/// One `granary-cache worker` process with its gRPC and metrics ports.
struct WorkerProcess {
    addr: String,
    metrics: String,
    child: Child,
}

impl WorkerProcess {
    /// A worker serving at `addr`, with its metrics at `metrics`; `args` add to
    /// `worker --listen --metrics-listen --advertise`.
    fn spawn(addr: String, metrics: String, args: &[String], logs: &Path) -> Self {
        let log = std::fs::File::create(logs.join(format!("worker-{}.log", addr.replace(':', "_")))).expect("log");
        let child = Command::new(env!("CARGO_BIN_EXE_granary-cache"))
            .args([
                "worker",
                "--listen",
                &addr,
                "--metrics-listen",
                &metrics,
                "--advertise",
                &addr,
            ])
            .args(args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start granary-cache worker");
        WorkerProcess { addr, metrics, child }
    }

    /// Kills the process with SIGKILL, as a node failure would.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

fn addresses(workers: &[WorkerProcess]) -> Vec<String> {
    workers.iter().map(|w| w.addr.clone()).collect()
}

async fn http_get(addr: &str, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut out = String::new();
    stream.read_to_string(&mut out).await.ok()?;
    Some(out)
}

/// Sum of a metric's samples whose line starts with `prefix` (a name, or a name and labels).
fn metric(text: &str, prefix: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(prefix) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

async fn scrape(worker: &WorkerProcess) -> String {
    http_get(&worker.metrics, "/metrics").await.unwrap_or_default()
}

async fn wait_ready(workers: &[WorkerProcess]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    for w in workers {
        loop {
            let ready = http_get(&w.metrics, "/readyz")
                .await
                .is_some_and(|r| r.contains(" 200 "));
            if ready && tokio::net::TcpStream::connect(&w.addr).await.is_ok() {
                break;
            }
            assert!(Instant::now() < deadline, "worker {} did not start", w.addr);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// What the workers did, summed: blocks filled from a peer, and range reads of the store.
async fn fills(workers: &[&WorkerProcess]) -> (u64, u64) {
    let mut peer = 0;
    let mut source = 0;
    for w in workers {
        let text = scrape(w).await;
        peer += metric(&text, "granary_peer_fills_total{state=\"filled\"}");
        source += metric(&text, "granary_source_reads_total");
    }
    (peer, source)
}

/// The member set as worker `addr` serves it now.
async fn members_of(addr: &str) -> Vec<String> {
    let pool = WorkerPool::new(&[addr.to_string()], 1).expect("pool");
    let _ = pool.refresh_members().await;
    let mut members = pool.addresses();
    members.sort();
    members
}

fn write_members(file: &Path, members: &[String]) {
    // Written whole and renamed in, as the kubelet swaps a ConfigMap volume's contents.
    let staged = file.with_extension("new");
    std::fs::write(&staged, members.join("\n")).expect("write members");
    std::fs::rename(&staged, file).expect("rename members");
}

/// Keeps the first failures' messages and counts the rest.
fn record(failures: &Mutex<(u64, Vec<String>)>, message: String) {
    let mut failures = failures.lock().unwrap();
    failures.0 += 1;
    if failures.1.len() < 10 {
        failures.1.push(message);
    }
}

struct Readers {
    pools: Vec<WorkerPool>,
    rounds: Vec<Arc<AtomicU64>>,
    failures: Arc<Mutex<(u64, Vec<String>)>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Readers {
    /// `count` readers, each with its own pool that follows the workers' member set, reading
    /// its share of `files` over and over and checking every byte.
    fn start(count: usize, seed: &str, files: Arc<Vec<(String, Vec<u8>)>>) -> Self {
        let failures = Arc::new(Mutex::new((0, Vec::new())));
        let stop = Arc::new(AtomicBool::new(false));
        let mut pools = Vec::new();
        let mut rounds = Vec::new();
        let mut tasks = Vec::new();
        for r in 0..count {
            let pool = WorkerPool::new(&[seed.to_string()], 1).expect("pool");
            pool.follow_members(Duration::from_millis(200));
            let round = Arc::new(AtomicU64::new(0));
            let (p, files, failures, stop, done) = (
                pool.clone(),
                Arc::clone(&files),
                Arc::clone(&failures),
                Arc::clone(&stop),
                Arc::clone(&round),
            );
            tasks.push(tokio::spawn(async move {
                let _ = p.refresh_members().await;
                while !stop.load(Ordering::Relaxed) {
                    for (path, expected) in files.iter().skip(r).step_by(count) {
                        match read_all(&p, path).await {
                            Ok(data) if data == *expected => {}
                            Ok(data) => record(
                                &failures,
                                format!("{path}: {} bytes differ from the store's", data.len()),
                            ),
                            Err(e) => record(&failures, format!("{path}: {e}")),
                        }
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }));
            pools.push(pool);
            rounds.push(round);
        }
        Readers {
            pools,
            rounds,
            failures,
            stop,
            tasks,
        }
    }

    /// Waits until every reader places over `members` and then reads all its files twice
    /// (the first pass may have begun on the old set).
    async fn settle_on(&self, members: &[String], workers: &[&str]) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut wanted = members.to_vec();
        wanted.sort();
        loop {
            let mut agreed = self.pools.iter().all(|p| {
                let mut a = p.addresses();
                a.sort();
                a == wanted
            });
            for w in workers {
                agreed &= members_of(w).await == wanted;
            }
            if agreed {
                break;
            }
            assert!(Instant::now() < deadline, "the member set did not reach everyone");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let start: Vec<u64> = self.rounds.iter().map(|r| r.load(Ordering::Relaxed)).collect();
        while self
            .rounds
            .iter()
            .zip(&start)
            .any(|(r, s)| r.load(Ordering::Relaxed) < s + 2)
        {
            assert!(Instant::now() < deadline, "the readers stalled");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.expect("reader task");
        }
        let failures = self.failures.lock().unwrap().clone();
        failures
    }
}

/// Of `blocks`, how many have another top owner in `after` than in `before`.
fn moved_blocks(blocks: &[BlockName], before: &[String], after: &[String]) -> u64 {
    let owner = |set: &[String], name: &BlockName| set[placement::rank(set, name)[0]].clone();
    blocks
        .iter()
        .filter(|name| owner(before, name) != owner(after, name))
        .count() as u64
}

/// A dataset on local disk (`fs://`): `count` files of `size` bytes each.
fn dataset(dir: &Path, count: usize, size: usize) -> Vec<(String, Vec<u8>)> {
    (0..count)
        .map(|i| {
            let path = format!("train/{i:03}.bin");
            let data = pattern(size, i as u64 + 1);
            let file = dir.join(&path);
            std::fs::create_dir_all(file.parent().unwrap()).unwrap();
            std::fs::write(&file, &data).unwrap();
            (format!("/{path}"), data)
        })
        .collect()
}

/// The names of every block of `files`, as the workers name them.
async fn block_names(pool: &WorkerPool, files: &[(String, Vec<u8>)]) -> Vec<BlockName> {
    let mut names = Vec::new();
    for (path, _) in files {
        let info = pool.stat(path, false).await.expect("stat");
        names.extend((0..WorkerPool::blocks_of(&info)).map(|i| BlockName::of(&info.path, &info.version, i)));
    }
    names
}

async fn scrape_all(workers: &[WorkerProcess]) -> Vec<String> {
    let mut texts = Vec::new();
    for w in workers {
        texts.push(scrape(w).await);
    }
    texts
}

fn assert_share(label: &str, moved: u64, total: u64, theory: f64) {
    let share = moved as f64 / total as f64;
    assert!(
        (share - theory).abs() <= theory * 0.1,
        "{label}: {moved} of {total} blocks moved ({share:.3}), not within 10% of {theory:.3}"
    );
}

/// Workers scale 2 → 4 → 3 under four readers checking every byte: no read fails, and only
/// the blocks whose owner changed move (1/2, then 1/4 of them), filled from their old owner
/// while it lives and from the store once it was killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn workers_scale_2_4_3_under_readers_with_no_failed_read_and_one_nth_of_blocks_moved() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("data");
    // 4,096 blocks: enough that the moved share is within a few tenths of a percent of 1/n.
    let files = Arc::new(dataset(&data_dir, 64, (64 * BLOCK) as usize));
    let members_file: PathBuf = dir.path().join("members");
    std::fs::write(&members_file, "").unwrap();
    let args: Vec<String> = [
        "--source",
        &format!("fs://{}", data_dir.display()),
        "--block-size",
        &BLOCK.to_string(),
        "--memory-size",
        "1GiB",
        "--members-file",
        &members_file.display().to_string(),
        "--members-refresh",
        "100ms",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let ports = free_addresses(8);
    let mut workers: Vec<WorkerProcess> = ports
        .chunks(2)
        .map(|p| WorkerProcess::spawn(p[0].clone(), p[1].clone(), &args, dir.path()))
        .collect();
    let all = addresses(&workers);
    let two = all[..2].to_vec();
    write_members(&members_file, &two);
    wait_ready(&workers).await;
    let blocks = block_names(&WorkerPool::new(&two, 1).expect("pool"), &files).await;
    let total_blocks = blocks.len() as u64;
    assert_eq!(total_blocks, 64 * 64);

    let readers = Readers::start(4, &all[0], Arc::clone(&files));
    readers.settle_on(&two, &[&all[0], &all[1]]).await;

    // 2 → 4: half the blocks get a new owner, which copies each from its old owner.
    let everyone: Vec<&WorkerProcess> = workers.iter().collect();
    let before = fills(&everyone).await;
    write_members(&members_file, &all);
    readers
        .settle_on(&all, &all.iter().map(String::as_str).collect::<Vec<_>>())
        .await;
    let after = fills(&everyone).await;
    let (peer, source_reads) = (after.0 - before.0, after.1 - before.1);
    assert_eq!(
        source_reads, 0,
        "moved blocks come from their old owners, not the store"
    );
    assert_eq!(
        peer,
        moved_blocks(&blocks, &two, &all),
        "exactly the blocks whose owner changed move"
    );
    assert_share("2 -> 4", peer, total_blocks, 0.5);

    // 4 → 3: the last worker dies (SIGKILL) before the member set says so; its blocks move
    // to their next owner, which reads them from a peer that still has one or the store.
    let three = all[..3].to_vec();
    let before = fills(&workers[..3].iter().collect::<Vec<_>>()).await;
    workers[3].kill();
    write_members(&members_file, &three);
    readers
        .settle_on(&three, &three.iter().map(String::as_str).collect::<Vec<_>>())
        .await;
    let after = fills(&workers[..3].iter().collect::<Vec<_>>()).await;
    let fetched = (after.0 - before.0) + (after.1 - before.1);
    let owner = |set: &[String], name: &BlockName| set[placement::rank(set, name)[0]].clone();
    let moved = moved_blocks(&blocks, &all, &three);
    assert_share("4 -> 3", moved, total_blocks, 0.25);
    // A block of the dead worker that goes back to the owner it had before the scale-up is
    // still cached there; only the rest are fetched again.
    let refetched = blocks
        .iter()
        .filter(|b| owner(&all, b) != owner(&three, b) && owner(&three, b) != owner(&two, b))
        .count() as u64;
    assert_eq!(
        fetched, refetched,
        "the dead worker's blocks, and only those, are fetched by their new owners"
    );

    let (failed, first) = readers.stop().await;
    assert_eq!(failed, 0, "failed reads, the first: {first:?}");
}

/// Many clients of one hot file (`granary-cache cat --replicas 4`, one process each) spread
/// over its four replicas, and the store is read once: replicas fill from the block's owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_file_spreads_over_its_replicas_and_the_store_is_read_once() {
    let env = s3_env().await;
    let block: u64 = 1 << 20;
    let one_block = pattern(block as usize, 7);
    let four_blocks = pattern(4 * block as usize, 8);
    env.put("models/small.bin", &one_block).await;
    env.put("models/model.bin", &four_blocks).await;

    let ports = free_addresses(8);
    let members: Vec<String> = ports.chunks(2).map(|p| p[0].clone()).collect();
    let mut args: Vec<String> = vec![
        "--source".into(),
        format!("s3://{BUCKET}/"),
        "--block-size".into(),
        block.to_string(),
        "--members".into(),
        members.join(","),
    ];
    for (k, v) in env.s3.options() {
        args.extend(["--source-option".to_string(), format!("{k}={v}")]);
    }
    let workers: Vec<WorkerProcess> = ports
        .chunks(2)
        .map(|p| WorkerProcess::spawn(p[0].clone(), p[1].clone(), &args, env.dir.path()))
        .collect();
    wait_ready(&workers).await;

    let served = |texts: &[String]| -> Vec<u64> {
        texts
            .iter()
            .map(|t| metric(t, "granary_cache_served_bytes_total"))
            .collect()
    };

    for (path, expected, clients) in [
        ("/models/small.bin", &one_block, 40),
        ("/models/model.bin", &four_blocks, 64),
    ] {
        let before = scrape_all(&workers).await;
        // Each client is told one worker; it learns the other three from it.
        let cats: Vec<_> = (0..clients)
            .map(|i| {
                let seed = members[i % members.len()].clone();
                let path = path.to_string();
                tokio::task::spawn_blocking(move || {
                    Command::new(env!("CARGO_BIN_EXE_granary-cache"))
                        .args(["cat", "--workers", &seed, "--replicas", "4", &path])
                        .env_remove("GRANARY_WORKERS")
                        .output()
                        .expect("run granary-cache cat")
                })
            })
            .collect();
        for cat in cats {
            let out = cat.await.unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            assert!(out.stdout == *expected, "{path}: the bytes differ from the store's");
        }
        let after = scrape_all(&workers).await;
        let by_worker: Vec<u64> = served(&after).iter().zip(served(&before)).map(|(a, b)| a - b).collect();
        let total: u64 = by_worker.iter().sum();
        let source: u64 = after
            .iter()
            .map(|t| metric(t, "granary_source_read_bytes_total"))
            .sum::<u64>()
            - before
                .iter()
                .map(|t| metric(t, "granary_source_read_bytes_total"))
                .sum::<u64>();
        assert_eq!(
            source,
            expected.len() as u64,
            "{path}: the store is read once, {by_worker:?}"
        );
        assert!(
            total >= clients as u64 * expected.len() as u64,
            "{path}: every client's bytes were served: {by_worker:?}"
        );
        for (w, bytes) in by_worker.iter().enumerate() {
            assert!(*bytes > 0, "{path}: worker {w} served nothing: {by_worker:?}");
            assert!(
                *bytes * 2 <= total,
                "{path}: worker {w} served over half: {by_worker:?}"
            );
        }
    }
}
