//! The memory tier: block bytes held in RAM under a byte bound.

use std::sync::Mutex;

use bytes::Bytes;

use super::bounded_index::{Admission, BoundedIndex, EvictionPolicy};
use crate::block::BlockName;

pub struct MemoryTier {
    capacity: u64,
    index: Mutex<BoundedIndex<BlockName, Bytes>>,
}

/// What an insertion did, for the metrics.
#[derive(Debug, Default, Clone, Copy)]
pub struct InsertOutcome {
    pub admitted: bool,
    pub evicted: usize,
}

impl MemoryTier {
    pub fn new(capacity: u64, policy: EvictionPolicy) -> Self {
        MemoryTier {
            capacity,
            index: Mutex::new(BoundedIndex::new(capacity, policy)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BoundedIndex<BlockName, Bytes>> {
        // A panic while holding this lock cannot leave the index half-updated in a way that
        // matters more than losing the process, so a poisoned lock is taken over.
        self.index.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn get(&self, name: &BlockName) -> Option<Bytes> {
        self.lock().get(name).cloned()
    }

    /// Offers a block to the tier; `None` when the tier is disabled (size 0), so that is not
    /// counted as a rejection.
    pub fn insert(&self, name: BlockName, data: Bytes) -> Option<InsertOutcome> {
        if self.capacity == 0 {
            return None;
        }
        let size = data.len() as u64;
        // Evicted blocks are dropped after the lock is released.
        let admission = self.lock().insert(name, data, size);
        Some(match admission {
            Admission::Admitted { evicted } => InsertOutcome {
                admitted: true,
                evicted: evicted.len(),
            },
            Admission::Rejected => InsertOutcome::default(),
        })
    }

    /// (used bytes, capacity, blocks)
    pub fn usage(&self) -> (u64, u64, u64) {
        let index = self.lock();
        (index.used(), index.capacity(), index.len() as u64)
    }
}
