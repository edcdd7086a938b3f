//! This node's side of the commit protocol of a volume written by several nodes (see
//! `granary-commit`): it tells the coordinator every path it has not settled in the store —
//! a new writer before its `create()`/`open()` returns, the rest as a periodic difference —
//! and asks it before uploading a marker whose directory is settled here.
//!
//! Ordering: one lock is held across computing a difference and sending it, and across a
//! writer's registration and its entry in the tracker, so the coordinator never receives
//! "settled" for a path after a newer "pending" for it.

use std::collections::BTreeSet;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use granary_commit::proto::{MayCommitRequest, ReportRequest};
use granary_commit::{CommitClient, CommitClientError};
use tokio::sync::{watch, Mutex};

use super::tracker::{parent_of, Tracker};

/// Where a node's volume is coordinated, and as whom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitCoordination {
    /// `host:port` of the coordinator (in a cluster, the CheckpointPolicy's Service).
    pub address: String,
    pub token: Option<String>,
    /// This node's name, unique among the volume's writers (the Kubernetes node name).
    pub node: String,
}

/// How long a new writer waits for the coordinator before its open fails with EIO: a file
/// the coordinator does not know of could let another node commit its checkpoint without it.
const REGISTER_DEADLINE: Duration = Duration::from_secs(30);
/// A report at least this often, so the coordinator can tell a silent node.
const HEARTBEAT: Duration = Duration::from_secs(5);
/// How often differences are sent and waiting markers ask again.
const ROUND: Duration = Duration::from_millis(200);

struct Reported {
    /// What the coordinator holds unsettled for this node.
    paths: BTreeSet<String>,
    /// The upload refusal last told.
    refusal: String,
    /// The coordinator's incarnation last seen (0: none yet).
    incarnation: u64,
    /// Whether the whole set was sent since this process started (the coordinator may hold
    /// paths of a previous run that are settled now).
    synced: bool,
    last_sent: Instant,
}

/// A coordinator that restarted may have lost what it was told (its PVC gone, a machine
/// crash before its journal reached the disk): tell it the whole set at the next round.
fn note_incarnation(reported: &mut Reported, incarnation: u64) {
    if reported.incarnation != 0 && reported.incarnation != incarnation {
        tracing::info!("the commit coordinator restarted; sending it this node's whole unsettled set");
        reported.synced = false;
    }
    if reported.synced {
        reported.incarnation = incarnation;
    }
}

pub struct CommitPeer {
    client: CommitClient,
    /// Drives requests made from FUSE threads, which are not the runtime's.
    runtime: tokio::runtime::Handle,
    volume: String,
    node: String,
    reported: Mutex<Reported>,
    /// Directories whose refusal was logged, so a wait is logged once, not per round.
    logged_waits: std::sync::Mutex<BTreeSet<String>>,
    /// Whether the target refuses this node's uploads, told with every report (the operator
    /// shows it on the CheckpointPolicy).
    health: Arc<super::uploader::UploadHealth>,
}

#[derive(Debug, thiserror::Error)]
pub enum CommitPeerError {
    #[error(transparent)]
    Client(#[from] CommitClientError),
    #[error("the node name for the commit coordinator is empty; pass the node's name (--node-name, from the downward API in a cluster)")]
    NoNodeName,
}

impl CommitPeer {
    pub fn new(
        config: &CommitCoordination,
        volume: &str,
        runtime: tokio::runtime::Handle,
        health: Arc<super::uploader::UploadHealth>,
    ) -> Result<Self, CommitPeerError> {
        if config.node.trim().is_empty() {
            return Err(CommitPeerError::NoNodeName);
        }
        let client = CommitClient::new(&config.address, config.token.as_deref(), Duration::from_secs(5))?;
        Ok(CommitPeer {
            client,
            runtime,
            volume: volume.to_string(),
            node: config.node.clone(),
            reported: Mutex::new(Reported {
                paths: BTreeSet::new(),
                refusal: String::new(),
                incarnation: 0,
                synced: false,
                last_sent: Instant::now(),
            }),
            logged_waits: std::sync::Mutex::new(BTreeSet::new()),
            health,
        })
    }

    pub fn address(&self) -> &str {
        self.client.address()
    }

    fn request(&self, pending: Vec<String>, settled: Vec<String>, replace: bool) -> ReportRequest {
        ReportRequest {
            volume: self.volume.clone(),
            node: self.node.clone(),
            pending,
            settled,
            replace,
            upload_refusal: self.health.refusal().unwrap_or_default(),
        }
    }

