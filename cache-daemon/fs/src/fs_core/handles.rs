//! Open file and directory handles, sharded so concurrent reads of different files never
//! wait on one lock.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

const SHARDS: usize = 32;

pub struct Handles<T> {
    shards: Vec<Mutex<HashMap<u64, Arc<T>>>>,
    next: AtomicU64,
}

/// Handle numbers carry the daemon's epoch above this bit, so a restarted daemon never hands
/// out a number the kernel still holds from its predecessor.
const EPOCH_SHIFT: u32 = 40;

impl<T> Default for Handles<T> {
    fn default() -> Self {
        Self::with_epoch(0)
    }
}

impl<T> Handles<T> {
    /// Handles of the daemon's `epoch`-th incarnation serving this mount.
    pub fn with_epoch(epoch: u64) -> Self {
        Handles {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            next: AtomicU64::new((epoch << EPOCH_SHIFT) | 1),
        }
    }

    /// Whether `fh` was handed out by an earlier incarnation (before a restart).
    pub fn is_inherited(&self, fh: u64) -> bool {
        fh >> EPOCH_SHIFT < self.next.load(Ordering::Relaxed) >> EPOCH_SHIFT
    }

    /// Takes over `fh` from an earlier incarnation; a racing take-over of the same handle
    /// keeps the first one.
    pub fn adopt(&self, fh: u64, value: T) -> Arc<T> {
        Arc::clone(self.shard(fh).entry(fh).or_insert_with(|| Arc::new(value)))
    }

    fn shard(&self, fh: u64) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<T>>> {
        self.shards[(fh as usize) % SHARDS]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn insert(&self, value: T) -> u64 {
        let fh = self.next.fetch_add(1, Ordering::Relaxed);
        self.shard(fh).insert(fh, Arc::new(value));
        fh
    }

    pub fn get(&self, fh: u64) -> Option<Arc<T>> {
        self.shard(fh).get(&fh).cloned()
    }

    pub fn remove(&self, fh: u64) -> Option<Arc<T>> {
        self.shard(fh).remove(&fh)
    }
}
