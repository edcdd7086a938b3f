//! One byte budget (`--max-memory`) for everything the filesystem holds in memory that grows
//! with load: blocks being fetched, blocks cached, readahead. Metadata gets a fixed share at
//! start. Holders take a [`MemoryLease`]; when the budget is exhausted, caches are asked to
//! shrink first, readahead is skipped, and readers wait for memory rather than the process
//! growing past its limit. The bytes are a [`ByteBudget`]; this adds the caches' reclaim and
//! the metrics.

use std::sync::Arc;
use std::time::Duration;

use granary_cache::budget::{ByteBudget, ByteLease};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

pub struct MemoryBudget {
    bytes: ByteBudget,
    used_gauge: Gauge,
    waits: Counter,
}

/// Bytes held under the budget; released when dropped.
#[must_use]
pub struct MemoryLease {
    budget: Arc<MemoryBudget>,
    lease: Option<ByteLease>,
}

impl std::fmt::Debug for MemoryLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MemoryLease({} bytes)", self.lease.as_ref().map_or(0, |l| l.bytes()))
    }
}

impl Drop for MemoryLease {
    fn drop(&mut self) {
        drop(self.lease.take());
        self.budget.used_gauge.set(self.budget.used() as i64);
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
            // Byte units: leases are blocks of any size, and the budget is exact.
            bytes: ByteBudget::new(limit, 1),
            used_gauge,
            waits,
        })
    }

    pub fn limit(&self) -> u64 {
        self.bytes.limit()
    }

    pub fn used(&self) -> u64 {
        self.bytes.used()
    }

    fn lease(self: &Arc<Self>, lease: ByteLease) -> MemoryLease {
        self.used_gauge.set(self.used() as i64);
        MemoryLease {
            budget: Arc::clone(self),
            lease: Some(lease),
        }
    }

    /// Takes `bytes` if they are free now.
    pub fn try_reserve(self: &Arc<Self>, bytes: u64) -> Option<MemoryLease> {
        self.bytes.try_reserve(bytes).map(|l| self.lease(l))
    }

    /// Takes `bytes`, asking `cache` to shrink when they are not free, and waiting for other
    /// holders to release memory when it cannot. A request larger than the whole budget is
    /// cut to the budget, so it waits for an idle moment instead of forever.
    pub async fn reserve(self: &Arc<Self>, bytes: u64, cache: &dyn Reclaim) -> MemoryLease {
        let bytes = bytes.min(self.limit());
        let mut waited = false;
        loop {
            if let Some(lease) = self.try_reserve(bytes) {
                return lease;
            }
            let short = (self.used() + bytes).saturating_sub(self.limit());
            if cache.reclaim(short) > 0 {
                continue;
            }
            if !waited {
                waited = true;
                self.waits.inc();
            }
            // In turn with other waiters; after a while, ask the cache again.
            if let Some(lease) = self.bytes.reserve_within(bytes, Duration::from_millis(50)).await {
                return self.lease(lease);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
