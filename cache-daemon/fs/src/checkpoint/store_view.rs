//! What the target store holds, as the mount shows it next to the local files: directory
//! listings cached for a short TTL (other nodes may write there too), dropped when this
//! mount's own uploads and deletes change a directory.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::tracker::{is_under, parent_of};
use granary_store::target::{StoreEntry, TargetStore};
use granary_store::StoreError;

pub type Listing = Arc<BTreeMap<String, StoreEntry>>;

pub struct StoreView {
    target: TargetStore,
    ttl: Duration,
    listings: Mutex<HashMap<String, (Instant, Listing)>>,
}

impl StoreView {
    pub fn new(target: TargetStore, ttl: Duration) -> Self {
        StoreView {
            target,
            ttl,
            listings: Mutex::new(HashMap::new()),
        }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Instant, Listing)>> {
        self.listings.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub async fn listing(&self, dir: &str) -> Result<Listing, StoreError> {
        if let Some((at, listing)) = self.cache().get(dir) {
            if at.elapsed() < self.ttl {
                return Ok(Arc::clone(listing));
            }
        }
        let entries = self.target.list_dir(dir).await?;
        let listing: Listing = Arc::new(entries.into_iter().map(|e| (e.name.clone(), e)).collect());
        self.cache()
            .insert(dir.to_string(), (Instant::now(), Arc::clone(&listing)));
        Ok(listing)
    }

    /// The store's entry for `path`, if any.
    pub async fn lookup(&self, path: &str) -> Result<Option<StoreEntry>, StoreError> {
        if path.is_empty() {
            return Ok(Some(StoreEntry {
                name: String::new(),
                is_dir: true,
                size: 0,
                modified: None,
            }));
        }
        let name = path.rsplit('/').next().unwrap_or(path);
        Ok(self.listing(parent_of(path)).await?.get(name).cloned())
    }

    /// A directory made here is new to the store: remember it as empty rather than list it.
    pub fn known_empty(&self, dir: &str) {
        self.cache()
            .insert(dir.to_string(), (Instant::now(), Arc::new(BTreeMap::new())));
    }

    /// Drops the listing of the directory holding `path`, and of its ancestors (a new object
    /// can make new directories appear in them).
    pub fn invalidate_parent(&self, path: &str) {
        let mut cache = self.cache();
        let mut dir = parent_of(path);
        loop {
            cache.remove(dir);
            if dir.is_empty() {
                break;
            }
            dir = parent_of(dir);
        }
    }

    /// Drops every listing at or under `dir`, and its parents'.
    pub fn invalidate_tree(&self, dir: &str) {
        self.cache().retain(|d, _| !is_under(d, dir));
        self.invalidate_parent(dir);
    }
}
