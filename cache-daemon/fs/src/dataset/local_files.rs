//! The node-local file cache: each cached file is one plain file on local disk holding
//! exactly the file's bytes, filled block by block (sparse until complete). A complete file
//! can be handed to the kernel as a FUSE passthrough backing file, so reads of it run at the
//! local disk's speed without entering this process.
//!
//! ```text
//! <dir>/files/<key>           complete files (indexed again at start: a restart is warm)
//! <dir>/loaded/<key>.<path>   complete files a load placed here (`granary-cache load --mount`)
//! <dir>/partial/<key>         files being filled (dropped at start)
//! ```
//! `<key>` is the hex xxh3-128 of the file's path and version, so a changed file is a new
//! entry and the old one ages out; `<path>` the hex xxh3-64 of its path.
//!
//! What stays when the cache is full: a file a load placed is never evicted to make room for
//! a copy made by reads, nor for another load's file: a load fills what is free or held by
//! read copies, and a file that does not fit stays on the workers. A loaded file goes when a
//! newer version of its path is loaded; while loaded files fill the cache, reads keep no
//! copies.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::Semaphore;

use super::memory_budget::MemoryLease;
use granary_cache::block::{block_count, block_range};
use granary_cache::proto::FileInfo;
use granary_cache::tiers::{Admission, BoundedIndex, EvictionPolicy};

/// Background writes in flight at once; more are dropped (the block is still served, and
/// stored when it is fetched again). Enough to keep up with a sequential reader's readahead.
const MAX_PENDING_WRITES: usize = 64;

type Key = u128;

struct Entry {
    complete: bool,
    /// One bit per block, set when the block is on disk (empty when complete).
    present: Vec<u64>,
    missing: u64,
    /// Placed by a load: the hash of its path (it is kept, see the module's rule).
    loaded: Option<u64>,
}

impl Entry {
    fn has(&self, index: u64) -> bool {
        self.complete
            || self
                .present
                .get((index / 64) as usize)
                .is_some_and(|word| word & (1 << (index % 64)) != 0)
    }
}

/// What [`LocalFileCache::begin_load`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadSlot {
    /// The file is complete here already.
    Complete,
    /// Room is reserved; its missing blocks are to be written.
    Admitted,
    /// It does not fit without evicting loaded files: it stays on the workers.
    NoRoom,
}

pub struct LocalFileCache {
    files_dir: PathBuf,
    loaded_dir: PathBuf,
    partial_dir: PathBuf,
    index: Mutex<BoundedIndex<Key, Entry>>,
    /// Loaded files by the hash of their path, so a newer version replaces the old one.
    loaded_paths: Mutex<std::collections::HashMap<u64, Key>>,
    writes: Arc<Semaphore>,
    used: Gauge,
}

fn path_hash(file: &FileInfo) -> u64 {
    xxhash_rust::xxh3::xxh3_64(file.path.as_bytes())
}

/// Read copies never push out loaded files.
fn is_read_copy(entry: &Entry) -> bool {
    entry.loaded.is_none()
}

fn key_of(file: &FileInfo) -> Key {
    let mut buf = Vec::with_capacity(file.path.len() + file.version.len() + 1);
    buf.extend_from_slice(file.path.as_bytes());
    buf.push(0);
    buf.extend_from_slice(file.version.as_bytes());
    xxhash_rust::xxh3::xxh3_128(&buf)
}

/// Disk usage of a file of `size` bytes, in whole 4 KiB units.
fn allocated(size: u64) -> u64 {
    size.div_ceil(4096).max(1) * 4096
}

/// Reserves the file's extents up front: blocks arrive out of order, and a sparse file
/// filled that way reads back sequentially slower (passthrough reads it from disk).
fn preallocate(f: &File, size: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: posix_fallocate works on a descriptor `f` keeps open for the call.
    let rc = unsafe { libc::posix_fallocate(f.as_raw_fd(), 0, size as libc::off_t) };
    match rc {
        0 => Ok(()),
        // Filesystems without fallocate get a sparse file.
        libc::EOPNOTSUPP | libc::EINVAL => f.set_len(size),
        err => Err(io::Error::from_raw_os_error(err)),
    }
}

