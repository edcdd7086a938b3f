//! Block buffers the mount reuses. A block that arrives from a worker or a block file is
//! copied into (or read into) a buffer of about a block's size; glibc serves allocations
//! that large with a fresh mmap, so every block used to pay its size in page faults and an
//! munmap, most of a warm read's CPU. Buffers freed by evicted blocks go back to a short
//! free list instead, and the next fetch takes one already faulted in.
//!
//! The free list is bounded, and each buffer on it holds a lease on the memory budget, so
//! what the mount keeps resident stays within `--max-memory`; when the budget has no room a
//! freed buffer is returned to the allocator as before, and a reader short of memory takes
//! the free list back first ([`Reclaim`]). Each mount has its own pool; a node daemon's
//! mounts share one budget, so each pool keeps at most 1/32 of it.

use std::sync::{Arc, Mutex};

use bytes::Bytes;

use super::memory_budget::{MemoryBudget, MemoryLease, Reclaim};

pub struct BlockBuffers {
    /// Capacity of a pooled buffer: a block, plus room for a block file's header.
    buffer_bytes: usize,
    /// Buffers kept on the free list at most.
    keep: usize,
    free: Mutex<Vec<(Vec<u8>, MemoryLease)>>,
    budget: Arc<MemoryBudget>,
}

/// Room for a block file's header (magic, checksum, lengths, path and version) after a block.
const HEADER_ROOM: usize = 16 << 10;

/// A buffer to fill, from the pool when its size is near a block's; back to the pool when the
/// last `Bytes` made from it is dropped.
pub struct BlockBuffer {
    bytes: Vec<u8>,
    pool: Option<Arc<BlockBuffers>>,
}

impl BlockBuffers {
    /// A pool for blocks of `block_size` bytes under `budget`: it keeps at most 1/32 of the
    /// budget, and no more than 16 buffers, free.
    pub fn new(block_size: u64, budget: Arc<MemoryBudget>) -> Arc<Self> {
        let buffer_bytes = block_size as usize + HEADER_ROOM;
        let keep = ((budget.limit() / 32) as usize / buffer_bytes.max(1)).min(16);
        Arc::new(BlockBuffers {
            buffer_bytes,
            keep,
            free: Mutex::new(Vec::new()),
            budget,
        })
    }

    fn free_list(&self) -> std::sync::MutexGuard<'_, Vec<(Vec<u8>, MemoryLease)>> {
        self.free.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// An empty buffer with room for `len` bytes. Blocks well short of a whole one (the last
    /// of a file, files smaller than a block) come from the allocator: a pooled buffer once
    /// filled is resident whole, and the caller's lease counts only `len`.
    pub fn take(self: &Arc<Self>, len: usize) -> BlockBuffer {
        if self.keep == 0 || len > self.buffer_bytes || len < self.buffer_bytes - self.buffer_bytes / 8 {
            return BlockBuffer {
                bytes: Vec::with_capacity(len),
                pool: None,
            };
        }
        // The free buffer's lease goes: the caller holds its own for the block.
        let reused = self.free_list().pop().map(|(bytes, _lease)| bytes);
        BlockBuffer {
            bytes: reused.unwrap_or_else(|| Vec::with_capacity(self.buffer_bytes)),
            pool: Some(Arc::clone(self)),
        }
    }

    /// `data` copied into a buffer of the pool.
    #[cfg(test)]
    pub fn copy_of(self: &Arc<Self>, data: &[u8]) -> Bytes {
        let mut buffer = self.take(data.len());
        buffer.as_mut().extend_from_slice(data);
        buffer.freeze()
    }

    fn give_back(&self, mut bytes: Vec<u8>) {
        if bytes.capacity() != self.buffer_bytes {
            return;
        }
        if self.free_list().len() >= self.keep {
            return;
        }
        let Some(lease) = self.budget.try_reserve(self.buffer_bytes as u64) else {
            return;
        };
        bytes.clear();
        let mut free = self.free_list();
        if free.len() < self.keep {
            free.push((bytes, lease));
        }
    }

