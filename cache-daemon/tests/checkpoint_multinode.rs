//! A checkpoint volume written by several nodes, as a multi-node PyTorch DCP job writes one:
//! three node processes (`granary-cache mount --checkpoint`, each with its own write-back
//! area, one target) and a real `granary-cache commit-coordinator`, over the S3-protocol
//! server on loopback. The marker of a step reaches the store only after every node's
//! shards; a node killed with -9 mid-upload holds its step back until it is restarted, and a
//! node lost for good leaves its step uncommitted while retention keeps the complete ones.
//! `make ckpt-multinode` runs this file and prints its summary line. Mandatory in CI.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use granary_commit::proto::StatusResponse;
use granary_commit::CommitClient;
use support::{fuse_possible, pattern, s3_env, S3Env, BUCKET};

const MIB: usize = 1 << 20;
const PREFIX: &str = "multi";
const TOKEN: &str = "a-test-token-of-the-coordinator";

struct Coordinator {
    child: Child,
    addr: String,
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_coordinator(dir: &Path, token_file: &Path) -> Coordinator {
    start_coordinator_at(dir, token_file, "127.0.0.1:0")
}

fn start_coordinator_at(dir: &Path, token_file: &Path, listen: &str) -> Coordinator {
    let mut child = Command::new(env!("CARGO_BIN_EXE_granary-cache"))
        // The shortest grace allowed: a restarted coordinator commits nothing before every
        // live node has reported (one heartbeat).
        .args([
            "commit-coordinator",
            "--resync-grace",
            "6s",
            "--listen",
            listen,
            "--state-dir",
        ])
        .arg(dir.join("coordinator"))
        .arg("--token-file")
        .arg(token_file)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("coordinator.log")).expect("log"))
        .spawn()
        .expect("start the coordinator");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).expect("read the address");
    let addr = line
        .trim()
        .strip_prefix("commit coordinator serving on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    Coordinator { child, addr }
}

/// One "node": its mount process, write-back area and mountpoint.
struct Node {
    name: String,
    mountpoint: PathBuf,
    writeback: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Node {
    fn new(root: &Path, name: &str) -> Node {
        let mountpoint = root.join(format!("mnt-{name}"));
        std::fs::create_dir_all(&mountpoint).expect("mountpoint");
        Node {
            name: name.to_string(),
            mountpoint,
            writeback: root.join(format!("writeback-{name}")),
            log: root.join(format!("{name}.log")),
            child: None,
        }
    }

    fn start(&mut self, env: &S3Env, coordinator: &str, token_file: &Path) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_granary-cache"));
        cmd.args(["mount", "--checkpoint", "--target", &format!("s3://{BUCKET}/{PREFIX}")])
            .arg("--writeback-dir")
            .arg(&self.writeback)
            .args([
                "--writeback-size",
                "1GiB",
                "--commit-marker",
                ".metadata",
                "--keep-last",
                "2",
                "--part-size",
                "5MiB",
                "--upload-concurrency",
                "2",
                // A node's exit need not wait for the others' shards.
                "--drain-timeout",
                "2s",
                "--commit-coordinator",
                coordinator,
                "--node-name",
                &self.name,
            ])
            .arg("--commit-token-file")
            .arg(token_file);
        for (k, v) in env.s3.options() {
            cmd.arg("--target-option").arg(format!("{k}={v}"));
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let mut child = cmd
            .arg(&self.mountpoint)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start granary-cache mount");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !support::is_mounted(&self.mountpoint) {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("{} exited with {status}: {}", self.name, self.log_text());
            }
            assert!(Instant::now() < deadline, "{} not mounted within 30s", self.name);
            std::thread::sleep(Duration::from_millis(50));
        }
        self.child = Some(child);
    }

    fn kill_9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("kill -9");
            let _ = child.wait();
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Writes `data` at `rel` as a rank does: create, 1 MiB writes, close.
    fn write(&self, rel: &str, data: &[u8]) {
        let path = self.mountpoint.join(rel);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        let mut f = std::fs::File::create(&path).expect("create");
        for chunk in data.chunks(MIB) {
            f.write_all(chunk).expect("write");
        }
    }

    /// DCP's `.metadata`: written to a temporary name and renamed.
    fn write_marker(&self, step: u32) {
        let tmp = self.mountpoint.join(format!("step_{step}/.metadata.tmp"));
        std::fs::write(&tmp, format!("metadata of step {step}")).expect("write .metadata.tmp");
        std::fs::rename(&tmp, self.mountpoint.join(format!("step_{step}/.metadata"))).expect("rename");
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill only sends a signal to the child we started.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
        }
        let _ = granary_fs::dataset::detach(&self.mountpoint);
    }
}