impl LocalFileCache {
    /// Opens (creating) the cache under `dir` with a bound of `capacity` bytes, indexing the
    /// complete files already there.
    pub fn open(dir: &Path, capacity: u64, used: Gauge) -> io::Result<Self> {
        let files_dir = dir.join("files");
        let loaded_dir = dir.join("loaded");
        let partial_dir = dir.join("partial");
        std::fs::create_dir_all(&files_dir)?;
        std::fs::create_dir_all(&loaded_dir)?;
        // Partly filled files are not resumed: their block map lived in memory.
        if partial_dir.exists() {
            std::fs::remove_dir_all(&partial_dir)?;
        }
        std::fs::create_dir_all(&partial_dir)?;
        let mut index = BoundedIndex::new(capacity, EvictionPolicy::Lru);
        let mut loaded_paths = std::collections::HashMap::new();
        // Loaded files first: they are kept before read copies when the cache shrank.
        for (dir, loaded) in [(&loaded_dir, true), (&files_dir, false)] {
            for entry in std::fs::read_dir(dir)? {
                let entry = entry?;
                let name = entry.file_name();
                let (key, path) = match name.to_str().map(|n| n.split_once('.')) {
                    Some(Some((key, path))) if loaded => (key, u64::from_str_radix(path, 16).ok()),
                    Some(None) if !loaded => (name.to_str().unwrap_or_default(), None),
                    _ => continue,
                };
                let Ok(key) = Key::from_str_radix(key, 16) else {
                    continue;
                };
                let size = entry.metadata()?.len();
                let value = Entry {
                    complete: true,
                    present: Vec::new(),
                    missing: 0,
                    loaded: path,
                };
                match index.insert_evicting(key, value, allocated(size), is_read_copy) {
                    Admission::Admitted { .. } => {
                        if let Some(path) = path {
                            loaded_paths.insert(path, key);
                        }
                    }
                    Admission::Rejected => {
                        let _ = std::fs::remove_file(entry.path());
                    }
                }
            }
        }
        used.set(index.used() as i64);
        Ok(LocalFileCache {
            files_dir,
            loaded_dir,
            partial_dir,
            index: Mutex::new(index),
            loaded_paths: Mutex::new(loaded_paths),
            writes: Arc::new(Semaphore::new(MAX_PENDING_WRITES)),
            used,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BoundedIndex<Key, Entry>> {
        self.index.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Where a complete file is: a read copy's, or a loaded file's (`loaded` its path hash).
    fn complete_path(&self, key: Key, loaded: Option<u64>) -> PathBuf {
        match loaded {
            None => self.files_dir.join(format!("{key:032x}")),
            Some(path) => self.loaded_dir.join(format!("{key:032x}.{path:016x}")),
        }
    }

    /// Deletes whatever file `key` has on disk.
    fn remove_files(&self, key: Key, loaded: Option<u64>) {
        let _ = std::fs::remove_file(self.complete_path(key, None));
        if loaded.is_some() {
            let _ = std::fs::remove_file(self.complete_path(key, loaded));
        }
        let _ = std::fs::remove_file(self.partial_path(key));
    }

    fn paths(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<u64, Key>> {
        self.loaded_paths
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Drops a loaded file of `file`'s path whose version is not `file`'s: it can never be
    /// read again.
    fn drop_older_load(&self, file: &FileInfo, key: Key) {
        let path = path_hash(file);
        let old = match self.paths().get(&path) {
            Some(old) if *old != key => *old,
            _ => return,
        };
        self.paths().remove(&path);
        let removed = self.lock().remove(&old);
        if let Some(entry) = removed {
            self.remove_files(old, entry.loaded);
        }
        self.used.set(self.lock().used() as i64);
    }

    /// Reserves room for a load of `file` (whole), or finds it here. Room is taken from
    /// free space and read copies, never from other loaded files. A read copy of the same
    /// file, partial or complete, becomes loaded.
    pub fn begin_load(&self, file: &FileInfo) -> io::Result<LoadSlot> {
        let key = key_of(file);
        self.drop_older_load(file, key);
        let path = path_hash(file);
        let blocks = block_count(file.size, file.block_size.max(1));
        let evicted = {
            let mut index = self.lock();
            match index.get(&key) {
                Some(entry) if entry.loaded.is_some() && entry.complete => return Ok(LoadSlot::Complete),
                Some(entry) if entry.complete => {
                    std::fs::rename(self.complete_path(key, None), self.complete_path(key, Some(path)))?;
                    entry.loaded = Some(path);
                    drop(index);
                    self.paths().insert(path, key);
                    return Ok(LoadSlot::Complete);
                }
                Some(entry) => {
                    entry.loaded = Some(path);
                    Vec::new()
                }
                None => {
                    let entry = Entry {
                        complete: false,
                        present: vec![0; blocks.div_ceil(64) as usize],
                        missing: blocks,
                        loaded: Some(path),
                    };
                    match index.insert_evicting(key, entry, allocated(file.size), is_read_copy) {
                        Admission::Admitted { evicted } => evicted,
                        Admission::Rejected => return Ok(LoadSlot::NoRoom),
                    }
                }
            }
        };
        for (old, entry, _) in evicted {
            self.remove_files(old, entry.loaded);
        }
        self.paths().insert(path, key);
        self.used.set(self.lock().used() as i64);
        Ok(LoadSlot::Admitted)
    }

    /// Whether block `index` of `file` is on local disk.
    pub fn has_block(&self, file: &FileInfo, index: u64) -> bool {
        self.lock().get(&key_of(file)).is_some_and(|e| e.has(index))
    }

    /// Bytes the cache holds, and its size.
    pub fn usage(&self) -> (u64, u64) {
        let index = self.lock();
        (index.used(), index.capacity())
    }

    fn partial_path(&self, key: Key) -> PathBuf {
        self.partial_dir.join(format!("{key:032x}"))
    }

    /// The complete local copy of `file`, opened for reading (for passthrough).
    pub fn open_complete(&self, file: &FileInfo) -> Option<File> {
        let key = key_of(file);
        let loaded = match self.lock().get(&key) {
            Some(e) if e.complete => e.loaded,
            _ => return None,
        };
        File::open(self.complete_path(key, loaded)).ok()
    }

    /// Reads block `index` of `file` when it is on local disk.
    pub async fn read_block<B>(&self, file: &FileInfo, index: u64, mut buffer: B) -> Option<Bytes>
    where
        B: AsRef<[u8]> + AsMut<Vec<u8>> + Send + 'static,
    {
        let key = key_of(file);
        let path_now = || match self.lock().get(&key) {
            Some(e) if e.complete => Some(self.complete_path(key, e.loaded)),
            Some(e) if e.has(index) => Some(self.partial_path(key)),
            _ => None,
        };
        let path = path_now()?;
        let range = block_range(file.size, file.block_size.max(1), index);
        let tried = path.clone();
        let read = tokio::task::spawn_blocking(move || -> io::Result<Bytes> {
            let f = File::open(path)?;
            let bytes = buffer.as_mut();
            bytes.clear();
            bytes.resize((range.end - range.start) as usize, 0);
            f.read_exact_at(bytes, range.start)?;
            Ok(Bytes::from_owner(buffer))
        })
        .await;
        match read {
            Ok(Ok(data)) => Some(data),
            // Renamed meanwhile (completed, or a read copy made a loaded file): the file is
            // fine; this block is read from elsewhere this once.
            Ok(Err(e)) if e.kind() == io::ErrorKind::NotFound && path_now().is_some_and(|p| p != tried) => None,
            Ok(Err(e)) => {
                tracing::warn!(path = %file.path, error = %e, "a local cache file could not be read; dropping it");
                self.forget(key);
                None
            }
            Err(_) => None,
        }
    }

    fn forget(&self, key: Key) {
        let removed = self.lock().remove(&key);
        if let Some(entry) = removed {
            self.remove_files(key, entry.loaded);
        }
        self.used.set(self.lock().used() as i64);
    }

    /// Stores block `index` of `file` in the background; dropped when too many writes are
    /// pending or the file does not fit.
    /// `lease` holds the block's memory until it is written: a block evicted from memory
    /// meanwhile is still counted against the budget.
    pub fn store(self: &Arc<Self>, file: &FileInfo, index: u64, data: Bytes, lease: MemoryLease) {
        if file.size == 0 {
            return;
        }
        let Ok(permit) = Arc::clone(&self.writes).try_acquire_owned() else {
            return;
        };
        let this = Arc::clone(self);
        let file = file.clone();
        tokio::task::spawn_blocking(move || {
            let _held = (permit, lease);
            this.write_or_forget(&file, index, &data);
        });
    }

    /// Writes block `index` now and says whether it is in the cache (for a caller about to
    /// open the file through passthrough).
    pub async fn write_now(self: &Arc<Self>, file: &FileInfo, index: u64, data: Bytes) -> bool {
        let this = Arc::clone(self);
        let file = file.clone();
        let written = tokio::task::spawn_blocking(move || this.write_or_forget(&file, index, &data)).await;
        written.unwrap_or(false)
    }

    /// Writes block `index`; a file whose write failed is dropped from the cache whole.
    fn write_or_forget(&self, file: &FileInfo, index: u64, data: &[u8]) -> bool {
        match self.write_block(file, index, data) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(path = %file.path, error = %e, "writing to the local file cache failed; the block is served from elsewhere");
                self.forget(key_of(file));
                false
            }
        }
    }

    fn write_block(&self, file: &FileInfo, index: u64, data: &[u8]) -> io::Result<()> {
        let key = key_of(file);
        let blocks = block_count(file.size, file.block_size.max(1));
        let partial = self.partial_path(key);
        // Only the index is touched under the lock; files are created and written outside it.
        let (new_file, evicted) = {
            let mut index_lock = self.lock();
            match index_lock.get(&key) {
                Some(e) if e.has(index) => return Ok(()),
                Some(_) => (false, Vec::new()),
                None => {
                    // A new file: its whole size is reserved in the index.
                    let entry = Entry {
                        complete: false,
                        present: vec![0; blocks.div_ceil(64) as usize],
                        missing: blocks,
                        loaded: None,
                    };
                    match index_lock.insert_evicting(key, entry, allocated(file.size), is_read_copy) {
                        Admission::Admitted { evicted } => (true, evicted),
                        Admission::Rejected => return Ok(()),
                    }
                }
            }
        };
        for (old, entry, _) in evicted {
            self.remove_files(old, entry.loaded);
        }
        let range = block_range(file.size, file.block_size.max(1), index);
        if data.len() as u64 != range.end - range.start {
            return Ok(());
        }
        // Writers of other blocks of a new file may get here first: each may create it, and
        // preallocation keeps what was written.
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&partial)?;
        if new_file {
            preallocate(&f, file.size)?;
        }
        f.write_all_at(data, range.start)?;
        let now_complete = {
            let mut index_lock = self.lock();
            let Some(entry) = index_lock.get(&key) else {
                // Evicted meanwhile: leave no stray file behind.
                drop(index_lock);
                let _ = std::fs::remove_file(&partial);
                return Ok(());
            };
            if entry.has(index) {
                false
            } else {
                entry.present[(index / 64) as usize] |= 1 << (index % 64);
                entry.missing -= 1;
                entry.missing == 0
            }
        };
        if now_complete {
            // Renamed under the index's lock: a load marking the entry meanwhile names the
            // file it is renamed to.
            let mut index_lock = self.lock();
            if let Some(entry) = index_lock.get(&key) {
                std::fs::rename(&partial, self.complete_path(key, entry.loaded))?;
                entry.complete = true;
                entry.present = Vec::new();
            }
        }
        self.used.set(self.lock().used() as i64);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(path: &str, size: u64, block_size: u64) -> FileInfo {
        FileInfo {
            path: path.into(),
            is_dir: false,
            size,
            version: "v1".into(),
            mtime_unix_nanos: 0,
            block_size,
        }
    }

    #[tokio::test]
    async fn blocks_fill_a_file_that_becomes_complete_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(LocalFileCache::open(dir.path(), 1 << 20, Gauge::default()).unwrap());
        let file = info("a/b.bin", 10, 4);
        assert!(cache.read_block(&file, 0, Vec::new()).await.is_none());
        cache.write_block(&file, 1, b"4567").unwrap();
        assert_eq!(&cache.read_block(&file, 1, Vec::new()).await.unwrap()[..], b"4567");
        assert!(
            cache.read_block(&file, 0, Vec::new()).await.is_none(),
            "block 0 was never written"
        );
        assert!(cache.open_complete(&file).is_none());
        cache.write_block(&file, 0, b"0123").unwrap();
        cache.write_block(&file, 2, b"89").unwrap();
        let complete = cache.open_complete(&file).expect("all blocks are there");
        assert_eq!(complete.metadata().unwrap().len(), 10);
        drop(cache);

        let reopened = LocalFileCache::open(dir.path(), 1 << 20, Gauge::default()).unwrap();
        assert_eq!(&reopened.read_block(&file, 2, Vec::new()).await.unwrap()[..], b"89");
        let mut other_version = file.clone();
        other_version.version = "v2".into();
        assert!(reopened.read_block(&other_version, 0, Vec::new()).await.is_none());
    }

    #[tokio::test]
    async fn the_cache_stays_within_its_size_by_evicting_old_files() {
        let dir = tempfile::tempdir().unwrap();
        let cache = LocalFileCache::open(dir.path(), 3 * 4096, Gauge::default()).unwrap();
        for i in 0..5 {
            cache
                .write_block(&info(&format!("f{i}"), 100, 4096), 0, &[i as u8; 100])
                .unwrap();
        }
        assert!(cache.lock().used() <= 3 * 4096);
        let on_disk = std::fs::read_dir(dir.path().join("files")).unwrap().count();
        assert_eq!(on_disk, 3, "evicted files are deleted");
        assert!(cache.read_block(&info("f0", 100, 4096), 0, Vec::new()).await.is_none());
        assert_eq!(
            cache.read_block(&info("f4", 100, 4096), 0, Vec::new()).await.unwrap()[0],
            4
        );
    }

    #[tokio::test]
    async fn loaded_files_are_kept_before_read_copies_and_replaced_by_their_new_version() {
        let dir = tempfile::tempdir().unwrap();
        let cache = LocalFileCache::open(dir.path(), 3 * 4096, Gauge::default()).unwrap();
        cache.write_block(&info("read-copy", 100, 4096), 0, &[9; 100]).unwrap();
        for name in ["l0", "l1"] {
            assert_eq!(cache.begin_load(&info(name, 100, 4096)).unwrap(), LoadSlot::Admitted);
            cache.write_block(&info(name, 100, 4096), 0, &[1; 100]).unwrap();
        }
        assert_eq!(
            cache.begin_load(&info("l2", 100, 4096)).unwrap(),
            LoadSlot::Admitted,
            "a load takes the read copy's room"
        );
        assert!(cache.open_complete(&info("read-copy", 100, 4096)).is_none());
        cache.write_block(&info("l2", 100, 4096), 0, &[1; 100]).unwrap();
        assert_eq!(
            cache.begin_load(&info("l3", 100, 4096)).unwrap(),
            LoadSlot::NoRoom,
            "a load never evicts loaded files"
        );
        cache
            .write_block(&info("another-read", 100, 4096), 0, &[2; 100])
            .unwrap();
        assert!(
            cache.open_complete(&info("another-read", 100, 4096)).is_none(),
            "reads keep no copy when loaded files fill the cache"
        );
        assert_eq!(cache.begin_load(&info("l0", 100, 4096)).unwrap(), LoadSlot::Complete);

        // A new version of l0 replaces the loaded old one.
        let mut newer = info("l0", 100, 4096);
        newer.version = "v2".into();
        assert_eq!(cache.begin_load(&newer).unwrap(), LoadSlot::Admitted);
        cache.write_block(&newer, 0, &[3; 100]).unwrap();
        assert!(
            cache.open_complete(&info("l0", 100, 4096)).is_none(),
            "the old version is gone"
        );
        drop(cache);

        // Loaded files stay loaded across a restart.
        let reopened = LocalFileCache::open(dir.path(), 3 * 4096, Gauge::default()).unwrap();
        assert!(reopened.open_complete(&newer).is_some());
        assert_eq!(reopened.begin_load(&info("l3", 100, 4096)).unwrap(), LoadSlot::NoRoom);
    }
}
