//! What the write-back area holds and what the target store still needs. Per file: the
//! version the store should have (or none, while it is being written), the version it has,
//! the local size, and who has it open. Every change is a journal [`Record`] applied by one
//! function, live and at replay alike, so a restarted daemon continues where the dead one
//! stopped. Space in the area is accounted here too: writes reserve what they add.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::journal::{Journal, Record};

/// What the store should get of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// Open for writing (or left so by a crash): nothing yet.
    Writing,
    /// Version `want_seq` once nobody writes it.
    Upload,
    /// Never this version: a write failed.
    Broken,
}

#[derive(Debug, Clone)]
pub struct FileEntry {
    pub want: Want,
    pub want_seq: u64,
    /// The version the store has (0: none of ours).
    pub done_seq: u64,
    /// The store holds some version of this path (ours or an older one).
    pub in_store: bool,
    /// Bytes of the local copy.
    pub size: u64,
    pub writers: u32,
    pub failures: u32,
    pub retry_at: Option<Instant>,
    /// When the version to upload was closed (for the pending age and commit latency).
    pub closed_at: Option<Instant>,
    /// Last open or close, for choosing what to evict.
    pub last_used: Instant,
}

impl FileEntry {
    fn new(seq: u64) -> Self {
        FileEntry {
            want: Want::Writing,
            want_seq: seq,
            done_seq: 0,
            in_store: false,
            size: 0,
            writers: 0,
            failures: 0,
            retry_at: None,
            closed_at: None,
            last_used: Instant::now(),
        }
    }

    pub fn upload_pending(&self) -> bool {
        self.want == Want::Upload && self.done_seq < self.want_seq
    }

    /// The local copy equals what the store has, so dropping it loses nothing.
    pub fn is_clean(&self) -> bool {
        self.want == Want::Upload && self.done_seq == self.want_seq
    }
}

#[derive(Debug, Default)]
pub struct State {
    pub files: HashMap<String, FileEntry>,
    /// Store objects to delete, by path, with the version of the removal.
    pub deletes: HashMap<String, DeleteEntry>,
    pub next_seq: u64,
    /// Bytes of local copies.
    pub used: u64,
    /// Paths whose upload is running. Kept apart from the entries: a rename moves an entry
    /// while its old path's upload still runs.
    pub uploading: std::collections::HashSet<String>,
}

#[derive(Debug, Clone)]
pub struct DeleteEntry {
    pub seq: u64,
    pub busy: bool,
    pub retry_at: Option<Instant>,
    pub failures: u32,
}

impl DeleteEntry {
    fn new(seq: u64) -> Self {
        DeleteEntry {
            seq,
            busy: false,
            retry_at: None,
            failures: 0,
        }
    }
}

/// `path` is `dir` or lies under it ("" is the root, holding everything).
pub fn is_under(path: &str, dir: &str) -> bool {
    dir.is_empty() || path == dir || (path.starts_with(dir) && path.as_bytes().get(dir.len()) == Some(&b'/'))
}

/// The directory holding `path` ("" for the root); a marker's checkpoint directory.
pub fn parent_of(path: &str) -> &str {
    path.rsplit_once('/').map(|(dir, _)| dir).unwrap_or("")
}

/// `path` with its leading `from` replaced by `to`.
fn moved_path(path: &str, from: &str, to: &str) -> String {
    format!("{to}{}", &path[from.len()..])
}

impl State {
    fn entry(&mut self, path: &str, seq: u64) -> &mut FileEntry {
        self.files
            .entry(path.to_string())
            .or_insert_with(|| FileEntry::new(seq))
    }

    fn drop_entry(&mut self, path: &str) -> Option<FileEntry> {
        let gone = self.files.remove(path);
        if let Some(e) = &gone {
            self.used = self.used.saturating_sub(e.size);
        }
        gone
    }