    /// Registers `path` with the coordinator, then opens it for writing in `tracker`: the
    /// coordinator knows of the file before its writer gets a handle.
    pub async fn begin_write(&self, tracker: &Tracker, path: &str) -> io::Result<()> {
        let mut reported = self.reported.lock().await;
        if !reported.paths.contains(path) {
            let deadline = Instant::now() + REGISTER_DEADLINE;
            let mut pause = Duration::from_millis(100);
            loop {
                match self
                    .client
                    .report(self.request(vec![path.to_string()], Vec::new(), false))
                    .await
                {
                    Ok(answer) => {
                        note_incarnation(&mut reported, answer.incarnation);
                        break;
                    }
                    Err(e) if e.is_transient() && Instant::now() + pause < deadline => {
                        tracing::warn!(path, error = %e, "the commit coordinator did not take a new file; retrying");
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(5));
                    }
                    Err(e) => {
                        tracing::error!(path, error = %e, "a new checkpoint file is refused: the commit coordinator must know of every file before it is written, or another node could commit the checkpoint without it; check the CheckpointPolicy's coordinator pod");
                        return Err(io::Error::other(e.to_string()));
                    }
                }
            }
            reported.paths.insert(path.to_string());
            reported.last_sent = Instant::now();
        }
        tracker.begin_write(path)
    }

    /// [`Self::begin_write`] from a thread that must block (a FUSE request answered in place).
    pub fn begin_write_blocking(&self, tracker: &Tracker, path: &str) -> io::Result<()> {
        let run = || self.runtime.block_on(self.begin_write(tracker, path));
        if tokio::runtime::Handle::try_current().is_ok() {
            // On a runtime thread (tests): let its other tasks move elsewhere meanwhile.
            tokio::task::block_in_place(run)
        } else {
            run()
        }
    }

    /// Sends what changed in this node's unsettled set since the last report (the whole set
    /// at the first), or a heartbeat.
    pub async fn sync(&self, tracker: &Tracker) -> Result<(), CommitClientError> {
        let mut reported = self.reported.lock().await;
        let now = tracker.unsettled_paths();
        let request = if reported.synced {
            let pending: Vec<String> = now.difference(&reported.paths).cloned().collect();
            let settled: Vec<String> = reported.paths.difference(&now).cloned().collect();
            let refusal_changed = self.health.refusal().unwrap_or_default() != reported.refusal;
            if pending.is_empty() && settled.is_empty() && !refusal_changed && reported.last_sent.elapsed() < HEARTBEAT
            {
                return Ok(());
            }
            self.request(pending, settled, false)
        } else {
            self.request(now.iter().cloned().collect(), Vec::new(), true)
        };
        let refusal = request.upload_refusal.clone();
        let replace = request.replace;
        let answer = self.client.report(request).await?;
        reported.refusal = refusal;
        reported.paths = now;
        reported.synced = true;
        if replace {
            reported.incarnation = answer.incarnation;
        } else {
            note_incarnation(&mut reported, answer.incarnation);
        }
        reported.last_sent = Instant::now();
        Ok(())
    }

    /// Asks the coordinator about every marker settled here; clears those it allows.
    pub async fn clear_markers(&self, tracker: &Tracker) -> Result<(), CommitClientError> {
        for marker in tracker.markers_to_clear() {
            let dir = parent_of(&marker).to_string();
            let answer = self
                .client
                .may_commit(MayCommitRequest {
                    volume: self.volume.clone(),
                    node: self.node.clone(),
                    dir: dir.clone(),
                    marker: marker.clone(),
                })
                .await?;
            let mut logged = self.logged_waits.lock().unwrap_or_else(|p| p.into_inner());
            if answer.ready {
                if logged.remove(&dir) {
                    tracing::info!(
                        checkpoint = dir,
                        "every node has put its files of the checkpoint in the store; committing"
                    );
                }
                tracker.clear_marker(&marker);
            } else if logged.insert(dir.clone()) {
                let waiting: Vec<String> = answer
                    .blockers
                    .iter()
                    .map(|b| {
                        format!(
                            "{} ({} files, e.g. {}, last heard {}s ago)",
                            b.node, b.pending, b.example, b.silent_seconds
                        )
                    })
                    .chain((!answer.reason.is_empty()).then(|| answer.reason.clone()))
                    .collect();
                tracing::info!(
                    checkpoint = dir,
                    waiting_for = waiting.join("; "),
                    "the checkpoint's marker waits for other nodes' files to reach the store"
                );
            }
        }
        Ok(())
    }

    /// Reports and clears markers every round until `stop`; says once when the coordinator
    /// cannot be reached, and when it can again.
    pub async fn run(self: Arc<Self>, tracker: Arc<Tracker>, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(ROUND);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => {}
            }
            let round = async {
                self.sync(&tracker).await?;
                self.clear_markers(&tracker).await
            };
            match round.await {
                Ok(()) if failing => {
                    failing = false;
                    tracing::info!(coordinator = self.address(), "the commit coordinator answers again");
                }
                Ok(()) => {}
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(coordinator = self.address(), error = %e, "cannot reach the commit coordinator: uploads go on, markers wait");
                }
                Err(_) => {}
            }
            if *stop.borrow() {
                return;
            }
        }
    }
}
