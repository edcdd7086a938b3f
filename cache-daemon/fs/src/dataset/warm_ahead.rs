//! Warm-ahead for epoch-like scans: once readers have opened several different small files
//! of one directory, the rest of that directory is about to be read too (a shuffled epoch
//! reads every sample once). The workers are asked to fetch those files from the store
//! ahead of the readers, many at once, so a cold epoch is not paced by one store round trip
//! per sample per reader thread. Nothing is held in this process's memory for it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;

use super::metadata::DirListing;
use super::remote::Remote;

/// Distinct files of a directory opened before its other files are warmed.
const TRIGGER_AFTER: usize = 4;
/// Warm requests in flight at once, per mount.
const IN_FLIGHT: usize = 32;
/// Directories remembered; past this the memory starts over.
const MAX_DIRS: usize = 100_000;

#[derive(Default)]
struct DirScan {
    opened: usize,
    started: bool,
}

pub struct WarmAhead {
    remote: Arc<Remote>,
    dirs: Mutex<HashMap<String, DirScan>>,
    in_flight: Arc<Semaphore>,
}

impl WarmAhead {
    pub fn new(remote: Arc<Remote>) -> Self {
        WarmAhead {
            remote,
            dirs: Mutex::new(HashMap::new()),
            in_flight: Arc::new(Semaphore::new(IN_FLIGHT)),
        }
    }

    /// Records that a file of `dir` was opened; `listing` is asked for only when the scan
    /// starts.
    pub fn opened(&self, dir: &str, listing: impl FnOnce() -> Arc<DirListing>) {
        if !self.remote.uses_workers() {
            return;
        }
        {
            let mut dirs = self.dirs.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if dirs.len() >= MAX_DIRS && !dirs.contains_key(dir) {
                dirs.clear();
            }
            // Looked up before inserting: most opens are of directories already seen, and
            // need no key allocated.
            let scan = match dirs.get_mut(dir) {
                Some(scan) => scan,
                None => dirs.entry(dir.to_string()).or_default(),
            };
            if scan.started {
                return;
            }
            scan.opened += 1;
            if scan.opened < TRIGGER_AFTER {
                return;
            }
            scan.started = true;
        }
        let listing = listing();
        let remote = Arc::clone(&self.remote);
        let in_flight = Arc::clone(&self.in_flight);
        let dir = dir.to_string();
        tokio::spawn(async move {
            let mut index = 0;
            let mut warmed = 0u64;
            loop {
                let batch = match listing.entries_from(index, 512).await {
                    Ok(batch) if !batch.is_empty() => batch,
                    _ => break,
                };
                index += batch.len();
                for info in batch {
                    // Small files only: large ones stream through readahead.
                    if info.is_dir || info.size == 0 || info.size > info.block_size {
                        continue;
                    }
                    let Ok(permit) = Arc::clone(&in_flight).acquire_owned().await else {
                        return;
                    };
                    let remote = Arc::clone(&remote);
                    tokio::spawn(async move {
                        let _permit = permit;
                        let _ = remote.warm(&info, 0).await;
                    });
                    warmed += 1;
                }
            }
            tracing::debug!(dir, warmed, "warmed a directory ahead of its readers");
        });
    }
}