    /// The single place a record changes the state.
    pub fn apply(&mut self, record: &Record) {
        self.next_seq = self.next_seq.max(record.seq() + 1);
        match record {
            Record::Writing { path, seq } => {
                let e = self.entry(path, *seq);
                e.want = Want::Writing;
                e.want_seq = *seq;
            }
            Record::Closed { path, seq } => {
                let e = self.entry(path, *seq);
                e.want = Want::Upload;
                e.want_seq = *seq;
                e.closed_at = Some(Instant::now());
                e.failures = 0;
                e.retry_at = None;
                // The upload overwrites whatever the store has at this path.
                self.deletes.remove(path);
            }
            Record::Uploaded { path, seq } => {
                if let Some(e) = self.files.get_mut(path) {
                    e.in_store = true;
                    if e.want_seq == *seq {
                        e.done_seq = *seq;
                    }
                }
            }
            Record::Broken { path, seq } => {
                let e = self.entry(path, *seq);
                e.want = Want::Broken;
                e.want_seq = *seq;
            }
            Record::Removed { path, seq, store } => {
                self.drop_entry(path);
                if *store {
                    self.deletes.insert(path.clone(), DeleteEntry::new(*seq));
                }
            }
            Record::StoreDeleted { path, seq } => {
                if self.deletes.get(path).is_some_and(|d| d.seq == *seq) {
                    self.deletes.remove(path);
                }
            }
            Record::Moved { from, to, seq, store } => {
                // A directory moves with everything under it.
                let moving: Vec<String> = self.files.keys().filter(|p| is_under(p, from)).cloned().collect();
                for old in moving {
                    let new = moved_path(&old, from, to);
                    let Some(mut e) = self.files.remove(&old) else { continue };
                    if *store || e.in_store {
                        self.deletes.insert(old.clone(), DeleteEntry::new(*seq));
                    }
                    e.in_store = false;
                    e.done_seq = 0;
                    if e.want == Want::Upload {
                        e.want_seq = *seq;
                        e.closed_at.get_or_insert_with(Instant::now);
                    }
                    self.deletes.remove(&new);
                    if let Some(replaced) = self.files.insert(new, e) {
                        self.used = self.used.saturating_sub(replaced.size);
                    }
                }
            }
            Record::Evicted { path } => {
                self.drop_entry(path);
            }
            Record::Fetched { path, seq } => {
                let e = self.entry(path, *seq);
                e.want = Want::Upload;
                e.want_seq = *seq;
                e.done_seq = *seq;
                e.in_store = true;
                e.closed_at = None;
            }
        }
    }

    /// Records that rebuild this state from nothing (for rewriting the journal).
    pub fn snapshot(&self) -> Vec<Record> {
        let mut out = Vec::new();
        // Deletes first: a removal record drops any entry at its path, and a file written
        // there since (still open) must survive the replay.
        let mut deletes: Vec<(&String, &DeleteEntry)> = self.deletes.iter().collect();
        deletes.sort_by_key(|(p, _)| *p);
        for (path, d) in deletes {
            out.push(Record::Removed {
                path: path.clone(),
                seq: d.seq,
                store: true,
            });
        }
        let mut paths: Vec<&String> = self.files.keys().collect();
        paths.sort();
        for path in paths {
            let e = &self.files[path];
            let path = path.clone();
            let seq = e.want_seq;
            match e.want {
                Want::Writing => out.push(Record::Writing { path, seq }),
                Want::Broken => out.push(Record::Broken { path, seq }),
                Want::Upload if e.is_clean() => out.push(Record::Fetched { path, seq }),
                Want::Upload => {
                    out.push(Record::Closed {
                        path: path.clone(),
                        seq,
                    });
                    if e.in_store && e.done_seq != 0 {
                        // Keep "the store has an older version" so a later rename deletes it.
                        out.push(Record::Uploaded { path, seq: e.done_seq });
                    }
                }
            }
        }
        out
    }
}

/// Work for the uploader.
#[derive(Debug, Clone)]
pub enum Work {
    Upload { path: String, seq: u64, size: u64 },
    Delete { path: String, seq: u64 },
}

/// Totals for the metrics.
#[derive(Debug, Default, Clone, Copy)]
pub struct Pending {
    pub files: u64,
    pub bytes: u64,
    pub oldest: Option<Duration>,
    pub deletes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum NoSpace {
    #[error(
        "{path:?} needs {needed} bytes but the write-back area holds {limit} bytes in all; raise --writeback-size (or the volume's writebackSize)"
    )]
    TooLarge { path: String, needed: u64, limit: u64 },
    #[error(
        "the write-back area ({limit} bytes) is full of files still open for writing, so no upload can free room; raise --writeback-size or close files sooner"
    )]
    Full { limit: u64 },
}

