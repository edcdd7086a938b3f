//! Blocks kept in memory by the filesystem: what was read or read ahead, so the kernel's
//! many small reads of one block make one fetch. It has no size of its own: every block holds
//! a lease on the memory budget, and the budget asks it to shrink (least recently used first)
//! when readers need the memory.

use std::sync::Mutex;

use bytes::Bytes;

use super::memory_budget::{MemoryLease, Reclaim};
use granary_cache::block::BlockName;
use granary_cache::tiers::{BoundedIndex, EvictionPolicy};

pub struct BlockCache {
    index: Mutex<BoundedIndex<BlockName, Cached>>,
}

struct Cached {
    data: Bytes,
    _lease: MemoryLease,
    /// A reader has taken it (blocks read ahead are not read yet when they arrive).
    read: bool,
}

impl Default for BlockCache {
    fn default() -> Self {
        BlockCache {
            index: Mutex::new(BoundedIndex::new(u64::MAX, EvictionPolicy::Lru)),
        }
    }
}

impl BlockCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, BoundedIndex<BlockName, Cached>> {
        self.index.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn get(&self, name: &BlockName) -> Option<Bytes> {
        self.lock().get(name).map(|cached| {
            cached.read = true;
            cached.data.clone()
        })
    }

    pub fn contains(&self, name: &BlockName) -> bool {
        self.lock().contains(name)
    }

    /// Makes a block the first to go when memory is needed (a reader is done with it; a
    /// read arriving late, out of the kernel's order, still finds it).
    pub fn demote(&self, name: &BlockName) {
        if let Some(cached) = self.lock().demote(name) {
            cached.read = true;
        }
    }

    /// Keeps a block; `read` says whether a reader has it already (else it was read ahead).
    pub fn insert(&self, name: BlockName, data: Bytes, lease: MemoryLease, read: bool) {
        let size = data.len() as u64;
        let cached = Cached {
            data,
            _lease: lease,
            read,
        };
        // Replaced entries are dropped (and their leases released) after the lock is gone.
        let _replaced = self.lock().insert(name, cached, size);
    }

    /// Frees at least `bytes` from blocks readers have taken, finished ones first; returns
    /// how many bytes it freed. For optional work (readahead, local copies), which must not
    /// push out blocks read ahead that nobody has read yet.
    pub fn reclaim_read(&self, bytes: u64) -> u64 {
        self.evict(bytes, |cached| cached.read)
    }

    fn evict(&self, bytes: u64, evictable: impl Fn(&Cached) -> bool) -> u64 {
        let mut evicted = Vec::new();
        let mut freed = 0;
        {
            let mut index = self.lock();
            while freed < bytes.max(1) {
                match index.pop_lru_where(&evictable) {
                    Some((_, entry, size)) => {
                        freed += size;
                        evicted.push(entry);
                    }
                    None => break,
                }
            }
        }
        drop(evicted);
        freed
    }
}

impl Reclaim for BlockCache {
    fn reclaim(&self, bytes: u64) -> u64 {
        self.evict(bytes, |_| true)
    }
}
