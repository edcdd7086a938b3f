//! The write-back area of a checkpoint volume, shared by the filesystem and the uploader:
//! the [`WritebackState`] behind one lock, the journal every change goes through first, and
//! the wake-ups of those waiting on it. Every change is a journal [`Record`] applied by
//! [`WritebackState::apply`], live and at replay alike, so a restarted daemon continues where
//! the dead one stopped. Space in the area is accounted here too: writes reserve what they add.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::journal::{Journal, Record};
pub use super::writeback_state::{is_under, parent_of, DeleteEntry, Effects, FileEntry, Want, Work, WritebackState};

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
    state: Mutex<(WritebackState, Journal)>,
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

const BOTH: Effects = Effects {
    work_ready: true,
    space_freed: true,
};

impl Tracker {
    /// Replays the journal at `journal_path`, reconciles it with the files under
    /// `files_root`, and rewrites the journal compactly.
    pub fn open(
        journal_path: &Path,
        files_root: &Path,
        limit: u64,
        marker: Option<String>,
    ) -> io::Result<(Tracker, Recovery)> {
        let now = Instant::now();
        let mut state = WritebackState::new(marker.clone());
        for record in Journal::read(journal_path)? {
            let _ = state.apply(&record, now);
        }
        let mut recovery = Recovery::default();
        // Local sizes, and files the journal does not know: a crash between a rename and
        // its record leaves one; it was closed (renames happen after writing), so upload it.
        let mut local = Vec::new();
        walk_files(files_root, files_root, &mut local)?;
        let mut seen = std::collections::HashSet::new();
        for (path, size) in local {
            seen.insert(path.clone());
            if state.file(&path).is_none() {
                let seq = state.next_seq();
                let _ = state.apply(
                    &Record::Closed {
                        path: path.clone(),
                        seq,
                    },
                    now,
                );
                recovery.untracked.push(path.clone());
            }
            let _ = state.set_size(&path, size);
        }
        let missing: Vec<String> = state
            .files()
            .map(|(p, _)| p)
            .filter(|p| !seen.contains(*p))
            .cloned()
            .collect();
        for path in missing {
            if state.file(&path).is_some_and(|e| e.upload_pending()) {
                recovery.lost.push(path.clone());
            }
            state.forget_missing(&path);
        }
        for (path, e) in state.files() {
            match e.want {
                Want::Writing => recovery.unfinished_writes.push(path.clone()),
                Want::Upload if e.upload_pending() => recovery.pending_uploads += 1,
                _ => {}
            }
        }
        recovery.unfinished_writes.sort();
        recovery.pending_deletes = state.deletes().count();
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

    fn lock(&self) -> MutexGuard<'_, (WritebackState, Journal)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wakes whoever `effects` concern.
    fn wake(&self, effects: Effects) {
        if effects.space_freed {
            self.space_freed.notify_waiters();
        }
        if effects.work_ready {
            self.work_ready.notify_one();
        }
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
        self.lock().0.used()
    }

    pub fn marker(&self) -> Option<&str> {
        self.marker.as_deref()
    }

    /// Journals `make(seq)` with a fresh version number and applies it.
    fn record(&self, make: impl FnOnce(u64) -> Record) -> io::Result<Effects> {
        let mut guard = self.lock();
        let (state, journal) = &mut *guard;
        let record = make(state.next_seq());
        commit_record(state, journal, &record)
    }

    pub fn sync_journal(&self) -> io::Result<()> {
        self.lock().1.sync()
    }

    /// A handle opened `path` for writing.
    pub fn begin_write(&self, path: &str) -> io::Result<()> {
        let mut guard = self.lock();
        let (state, journal) = &mut *guard;
        if state.file(path).is_none_or(|e| e.want != Want::Writing) {
            let record = Record::Writing {
                path: path.to_string(),
                seq: state.next_seq(),
            };
            let _ = commit_record(state, journal, &record)?;
        }
        state.writer_opened(path, Instant::now());
        Ok(())
    }

    /// A writing handle of `path` was closed: the bytes written so far are a version for
    /// the store. `size` is the local file's size now.
    pub fn closed(&self, path: &str, size: u64) -> io::Result<()> {
        let effects = {
            let mut guard = self.lock();
            let (state, journal) = &mut *guard;
            let Some(e) = state.file(path) else { return Ok(()) };
            let mut effects = Effects::default();
            if e.want == Want::Writing {
                let record = Record::Closed {
                    path: path.to_string(),
                    seq: state.next_seq(),
                };
                effects = commit_record(state, journal, &record)?;
            }
            let _ = state.set_size(path, size);
            effects
        };
        self.wake(Effects {
            work_ready: true,
            ..effects
        });
        Ok(())
    }

    /// A writing handle of `path` was released (the last reference to its open file).
    pub fn end_write(&self, path: &str) {
        let effects = self.lock().0.writer_released(path, Instant::now());
        self.wake(effects);
    }

    /// A write to `path` failed: this version must never reach the store.
    pub fn broken(&self, path: &str) -> io::Result<()> {
        let known = self.lock().0.file(path).is_some_and(|e| e.want != Want::Broken);
        if known {
            let _ = self.record(|seq| Record::Broken {
                path: path.to_string(),
                seq,
            })?;
        }
        Ok(())
    }

    /// A file that exists only in the store was copied into the area.
    pub fn fetched(&self, path: &str, size: u64) -> io::Result<()> {
        let mut guard = self.lock();
        let (state, journal) = &mut *guard;
        let record = Record::Fetched {
            path: path.to_string(),
            seq: state.next_seq(),
        };
        let _ = commit_record(state, journal, &record)?;
        let _ = state.set_size(path, size);
        Ok(())
    }

    /// `path` was removed; `in_store` says the store holds it (a file only the store had).
    pub fn removed(&self, path: &str, in_store: bool) -> io::Result<()> {
        let store = {
            let guard = self.lock();
            in_store || guard.0.is_uploading(path) || guard.0.file(path).is_some_and(|e| e.in_store)
        };
        let effects = self.record(|seq| Record::Removed {
            path: path.to_string(),
            seq,
            store,
        })?;
        self.wake(Effects {
            space_freed: true,
            ..effects
        });
        Ok(())
    }

    /// `from` (a file, or a directory with everything under it) was renamed to `to`.
    pub fn moved(&self, from: &str, to: &str) -> io::Result<()> {
        let store = {
            let guard = self.lock();
            let state = &guard.0;
            state.uploading_under(from) || state.files().any(|(p, e)| is_under(p, from) && e.in_store)
        };
        let effects = self.record(|seq| Record::Moved {
            from: from.to_string(),
            to: to.to_string(),
            seq,
            store,
        })?;
        self.wake(effects);
        Ok(())
    }

    /// Sets the accounted size of `path` (after a truncate, or from the file itself).
    pub fn set_size(&self, path: &str, size: u64) {
        let effects = self.lock().0.set_size(path, size);
        self.wake(effects);
    }

    /// Reserves room for `path` to grow to `end` bytes; false when the area is full.
    pub fn try_grow(&self, path: &str, end: u64) -> Result<bool, NoSpace> {
        let mut guard = self.lock();
        let state = &mut guard.0;
        let Some(e) = state.file(path) else {
            return Ok(true);
        };
        if end > e.size && end > self.limit {
            return Err(NoSpace::TooLarge {
                path: path.to_string(),
                needed: end,
                limit: self.limit,
            });
        }
        Ok(state.try_grow(path, end, self.limit))
    }

    /// Files whose local copies can be dropped (uploaded, not open for writing), least
    /// recently used first; the latest committed checkpoint's files come last.
    pub fn eviction_candidates(&self) -> Vec<(String, u64)> {
        let latest = self.latest_commit();
        let guard = self.lock();
        let state = &guard.0;
        let mut candidates: Vec<(bool, Instant, String, u64)> = state
            .files()
            .filter(|(p, e)| e.is_clean() && e.writers == 0 && !state.is_uploading(p))
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
        let Some(e) = state.file(path) else { return Ok(0) };
        if !(e.is_clean() && e.writers == 0 && !state.is_uploading(path)) {
            return Ok(0);
        }
        let size = e.size;
        match std::fs::remove_file(self.local_path(path)) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(err),
        }
        let record = Record::Evicted { path: path.to_string() };
        let effects = commit_record(state, journal, &record)?;
        drop(guard);
        self.wake(Effects {
            space_freed: true,
            ..effects
        });
        Ok(size)
    }