pub struct Tracker {
    state: Mutex<(State, Journal)>,
    files_root: PathBuf,
    limit: u64,
    marker: Option<String>,
    /// Wakes the uploader: something became uploadable.
    pub work_ready: Notify,
    /// Wakes writers waiting for room: something was uploaded, evicted or removed.
    pub space_freed: Notify,
    /// The checkpoint directory committed last; its files stay local for fast restores.
    latest_commit: Mutex<Option<String>>,
    /// Commits whose follow-up (retention) is still running: not idle yet.
    committing: std::sync::atomic::AtomicUsize,
}

/// What a replay found, for the log.
#[derive(Debug, Default)]
pub struct Recovery {
    pub pending_uploads: usize,
    pub pending_deletes: usize,
    pub unfinished_writes: Vec<String>,
    pub lost: Vec<String>,
    pub untracked: Vec<String>,
}

impl Tracker {
    /// Replays the journal at `journal_path`, reconciles it with the files under
    /// `files_root`, and rewrites the journal compactly.
    pub fn open(
        journal_path: &Path,
        files_root: &Path,
        limit: u64,
        marker: Option<String>,
    ) -> io::Result<(Tracker, Recovery)> {
        let mut state = State {
            next_seq: 1,
            ..Default::default()
        };
        for record in Journal::read(journal_path)? {
            state.apply(&record);
        }
        let mut recovery = Recovery::default();
        // Local sizes, and files the journal does not know: a crash between a rename and
        // its record leaves one; it was closed (renames happen after writing), so upload it.
        let mut local = Vec::new();
        walk_files(files_root, files_root, &mut local)?;
        let mut seen = std::collections::HashSet::new();
        for (path, size) in local {
            seen.insert(path.clone());
            match state.files.get_mut(&path) {
                Some(e) => e.size = size,
                None => {
                    let seq = state.next_seq;
                    state.apply(&Record::Closed {
                        path: path.clone(),
                        seq,
                    });
                    if let Some(e) = state.files.get_mut(&path) {
                        e.size = size;
                    }
                    recovery.untracked.push(path);
                }
            }
        }
        let missing: Vec<String> = state.files.keys().filter(|p| !seen.contains(*p)).cloned().collect();
        for path in missing {
            if state.files.get(&path).is_some_and(|e| e.upload_pending()) {
                recovery.lost.push(path.clone());
            }
            state.files.remove(&path);
        }
        state.used = state.files.values().map(|e| e.size).sum();
        for (path, e) in &state.files {
            match e.want {
                Want::Writing => recovery.unfinished_writes.push(path.clone()),
                Want::Upload if e.upload_pending() => recovery.pending_uploads += 1,
                _ => {}
            }
        }
        recovery.pending_deletes = state.deletes.len();
        let journal = Journal::rewrite(journal_path, &state.snapshot())?;
        Ok((
            Tracker {
                state: Mutex::new((state, journal)),
                files_root: files_root.to_path_buf(),
                limit,
                marker,
                work_ready: Notify::new(),
                space_freed: Notify::new(),
                latest_commit: Mutex::new(None),
                committing: std::sync::atomic::AtomicUsize::new(0),
            },
            recovery,
        ))
    }

