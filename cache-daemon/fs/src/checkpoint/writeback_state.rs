//! The write-back area as a state machine without I/O and without a clock: what each file's
//! local copy is, what the store has and still needs, and which work may start. Journal
//! [`Record`]s change it through [`WritebackState::apply`], live and at replay alike; the
//! rest (writers, running uploads, retries) are the uploader's live facts, lost with the
//! process on purpose. Time comes in as an argument, so every step is reproducible in a test.
//!
//! Indexes keep the questions of the hot path O(1) or O(log n) instead of a scan of every
//! file under the lock: the uploads that may start, in version order; the deletes that may
//! start; the retries by due time; and per directory, how many paths under it are not yet
//! settled in the store, which is what a commit marker waits for.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use super::journal::Record;

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
    fn new(seq: u64, now: Instant) -> Self {
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
            last_used: now,
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

/// Work for the uploader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Work {
    Upload { path: String, seq: u64, size: u64 },
    Delete { path: String, seq: u64 },
}

/// What a change means for those waiting on the area.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub struct Effects {
    /// Something may have become uploadable or deletable: wake the uploader.
    pub work_ready: bool,
    /// Local bytes were freed: wake writers waiting for room.
    pub space_freed: bool,
}

pub use crate::fs_core::paths::{is_under, parent_of};

/// Whether `path` is the commit marker `marker` of its directory.
pub fn marks_commit(marker: Option<&str>, path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    marker == Some(name)
}

/// `path` with its leading `from` replaced by `to`.
fn moved_path(path: &str, from: &str, to: &str) -> String {
    format!("{to}{}", &path[from.len()..])
}

/// `path` itself and every directory above it, up to the root "": the directories `path`
/// is under, by [`is_under`].
fn self_and_ancestors(path: &str) -> impl Iterator<Item = &str> {
    let mut next = Some(path);
    std::iter::from_fn(move || {
        let current = next?;
        next = if current.is_empty() {
            None
        } else {
            Some(parent_of(current))
        };
        Some(current)
    })
}

/// Where a path stands in the indexes, kept so the old place can be left in O(log n).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Slots {
    /// Counted in `unsettled_under` of itself and its ancestors.
    unsettled: bool,
    /// Has a version still to upload (counted in `upload_pending`).
    pending: bool,
    upload: Option<Queued>,
    delete: Option<Queued>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Queued {
    /// May start now; ordered by version.
    Ready(u64),
    /// Retries at this time.
    Waiting(Instant),
}

#[derive(Debug, Default)]
pub struct WritebackState {
    files: HashMap<String, FileEntry>,
    /// Store objects to delete, by path, with the version of the removal.
    deletes: HashMap<String, DeleteEntry>,
    next_seq: u64,
    /// Bytes of local copies.
    used: u64,
    /// Paths whose upload is running. Kept apart from the entries: a rename moves an entry
    /// while its old path's upload still runs.
    uploading: HashSet<String>,
    /// The commit marker's file name, if the volume has one.
    marker: Option<String>,

    slots: HashMap<String, Slots>,
    /// Per directory (and per path, for itself): paths under it whose local file is not what
    /// the store has, whose upload runs, or whose store object is still to be deleted.
    unsettled_under: HashMap<String, u64>,
    uploads_ready: BTreeSet<(u64, String)>,
    uploads_waiting: BTreeSet<(Instant, String)>,
    deletes_ready: BTreeSet<String>,
    deletes_waiting: BTreeSet<(Instant, String)>,
    /// Files with a version still to upload.
    upload_pending: u64,
    /// Markers wait for the commit coordinator too (other nodes write the same volume).
    coordinated: bool,
    /// How long a closed file waits before its upload starts, so a file renamed right after
    /// close (DCP's `.metadata.tmp`) is uploaded once, under its final name.
    upload_grace: Duration,
    /// Markers the coordinator cleared: no node has anything unsettled in their directory.
    /// Not journaled: after a restart the coordinator is asked again.
    cleared: HashSet<String>,
}

