//! Blocks on their way to the disk tier. A fetched block is served at once and written in the
//! background, so a cold read never waits on the local disk; while pending it stays readable
//! here. The pending bytes are bounded: past the bound, new fetches wait for the disk
//! (backpressure) rather than memory growing. Shutdown flushes what is pending.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use bytes::Bytes;
use tokio::sync::Notify;

use crate::block::BlockName;
use crate::budget::{ByteBudget, ByteLease};

/// The budget is counted in KiB, so a budget of many GiB fits a semaphore.
const UNIT: u64 = 1024;

pub struct WriteBehind {
    pending: Mutex<HashMap<BlockName, Bytes>>,
    budget: ByteBudget,
    in_flight: AtomicUsize,
    idle: Notify,
}

/// Held while a block is pending; dropping it returns its bytes to the budget.
pub struct PendingWrite {
    _lease: ByteLease,
}

impl WriteBehind {
    pub fn new(budget_bytes: u64) -> Self {
        WriteBehind {
            pending: Mutex::new(HashMap::new()),
            budget: ByteBudget::new(budget_bytes, UNIT),
            in_flight: AtomicUsize::new(0),
            idle: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<BlockName, Bytes>> {
        self.pending.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn get(&self, name: &BlockName) -> Option<Bytes> {
        self.lock().get(name).cloned()
    }

    pub fn pending_bytes(&self) -> u64 {
        self.lock().values().map(|b| b.len() as u64).sum()
    }

    /// Waits for room in the budget, then records the block as pending.
    pub async fn begin(&self, name: BlockName, data: Bytes) -> PendingWrite {
        let lease = self.budget.reserve(data.len() as u64).await;
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.lock().insert(name, data);
        PendingWrite { _lease: lease }
    }

    /// The block is on disk (or refused): it is no longer pending.
    pub fn finish(&self, name: &BlockName, write: PendingWrite) {
        self.lock().remove(name);
        drop(write);
        if self.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.idle.notify_waiters();
        }
    }

    /// Waits until nothing is pending.
    pub async fn flush(&self) {
        loop {
            let notified = self.idle.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            if self.in_flight.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn pending_blocks_are_readable_bounded_and_flushed() {
        let wb = Arc::new(WriteBehind::new(8 * 1024));
        let a = BlockName::of("a", "v", 0);
        let b = BlockName::of("b", "v", 0);
        let first = wb.begin(a, Bytes::from(vec![1u8; 6 * 1024])).await;
        assert_eq!(wb.get(&a).map(|d| d.len()), Some(6 * 1024));

        // The second block does not fit until the first is written.
        let waiter = {
            let wb = Arc::clone(&wb);
            tokio::spawn(async move { wb.begin(b, Bytes::from(vec![2u8; 6 * 1024])).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "over the budget, a new write waits");
        wb.finish(&a, first);
        let second = waiter.await.unwrap();
        assert!(wb.get(&a).is_none() && wb.get(&b).is_some());

        let flushed = {
            let wb = Arc::clone(&wb);
            tokio::spawn(async move { wb.flush().await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!flushed.is_finished(), "flush waits for pending writes");
        wb.finish(&b, second);
        flushed.await.unwrap();
    }
}