    fn lock(&self) -> MutexGuard<'_, (State, Journal)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn files_root(&self) -> &Path {
        &self.files_root
    }

    pub fn local_path(&self, path: &str) -> PathBuf {
        if path.is_empty() {
            self.files_root.clone()
        } else {
            self.files_root.join(path)
        }
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    pub fn used(&self) -> u64 {
        self.lock().0.used
    }

    pub fn marker(&self) -> Option<&str> {
        self.marker.as_deref()
    }

    /// Applies `make(seq)` with a fresh version number and journals it.
    fn record(&self, make: impl FnOnce(u64) -> Record) -> io::Result<()> {
        let mut guard = self.lock();
        let (state, journal) = &mut *guard;
        let record = make(state.next_seq);
        commit_record(state, journal, &record)?;
        Ok(())
    }

    pub fn sync_journal(&self) -> io::Result<()> {
        self.lock().1.sync()
    }

    /// A handle opened `path` for writing.
    pub fn begin_write(&self, path: &str) -> io::Result<()> {
        let mut guard = self.lock();
        let (state, journal) = &mut *guard;
        let seq = state.next_seq;
        let needs_record = state.files.get(path).is_none_or(|e| e.want != Want::Writing);
        if needs_record {
            let record = Record::Writing {
                path: path.to_string(),
                seq,
            };
            commit_record(state, journal, &record)?;
        }
        let e = state.entry(path, seq);
        e.writers += 1;
        e.last_used = Instant::now();
        Ok(())
    }

    /// A writing handle of `path` was closed: the bytes written so far are a version for
    /// the store. `size` is the local file's size now.
    pub fn closed(&self, path: &str, size: u64) -> io::Result<()> {
        {
            let mut guard = self.lock();
            let (state, journal) = &mut *guard;
            let Some(e) = state.files.get(path) else { return Ok(()) };
            if e.want == Want::Writing {
                let record = Record::Closed {
                    path: path.to_string(),
                    seq: state.next_seq,
                };
                commit_record(state, journal, &record)?;
            }
            Self::set_size_locked(state, path, size);
        }
        self.work_ready.notify_one();
        Ok(())
    }

    /// A writing handle of `path` was released (the last reference to its open file).
    pub fn end_write(&self, path: &str) {
        {
            let mut guard = self.lock();
            if let Some(e) = guard.0.files.get_mut(path) {
                e.writers = e.writers.saturating_sub(1);
                e.last_used = Instant::now();
            }
        }
        self.work_ready.notify_one();
    }

    /// A write to `path` failed: this version must never reach the store.
    pub fn broken(&self, path: &str) -> io::Result<()> {
        let known = self.lock().0.files.get(path).is_some_and(|e| e.want != Want::Broken);
        if known {
            self.record(|seq| Record::Broken {
                path: path.to_string(),
                seq,
            })?;
        }
        Ok(())
    }

    /// A file that exists only in the store was copied into the area.
    pub fn fetched(&self, path: &str, size: u64) -> io::Result<()> {
        self.record(|seq| Record::Fetched {
            path: path.to_string(),
            seq,
        })?;
        let mut guard = self.lock();
        Self::set_size_locked(&mut guard.0, path, size);
        Ok(())
    }

    /// `path` was removed; `in_store` says the store holds it (a file only the store had).
    pub fn removed(&self, path: &str, in_store: bool) -> io::Result<()> {
        let store = {
            let guard = self.lock();
            in_store || guard.0.uploading.contains(path) || guard.0.files.get(path).is_some_and(|e| e.in_store)
        };
        self.record(|seq| Record::Removed {
            path: path.to_string(),
            seq,
            store,
        })?;
        self.space_freed.notify_waiters();
        self.work_ready.notify_one();
        Ok(())
    }

    /// `from` (a file, or a directory with everything under it) was renamed to `to`.
    pub fn moved(&self, from: &str, to: &str) -> io::Result<()> {
        let store = {
            let guard = self.lock();
            let state = &guard.0;
            state.uploading.iter().any(|p| is_under(p, from))
                || state.files.iter().any(|(p, e)| is_under(p, from) && e.in_store)
        };
        self.record(|seq| Record::Moved {
            from: from.to_string(),
            to: to.to_string(),
            seq,
            store,
        })?;
        self.work_ready.notify_one();
        Ok(())
    }

    fn set_size_locked(state: &mut State, path: &str, size: u64) {
        if let Some(e) = state.files.get_mut(path) {
            state.used = state.used.saturating_sub(e.size) + size;
            e.size = size;
        }
    }

    /// Sets the accounted size of `path` (after a truncate, or from the file itself).
    pub fn set_size(&self, path: &str, size: u64) {
        let shrank = {
            let mut guard = self.lock();
            let before = guard.0.used;
            Self::set_size_locked(&mut guard.0, path, size);
            guard.0.used < before
        };
        if shrank {
            self.space_freed.notify_waiters();
        }
    }

    /// Reserves room for `path` to grow to `end` bytes; false when the area is full.
    pub fn try_grow(&self, path: &str, end: u64) -> Result<bool, NoSpace> {
        let mut guard = self.lock();
        let state = &mut guard.0;
        let Some(e) = state.files.get_mut(path) else {
            return Ok(true);
        };
        if end <= e.size {
            return Ok(true);
        }
        if end > self.limit {
            return Err(NoSpace::TooLarge {
                path: path.to_string(),
                needed: end,
                limit: self.limit,
            });
        }
        let delta = end - e.size;
        if state.used + delta > self.limit {
            return Ok(false);
        }
        e.size = end;
        state.used += delta;
        Ok(true)
    }

    /// Files whose local copies can be dropped (uploaded, not open for writing), least
    /// recently used first; the latest committed checkpoint's files come last.
    pub fn eviction_candidates(&self) -> Vec<(String, u64)> {
        let latest = self.latest_commit();
        let guard = self.lock();
        let state = &guard.0;
        let mut candidates: Vec<(bool, Instant, String, u64)> = state
            .files
            .iter()
            .filter(|(p, e)| e.is_clean() && e.writers == 0 && !state.uploading.contains(*p))
            .map(|(p, e)| {
                let protected = latest.as_deref().is_some_and(|dir| is_under(p, dir));
                (protected, e.last_used, p.clone(), e.size)
            })
            .collect();
        candidates.sort();
        candidates.into_iter().map(|(_, _, p, s)| (p, s)).collect()
    }

    /// Drops the local copy of `path` if it is still clean; returns the bytes freed.
    pub fn evict(&self, path: &str) -> io::Result<u64> {
        let mut guard = self.lock();
        let (state, journal) = &mut *guard;
        let Some(e) = state.files.get(path) else { return Ok(0) };
        if !(e.is_clean() && e.writers == 0 && !state.uploading.contains(path)) {
            return Ok(0);
        }
        let size = e.size;
        match std::fs::remove_file(self.local_path(path)) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(err),
        }
        let record = Record::Evicted { path: path.to_string() };
        commit_record(state, journal, &record)?;
        drop(guard);
        self.space_freed.notify_waiters();
        Ok(size)
    }

    /// Whether the store's object at `path` is being deleted (so the mount must not show it).
    pub fn deleting(&self, path: &str) -> bool {
        self.lock().0.deletes.contains_key(path)
    }

    /// The local state of `path`, if it has any.
    pub fn entry(&self, path: &str) -> Option<FileEntry> {
        self.lock().0.files.get(path).cloned()
    }

    pub fn set_latest_commit(&self, dir: Option<String>) {
        *self.latest_commit.lock().unwrap_or_else(|p| p.into_inner()) = dir;
    }

    pub fn latest_commit(&self) -> Option<String> {
        self.latest_commit.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether every local file under `dir` is already in the store, and none is open.
    pub fn settled_under(&self, dir: &str) -> bool {
        let guard = self.lock();
        let state = &guard.0;
        !state.uploading.iter().any(|p| is_under(p, dir))
            && state
                .files
                .iter()
                .filter(|(p, _)| is_under(p, dir))
                .all(|(_, e)| e.is_clean() && e.writers == 0)
    }

    /// Forgets every local file under `dir` (retention removed the checkpoint).
    pub fn forget_under(&self, dir: &str) -> io::Result<()> {
        let paths: Vec<String> = {
            let guard = self.lock();
            guard.0.files.keys().filter(|p| is_under(p, dir)).cloned().collect()
        };
        for path in paths {
            self.record(|seq| Record::Removed {
                path,
                seq,
                store: false,
            })?;
        }
        self.space_freed.notify_waiters();
        Ok(())
    }

    /// Whether `path` is a commit marker, and so a checkpoint's last file.
    pub fn marks_commit(&self, path: &str) -> bool {
        let name = path.rsplit('/').next().unwrap_or(path);
        self.marker.as_deref() == Some(name)
    }

    /// Up to `max` pieces of work that may start now, marking them busy. A marker is
    /// uploadable only when everything else under its directory is in the store.
    pub fn take_work(&self, max: usize) -> Vec<Work> {
        let now = Instant::now();
        let mut guard = self.lock();
        let state = &mut guard.0;
        let mut work = Vec::new();
        let ready = |retry_at: Option<Instant>| retry_at.is_none_or(|t| t <= now);
        for (path, d) in state.deletes.iter_mut() {
            if work.len() >= max {
                break;
            }
            if !d.busy && ready(d.retry_at) {
                // Not while an upload of the same key runs: the delete would remove it.
                if state.uploading.contains(path) {
                    continue;
                }
                d.busy = true;
                work.push(Work::Delete {
                    path: path.clone(),
                    seq: d.seq,
                });
            }
        }
        let mut candidates: Vec<(String, u64, u64)> = state
            .files
            .iter()
            .filter(|(p, e)| {
                e.upload_pending()
                    && e.writers == 0
                    && !state.uploading.contains(*p)
                    && ready(e.retry_at)
                    && !state.deletes.contains_key(*p)
            })
            .map(|(p, e)| (p.clone(), e.want_seq, e.size))
            .collect();
        // Oldest versions first: checkpoints reach the store in the order they were written.
        candidates.sort_by_key(|(_, seq, _)| *seq);
        for (path, seq, size) in candidates {
            if work.len() >= max {
                break;
            }
            if self.marks_commit(&path) {
                let dir = parent_of(&path);
                let others_done = state
                    .files
                    .iter()
                    .filter(|(p, _)| **p != path && is_under(p, dir))
                    .all(|(p, e)| e.is_clean() && !state.uploading.contains(p))
                    && !state.uploading.iter().any(|p| is_under(p, dir))
                    && !state.deletes.keys().any(|p| is_under(p, dir) && p != &path);
                if !others_done {
                    continue;
                }
            }
            state.uploading.insert(path.clone());
            work.push(Work::Upload { path, seq, size });
        }
        work
    }

    /// An upload finished (`ok`) or failed; failures retry after a growing pause.
    pub fn upload_finished(&self, path: &str, seq: u64, ok: bool) -> io::Result<()> {
        if ok {
            let mut guard = self.lock();
            let (state, journal) = &mut *guard;
            state.uploading.remove(path);
            let record = Record::Uploaded {
                path: path.to_string(),
                seq,
            };
            commit_record(state, journal, &record)?;
            if let Some(e) = state.files.get_mut(path) {
                e.failures = 0;
                e.retry_at = None;
            }
        } else {
            let mut guard = self.lock();
            guard.0.uploading.remove(path);
            if let Some(e) = guard.0.files.get_mut(path) {
                e.failures += 1;
                e.retry_at = Some(Instant::now() + backoff(e.failures));
            }
        }
        self.space_freed.notify_waiters();
        self.work_ready.notify_one();
        Ok(())
    }

    /// A delete finished (`ok`) or failed.
    pub fn delete_finished(&self, path: &str, seq: u64, ok: bool) -> io::Result<()> {
        let mut guard = self.lock();
        let (state, journal) = &mut *guard;
        if ok {
            let record = Record::StoreDeleted {
                path: path.to_string(),
                seq,
            };
            commit_record(state, journal, &record)?;
        }
        if let Some(d) = state.deletes.get_mut(path) {
            d.busy = false;
            if !ok {
                d.failures += 1;
                d.retry_at = Some(Instant::now() + backoff(d.failures));
            }
        }
        drop(guard);
        self.work_ready.notify_one();
        Ok(())
    }

    /// When the version of `path` being uploaded was closed.
    pub fn closed_at(&self, path: &str) -> Option<Instant> {
        self.lock().0.files.get(path).and_then(|e| e.closed_at)
    }

    pub fn pending(&self) -> Pending {
        let now = Instant::now();
        let guard = self.lock();
        let mut p = Pending {
            deletes: guard.0.deletes.len() as u64,
            ..Default::default()
        };
        for e in guard.0.files.values().filter(|e| e.upload_pending()) {
            p.files += 1;
            p.bytes += e.size;
            if let Some(t) = e.closed_at {
                let age = now.saturating_duration_since(t);
                p.oldest = Some(p.oldest.map_or(age, |o| o.max(age)));
            }
        }
        p
    }

    /// A commit's follow-up work starts (`true`) or ends (`false`).
    pub fn committing(&self, started: bool) {
        use std::sync::atomic::Ordering;
        if started {
            self.committing.fetch_add(1, Ordering::AcqRel);
        } else {
            self.committing.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Whether nothing is waiting for the store (uploads, deletes, retention) — for tests
    /// and shutdown.
    pub fn idle(&self) -> bool {
        if self.committing.load(std::sync::atomic::Ordering::Acquire) > 0 {
            return false;
        }
        let guard = self.lock();
        guard.0.deletes.is_empty()
            && guard.0.uploading.is_empty()
            && !guard.0.files.values().any(|e| e.upload_pending())
    }

    /// Whether any upload could still free space (so a waiting writer should keep waiting).
    pub fn uploads_outstanding(&self) -> bool {
        let guard = self.lock();
        !guard.0.uploading.is_empty() || guard.0.files.values().any(|e| e.upload_pending())
    }
}

/// Records appended before the journal is rewritten to what still matters: replay time and
/// disk use stay bounded however long a job runs.
const COMPACT_AFTER: u64 = 100_000;

/// Journals `record` and applies it; compacts the journal when it has grown long.
fn commit_record(state: &mut State, journal: &mut Journal, record: &Record) -> io::Result<()> {
    journal.append(record)?;
    state.apply(record);
    if journal.appended() > COMPACT_AFTER {
        let path = journal.path().to_path_buf();
        *journal = Journal::rewrite(&path, &state.snapshot())?;
    }
    Ok(())
}

/// 1 s, 2 s, 4 s … up to 30 s between attempts: a store outage costs few requests, and its
/// end is noticed within half a minute.
fn backoff(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.saturating_sub(1).min(5)).min(Duration::from_secs(30))
}

/// Regular files under `dir`, as paths relative to `root` with their sizes.
fn walk_files(root: &Path, dir: &Path, out: &mut Vec<(String, u64)>) -> io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let ft = entry.file_type()?;
        let path = entry.path();
        if ft.is_dir() {
            walk_files(root, &path, out)?;
        } else if ft.is_file() {
            let Ok(rel) = path.strip_prefix(root) else { continue };
            let Some(rel) = rel.to_str() else {
                tracing::warn!(path = %path.display(), "skipping a local file whose name is not UTF-8");
                continue;
            };
            out.push((rel.to_string(), entry.metadata()?.len()));
        }
    }
    Ok(())
}