impl WritebackState {
    pub fn new(marker: Option<String>) -> Self {
        WritebackState {
            next_seq: 1,
            marker,
            ..Default::default()
        }
    }

    // ---- reading ----

    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    pub fn used(&self) -> u64 {
        self.used
    }

    pub fn file(&self, path: &str) -> Option<&FileEntry> {
        self.files.get(path)
    }

    pub fn files(&self) -> impl Iterator<Item = (&String, &FileEntry)> {
        self.files.iter()
    }

    pub fn deletes(&self) -> impl Iterator<Item = (&String, &DeleteEntry)> {
        self.deletes.iter()
    }

    pub fn deleting(&self, path: &str) -> bool {
        self.deletes.contains_key(path)
    }

    pub fn is_uploading(&self, path: &str) -> bool {
        self.uploading.contains(path)
    }

    /// Whether a running upload is `dir` or under it.
    pub fn uploading_under(&self, dir: &str) -> bool {
        if dir.is_empty() {
            return !self.uploading.is_empty();
        }
        self.uploading.iter().any(|p| is_under(p, dir))
    }

    /// Whether `path` is a commit marker, and so a checkpoint's last file.
    pub fn marks_commit(&self, path: &str) -> bool {
        marks_commit(self.marker.as_deref(), path)
    }

    /// Whether nothing is waiting for the store: no upload to make or running, no delete.
    pub fn idle(&self) -> bool {
        self.deletes.is_empty() && self.uploading.is_empty() && self.upload_pending == 0
    }

    /// Whether any upload could still free space.
    pub fn uploads_outstanding(&self) -> bool {
        !self.uploading.is_empty() || self.upload_pending > 0
    }

    /// Paths under `dir` not yet settled in the store (see `unsettled_under`).
    pub fn unsettled_under(&self, dir: &str) -> u64 {
        self.unsettled_under.get(dir).copied().unwrap_or(0)
    }

    /// Whether the marker at `path` may be uploaded: everything else under its directory is
    /// in the store, and nothing there is being uploaded or deleted; on a coordinated volume,
    /// the coordinator also found nothing unsettled there on any other node.
    pub fn marker_ready(&self, path: &str) -> bool {
        self.settled_here(path) && (!self.coordinated || self.cleared.contains(path))
    }

    /// Whether everything else under the marker's directory is settled on this node.
    fn settled_here(&self, path: &str) -> bool {
        let own = u64::from(self.slots.get(path).is_some_and(|s| s.unsettled));
        self.unsettled_under(parent_of(path)) == own
    }

    /// Holds each closed version `grace` before its upload (see `upload_grace`).
    pub fn set_upload_grace(&mut self, grace: Duration) {
        self.upload_grace = grace;
    }

    /// Makes markers wait for [`Self::clear_marker`] as well (see `coordinated`).
    pub fn set_coordinated(&mut self, on: bool) {
        self.coordinated = on;
    }

    /// Markers ready to upload but for the coordinator's word.
    pub fn markers_to_clear(&self) -> Vec<String> {
        if !self.coordinated {
            return Vec::new();
        }
        self.uploads_ready
            .iter()
            .map(|(_, p)| p)
            .filter(|p| self.marks_commit(p) && !self.cleared.contains(p.as_str()) && self.settled_here(p))
            .cloned()
            .collect()
    }

    /// The coordinator found the marker's directory settled on every node.
    pub fn clear_marker(&mut self, path: &str) {
        self.cleared.insert(path.to_string());
    }

    /// Every path not settled in the store (what the commit coordinator is told).
    pub fn unsettled_paths(&self) -> impl Iterator<Item = &String> {
        self.slots.iter().filter(|(_, s)| s.unsettled).map(|(p, _)| p)
    }

    // ---- journaled changes ----

