//! Prewarm (`Load`): list everything under a path, and have each block's owners fetch it,
//! with a bound on the blocks in flight. The listing runs ahead of the fetching so the totals
//! (and so the progress bar) are known early; progress streams back a few times a second; a
//! failed file is reported by name and does not stop the rest. A client that goes away stops
//! the prewarm; running it again is quick because cached blocks are skipped.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use super::status::{from_source, invalid};
use super::WorkerState;
use crate::block::{block_count, BlockKey};
use crate::client::WorkerPool;
use crate::metrics::StateLabel;
use crate::proto::{FileFailure, FileInfo, LoadProgress, LoadRequest, Tier};
use granary_store::source::{FileMeta, ListedEntry};

/// Directories whose listings a prewarm warms at most (beyond, mounts list them cold).
const MAX_LISTED_DIRS: usize = 100_000;
/// Directory listings warmed at once.
const LISTINGS_AT_ONCE: usize = 8;

/// How far the listing may run ahead of the fetching, in files.
const LISTING_AHEAD: usize = 65_536;
const REPORT_EVERY: Duration = Duration::from_millis(250);

#[derive(Default)]
struct Counters {
    files_total: AtomicU64,
    files_done: AtomicU64,
    files_failed: AtomicU64,
    bytes_total: AtomicU64,
    bytes_done: AtomicU64,
    bytes_from_source: AtomicU64,
    listing_done: AtomicBool,
    new_failures: Mutex<Vec<FileFailure>>,
}

impl Counters {
    fn fail(&self, path: &str, error: String) {
        self.files_failed.fetch_add(1, Ordering::Relaxed);
        let mut failures = self.new_failures.lock().unwrap_or_else(|p| p.into_inner());
        failures.push(FileFailure {
            path: path.to_string(),
            error,
        });
    }

    fn snapshot(&self, finished: bool) -> LoadProgress {
        let new_failures = std::mem::take(&mut *self.new_failures.lock().unwrap_or_else(|p| p.into_inner()));
        LoadProgress {
            files_total: self.files_total.load(Ordering::Relaxed),
            files_done: self.files_done.load(Ordering::Relaxed),
            files_failed: self.files_failed.load(Ordering::Relaxed),
            bytes_total: self.bytes_total.load(Ordering::Relaxed),
            bytes_done: self.bytes_done.load(Ordering::Relaxed),
            bytes_from_source: self.bytes_from_source.load(Ordering::Relaxed),
            new_failures,
            listing_done: self.listing_done.load(Ordering::Relaxed),
            finished,
        }
    }
}

/// A file whose blocks are being fetched: blocks left, and its first failure.
type PendingFile = (u64, Option<String>);

/// Who fetches blocks: this worker alone, or every owner over gRPC.
#[derive(Clone)]
enum Fetcher {
    Local(Arc<WorkerState>),
    Owners(WorkerPool),
}

impl Fetcher {
    async fn warm(&self, file: &FileInfo, index: u64) -> Result<(u64, Tier), String> {
        match self {
            Fetcher::Local(state) => {
                let key = BlockKey {
                    path: file.path.clone(),
                    version: file.version.clone(),
                    index,
                };
                state
                    .store
                    .read(&key, file.size, super::Fill::PeersThenSource)
                    .await
                    .map(|(data, tier)| (data.len() as u64, tier))
                    .map_err(|e| e.to_string())
            }
            Fetcher::Owners(pool) => pool.warm_block(file, index).await.map_err(|e| e.to_string()),
        }
    }
}

/// Starts a prewarm and returns its progress stream.
pub fn start(
    state: Arc<WorkerState>,
    request: LoadRequest,
) -> Result<impl Stream<Item = Result<LoadProgress, Status>> + Send + 'static, Status> {
    let fetcher = if request.workers.is_empty() {
        Fetcher::Local(Arc::clone(&state))
    } else {
        let pool =
            WorkerPool::new(&request.workers, request.replicas.max(1) as usize).map_err(|e| invalid(e.to_string()))?;
        Fetcher::Owners(pool)
    };
    // A request cannot make a worker hold more fetches than this at once.
    const MAX_PARALLELISM: usize = 1024;
    let parallelism = match request.parallelism {
        0 => state.load_parallelism,
        n => (n as usize).min(MAX_PARALLELISM),
    };
    let (progress_tx, progress_rx) = mpsc::channel::<Result<LoadProgress, Status>>(16);
    tokio::spawn(async move {
        state.metrics.prewarm_running.inc();
        let outcome = run(
            Arc::clone(&state),
            request.path.clone(),
            fetcher,
            parallelism,
            progress_tx,
        )
        .await;
        state.metrics.prewarm_running.dec();
        if let Err(reason) = outcome {
            tracing::info!(path = %request.path, %reason, "prewarm stopped");
        }
    });
    Ok(ReceiverStream::new(progress_rx))
}