pub type SharedTracker = Arc<Tracker>;

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path, marker: Option<&str>) -> (Tracker, Recovery) {
        std::fs::create_dir_all(dir.join("files")).expect("files dir");
        Tracker::open(
            &dir.join("journal.jsonl"),
            &dir.join("files"),
            1 << 30,
            marker.map(String::from),
        )
        .expect("open")
    }

    fn write_local(dir: &Path, path: &str, len: usize) {
        let p = dir.join("files").join(path);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(p, vec![7u8; len]).expect("write");
    }

    fn uploads(work: &[Work]) -> Vec<String> {
        let mut v: Vec<String> = work
            .iter()
            .filter_map(|w| match w {
                Work::Upload { path, .. } => Some(path.clone()),
                Work::Delete { .. } => None,
            })
            .collect();
        v.sort();
        v
    }

    #[test]
    fn the_marker_waits_for_every_other_file_of_its_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (t, _) = open(dir.path(), Some(".metadata"));
        for f in ["step1/a", "step1/sub/b", "step1/.metadata"] {
            write_local(dir.path(), f, 10);
            t.begin_write(f).expect("begin");
            t.closed(f, 10).expect("close");
            t.end_write(f);
        }
        let first = t.take_work(16);
        assert_eq!(uploads(&first), vec!["step1/a", "step1/sub/b"], "marker held back");
        t.upload_finished("step1/a", 2, true).expect("done");
        assert!(t.take_work(16).is_empty(), "b still uploading");
        let Work::Upload { seq, .. } = first[1].clone() else {
            panic!("upload")
        };
        t.upload_finished("step1/sub/b", seq, true).expect("done");
        assert_eq!(uploads(&t.take_work(16)), vec!["step1/.metadata"]);
    }

    #[test]
    fn a_restart_resumes_closed_files_and_holds_unfinished_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let (t, _) = open(dir.path(), None);
            for f in ["done", "pending", "open"] {
                write_local(dir.path(), f, 5);
                t.begin_write(f).expect("begin");
            }
            for f in ["done", "pending"] {
                t.closed(f, 5).expect("close");
                t.end_write(f);
            }
            let work = t.take_work(16);
            let Some(Work::Upload { seq, .. }) = work
                .iter()
                .find(|w| matches!(w, Work::Upload { path, .. } if path == "done"))
                .cloned()
            else {
                panic!("done is uploadable")
            };
            t.upload_finished("done", seq, true).expect("uploaded");
            // killed here: "pending" was being uploaded, "open" never closed
        }
        // A rename whose record never made it to the journal.
        write_local(dir.path(), "renamed", 3);
        let (t, recovery) = open(dir.path(), None);
        assert_eq!(recovery.unfinished_writes, vec!["open"]);
        assert_eq!(recovery.untracked, vec!["renamed"]);
        assert_eq!(uploads(&t.take_work(16)), vec!["pending", "renamed"]);
        assert!(t.entry("done").is_some_and(|e| e.is_clean()));
    }

    #[test]
    fn a_rename_uploads_the_new_name_and_deletes_the_old_object() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (t, _) = open(dir.path(), None);
        write_local(dir.path(), "tmp/x", 4);
        t.begin_write("tmp/x").expect("begin");
        t.closed("tmp/x", 4).expect("close");
        t.end_write("tmp/x");
        let Some(Work::Upload { seq, .. }) = t.take_work(1).pop() else {
            panic!("upload")
        };
        t.upload_finished("tmp/x", seq, true).expect("uploaded");
        std::fs::rename(dir.path().join("files/tmp"), dir.path().join("files/final")).expect("rename");
        t.moved("tmp", "final").expect("moved");
        let work = t.take_work(16);
        assert!(work
            .iter()
            .any(|w| matches!(w, Work::Delete { path, .. } if path == "tmp/x")));
        assert!(t.deleting("tmp/x"));
        assert!(t.entry("final/x").is_some_and(|e| e.upload_pending()));
        // The replay gives the same picture.
        drop(t);
        let (t, recovery) = open(dir.path(), None);
        assert_eq!(recovery.pending_deletes, 1);
        assert!(t.entry("final/x").is_some_and(|e| e.upload_pending()));
    }

    #[test]
    fn a_compacted_journal_replays_to_the_same_state() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut state = State {
            next_seq: 1,
            ..Default::default()
        };
        let records = [
            Record::Closed {
                path: "a".into(),
                seq: 1,
            },
            Record::Uploaded {
                path: "a".into(),
                seq: 1,
            },
            Record::Removed {
                path: "a".into(),
                seq: 2,
                store: true,
            },
            // A new file at the removed path, still open: the old object must still go.
            Record::Writing {
                path: "a".into(),
                seq: 3,
            },
            Record::Closed {
                path: "b".into(),
                seq: 4,
            },
            Record::Uploaded {
                path: "b".into(),
                seq: 4,
            },
            Record::Closed {
                path: "b".into(),
                seq: 5,
            },
            Record::Broken {
                path: "c".into(),
                seq: 6,
            },
        ];
        for r in &records {
            state.apply(r);
        }
        let path = dir.path().join("j");
        drop(Journal::rewrite(&path, &state.snapshot()).expect("rewrite"));
        let mut replayed = State::default();
        for r in Journal::read(&path).expect("read") {
            replayed.apply(&r);
        }
        assert!(
            replayed.deletes.contains_key("a"),
            "the old object of a is still to be deleted"
        );
        assert_eq!(replayed.files["a"].want, Want::Writing);
        let b = &replayed.files["b"];
        assert!(
            b.upload_pending() && b.in_store,
            "b: a newer version to upload over an older one"
        );
        assert_eq!(replayed.files["c"].want, Want::Broken);
        assert_eq!(replayed.next_seq, state.next_seq);
    }

    #[test]
    fn growth_is_refused_past_the_limit_and_a_file_larger_than_the_area_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("files")).expect("files");
        let (t, _) = Tracker::open(&dir.path().join("j"), &dir.path().join("files"), 100, None).expect("open");
        t.begin_write("a").expect("begin");
        t.begin_write("b").expect("begin");
        assert!(t.try_grow("a", 60).expect("fits"));
        assert!(!t.try_grow("b", 50).expect("not an error"), "area full: wait");
        assert!(t.try_grow("b", 40).expect("fits"));
        assert!(matches!(t.try_grow("a", 101), Err(NoSpace::TooLarge { .. })));
        assert_eq!(t.used(), 100);
    }
}
