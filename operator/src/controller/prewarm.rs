//! Prewarm: a Load over the Dataset's workers, run as a task beside the reconciles. The
//! task keeps its progress here; reconciles copy it into the status. A prewarm that is
//! interrupted (the operator restarts, a worker goes away) is started again by the next
//! reconcile as a new attempt of the same prewarm: the workers skip the blocks they hold,
//! so it resumes where the data is, and the status and an Event say so.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::api::dataset::{DatasetSpec, PrewarmStatus};
use crate::resources::short_hash;
use futures::StreamExt;
use granary_cache::client::WorkerPool;
use granary_cache::proto::LoadProgress;

/// Failed files kept in the status.
const FAILED_FILES_KEPT: usize = 10;

/// The prewarm of one Dataset spec: totals over all its paths.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Progress {
    pub files_total: u64,
    pub files_done: u64,
    pub files_failed: u64,
    pub bytes_total: u64,
    pub bytes_done: u64,
    pub bytes_from_source: u64,
    pub failed_files: Vec<String>,
    /// Every path is listed, so the totals are final (before, they grow as listing goes on).
    pub listing_done: bool,
}

impl Progress {
    /// These totals plus one path's load (its failed files are kept separately);
    /// `last_path`: no path follows, so that path's finished listing finishes the totals.
    fn plus(&self, p: &LoadProgress, last_path: bool) -> Progress {
        Progress {
            files_total: self.files_total + p.files_total,
            files_done: self.files_done + p.files_done,
            files_failed: self.files_failed + p.files_failed,
            bytes_total: self.bytes_total + p.bytes_total,
            bytes_done: self.bytes_done + p.bytes_done,
            bytes_from_source: self.bytes_from_source + p.bytes_from_source,
            failed_files: Vec::new(),
            listing_done: last_path && p.listing_done,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Running,
    /// Every path loaded; failures are counted in the progress.
    Finished,
    /// The attempt stopped before the end (the reason names it).
    Interrupted(String),
}

#[derive(Debug, Clone)]
pub struct Snapshot {
    pub spec_hash: String,
    pub progress: Progress,
    pub outcome: Outcome,
}

struct Running {
    spec_hash: String,
    state: Arc<Mutex<(Progress, Outcome)>>,
    task: tokio::task::JoinHandle<()>,
}

/// The prewarms this operator process runs, by Dataset (`namespace/name`).
#[derive(Default)]
pub struct Prewarms {
    running: Mutex<HashMap<String, Running>>,
}

/// Identifies what a prewarm loads: a changed source, path set or worker layout is a new
/// prewarm, anything else (placement, image) is not.
pub fn spec_hash(spec: &DatasetSpec) -> String {
    let counts = [spec.cache.workers.to_string(), spec.cache.replicas.to_string()];
    let options = spec.source.options.iter().flat_map(|(k, v)| [k.as_str(), v.as_str()]);
    let paths = spec.prewarm.paths.iter().map(String::as_str);
    let parts = std::iter::once(spec.source.uri.as_str())
        .chain(options)
        .chain(paths)
        .chain(counts.iter().map(String::as_str))
        .chain(std::iter::once(spec.cache.block_size.0.as_str()));
    short_hash(parts)
}

/// Attempts of one prewarm before it is called failed (and gated pods are let through).
pub const MAX_PREWARM_ATTEMPTS: u32 = 5;

/// Whether a prewarm gave up: its last attempt failed and it had no attempts left.
pub fn gave_up(p: &PrewarmStatus) -> bool {
    p.finished.is_none() && p.attempts >= MAX_PREWARM_ATTEMPTS && p.last_error.is_some()
}

impl Prewarms {
    /// The prewarm of `key`, if this process has one for `spec_hash`.
    pub fn snapshot(&self, key: &str, spec_hash: &str) -> Option<Snapshot> {
        let running = self.running.lock().ok()?;
        let r = running.get(key).filter(|r| r.spec_hash == spec_hash)?;
        let state = r.state.lock().ok()?;
        Some(Snapshot {
            spec_hash: r.spec_hash.clone(),
            progress: state.0.clone(),
            outcome: state.1.clone(),
        })
    }

    /// Starts loading `paths` over `workers`, replacing (and stopping) any prewarm of `key`.
    pub fn start(
        &self,
        key: &str,
        spec_hash: String,
        workers: Vec<String>,
        replicas: usize,
        paths: Vec<String>,
        parallelism: u32,
    ) {
        let state = Arc::new(Mutex::new((Progress::default(), Outcome::Running)));
        let task_state = Arc::clone(&state);
        let task = tokio::spawn(async move {
            let outcome = match load_all(&workers, replicas, &paths, parallelism, &task_state).await {
                Ok(()) => Outcome::Finished,
                Err(reason) => Outcome::Interrupted(reason),
            };
            if let Ok(mut s) = task_state.lock() {
                s.1 = outcome;
            }
        });
        if let Ok(mut running) = self.running.lock() {
            if let Some(old) = running.insert(key.to_string(), Running { spec_hash, state, task }) {
                old.task.abort();
            }
        }
    }

    /// Stops and forgets the prewarm of `key` (the Dataset is going away).
    pub fn stop(&self, key: &str) {
        if let Ok(mut running) = self.running.lock() {
            if let Some(old) = running.remove(key) {
                old.task.abort();
            }
        }
    }
}

async fn load_all(
    workers: &[String],
    replicas: usize,
    paths: &[String],
    parallelism: u32,
    state: &Mutex<(Progress, Outcome)>,
) -> Result<(), String> {
    let pool = WorkerPool::new(workers, replicas.max(1)).map_err(|e| e.to_string())?;
    // Totals of the paths already loaded, under those of the path loading now.
    let mut done = Progress::default();
    for (i, path) in paths.iter().enumerate() {
        let last_path = i + 1 == paths.len();
        let mut stream = pool
            .load(path, parallelism)
            .await
            .map_err(|e| format!("starting the load of {path}: {e}"))?;
        let mut last = LoadProgress::default();
        while let Some(message) = stream.next().await {
            let p = message.map_err(|e| format!("loading {path}: {e}"))?;
            if let Ok(mut s) = state.lock() {
                let failed_files = std::mem::take(&mut s.0.failed_files);
                s.0 = Progress {
                    failed_files,
                    ..done.plus(&p, last_path)
                };
                for f in &p.new_failures {
                    if s.0.failed_files.len() < FAILED_FILES_KEPT {
                        s.0.failed_files.push(format!("{}: {}", f.path, f.error));
                    }
                }
            }
            let finished = p.finished;
            last = p;
            if finished {
                break;
            }
        }
        if !last.finished {
            return Err(format!(
                "the load of {path} ended before it finished (a worker went away?)"
            ));
        }
        done = done.plus(&last, last_path);
    }
    Ok(())
}