    /// Whether the store's object at `path` is being deleted (so the mount must not show it).
    pub fn deleting(&self, path: &str) -> bool {
        self.lock().0.deleting(path)
    }

    /// The local state of `path`, if it has any.
    pub fn entry(&self, path: &str) -> Option<FileEntry> {
        self.lock().0.file(path).cloned()
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
        !state.uploading_under(dir)
            && state
                .files()
                .filter(|(p, _)| is_under(p, dir))
                .all(|(_, e)| e.is_clean() && e.writers == 0)
    }

    /// Forgets every local file under `dir` (retention removed the checkpoint).
    pub fn forget_under(&self, dir: &str) -> io::Result<()> {
        let paths: Vec<String> = {
            let guard = self.lock();
            guard
                .0
                .files()
                .map(|(p, _)| p)
                .filter(|p| is_under(p, dir))
                .cloned()
                .collect()
        };
        for path in paths {
            let _ = self.record(|seq| Record::Removed {
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
        super::writeback_state::marks_commit(self.marker.as_deref(), path)
    }

    /// Holds each closed version `grace` before its upload starts.
    pub fn set_upload_grace(&self, grace: std::time::Duration) {
        self.lock().0.set_upload_grace(grace);
    }

    /// Markers also wait for the commit coordinator (a volume written by several nodes).
    pub fn set_coordinated(&self, on: bool) {
        self.lock().0.set_coordinated(on);
    }

    /// Markers whose directory is settled here, waiting for the coordinator's word.
    pub fn markers_to_clear(&self) -> Vec<String> {
        self.lock().0.markers_to_clear()
    }

    /// The coordinator found nothing unsettled under the marker's directory on any node.
    pub fn clear_marker(&self, path: &str) {
        self.lock().0.clear_marker(path);
        self.work_ready.notify_one();
    }

    /// Every path this node has not settled in the store: being written, closed but not
    /// uploaded, uploading, or an object to delete.
    pub fn unsettled_paths(&self) -> std::collections::BTreeSet<String> {
        self.lock().0.unsettled_paths().cloned().collect()
    }

    /// Up to `max` pieces of work that may start now, marking them busy. A marker is
    /// uploadable only when everything else under its directory is in the store.
    pub fn take_work(&self, max: usize) -> Vec<Work> {
        self.lock().0.take_work(max, Instant::now())
    }

    /// An upload finished (`ok`) or failed; failures retry after a growing pause.
    pub fn upload_finished(&self, path: &str, seq: u64, ok: bool) -> io::Result<()> {
        {
            let mut guard = self.lock();
            let (state, journal) = &mut *guard;
            if ok {
                state.upload_ended(path);
                let record = Record::Uploaded {
                    path: path.to_string(),
                    seq,
                };
                let _ = commit_record(state, journal, &record)?;
            } else {
                let _ = state.upload_failed(path, Instant::now(), backoff);
            }
        }
        // Either way: a writer waiting for room re-checks whether uploads can still free it.
        self.wake(BOTH);
        Ok(())
    }

    /// A delete finished (`ok`) or failed.
    pub fn delete_finished(&self, path: &str, seq: u64, ok: bool) -> io::Result<()> {
        {
            let mut guard = self.lock();
            let (state, journal) = &mut *guard;
            if ok {
                let record = Record::StoreDeleted {
                    path: path.to_string(),
                    seq,
                };
                let _ = commit_record(state, journal, &record)?;
            }
            state.delete_ended(path, ok, Instant::now(), backoff);
        }
        self.work_ready.notify_one();
        Ok(())
    }

    /// When the version of `path` being uploaded was closed.
    pub fn closed_at(&self, path: &str) -> Option<Instant> {
        self.lock().0.file(path).and_then(|e| e.closed_at)
    }

    /// Totals for the metrics (a scan: the metrics are read every few seconds, not per write).
    pub fn pending(&self) -> Pending {
        let now = Instant::now();
        let guard = self.lock();
        let mut p = Pending {
            deletes: guard.0.deletes().count() as u64,
            ..Default::default()
        };
        for (_, e) in guard.0.files().filter(|(_, e)| e.upload_pending()) {
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
        self.lock().0.idle()
    }

    /// Whether any upload could still free space (so a waiting writer should keep waiting).
    pub fn uploads_outstanding(&self) -> bool {
        self.lock().0.uploads_outstanding()
    }
}

/// Records appended before the journal is rewritten to what still matters: replay time and
/// disk use stay bounded however long a job runs.
const COMPACT_AFTER: u64 = 100_000;

/// Journals `record` and applies it; compacts the journal when it has grown long.
fn commit_record(state: &mut WritebackState, journal: &mut Journal, record: &Record) -> io::Result<Effects> {
    journal.append(record)?;
    let effects = state.apply(record, Instant::now());
    if journal.appended() > COMPACT_AFTER {
        let path = journal.path().to_path_buf();
        *journal = Journal::rewrite(&path, &state.snapshot())?;
    }
    Ok(effects)
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
        let now = Instant::now();
        let mut state = WritebackState::new(None);
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
            let _ = state.apply(r, now);
        }
        let path = dir.path().join("j");
        drop(Journal::rewrite(&path, &state.snapshot()).expect("rewrite"));
        let mut replayed = WritebackState::new(None);
        for r in Journal::read(&path).expect("read") {
            let _ = replayed.apply(&r, now);
        }
        assert!(replayed.deleting("a"), "the old object of a is still to be deleted");
        assert_eq!(replayed.file("a").expect("a").want, Want::Writing);
        let b = replayed.file("b").expect("b");
        assert!(
            b.upload_pending() && b.in_store,
            "b: a newer version to upload over an older one"
        );
        assert_eq!(replayed.file("c").expect("c").want, Want::Broken);
        assert_eq!(replayed.next_seq(), state.next_seq());
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
