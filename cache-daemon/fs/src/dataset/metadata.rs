//! The filesystem's metadata cache: stat results (including "does not exist") and directory
//! listings, kept for the dataset's TTL. A listing streams in: readers of a 10^6-entry
//! directory get the first entries while the rest are still arriving, and once it is
//! complete, every lookup in that directory is answered from memory, hit or miss.
//! Bounded by an estimate of its bytes, least recently used out first: stat results and
//! whole listings are entries of one LRU (a listing enters it once complete, at the bytes of
//! all its entries; each listed file is also a stat entry, so a listed file is counted twice
//! and the bound is never exceeded).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use futures::StreamExt;
use granary_cache::tiers::{BoundedIndex, EvictionPolicy};
use tokio::sync::watch;

use super::error::FsError;
use super::remote::Remote;
use crate::metrics::dataset::OriginLabel;
use crate::metrics::FuseMetrics;
use granary_cache::proto::FileInfo;
use granary_store::units::MetadataTtl;

/// Entries between wake-ups of readers waiting on a listing.
const PUBLISH_EVERY: usize = 256;

enum Cached {
    Found(Arc<FileInfo>, Instant),
    Missing(Instant),
}

#[derive(Debug, Clone, Default)]
struct Progress {
    len: usize,
    done: bool,
    error: Option<FsError>,
}

/// One directory's listing, filled by a background task.
pub struct DirListing {
    entries: RwLock<Vec<Arc<FileInfo>>>,
    progress: watch::Sender<Progress>,
    started: Instant,
}

impl DirListing {
    fn new() -> Self {
        DirListing {
            entries: RwLock::new(Vec::new()),
            progress: watch::Sender::new(Progress::default()),
            started: Instant::now(),
        }
    }

    fn complete(&self) -> bool {
        let p = self.progress.borrow();
        p.done && p.error.is_none()
    }

    /// Up to `max` entries from position `start`, waiting until they have arrived; an empty
    /// result means the end.
    pub async fn entries_from(&self, start: usize, max: usize) -> Result<Vec<Arc<FileInfo>>, FsError> {
        let mut rx = self.progress.subscribe();
        loop {
            {
                let p = rx.borrow_and_update();
                if p.len > start || p.done {
                    if p.len <= start {
                        return match &p.error {
                            Some(e) => Err(e.clone()),
                            None => Ok(Vec::new()),
                        };
                    }
                    let entries = self.entries.read().unwrap_or_else(|poisoned| poisoned.into_inner());
                    let end = p.len.min(start + max);
                    return Ok(entries[start..end].to_vec());
                }
            }
            if rx.changed().await.is_err() {
                return Ok(Vec::new());
            }
        }
    }
}

#[derive(Clone, PartialEq, Eq, Hash)]
enum Key {
    Stat(String),
    Dir(String),
}

enum Entry {
    Stat(Cached),
    Dir(Arc<DirListing>),
}

struct State {
    /// Stat results and complete listings, byte-bounded, least recently used out first.
    index: BoundedIndex<Key, Entry>,
    /// Listings still arriving (outside the bound until complete).
    filling: HashMap<String, Arc<DirListing>>,
}

pub struct Metadata {
    remote: Arc<Remote>,
    ttl: MetadataTtl,
    state: Mutex<State>,
    metrics: Arc<FuseMetrics>,
    me: Weak<Metadata>,
}

/// The directory of a dataset path ("" for the root's entries).
pub fn parent_of(path: &str) -> &str {
    path.rsplit_once('/').map(|(parent, _)| parent).unwrap_or("")
}

/// The last component of a dataset path.
pub fn name_of(path: &str) -> &str {
    path.rsplit_once('/').map(|(_, name)| name).unwrap_or(path)
}

/// A rough count of what one cached entry costs in memory.
pub fn entry_bytes(info: &FileInfo) -> u64 {
    200 + 2 * (info.path.len() + info.version.len()) as u64
}

const CACHE: OriginLabel = OriginLabel { origin: "cache" };
const REMOTE: OriginLabel = OriginLabel { origin: "remote" };