    /// Buffers on the free list now.
    #[cfg(test)]
    pub fn free_buffers(&self) -> usize {
        self.free_list().len()
    }
}

/// A reader short of memory may take the free list's leases back.
impl Reclaim for BlockBuffers {
    fn reclaim(&self, bytes: u64) -> u64 {
        let mut dropped = Vec::new();
        let mut freed = 0;
        {
            let mut free = self.free_list();
            while freed < bytes.max(1) {
                let Some(entry) = free.pop() else { break };
                freed += self.buffer_bytes as u64;
                dropped.push(entry);
            }
        }
        drop(dropped);
        freed
    }
}

impl BlockBuffer {
    /// The filled buffer as `Bytes`, without a copy.
    pub fn freeze(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for BlockBuffer {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

impl AsMut<Vec<u8>> for BlockBuffer {
    fn as_mut(&mut self) -> &mut Vec<u8> {
        &mut self.bytes
    }
}

impl Drop for BlockBuffer {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take() {
            pool.give_back(std::mem::take(&mut self.bytes));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::gauge::Gauge;

    fn budget_of(limit: u64) -> Arc<MemoryBudget> {
        MemoryBudget::new(limit, Gauge::default(), &Gauge::default(), Counter::default())
    }

    #[test]
    fn freed_block_buffers_are_reused_and_counted_against_the_budget() {
        let budget = budget_of(256 << 20);
        let pool = BlockBuffers::new(4 << 20, Arc::clone(&budget));
        let first = pool.copy_of(&vec![1u8; 4 << 20]);
        let address = first.as_ptr();
        drop(first);
        assert_eq!(pool.free_buffers(), 1);
        assert_eq!(
            budget.used(),
            (4 << 20) + HEADER_ROOM as u64,
            "a free buffer holds a lease"
        );
        let second = pool.copy_of(&vec![2u8; (4 << 20) - 1000]);
        assert_eq!(second.as_ptr(), address, "the freed buffer is taken again");
        assert_eq!(second.len(), (4 << 20) - 1000);
        assert!(second.iter().all(|b| *b == 2));
        assert_eq!(budget.used(), 0, "a taken buffer's lease is the caller's to hold");
        // A slice keeps the buffer alive; it returns when the last view goes.
        let view = second.slice(10..20);
        drop(second);
        assert_eq!(pool.free_buffers(), 0);
        drop(view);
        assert_eq!(pool.free_buffers(), 1);
    }

    #[test]
    fn the_free_list_is_bounded_and_small_blocks_bypass_it() {
        // 1/32 of 64 MiB is 2 MiB: one 1 MiB-block buffer (with header room) fits.
        let budget = budget_of(64 << 20);
        let pool = BlockBuffers::new(1 << 20, Arc::clone(&budget));
        let held: Vec<Bytes> = (0..4).map(|i| pool.copy_of(&vec![i; 1 << 20])).collect();
        drop(held);
        assert_eq!(pool.free_buffers(), 1);
        drop(pool.copy_of(&[7u8; 1000]));
        drop(pool.copy_of(&vec![7u8; 1 << 19]));
        assert_eq!(
            pool.free_buffers(),
            1,
            "blocks well short of a whole one are not pooled"
        );
        // A full budget keeps nothing free: the memory goes back to the allocator.
        let full = budget_of(64 << 20);
        let pool = BlockBuffers::new(1 << 20, Arc::clone(&full));
        let nearly_all = full.try_reserve(63 << 20).unwrap();
        drop(pool.copy_of(&vec![1u8; 1 << 20]));
        assert_eq!(pool.free_buffers(), 0);
        // A reader short of memory takes the free buffers' leases back.
        drop(nearly_all);
        drop(pool.copy_of(&vec![1u8; 1 << 20]));
        assert_eq!(pool.free_buffers(), 1);
        let held = full.used();
        assert!(pool.reclaim(1) >= 1 << 20);
        assert_eq!(pool.free_buffers(), 0);
        assert_eq!(full.used(), held - ((1 << 20) + HEADER_ROOM as u64));
    }
}
