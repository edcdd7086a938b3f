//! One byte budget (`--max-memory`) for everything the filesystem holds in memory that grows
//! with load: blocks being fetched, blocks cached, readahead. Metadata gets a fixed share at
//! start. Holders take a [`MemoryLease`]; when the budget is exhausted, caches are asked to
//! shrink first, readahead is skipped, and readers wait for memory rather than the process
//! growing past its limit.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::Notify;

pub struct MemoryBudget {
    limit: u64,
    used: AtomicU64,
    freed: Notify,
    used_gauge: Gauge,
    waits: Counter,
}

/// Bytes held under the budget; released when dropped.
#[must_use]
pub struct MemoryLease {
    budget: Arc<MemoryBudget>,
    bytes: u64,
}

impl std::fmt::Debug for MemoryLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MemoryLease({} bytes)", self.bytes)
    }
}

impl Drop for MemoryLease {
    fn drop(&mut self) {
        if self.bytes > 0 {
            let before = self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
            self.budget.used_gauge.set((before - self.bytes) as i64);
            self.budget.freed.notify_waiters();
        }
    }
}

/// Something that holds memory it can give back on request (a cache).
pub trait Reclaim: Send + Sync {
    /// Frees at least `bytes` if it can; returns how many bytes it freed.
    fn reclaim(&self, bytes: u64) -> u64;
}

impl MemoryBudget {
    pub fn new(limit: u64, used_gauge: Gauge, limit_gauge: &Gauge, waits: Counter) -> Arc<Self> {
        limit_gauge.set(limit as i64);
        Arc::new(MemoryBudget {
            limit,
            used: AtomicU64::new(0),
            freed: Notify::new(),
            used_gauge,
            waits,
        })
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    /// Takes `bytes` if they are free now.
    pub fn try_reserve(self: &Arc<Self>, bytes: u64) -> Option<MemoryLease> {
        let mut used = self.used.load(Ordering::Acquire);
        loop {
            let next = used.checked_add(bytes)?;
            if next > self.limit {
                return None;
            }
            match self
                .used
                .compare_exchange_weak(used, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    self.used_gauge.set(next as i64);
                    return Some(MemoryLease {
                        budget: Arc::clone(self),
                        bytes,
                    });
                }
                Err(now) => used = now,
            }
        }
    }

    /// Takes `bytes`, asking `cache` to shrink when they are not free, and waiting for other
    /// holders to release memory when it cannot. A request larger than the whole budget is
    /// cut to the budget, so it waits for an idle moment instead of forever.
    pub async fn reserve(self: &Arc<Self>, bytes: u64, cache: &dyn Reclaim) -> MemoryLease {
        let bytes = bytes.min(self.limit);
        let mut waited = false;
        loop {
            // Register for wake-ups before checking, so a release in between is not missed.
            let freed = self.freed.notified();
            if let Some(lease) = self.try_reserve(bytes) {
                return lease;
            }
            let short = (self.used() + bytes).saturating_sub(self.limit);
            if cache.reclaim(short) > 0 {
                continue;
            }
            if !waited {
                waited = true;
                self.waits.inc();
            }
            // Time-bounded: a release racing the registration costs at most this delay.
            let _ = tokio::time::timeout(Duration::from_millis(50), freed).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct NothingToGive;
    impl Reclaim for NothingToGive {
        fn reclaim(&self, _bytes: u64) -> u64 {
            0
        }
    }

    fn budget(limit: u64) -> Arc<MemoryBudget> {
        MemoryBudget::new(limit, Gauge::default(), &Gauge::default(), Counter::default())
    }

    #[test]
    fn leases_stay_within_the_limit_and_release_on_drop() {
        let b = budget(100);
        let a = b.try_reserve(60).unwrap();
        assert!(b.try_reserve(50).is_none(), "60 + 50 is over the limit");
        let c = b.try_reserve(40).unwrap();
        assert_eq!(b.used(), 100);
        drop(a);
        assert_eq!(b.used(), 40);
        drop(c);
        assert_eq!(b.used(), 0);
    }

    #[tokio::test]
    async fn a_reader_waits_for_memory_instead_of_exceeding_the_budget() {
        let b = budget(100);
        let held = b.try_reserve(90).unwrap();
        let waiter = {
            let b = Arc::clone(&b);
            tokio::spawn(async move { b.reserve(50, &NothingToGive).await })
        };
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(!waiter.is_finished(), "must wait while 90 of 100 bytes are held");
        drop(held);
        let lease = tokio::time::timeout(Duration::from_secs(2), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(b.used(), 50);
        drop(lease);
        // Larger than the budget: cut to the budget rather than waiting forever.
        let whole = b.reserve(1000, &NothingToGive).await;
        assert_eq!(b.used(), 100);
        drop(whole);
    }
}