async fn run(
    state: Arc<WorkerState>,
    path: String,
    fetcher: Fetcher,
    parallelism: usize,
    progress: mpsc::Sender<Result<LoadProgress, Status>>,
) -> Result<(), &'static str> {
    let root = match state.metadata.stat(&path, true).await {
        Ok(meta) => meta,
        Err(e) => {
            let _ = progress.send(Err(from_source(&e))).await;
            return Err("the path could not be read");
        }
    };
    tracing::info!(path = %path, parallelism, "prewarm started");
    let counters = Arc::new(Counters::default());
    let block_size = state.store.block_size();

    // The listing, running ahead.
    let (files_tx, files_rx) = mpsc::channel::<FileInfo>(LISTING_AHEAD);
    let lister = {
        let state = Arc::clone(&state);
        let counters = Arc::clone(&counters);
        let fetcher_for_listings = fetcher.clone();
        tokio::spawn(async move {
            let add = |meta: &FileMeta| {
                counters.files_total.fetch_add(1, Ordering::Relaxed);
                counters.bytes_total.fetch_add(meta.size, Ordering::Relaxed);
                FileInfo::from_meta(meta, block_size)
            };
            // Directories seen, whose listings a fresh mount's walk will ask for.
            let mut dirs = HashSet::from([root.path.clone()]);
            if !root.is_dir {
                let _ = files_tx.send(add(&root)).await;
                dirs.clear();
            } else {
                match state.store.source().list(&root.path, true).await {
                    Err(e) => {
                        counters.fail(&root.path, e.to_string());
                    }
                    Ok(listing) => {
                        let mut listing = std::pin::pin!(listing);
                        while let Some(entry) = listing.next().await {
                            let meta = match entry {
                                Ok(ListedEntry::Known(meta)) => Ok(meta),
                                Ok(ListedEntry::NeedsStat(p)) => {
                                    state.metadata.stat(&p, false).await.map_err(|e| (p, e))
                                }
                                Err(e) => {
                                    // A listing that failed (after the store layer's retries)
                                    // cannot be resumed where it stopped: report it once and
                                    // load what was listed. Running the load again retries.
                                    counters.fail(&root.path, format!("listing stopped: {e}"));
                                    break;
                                }
                            };
                            match meta {
                                Ok(meta) if meta.is_dir => {}
                                Ok(meta) => {
                                    state.metadata.insert(meta.clone());
                                    if dirs.len() < MAX_LISTED_DIRS {
                                        note_parents(&mut dirs, &meta.path, &root.path);
                                    }
                                    if files_tx.send(add(&meta)).await.is_err() {
                                        break;
                                    }
                                }
                                Err((p, e)) => {
                                    counters.files_total.fetch_add(1, Ordering::Relaxed);
                                    counters.fail(&p, e.to_string());
                                }
                            }
                        }
                    }
                }
            }
            counters.listing_done.store(true, Ordering::Relaxed);
            drop(files_tx);
            warm_listings(&state, &fetcher_for_listings, dirs).await;
        })
    };

    // The fetching: every block of every listed file, `parallelism` at once.
    let remaining: Arc<Mutex<HashMap<String, PendingFile>>> = Arc::default();
    let blocks = {
        let remaining = Arc::clone(&remaining);
        let counters = Arc::clone(&counters);
        ReceiverStream::new(files_rx).flat_map(move |file| {
            let count = block_count(file.size, block_size);
            if count == 0 {
                counters.files_done.fetch_add(1, Ordering::Relaxed);
            } else {
                remaining
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(file.path.clone(), (count, None));
            }
            let file = Arc::new(file);
            futures::stream::iter((0..count).map(move |index| (Arc::clone(&file), index)))
        })
    };
    let fetches = blocks
        .map(|(file, index)| {
            let fetcher = fetcher.clone();
            async move {
                let result = fetcher.warm(&file, index).await;
                (file, result)
            }
        })
        .buffer_unordered(parallelism.max(1));
    let mut fetches = std::pin::pin!(fetches);
    let mut ticker = tokio::time::interval(REPORT_EVERY);
    loop {
        tokio::select! {
            next = fetches.next() => {
                let Some((file, result)) = next else { break };
                let mut remaining = remaining.lock().unwrap_or_else(|p| p.into_inner());
                let Some(entry) = remaining.get_mut(&file.path) else { continue };
                match result {
                    Ok((bytes, tier)) => {
                        counters.bytes_done.fetch_add(bytes, Ordering::Relaxed);
                        if tier == Tier::Source {
                            counters.bytes_from_source.fetch_add(bytes, Ordering::Relaxed);
                        }
                    }
                    Err(e) => {
                        entry.1.get_or_insert(e);
                    }
                }
                entry.0 -= 1;
                if entry.0 == 0 {
                    if let Some((_, (_, failure))) = remaining.remove_entry(&file.path) {
                        match failure {
                            Some(e) => counters.fail(&file.path, e),
                            None => {
                                counters.files_done.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                }
            }
            _ = ticker.tick() => {
                let snapshot = counters.snapshot(false);
                record(&state, &snapshot);
                if progress.send(Ok(snapshot)).await.is_err() {
                    lister.abort();
                    return Err("the client went away");
                }
            }
        }
    }
    let _ = lister.await;
    let last = counters.snapshot(true);
    record(&state, &last);
    tracing::info!(path = %path, files = last.files_done, failed = last.files_failed,
        bytes = last.bytes_done, from_source = last.bytes_from_source, "prewarm finished");
    progress.send(Ok(last)).await.map_err(|_| "the client went away")
}

fn record(state: &WorkerState, p: &LoadProgress) {
    let m = &state.metrics;
    for (s, v) in [
        ("total", p.files_total),
        ("done", p.files_done),
        ("failed", p.files_failed),
    ] {
        m.prewarm_files.get_or_create(&StateLabel { state: s }).set(v as i64);
    }
    for (s, v) in [("total", p.bytes_total), ("done", p.bytes_done)] {
        m.prewarm_bytes.get_or_create(&StateLabel { state: s }).set(v as i64);
    }
}

/// Adds the directories between `path` (a file) and `root` to `dirs`.
fn note_parents(dirs: &mut HashSet<String>, path: &str, root: &str) {
    let mut dir = path;
    while let Some(cut) = dir.rfind('/') {
        dir = &dir[..cut];
        if dir.len() < root.len() || !dirs.insert(dir.to_string()) {
            return;
        }
    }
}

/// Has each directory listed once by the worker that serves its listing, so a fresh mount's
/// walk is answered from the workers' listing caches. A failure only leaves that directory
/// cold.
async fn warm_listings(state: &Arc<WorkerState>, fetcher: &Fetcher, dirs: HashSet<String>) {
    let count = dirs.len();
    let failed = futures::stream::iter(dirs)
        .map(|dir| async move {
            let listed = match fetcher {
                Fetcher::Local(_) => match super::service::list(Arc::clone(state), &dir, false).await {
                    Ok(stream) => stream
                        .map(|r| r.map(|_| ()).map_err(|s| s.message().to_string()))
                        .boxed(),
                    Err(s) => futures::stream::once(async move { Err(s.message().to_string()) }).boxed(),
                },
                Fetcher::Owners(pool) => match pool.list(&dir, false).await {
                    Ok(stream) => stream.map(|r| r.map(|_| ()).map_err(|e| e.to_string())).boxed(),
                    Err(e) => futures::stream::once(async move { Err(e.to_string()) }).boxed(),
                },
            };
            let failure = listed.filter_map(|r| futures::future::ready(r.err())).next().await;
            if let Some(e) = &failure {
                tracing::debug!(dir, error = %e, "warming a directory listing failed");
            }
            failure.is_some()
        })
        .buffer_unordered(LISTINGS_AT_ONCE)
        .filter(|failed| futures::future::ready(*failed))
        .count()
        .await;
    tracing::info!(directories = count, failed, "prewarm listed the directories for mounts");
}
