//! One way to bound bytes: a [`ByteBudget`] over a `tokio::sync::Semaphore`, whose permits are
//! units of bytes. Holders get a [`ByteLease`] that returns its bytes when dropped; waiters
//! queue fairly (first come, first served) instead of polling. The write-behind queue of a
//! worker and the memory budget of a dataset mount are both one of these.
//!
//! A lease is at most `u32::MAX` units (the semaphore's limit per acquire), and at most the
//! whole budget: a request for more is cut to that, so it waits for an idle moment rather
//! than forever.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

#[derive(Debug)]
pub struct ByteBudget {
    permits: Arc<Semaphore>,
    /// Bytes per permit.
    unit: u64,
    units: u64,
}

/// Bytes held under a budget, returned when dropped.
#[derive(Debug)]
#[must_use]
pub struct ByteLease {
    _permit: OwnedSemaphorePermit,
    bytes: u64,
}

impl ByteLease {
    /// The bytes this lease holds, as accounted (whole units).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl ByteBudget {
    /// A budget of `limit` bytes counted in units of `unit` bytes (a larger unit lets a large
    /// budget fit the semaphore; every lease is rounded up to whole units). At least one unit.
    pub fn new(limit: u64, unit: u64) -> Self {
        let unit = unit.max(1);
        let units = (limit / unit).clamp(1, (Semaphore::MAX_PERMITS as u64) >> 1);
        ByteBudget {
            permits: Arc::new(Semaphore::new(units as usize)),
            unit,
            units,
        }
    }

    /// The budget in bytes (whole units).
    pub fn limit(&self) -> u64 {
        self.units * self.unit
    }

    /// Bytes held by leases now.
    pub fn used(&self) -> u64 {
        (self.units - self.permits.available_permits() as u64) * self.unit
    }

    /// Units for `bytes`: rounded up, at least one, at most the whole budget.
    fn units_for(&self, bytes: u64) -> u32 {
        bytes.div_ceil(self.unit).clamp(1, self.units.min(u64::from(u32::MAX))) as u32
    }

    fn lease(&self, permit: OwnedSemaphorePermit, units: u32) -> ByteLease {
        ByteLease {
            _permit: permit,
            bytes: u64::from(units) * self.unit,
        }
    }

    /// Takes `bytes` if they are free now (and fit the budget at all).
    pub fn try_reserve(&self, bytes: u64) -> Option<ByteLease> {
        if bytes.div_ceil(self.unit) > self.units {
            return None;
        }
        let units = self.units_for(bytes);
        let permit = Arc::clone(&self.permits).try_acquire_many_owned(units).ok()?;
        Some(self.lease(permit, units))
    }

    /// Waits for `bytes` (cut to the whole budget), in turn with other waiters.
    pub async fn reserve(&self, bytes: u64) -> ByteLease {
        let units = self.units_for(bytes);
        match Arc::clone(&self.permits).acquire_many_owned(units).await {
            Ok(permit) => self.lease(permit, units),
            // Never closed: the semaphore lives as long as the budget and nothing closes it.
            Err(_) => unreachable!("a budget's semaphore is never closed"),
        }
    }

    /// Waits up to `timeout` for `bytes` (cut to the whole budget).
    pub async fn reserve_within(&self, bytes: u64, timeout: Duration) -> Option<ByteLease> {
        tokio::time::timeout(timeout, self.reserve(bytes)).await.ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_hold_whole_units_within_the_limit_and_return_on_drop() {
        let b = ByteBudget::new(100, 1);
        let a = b.try_reserve(60).expect("fits");
        assert!(b.try_reserve(50).is_none(), "60 + 50 is over the limit");
        let c = b.try_reserve(40).expect("fits");
        assert_eq!(b.used(), 100);
        drop(a);
        assert_eq!(b.used(), 40);
        drop(c);
        assert_eq!(b.used(), 0);
        assert!(
            b.try_reserve(101).is_none(),
            "more than the whole budget never fits now"
        );

        let k = ByteBudget::new(10 << 10, 1 << 10);
        let lease = k.try_reserve(1).expect("fits");
        assert_eq!((lease.bytes(), k.used()), (1 << 10, 1 << 10), "rounded up to a unit");
        assert_eq!(k.limit(), 10 << 10);
    }

    #[tokio::test]
    async fn waiters_get_room_in_turn_and_oversized_requests_are_cut() {
        let b = Arc::new(ByteBudget::new(100, 1));
        let held = b.try_reserve(90).expect("fits");
        let waiter = {
            let b = Arc::clone(&b);
            tokio::spawn(async move { b.reserve(50).await })
        };
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(!waiter.is_finished(), "must wait while 90 of 100 bytes are held");
        assert!(
            b.reserve_within(20, Duration::from_millis(20)).await.is_none(),
            "in turn: behind the waiter"
        );
        drop(held);
        let lease = tokio::time::timeout(Duration::from_secs(2), waiter)
            .await
            .expect("woken")
            .expect("task");
        assert_eq!(b.used(), 50);
        drop(lease);
        let whole = b.reserve(1000).await;
        assert_eq!((whole.bytes(), b.used()), (100, 100));
    }
}