fn shard(step: u32, rank: usize) -> String {
    format!("step_{step}/__{rank}_0.distcp")
}

fn stored(env: &S3Env, key: &str) -> Option<Vec<u8>> {
    std::fs::read(env.s3.root.join(BUCKET).join(PREFIX).join(key)).ok()
}

/// Where `key` became visible in the store's completion log (its last time).
fn completed_at(env: &S3Env, key: &str) -> Option<usize> {
    let full = format!("/{BUCKET}/{PREFIX}/{key}");
    env.s3.completed_writes().iter().rposition(|p| *p == full)
}

async fn wait_for(what: &str, timeout: Duration, nodes: &[&Node], mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        if Instant::now() > deadline {
            let logs: Vec<String> = nodes
                .iter()
                .map(|n| format!("--- {}:\n{}", n.name, n.log_text()))
                .collect();
            panic!("{what}: not within {timeout:?}\n{}", logs.join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Asserts the marker of `step` became visible after every shard listed.
fn assert_marker_last(env: &S3Env, step: u32, shards: &[(String, Vec<u8>)]) {
    // The object's file can appear a moment before the server logs its completion.
    let deadline = Instant::now() + Duration::from_secs(10);
    let marker = loop {
        match completed_at(env, &format!("step_{step}/.metadata")) {
            Some(at) => break at,
            None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            None => panic!("step_{step}'s marker is not in the completion log"),
        }
    };
    for (key, data) in shards {
        let at = completed_at(env, key).unwrap_or_else(|| panic!("{key} never completed"));
        assert!(at < marker, "{key} became visible after step_{step}'s marker");
        assert!(
            stored(env, key).as_deref() == Some(data.as_slice()),
            "{key} differs in the store"
        );
    }
}

async fn status(client: &CommitClient) -> StatusResponse {
    client.status().await.expect("coordinator status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_commit_a_step_only_when_every_shard_is_in_the_store_and_a_lost_node_holds_its_step_back() {
    if !fuse_possible() {
        return;
    }
    let env = s3_env().await;
    let root = env.dir.path().to_path_buf();
    let token_file = root.join("token");
    std::fs::write(&token_file, TOKEN).expect("token");
    let coordinator = start_coordinator(&root, &token_file);
    let client = CommitClient::new(&coordinator.addr, Some(TOKEN), Duration::from_secs(5)).expect("client");
    let mut nodes: Vec<Node> = ["n1", "n2", "n3"].iter().map(|n| Node::new(&root, n)).collect();
    tokio::task::block_in_place(|| {
        for n in &mut nodes {
            n.start(&env, &coordinator.addr, &token_file);
        }
    });
    // Node i writes rank i's shard; the other nodes' shards are bigger, so without the
    // coordinator n1's marker would be in the store long before them.
    let size = |rank: usize| if rank == 0 { MIB } else { 12 * MIB };
    let write_step = |nodes: &[Node], step: u32, ranks: &[usize]| -> Vec<(String, Vec<u8>)> {
        tokio::task::block_in_place(|| {
            let mut files = Vec::new();
            std::thread::scope(|s| {
                let handles: Vec<_> = ranks
                    .iter()
                    .map(|&rank| {
                        let node = &nodes[rank];
                        s.spawn(move || {
                            let key = shard(step, rank);
                            let data = pattern(size(rank), u64::from(step) * 10 + rank as u64);
                            node.write(&key, &data);
                            (key, data)
                        })
                    })
                    .collect();
                for h in handles {
                    files.push(h.join().expect("rank"));
                }
            });
            // The barrier, then rank 0 writes the marker.
            nodes[0].write_marker(step);
            files
        })
    };
    env.s3.set_write_delay(Duration::from_millis(150));

    // Step 1: every node alive. The marker is last in the store across all three nodes.
    let step1 = write_step(&nodes, 1, &[0, 1, 2]);
    wait_for(
        "step_1 committed",
        Duration::from_secs(60),
        &nodes.iter().collect::<Vec<_>>(),
        || stored(&env, "step_1/.metadata").is_some(),
    )
    .await;
    assert_marker_last(&env, 1, &step1);
    assert_eq!(
        completed_at(&env, "step_1/.metadata.tmp"),
        None,
        "the marker's temporary name is not uploaded on its own"
    );

    // Step 2: n3 is killed -9 while its shard uploads, and the step waits for it.
    env.s3.set_write_delay(Duration::from_millis(600));
    let step2 = write_step(&nodes, 2, &[0, 1, 2]);
    let n3_key = format!("/{BUCKET}/{PREFIX}/{}", shard(2, 2));
    wait_for("n3's upload started", Duration::from_secs(30), &[&nodes[2]], || {
        env.s3.requests().iter().any(|r| r.method == "PUT" && r.path == n3_key)
    })
    .await;
    nodes[2].kill_9();
    assert!(
        completed_at(&env, &shard(2, 2)).is_none(),
        "the kill came too late: n3's shard is already in the store"
    );
    env.s3.set_write_delay(Duration::ZERO);
    wait_for(
        "n1's and n2's shards of step_2 in the store",
        Duration::from_secs(60),
        &[&nodes[0], &nodes[1]],
        || completed_at(&env, &shard(2, 0)).is_some() && completed_at(&env, &shard(2, 1)).is_some(),
    )
    .await;
    // Several rounds of the marker asking: it still waits, and the coordinator says for whom.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        stored(&env, "step_2/.metadata").is_none(),
        "step_2 committed without n3's shard"
    );
    assert!(
        stored(&env, "step_1/.metadata").is_some(),
        "the complete step_1 is kept"
    );
    let s = status(&client).await;
    let waiting = &s.volumes[0].waiting;
    assert_eq!(waiting.len(), 1, "one waiting checkpoint: {s:?}");
    assert_eq!(waiting[0].dir, "step_2");
    assert_eq!(waiting[0].blockers.len(), 1, "only n3 holds it back: {s:?}");
    assert_eq!(waiting[0].blockers[0].node, "n3");
    assert_eq!(waiting[0].blockers[0].example, shard(2, 2));
    // Restarted from its write-back area, n3 uploads its shard and the step commits.
    tokio::task::block_in_place(|| nodes[2].start(&env, &coordinator.addr, &token_file));
    wait_for(
        "step_2 committed after n3's restart",
        Duration::from_secs(60),
        &nodes.iter().collect::<Vec<_>>(),
        || stored(&env, "step_2/.metadata").is_some(),
    )
    .await;
    assert_marker_last(&env, 2, &step2);
    let node_loss = "n3 killed -9 mid-upload held step_2 back until restarted";

    // Step 3: n3 is lost for good before its shard reaches the store.
    env.s3.set_write_delay(Duration::from_millis(600));
    let step3 = write_step(&nodes, 3, &[0, 1, 2]);
    nodes[2].kill_9();
    env.s3.set_write_delay(Duration::ZERO);
    assert!(
        completed_at(&env, &shard(3, 2)).is_none(),
        "the kill came too late for step_3"
    );
    wait_for(
        "n1's and n2's shards of step_3",
        Duration::from_secs(60),
        &[&nodes[0], &nodes[1]],
        || completed_at(&env, &shard(3, 0)).is_some() && completed_at(&env, &shard(3, 1)).is_some(),
    )
    .await;

    // Step 4: the job resumes with a replacement node n4 for rank 2.
    let lost = nodes.pop().expect("n3");
    let mut n4 = Node::new(&root, "n4");
    tokio::task::block_in_place(|| n4.start(&env, &coordinator.addr, &token_file));
    nodes.push(n4);
    let step4 = write_step(&nodes, 4, &[0, 1, 2]);
    wait_for(
        "step_4 committed",
        Duration::from_secs(60),
        &nodes.iter().collect::<Vec<_>>(),
        || stored(&env, "step_4/.metadata").is_some(),
    )
    .await;
    assert_marker_last(&env, 4, &step4);
    // Retention (keep-last 2) ran after step_4's commit: of four steps, step_3 incomplete,
    // exactly the two newest complete ones are committed in the store.
    wait_for(
        "retention removed step_1",
        Duration::from_secs(30),
        &[&nodes[0]],
        // The marker goes first (the step is uncommitted), then its shards.
        || stored(&env, "step_1/.metadata").is_none() && stored(&env, &shard(1, 1)).is_none(),
    )
    .await;
    let committed: Vec<u32> = (1..=4)
        .filter(|s| stored(&env, &format!("step_{s}/.metadata")).is_some())
        .collect();
    assert_eq!(committed, vec![2, 4], "the two newest complete steps remain");
    assert!(stored(&env, &shard(1, 1)).is_none(), "step_1 deleted whole");
    assert!(stored(&env, &shard(3, 2)).is_none() && step3.len() == 3);
    let s = status(&client).await;
    let step3_wait = s.volumes[0]
        .waiting
        .iter()
        .find(|w| w.dir == "step_3")
        .expect("step_3 waiting");
    assert_eq!(step3_wait.blockers[0].node, "n3", "the lost node is named: {s:?}");
    // A wrong token is refused.
    let intruder = CommitClient::new(&coordinator.addr, Some("wrong"), Duration::from_secs(5)).expect("client");
    assert!(intruder.status().await.is_err(), "a wrong token must be refused");
    drop(lost);
    println!(
        "multi-node checkpoint: {} steps committed, marker last across nodes, 0 incomplete committed, node loss: {node_loss}; a node lost for good left step_3 uncommitted and retention kept steps {committed:?}",
        3
    );
}

/// A coordinator that comes back without its journal (its PVC lost) relearns what the live
/// nodes have not settled: they see its new incarnation and send their whole sets, so a
/// shard pending across the restart still holds the marker back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_coordinator_restarted_without_its_journal_relearns_the_live_nodes_pending_shards() {
    if !fuse_possible() {
        return;
    }
    let env = s3_env().await;
    let root = env.dir.path().to_path_buf();
    let token_file = root.join("token");
    std::fs::write(&token_file, TOKEN).expect("token");
    let listen = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .to_string();
    let mut coordinator = start_coordinator_at(&root, &token_file, &listen);
    let mut nodes: Vec<Node> = ["n1", "n2"].iter().map(|n| Node::new(&root, n)).collect();
    tokio::task::block_in_place(|| {
        for n in &mut nodes {
            n.start(&env, &coordinator.addr, &token_file);
        }
    });
    // n2's shard uploads slowly, so it is pending while the coordinator goes away.
    env.s3.set_write_delay(Duration::from_millis(800));
    let shard1 = pattern(12 * MIB, 41);
    let shard0 = pattern(MIB, 40);
    tokio::task::block_in_place(|| {
        nodes[1].write(&shard(1, 1), &shard1);
        nodes[0].write(&shard(1, 0), &shard0);
    });
    drop(coordinator);
    std::fs::remove_dir_all(root.join("coordinator")).expect("wipe the journal");
    coordinator = start_coordinator_at(&root, &token_file, &listen);
    assert_eq!(coordinator.addr, listen);
    tokio::task::block_in_place(|| nodes[0].write_marker(1));
    wait_for(
        "step_1 committed",
        Duration::from_secs(90),
        &nodes.iter().collect::<Vec<_>>(),
        || stored(&env, "step_1/.metadata").is_some(),
    )
    .await;
    assert_marker_last(&env, 1, &[(shard(1, 0), shard0), (shard(1, 1), shard1)]);
    assert!(
        nodes[1].log_text().contains("the commit coordinator restarted"),
        "n2 noticed the restart: {}",
        nodes[1].log_text()
    );
    env.s3.set_write_delay(Duration::ZERO);
}