impl Metadata {
    pub fn new(remote: Arc<Remote>, ttl: MetadataTtl, max_bytes: u64, metrics: Arc<FuseMetrics>) -> Arc<Self> {
        Arc::new_cyclic(|me| Metadata {
            remote,
            ttl,
            state: Mutex::new(State {
                index: BoundedIndex::new(max_bytes, EvictionPolicy::Lru),
                filling: HashMap::new(),
            }),
            metrics,
            me: me.clone(),
        })
    }

    /// How long the kernel may cache what this mount tells it.
    pub fn kernel_ttl(&self) -> Duration {
        match self.ttl {
            MetadataTtl::Never => Duration::from_secs(365 * 24 * 3600),
            MetadataTtl::Expires(d) => d,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn fresh(&self, at: Instant) -> bool {
        self.ttl.is_fresh(at.elapsed())
    }

    fn remember(&self, state: &mut State, info: Arc<FileInfo>) {
        let bytes = entry_bytes(&info);
        self.insert(state, info.path.clone(), Cached::Found(info, Instant::now()), bytes);
    }

    /// Caches `entry` for `path`, within the byte bound.
    fn insert(&self, state: &mut State, path: String, entry: Cached, bytes: u64) {
        if self.ttl == MetadataTtl::Expires(Duration::ZERO) {
            return;
        }
        state.index.insert(Key::Stat(path), Entry::Stat(entry), bytes);
    }

    /// Bytes the cache accounts for now, and its bound.
    #[cfg(test)]
    fn usage(&self) -> (u64, u64) {
        let state = self.lock();
        (state.index.used(), state.index.capacity())
    }

    /// Metadata of `path`: cached while fresh; a path missing from a complete, fresh listing
    /// of its parent does not exist without asking anyone.
    pub async fn stat(&self, path: &str) -> Result<Arc<FileInfo>, FsError> {
        {
            let mut state = self.lock();
            match state.index.get(&Key::Stat(path.to_string())) {
                Some(Entry::Stat(Cached::Found(info, at))) if self.fresh(*at) => {
                    self.metrics.metadata_requests.get_or_create(&CACHE).inc();
                    return Ok(Arc::clone(info));
                }
                Some(Entry::Stat(Cached::Missing(at))) if self.fresh(*at) => {
                    self.metrics.metadata_requests.get_or_create(&CACHE).inc();
                    return Err(FsError::NotFound(path.to_string()));
                }
                _ => {}
            }
            if !path.is_empty() {
                if let Some(Entry::Dir(listing)) = state.index.get(&Key::Dir(parent_of(path).to_string())) {
                    if listing.complete() && self.ttl.is_fresh(listing.started.elapsed()) {
                        self.metrics.metadata_requests.get_or_create(&CACHE).inc();
                        return Err(FsError::NotFound(path.to_string()));
                    }
                }
            }
        }
        self.metrics.metadata_requests.get_or_create(&REMOTE).inc();
        match self.remote.stat(path).await {
            Ok(info) => {
                let info = Arc::new(info);
                self.remember(&mut self.lock(), Arc::clone(&info));
                Ok(info)
            }
            Err(FsError::NotFound(p)) => {
                let bytes = 100 + path.len() as u64;
                self.insert(
                    &mut self.lock(),
                    path.to_string(),
                    Cached::Missing(Instant::now()),
                    bytes,
                );
                Err(FsError::NotFound(p))
            }
            Err(e) => Err(e),
        }
    }

    /// Metadata of `path` asked for afresh, past this mount's cache and the workers' (a
    /// read found the cached version gone from the store).
    pub async fn refresh(&self, path: &str) -> Result<Arc<FileInfo>, FsError> {
        self.metrics.metadata_requests.get_or_create(&REMOTE).inc();
        let info = Arc::new(self.remote.stat_fresh(path).await?);
        self.remember(&mut self.lock(), Arc::clone(&info));
        Ok(info)
    }

    /// The listing of directory `path`: the cached one while fresh (complete or still
    /// arriving), else a new one.
    pub fn listing(&self, path: &str) -> Arc<DirListing> {
        let mut state = self.lock();
        if let Some(Entry::Dir(listing)) = state.index.get(&Key::Dir(path.to_string())) {
            if self.ttl.is_fresh(listing.started.elapsed()) {
                self.metrics.metadata_requests.get_or_create(&CACHE).inc();
                return Arc::clone(listing);
            }
        }
        if let Some(listing) = state.filling.get(path) {
            self.metrics.metadata_requests.get_or_create(&CACHE).inc();
            return Arc::clone(listing);
        }
        self.metrics.metadata_requests.get_or_create(&REMOTE).inc();
        let listing = Arc::new(DirListing::new());
        state.filling.insert(path.to_string(), Arc::clone(&listing));
        drop(state);
        let me = self.me.clone();
        let dir = path.to_string();
        let filling = Arc::clone(&listing);
        tokio::spawn(async move {
            if let Some(metadata) = me.upgrade() {
                metadata.fill(&dir, &filling).await;
            }
        });
        listing
    }

    async fn fill(&self, dir: &str, listing: &Arc<DirListing>) {
        let mut stream = match self.remote.list(dir).await {
            Ok(stream) => stream,
            Err(e) => {
                tracing::warn!(dir, error = %e, "listing a directory failed");
                self.lock().filling.remove(dir);
                listing.progress.send_modify(|p| {
                    p.done = true;
                    p.error = Some(e);
                });
                return;
            }
        };
        let mut bytes = 64u64;
        let mut len = 0;
        let mut error = None;
        while let Some(entry) = stream.next().await {
            match entry {
                Ok(info) => {
                    let info = Arc::new(info);
                    bytes += entry_bytes(&info);
                    self.remember(&mut self.lock(), Arc::clone(&info));
                    listing
                        .entries
                        .write()
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .push(info);
                    len += 1;
                    if len % PUBLISH_EVERY == 0 {
                        listing.progress.send_modify(|p| p.len = len);
                    }
                }
                Err(e) => {
                    tracing::warn!(dir, error = %e, "a directory listing stopped midway");
                    error = Some(e);
                    break;
                }
            }
        }
        {
            // Complete, it enters the bound (and may push older entries out); a failed one
            // is dropped, and the next reader lists again.
            let mut state = self.lock();
            state.filling.remove(dir);
            if error.is_none() && self.ttl != MetadataTtl::Expires(Duration::ZERO) {
                state
                    .index
                    .insert(Key::Dir(dir.to_string()), Entry::Dir(Arc::clone(listing)), bytes);
            }
        }
        listing.progress.send_modify(|p| {
            p.len = len;
            p.done = true;
            p.error = error;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use granary_store::source::{SourceStore, SourceTuning};
    use prometheus_client::registry::Registry;

    fn remote_requests(metrics: &FuseMetrics) -> u64 {
        metrics.metadata_requests.get_or_create(&REMOTE).get()
    }

    /// Full, the cache lets its least recently used entries go, not everything: a file
    /// stated all along stays cached while a stream of other files passes through.
    #[tokio::test]
    async fn a_full_cache_evicts_the_least_recently_used_and_keeps_the_hot_entries() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..400 {
            std::fs::write(dir.path().join(format!("f{i:03}")), b"x").unwrap();
        }
        std::fs::write(dir.path().join("hot"), b"hot").unwrap();
        let uri = format!("fs://{}", dir.path().display());
        let source = SourceStore::open(&uri, &Default::default(), &SourceTuning::default()).unwrap();
        let metrics = Arc::new(FuseMetrics::register(&mut Registry::default()));
        let remote = Arc::new(Remote::new(None, Some(source), 1 << 20, Arc::clone(&metrics)));
        // Room for about 100 entries.
        let metadata = Metadata::new(remote, MetadataTtl::Never, 100 * 300, Arc::clone(&metrics));
        metadata.stat("hot").await.unwrap();
        for i in 0..400 {
            metadata.stat(&format!("f{i:03}")).await.unwrap();
            let before = remote_requests(&metrics);
            assert_eq!(&*metadata.stat("hot").await.unwrap().path, "hot");
            assert_eq!(
                remote_requests(&metrics),
                before,
                "the hot entry was evicted at f{i:03}"
            );
            let (used, bound) = metadata.usage();
            assert!(used <= bound, "{used} bytes over the bound of {bound}");
        }
        // The oldest cold entries went; the newest are still there.
        let before = remote_requests(&metrics);
        metadata.stat("f399").await.unwrap();
        assert_eq!(remote_requests(&metrics), before, "the newest entry is cached");
        metadata.stat("f000").await.unwrap();
        assert_eq!(remote_requests(&metrics), before + 1, "the oldest entry was evicted");
    }
}
