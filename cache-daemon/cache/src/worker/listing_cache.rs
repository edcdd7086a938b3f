//! Directory listings the worker keeps for the dataset's metadata TTL. Every mount asks a
//! directory's listing of the worker that owns the directory's path (rendezvous, like a
//! block), so one listing from the store serves every node until it expires, and a prewarm
//! lists each directory once so that a fresh mount's walk never waits on the store.
//!
//! Bounded in entries (the worker's `--metadata-max-entries`, shared with nothing else):
//! the oldest listings go first, and a directory larger than the whole bound is streamed
//! from the store each time and never kept.
//!
//! A listing being read from the store is shared too ([`Filling`]): clients asking for the
//! directory meanwhile stream its entries as they arrive, so a thousand mounts opening one
//! new directory at once cost one store listing.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::watch;

use crate::proto::FileInfo;
use granary_store::units::MetadataTtl;

/// How a listing being read ended: `Err` holds the gRPC code and message of the failure.
pub type FillEnd = Result<(), (tonic::Code, String)>;

/// A listing being read from the store: its entries so far, and a signal for each batch.
pub struct Filling {
    entries: Mutex<Vec<FileInfo>>,
    progress: watch::Sender<(usize, Option<FillEnd>)>,
}

impl Filling {
    fn new() -> Self {
        Filling {
            entries: Mutex::new(Vec::new()),
            progress: watch::channel((0, None)).0,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<FileInfo>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a batch read from the store.
    pub fn push(&self, batch: Vec<FileInfo>) {
        let len = {
            let mut entries = self.lock();
            entries.extend(batch);
            entries.len()
        };
        self.progress.send_replace((len, None));
    }

    /// Up to `max` entries from `from` on, waiting for them while the listing runs; an empty
    /// batch with `Some(end)` once everything was given.
    pub async fn next(&self, from: usize, max: usize) -> (Vec<FileInfo>, Option<FillEnd>) {
        let mut progress = self.progress.subscribe();
        loop {
            let (len, end) = progress.borrow_and_update().clone();
            if from < len {
                let entries = self.lock();
                let to = entries.len().min(from + max);
                return (entries[from..to].to_vec(), None);
            }
            if let Some(end) = end {
                return (Vec::new(), Some(end));
            }
            if progress.changed().await.is_err() {
                return (
                    Vec::new(),
                    Some(Err((tonic::Code::Internal, "the listing stopped".into()))),
                );
            }
        }
    }
}

struct Listing {
    entries: Arc<[FileInfo]>,
    at: Instant,
}

struct State {
    listings: HashMap<String, Listing>,
    /// Directories in the order they were cached, for eviction (may name replaced ones).
    order: VecDeque<String>,
    entries: usize,
}

pub struct ListingCache {
    ttl: MetadataTtl,
    max_entries: usize,
    state: Mutex<State>,
    filling: Mutex<HashMap<String, Arc<Filling>>>,
}

/// What a client asking for a directory's listing gets.
pub enum Lookup {
    /// Fresh in the cache.
    Cached(Arc<[FileInfo]>),
    /// Being read from the store by another request; stream it as it fills.
    Joined(Arc<Filling>),
    /// Not listed: this request reads the store, and everyone asking meanwhile joins it.
    Started(Arc<Filling>),
}

impl ListingCache {
    pub fn new(ttl: MetadataTtl, max_entries: usize) -> Self {
        ListingCache {
            ttl,
            max_entries,
            state: Mutex::new(State {
                listings: HashMap::new(),
                order: VecDeque::new(),
                entries: 0,
            }),
            filling: Mutex::new(HashMap::new()),
        }
    }

    /// The listing of `dir` from the cache, from a read in progress, or a read to start.
    pub fn lookup(&self, dir: &str) -> Lookup {
        let mut filling = self.filling.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entries) = self.get(dir) {
            return Lookup::Cached(entries);
        }
        if let Some(running) = filling.get(dir) {
            return Lookup::Joined(Arc::clone(running));
        }
        let started = Arc::new(Filling::new());
        filling.insert(dir.to_string(), Arc::clone(&started));
        Lookup::Started(started)
    }

    /// Ends the read of `dir` that [`Self::lookup`] started: kept when complete and in
    /// bounds, and no longer joined either way.
    pub fn finish(&self, dir: &str, fill: &Filling, end: FillEnd, listed_at: Instant) {
        let mut filling = self.filling.lock().unwrap_or_else(|p| p.into_inner());
        if end.is_ok() {
            let entries = fill.lock().clone();
            self.insert(dir.to_string(), entries, listed_at);
        }
        filling.remove(dir);
        let len = fill.lock().len();
        fill.progress.send_replace((len, Some(end)));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether a directory of `len` entries would be kept.
    pub fn would_keep(&self, len: usize) -> bool {
        self.ttl != MetadataTtl::Expires(std::time::Duration::ZERO) && len <= self.max_entries
    }

    /// The cached listing of `dir` (a normalized path), while fresh.
    pub fn get(&self, dir: &str) -> Option<Arc<[FileInfo]>> {
        let state = self.lock();
        let listing = state.listings.get(dir)?;
        self.ttl
            .is_fresh(listing.at.elapsed())
            .then(|| Arc::clone(&listing.entries))
    }

    /// Keeps the complete listing of `dir`, evicting the oldest listings to stay in bounds.
    pub fn insert(&self, dir: String, entries: Vec<FileInfo>, listed_at: Instant) {
        if !self.would_keep(entries.len()) {
            return;
        }
        let mut state = self.lock();
        if let Some(old) = state.listings.remove(&dir) {
            state.entries -= old.entries.len();
        }
        while state.entries + entries.len() > self.max_entries {
            let Some(oldest) = state.order.pop_front() else { break };
            if let Some(old) = state.listings.remove(&oldest) {
                state.entries -= old.entries.len();
            }
        }
        state.entries += entries.len();
        state.order.push_back(dir.clone());
        state.listings.insert(
            dir,
            Listing {
                entries: entries.into(),
                at: listed_at,
            },
        );
        // Replaced directories leave stale names in `order`; drop them when they pile up.
        if state.order.len() > 2 * state.listings.len() + 64 {
            let State { listings, order, .. } = &mut *state;
            order.retain(|d| listings.contains_key(d));
        }
    }

    /// Entries held now (for tests and stats).
    pub fn entries(&self) -> usize {
        self.lock().entries
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn files(dir: &str, n: usize) -> Vec<FileInfo> {
        (0..n)
            .map(|i| FileInfo {
                path: format!("{dir}/f{i}"),
                ..Default::default()
            })
            .collect()
    }

    #[test]
    fn listings_are_kept_in_bounds_oldest_out_first_and_expire() {
        let cache = ListingCache::new(MetadataTtl::Expires(Duration::from_secs(60)), 10);
        cache.insert("a".into(), files("a", 4), Instant::now());
        cache.insert("b".into(), files("b", 4), Instant::now());
        assert_eq!(cache.get("a").map(|l| l.len()), Some(4));
        cache.insert("c".into(), files("c", 4), Instant::now());
        assert!(cache.get("a").is_none(), "the oldest listing made room");
        assert_eq!(cache.entries(), 8);
        cache.insert("huge".into(), files("huge", 11), Instant::now());
        assert!(cache.get("huge").is_none(), "larger than the bound: never kept");
        cache.insert("b".into(), files("b", 2), Instant::now());
        assert_eq!(cache.entries(), 6, "a replaced listing is counted once");
        let expired = Instant::now() - Duration::from_secs(61);
        cache.insert("old".into(), files("old", 1), expired);
        assert!(cache.get("old").is_none(), "past the TTL");
        let off = ListingCache::new(MetadataTtl::Expires(Duration::ZERO), 10);
        off.insert("a".into(), files("a", 1), Instant::now());
        assert!(off.get("a").is_none(), "a zero TTL caches nothing");
    }
}
