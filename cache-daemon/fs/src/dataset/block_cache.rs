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
    index: Mutex<BoundedIndex<BlockName, (Bytes, MemoryLease)>>,
}

impl Default for BlockCache {
    fn default() -> Self {
        BlockCache {
            index: Mutex::new(BoundedIndex::new(u64::MAX, EvictionPolicy::Lru)),
        }
    }
}

impl BlockCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, BoundedIndex<BlockName, (Bytes, MemoryLease)>> {
        self.index.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn get(&self, name: &BlockName) -> Option<Bytes> {
        self.lock().get(name).map(|(data, _)| data.clone())
    }

    pub fn contains(&self, name: &BlockName) -> bool {
        self.lock().contains(name)
    }

    /// Makes a block the first to go when memory is needed (a reader is done with it; a
    /// read arriving late, out of the kernel's order, still finds it).
    pub fn demote(&self, name: &BlockName) {
        self.lock().demote(name);
    }

    pub fn insert(&self, name: BlockName, data: Bytes, lease: MemoryLease) {
        let size = data.len() as u64;
        // Replaced entries are dropped (and their leases released) after the lock is gone.
        let _replaced = self.lock().insert(name, (data, lease), size);
    }
}

impl Reclaim for BlockCache {
    fn reclaim(&self, bytes: u64) -> u64 {
        let mut evicted = Vec::new();
        let mut freed = 0;
        {
            let mut index = self.lock();
            while freed < bytes.max(1) {
                match index.pop_lru() {
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