    /// The single place a journal record changes the state.
    pub fn apply(&mut self, record: &Record, now: Instant) -> Effects {
        self.next_seq = self.next_seq.max(record.seq() + 1);
        let mut effects = Effects {
            work_ready: true,
            space_freed: false,
        };
        match record {
            Record::Writing { path, seq } => {
                let e = self.entry(path, *seq, now);
                e.want = Want::Writing;
                e.want_seq = *seq;
                self.touch(path);
            }
            Record::Closed { path, seq } => {
                let grace = self.upload_grace;
                let e = self.entry(path, *seq, now);
                e.want = Want::Upload;
                e.want_seq = *seq;
                e.closed_at = Some(now);
                e.failures = 0;
                e.retry_at = (!grace.is_zero()).then(|| now + grace);
                // The upload overwrites whatever the store has at this path.
                self.deletes.remove(path);
                self.touch(path);
            }
            Record::Uploaded { path, seq } => {
                if let Some(e) = self.files.get_mut(path) {
                    e.in_store = true;
                    if e.want_seq == *seq {
                        e.done_seq = *seq;
                    }
                }
                self.touch(path);
                effects.space_freed = true;
            }
            Record::Broken { path, seq } => {
                let e = self.entry(path, *seq, now);
                e.want = Want::Broken;
                e.want_seq = *seq;
                self.touch(path);
            }
            Record::Removed { path, seq, store } => {
                effects.space_freed = self.drop_entry(path);
                if *store {
                    self.deletes.insert(path.clone(), DeleteEntry::new(*seq));
                }
                self.touch(path);
            }
            Record::StoreDeleted { path, seq } => {
                if self.deletes.get(path).is_some_and(|d| d.seq == *seq) {
                    self.deletes.remove(path);
                }
                self.touch(path);
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
                        e.closed_at.get_or_insert(now);
                    }
                    self.deletes.remove(&new);
                    if let Some(replaced) = self.files.insert(new.clone(), e) {
                        self.used = self.used.saturating_sub(replaced.size);
                        effects.space_freed = true;
                    }
                    self.touch(&old);
                    self.touch(&new);
                }
            }
            Record::Evicted { path } => {
                effects.space_freed = self.drop_entry(path);
                self.touch(path);
                effects.work_ready = false;
            }
            Record::Fetched { path, seq } => {
                let e = self.entry(path, *seq, now);
                e.want = Want::Upload;
                e.want_seq = *seq;
                e.done_seq = *seq;
                e.in_store = true;
                e.closed_at = None;
                self.touch(path);
                effects.work_ready = false;
            }
        }
        effects
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
            if e.in_store && !e.is_clean() {
                // "The store has an older version" (`done_seq`, or 0 for one that is not
                // ours), so a later rename or removal deletes it. First, as the version the
                // store has: an `Uploaded` after `Closed` would not set `done_seq`, and after a
                // `Writing` nothing would say the store holds the path.
                out.push(Record::Fetched {
                    path: path.clone(),
                    seq: e.done_seq,
                });
            }
            match e.want {
                Want::Writing => out.push(Record::Writing { path, seq }),
                Want::Broken => out.push(Record::Broken { path, seq }),
                Want::Upload if e.is_clean() => out.push(Record::Fetched { path, seq }),
                Want::Upload => out.push(Record::Closed { path, seq }),
            }
        }
        out
    }

    // ---- live changes (not journaled) ----

    /// A handle opened `path` for writing (its `Writing` record, if needed, applied first).
    pub fn writer_opened(&mut self, path: &str, now: Instant) {
        let seq = self.next_seq;
        let e = self.entry(path, seq, now);
        e.writers += 1;
        e.last_used = now;
        self.touch(path);
    }

    /// A writing handle of `path` was released.
    pub fn writer_released(&mut self, path: &str, now: Instant) -> Effects {
        if let Some(e) = self.files.get_mut(path) {
            e.writers = e.writers.saturating_sub(1);
            e.last_used = now;
        }
        self.touch(path);
        Effects {
            work_ready: true,
            space_freed: false,
        }
    }

    /// Sets the accounted size of `path`.
    pub fn set_size(&mut self, path: &str, size: u64) -> Effects {
        let before = self.used;
        if let Some(e) = self.files.get_mut(path) {
            self.used = self.used.saturating_sub(e.size) + size;
            e.size = size;
        }
        Effects {
            work_ready: false,
            space_freed: self.used < before,
        }
    }

    /// Reserves room for `path` to grow to `end` bytes within `limit`; false when it does not fit.
    pub fn try_grow(&mut self, path: &str, end: u64, limit: u64) -> bool {
        let Some(e) = self.files.get_mut(path) else { return true };
        if end <= e.size {
            return true;
        }
        let delta = end - e.size;
        if self.used + delta > limit {
            return false;
        }
        e.size = end;
        self.used += delta;
        true
    }

    /// Forgets a file the replay knew but the disk does not have.
    pub fn forget_missing(&mut self, path: &str) {
        self.drop_entry(path);
        self.touch(path);
    }

    /// Up to `max` pieces of work that may start at `now`, marked running. Deletes first;
    /// then uploads, oldest version first, a marker only once [`Self::marker_ready`].
    pub fn take_work(&mut self, max: usize, now: Instant) -> Vec<Work> {
        self.promote_due(now);
        let mut work = Vec::new();
        let deletes: Vec<String> = self.deletes_ready.iter().take(max).cloned().collect();
        for path in deletes {
            if let Some(d) = self.deletes.get_mut(&path) {
                d.busy = true;
                work.push(Work::Delete {
                    path: path.clone(),
                    seq: d.seq,
                });
            }
            self.touch(&path);
        }
        let mut uploads = Vec::new();
        for (seq, path) in &self.uploads_ready {
            if work.len() + uploads.len() >= max {
                break;
            }
            if self.marks_commit(path) && !self.marker_ready(path) {
                continue;
            }
            let size = self.files.get(path).map_or(0, |e| e.size);
            uploads.push(Work::Upload {
                path: path.clone(),
                seq: *seq,
                size,
            });
        }
        for w in &uploads {
            if let Work::Upload { path, .. } = w {
                self.uploading.insert(path.clone());
                self.touch(path);
            }
        }
        work.extend(uploads);
        work
    }

    /// An upload of `path` failed: it retries after `backoff`.
    pub fn upload_failed(&mut self, path: &str, now: Instant, backoff: impl Fn(u32) -> Duration) -> Effects {
        self.uploading.remove(path);
        // A retry asks the coordinator again.
        self.cleared.remove(path);
        if let Some(e) = self.files.get_mut(path) {
            e.failures += 1;
            e.retry_at = Some(now + backoff(e.failures));
        }
        self.touch(path);
        Effects {
            work_ready: true,
            space_freed: false,
        }
    }

    /// An upload of `path` ended (its `Uploaded` record, if it succeeded, applied after).
    pub fn upload_ended(&mut self, path: &str) {
        self.uploading.remove(path);
        self.cleared.remove(path);
        if let Some(e) = self.files.get_mut(path) {
            e.failures = 0;
            e.retry_at = None;
        }
        self.touch(path);
    }

    /// A delete of `path` ended; when it failed it retries after `backoff`.
    pub fn delete_ended(&mut self, path: &str, ok: bool, now: Instant, backoff: impl Fn(u32) -> Duration) {
        if let Some(d) = self.deletes.get_mut(path) {
            d.busy = false;
            if !ok {
                d.failures += 1;
                d.retry_at = Some(now + backoff(d.failures));
            }
        }
        self.touch(path);
    }

    // ---- the indexes ----

    fn entry(&mut self, path: &str, seq: u64, now: Instant) -> &mut FileEntry {
        self.files
            .entry(path.to_string())
            .or_insert_with(|| FileEntry::new(seq, now))
    }

    /// Drops the entry of `path`; whether it held local bytes.
    fn drop_entry(&mut self, path: &str) -> bool {
        match self.files.remove(path) {
            Some(e) => {
                self.used = self.used.saturating_sub(e.size);
                e.size > 0
            }
            None => false,
        }
    }

    /// Moves retries that are due into the ready queues.
    fn promote_due(&mut self, now: Instant) {
        while let Some((at, path)) = self.uploads_waiting.first().cloned() {
            if at > now {
                break;
            }
            if let Some(e) = self.files.get_mut(&path) {
                e.retry_at = None;
            }
            self.uploads_waiting.remove(&(at, path.clone()));
            self.touch(&path);
        }
        while let Some((at, path)) = self.deletes_waiting.first().cloned() {
            if at > now {
                break;
            }
            if let Some(d) = self.deletes.get_mut(&path) {
                d.retry_at = None;
            }
            self.deletes_waiting.remove(&(at, path.clone()));
            self.touch(&path);
        }
    }

    /// Where `path` belongs in the indexes, from its entries alone.
    fn slots_of(&self, path: &str) -> Slots {
        let file = self.files.get(path);
        let delete = self.deletes.get(path);
        let uploading = self.uploading.contains(path);
        let unsettled = file.is_some_and(|e| !e.is_clean()) || uploading || delete.is_some();
        let pending = file.is_some_and(|e| e.upload_pending());
        let upload = file
            .filter(|e| e.upload_pending() && e.writers == 0 && !uploading && delete.is_none())
            .map(|e| match e.retry_at {
                Some(at) => Queued::Waiting(at),
                None => Queued::Ready(e.want_seq),
            });
        // Not while an upload of the same key runs: the delete would remove it.
        let delete = delete.filter(|d| !d.busy && !uploading).map(|d| match d.retry_at {
            Some(at) => Queued::Waiting(at),
            None => Queued::Ready(d.seq),
        });
        Slots {
            unsettled,
            pending,
            upload,
            delete,
        }
    }

    /// Brings the indexes of `path` up to date after any change to its entries.
    fn touch(&mut self, path: &str) {
        let new = self.slots_of(path);
        let old = self.slots.get(path).cloned().unwrap_or_default();
        if new == old {
            return;
        }
        if new.unsettled != old.unsettled {
            for dir in self_and_ancestors(path) {
                let count = self.unsettled_under.entry(dir.to_string()).or_insert(0);
                if new.unsettled {
                    *count += 1;
                } else {
                    *count -= 1;
                    if *count == 0 {
                        self.unsettled_under.remove(dir);
                    }
                }
            }
        }
        if new.upload != old.upload {
            match old.upload {
                Some(Queued::Ready(seq)) => {
                    self.uploads_ready.remove(&(seq, path.to_string()));
                }
                Some(Queued::Waiting(at)) => {
                    self.uploads_waiting.remove(&(at, path.to_string()));
                }
                None => {}
            }
            match new.upload {
                Some(Queued::Ready(seq)) => {
                    self.uploads_ready.insert((seq, path.to_string()));
                }
                Some(Queued::Waiting(at)) => {
                    self.uploads_waiting.insert((at, path.to_string()));
                }
                None => {}
            }
        }
        if new.delete != old.delete {
            match old.delete {
                Some(Queued::Ready(_)) => {
                    self.deletes_ready.remove(path);
                }
                Some(Queued::Waiting(at)) => {
                    self.deletes_waiting.remove(&(at, path.to_string()));
                }
                None => {}
            }
            match new.delete {
                Some(Queued::Ready(_)) => {
                    self.deletes_ready.insert(path.to_string());
                }
                Some(Queued::Waiting(at)) => {
                    self.deletes_waiting.insert((at, path.to_string()));
                }
                None => {}
            }
        }
        match (old.pending, new.pending) {
            (false, true) => self.upload_pending += 1,
            (true, false) => self.upload_pending -= 1,
            _ => {}
        }
        if new == Slots::default() {
            self.slots.remove(path);
        } else {
            self.slots.insert(path.to_string(), new);
        }
    }

    /// Recomputes every index from the entries and compares (for tests).
    #[cfg(test)]
    pub(crate) fn check_indexes(&self) -> Result<(), String> {
        let mut paths: HashSet<&str> = self.files.keys().map(String::as_str).collect();
        paths.extend(self.deletes.keys().map(String::as_str));
        paths.extend(self.uploading.iter().map(String::as_str));
        let mut unsettled: HashMap<String, u64> = HashMap::new();
        for p in &paths {
            let s = self.slots_of(p);
            if self.slots.get(*p).cloned().unwrap_or_default() != s {
                return Err(format!("slots of {p:?}: {:?}, recomputed {s:?}", self.slots.get(*p)));
            }
            if s.unsettled {
                for dir in self_and_ancestors(p) {
                    *unsettled.entry(dir.to_string()).or_insert(0) += 1;
                }
            }
        }
        if unsettled != self.unsettled_under {
            return Err(format!(
                "unsettled_under {:?}, recomputed {unsettled:?}",
                self.unsettled_under
            ));
        }
        if self.slots.keys().any(|p| !paths.contains(p.as_str())) {
            return Err("a slot for a path with no entry".into());
        }
        let pending = self.files.values().filter(|e| e.upload_pending()).count() as u64;
        if pending != self.upload_pending {
            return Err(format!(
                "upload_pending {} but {pending} files pend",
                self.upload_pending
            ));
        }
        let used: u64 = self.files.values().map(|e| e.size).sum();
        if used != self.used {
            return Err(format!("used {} but files hold {used}", self.used));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! `WritebackState` against a reference: random sequences of what the filesystem and the
    //! uploader do (open, write, close, unlink, rename, uploads and deletes that succeed or
    //! fail, time passing, and crashes), with the journal kept in memory.

    use super::*;
    use proptest::prelude::*;

    const LIMIT: u64 = 64;
    const MARKER: &str = ".metadata";
    const PATHS: &[&str] = &[
        "s1/a",
        "s1/b",
        "s1/.metadata",
        "s1/sub/a",
        "s1/sub/.metadata",
        "s2/a",
        "s2/.metadata",
        "top",
    ];
    const RENAMES: &[(&str, &str)] = &[
        ("s1", "s2"),
        ("s2", "s1"),
        ("s1/sub", "s2/sub"),
        ("s1/a", "s1/b"),
        ("s2/a", "s1/.metadata"),
    ];

    #[derive(Debug, Clone)]
    enum Op {
        Open(usize),
        Grow(usize, u64),
        Close(usize),
        Unlink(usize),
        Rename(usize),
        Take(usize),
        Finish(usize, bool),
        Tick(u64),
        Crash,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0..PATHS.len()).prop_map(Op::Open),
            3 => (0..PATHS.len(), 1..24u64).prop_map(|(p, n)| Op::Grow(p, n)),
            3 => (0..PATHS.len()).prop_map(Op::Close),
            1 => (0..PATHS.len()).prop_map(Op::Unlink),
            1 => (0..RENAMES.len()).prop_map(Op::Rename),
            3 => prop_oneof![Just(1usize), Just(2), Just(100)].prop_map(Op::Take),
            3 => (0..8usize, proptest::bool::weighted(0.8)).prop_map(|(i, ok)| Op::Finish(i, ok)),
            1 => (0..40u64).prop_map(Op::Tick),
            1 => Just(Op::Crash),
        ]
    }

    /// The state, its journal, and what the uploader and the writers hold, as the tracker
    /// and uploader keep them.
    struct Model {
        state: WritebackState,
        journal: Vec<Record>,
        running: Vec<Work>,
        now: Instant,
    }

    fn backoff(failures: u32) -> Duration {
        Duration::from_secs(u64::from(failures.min(4)))
    }

    impl Model {
        fn new() -> Self {
            Model {
                state: WritebackState::new(Some(MARKER.into())),
                journal: Vec::new(),
                running: Vec::new(),
                now: Instant::now(),
            }
        }

        fn record(&mut self, make: impl FnOnce(u64) -> Record) {
            let record = make(self.state.next_seq());
            let _ = self.state.apply(&record, self.now);
            self.journal.push(record);
        }

        fn step(&mut self, op: &Op) -> Result<(), TestCaseError> {
            match *op {
                Op::Open(i) => {
                    let path = PATHS[i];
                    if self.state.file(path).is_none_or(|e| e.want != Want::Writing) {
                        self.record(|seq| Record::Writing { path: path.into(), seq });
                    }
                    self.state.writer_opened(path, self.now);
                }
                Op::Grow(i, n) => {
                    let path = PATHS[i];
                    if let Some(e) = self.state.file(path).filter(|e| e.writers > 0) {
                        let (before, end) = (self.state.used(), e.size + n);
                        let grew = self.state.try_grow(path, end, LIMIT);
                        prop_assert_eq!(grew, before + n <= LIMIT, "growth refused only past the limit");
                    }
                }
                Op::Close(i) => {
                    let path = PATHS[i];
                    if self.state.file(path).is_some_and(|e| e.writers > 0) {
                        if self.state.file(path).is_some_and(|e| e.want == Want::Writing) {
                            self.record(|seq| Record::Closed { path: path.into(), seq });
                        }
                        let _ = self.state.writer_released(path, self.now);
                    }
                }
                Op::Unlink(i) => {
                    let path = PATHS[i];
                    if self.state.file(path).is_some() {
                        let store = self.state.is_uploading(path) || self.state.file(path).is_some_and(|e| e.in_store);
                        self.record(|seq| Record::Removed {
                            path: path.into(),
                            seq,
                            store,
                        });
                    }
                }
                Op::Rename(i) => {
                    let (from, to) = RENAMES[i];
                    let store = self.state.uploading_under(from)
                        || self.state.files().any(|(p, e)| is_under(p, from) && e.in_store);
                    self.record(|seq| Record::Moved {
                        from: from.into(),
                        to: to.into(),
                        seq,
                        store,
                    });
                }
                Op::Take(max) => {
                    let expected = reference_work(&self.state, self.now);
                    let work = self.state.take_work(max, self.now);
                    prop_assert!(work.len() <= max);
                    for w in &work {
                        prop_assert!(expected.contains(w), "{w:?} may not start; allowed: {expected:?}");
                    }
                    if max >= PATHS.len() * 2 {
                        prop_assert_eq!(work.len(), expected.len(), "everything allowed starts");
                    }
                    self.running.extend(work);
                }
                Op::Finish(i, ok) => {
                    if i < self.running.len() {
                        match self.running.remove(i) {
                            Work::Upload { path, seq, .. } => {
                                if ok {
                                    self.state.upload_ended(&path);
                                    self.record(|_| Record::Uploaded {
                                        path: path.clone(),
                                        seq,
                                    });
                                } else {
                                    let _ = self.state.upload_failed(&path, self.now, backoff);
                                }
                            }
                            Work::Delete { path, seq } => {
                                if ok {
                                    self.record(|_| Record::StoreDeleted {
                                        path: path.clone(),
                                        seq,
                                    });
                                }
                                self.state.delete_ended(&path, ok, self.now, backoff);
                            }
                        }
                    }
                }
                Op::Tick(secs) => self.now += Duration::from_secs(secs),
                Op::Crash => {
                    // The restarted daemon replays the journal and finds the files on disk
                    // (their sizes); running uploads and open handles died with the process.
                    let before = self.state.snapshot();
                    let sizes: Vec<(String, u64)> = self.state.files().map(|(p, e)| (p.clone(), e.size)).collect();
                    let mut replayed = WritebackState::new(Some(MARKER.into()));
                    for r in &self.journal {
                        let _ = replayed.apply(r, self.now);
                    }
                    prop_assert_eq!(
                        &replayed.snapshot(),
                        &before,
                        "replay equals the state before the crash"
                    );
                    // A compacted journal keeps the versions it still refers to, not the highest
                    // number ever used: numbers above them may be given out again, harmlessly.
                    prop_assert!(replayed.next_seq() <= self.state.next_seq());
                    for (path, size) in sizes {
                        let _ = replayed.set_size(&path, size);
                    }
                    // The journal is compacted at open; the compacted one replays the same.
                    self.journal = replayed.snapshot();
                    let mut compacted = WritebackState::new(Some(MARKER.into()));
                    for r in &self.journal {
                        let _ = compacted.apply(r, self.now);
                    }
                    prop_assert_eq!(compacted.snapshot(), before, "a compacted journal replays the same");
                    self.state = replayed;
                    self.running.clear();
                }
            }
            self.check()
        }

        fn check(&self) -> Result<(), TestCaseError> {
            self.state.check_indexes().map_err(TestCaseError::fail)?;
            prop_assert!(self.state.used() <= LIMIT, "used {} over the limit", self.state.used());
            // A marker is never ready while anything else under its directory is unsettled.
            for (path, _) in self.state.files() {
                if self.state.marks_commit(path) && self.state.marker_ready(path) {
                    let dir = parent_of(path);
                    for (p, e) in self.state.files() {
                        if p != path && is_under(p, dir) {
                            prop_assert!(
                                e.is_clean() && !self.state.is_uploading(p),
                                "marker {path} ready while {p} is {e:?}"
                            );
                        }
                    }
                    prop_assert!(!self.state.deletes().any(|(p, _)| is_under(p, dir) && p != path));
                }
            }
            Ok(())
        }
    }

    /// What may start, by a scan of everything (the tracker's rules before the indexes).
    fn reference_work(state: &WritebackState, now: Instant) -> Vec<Work> {
        let due = |at: Option<Instant>| at.is_none_or(|t| t <= now);
        let mut work = Vec::new();
        for (path, d) in state.deletes() {
            if !d.busy && due(d.retry_at) && !state.is_uploading(path) {
                work.push(Work::Delete {
                    path: path.clone(),
                    seq: d.seq,
                });
            }
        }
        for (path, e) in state.files() {
            let startable = e.upload_pending()
                && e.writers == 0
                && !state.is_uploading(path)
                && due(e.retry_at)
                && !state.deleting(path);
            if !startable {
                continue;
            }
            if state.marks_commit(path) {
                let dir = parent_of(path);
                let others_done = state
                    .files()
                    .filter(|(p, _)| *p != path && is_under(p, dir))
                    .all(|(p, e)| e.is_clean() && !state.is_uploading(p))
                    && !state.uploading_under(dir)
                    && !state.deletes().any(|(p, _)| is_under(p, dir) && p != path);
                if !others_done {
                    continue;
                }
            }
            work.push(Work::Upload {
                path: path.clone(),
                seq: e.want_seq,
                size: e.size,
            });
        }
        work
    }

    proptest! {
        // PROPTEST_CASES=5000 for a longer search.
        #![proptest_config(ProptestConfig { cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256), ..ProptestConfig::default() })]

        #[test]
        fn the_indexes_the_marker_rule_replay_and_space_hold(ops in proptest::collection::vec(op(), 1..120)) {
            let mut model = Model::new();
            for op in &ops {
                model.step(op)?;
            }
            // Drain: with every file closed and every upload succeeding, the area settles.
            model.now += Duration::from_secs(3600);
            let open: Vec<String> = model.state.files().filter(|(_, e)| e.writers > 0).map(|(p, _)| p.clone()).collect();
            for path in open {
                let i = PATHS.iter().position(|p| *p == path);
                while model.state.file(&path).is_some_and(|e| e.writers > 0) {
                    match i {
                        Some(i) => model.step(&Op::Close(i))?,
                        None => { let _ = model.state.writer_released(&path, model.now); }
                    }
                }
            }
            for _ in 0..64 {
                while !model.running.is_empty() {
                    model.step(&Op::Finish(0, true))?;
                }
                model.step(&Op::Take(100))?;
                if model.running.is_empty() {
                    break;
                }
            }
            // What is left unsettled is what must be: a broken version, a write a crash left
            // unfinished, or a marker held back by one of those.
            for (path, e) in model.state.files() {
                let held = match e.want {
                    Want::Broken | Want::Writing => true,
                    Want::Upload => e.is_clean() || (model.state.marks_commit(path) && !model.state.marker_ready(path)),
                };
                prop_assert!(held, "{path} never reached the store: {e:?}");
            }
            prop_assert_eq!(model.state.deletes().count(), 0, "every delete ran");
        }
    }
}
