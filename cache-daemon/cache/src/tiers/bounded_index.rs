//! A byte-bounded index of cached entries with an eviction policy. It holds no I/O and no
//! locks of its own: tiers wrap it in a short critical section and do their I/O outside.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;

/// What a tier does when it is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EvictionPolicy {
    /// Evict the least recently used entries to make room.
    Lru,
    /// Admit until full, then admit nothing and evict nothing: for shuffled epochs, where every
    /// sample is read once per epoch and LRU would keep evicting what the next epoch needs.
    Pin,
}

impl EvictionPolicy {
    pub fn as_str(&self) -> &'static str {
        match self {
            EvictionPolicy::Lru => "lru",
            EvictionPolicy::Pin => "pin",
        }
    }
}

/// The outcome of an insertion.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission<K, V> {
    /// Stored; these entries were evicted to make room.
    Admitted { evicted: Vec<(K, V, u64)> },
    /// Not stored: the policy keeps what is there, or the entry is larger than the tier.
    Rejected,
}

struct Slot<V> {
    value: V,
    size: u64,
    tick: u64,
}

pub struct BoundedIndex<K, V> {
    capacity: u64,
    used: u64,
    policy: EvictionPolicy,
    entries: HashMap<K, Slot<V>>,
    recency: BTreeMap<u64, K>,
    tick: u64,
    /// Ticks of demoted entries: below every `tick`, so they go first, oldest demotion first.
    demoted_tick: u64,
}

/// Where ordinary ticks start; demoted entries get ticks below it.
const FIRST_TICK: u64 = 1 << 62;

impl<K: Hash + Eq + Clone, V> BoundedIndex<K, V> {
    pub fn new(capacity: u64, policy: EvictionPolicy) -> Self {
        BoundedIndex {
            capacity,
            used: 0,
            policy,
            entries: HashMap::new(),
            recency: BTreeMap::new(),
            tick: FIRST_TICK,
            demoted_tick: 0,
        }
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    pub fn used(&self) -> u64 {
        self.used
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn next_tick(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    /// Looks an entry up and marks it most recently used.
    pub fn get(&mut self, key: &K) -> Option<&mut V> {
        let tick = self.next_tick();
        let slot = self.entries.get_mut(key)?;
        self.recency.remove(&slot.tick);
        slot.tick = tick;
        self.recency.insert(tick, key.clone());
        Some(&mut slot.value)
    }

    /// Marks an entry as the next to evict (after entries demoted before it); a later
    /// [`BoundedIndex::get`] makes it recently used again.
    pub fn demote(&mut self, key: &K) -> Option<&mut V> {
        self.demoted_tick = (self.demoted_tick + 1).min(FIRST_TICK - 1);
        let tick = self.demoted_tick;
        let slot = self.entries.get_mut(key)?;
        self.recency.remove(&slot.tick);
        slot.tick = tick;
        self.recency.insert(tick, key.clone());
        Some(&mut slot.value)
    }

    pub fn contains(&self, key: &K) -> bool {
        self.entries.contains_key(key)
    }

    pub fn remove(&mut self, key: &K) -> Option<V> {
        let slot = self.entries.remove(key)?;
        self.recency.remove(&slot.tick);
        self.used -= slot.size;
        Some(slot.value)
    }

    /// Removes and returns the least recently used entry for which `pred` holds (demoted
    /// entries first).
    pub fn pop_lru_where(&mut self, pred: impl Fn(&V) -> bool) -> Option<(K, V, u64)> {
        let key = self
            .recency
            .values()
            .find(|key| self.entries.get(*key).is_some_and(|slot| pred(&slot.value)))?
            .clone();
        let slot = self.entries.remove(&key)?;
        self.recency.remove(&slot.tick);
        self.used -= slot.size;
        Some((key, slot.value, slot.size))
    }

    /// Removes and returns the least recently used entry with its size.
    pub fn pop_lru(&mut self) -> Option<(K, V, u64)> {
        let (_, key) = self.recency.pop_first()?;
        let slot = self.entries.remove(&key)?;
        self.used -= slot.size;
        Some((key, slot.value, slot.size))
    }

    /// Inserts (or replaces) an entry of `size` bytes, evicting by the policy to make room.
    pub fn insert(&mut self, key: K, value: V, size: u64) -> Admission<K, V> {
        self.insert_evicting(key, value, size, |_| true)
    }

    /// Like [`BoundedIndex::insert`], but only entries for which `evictable` holds may be
    /// evicted (the disk tier never evicts a block whose file is still being written). When
    /// the evictable entries cannot make room, nothing is evicted and the entry is rejected.
    pub fn insert_evicting(&mut self, key: K, value: V, size: u64, evictable: impl Fn(&V) -> bool) -> Admission<K, V> {
        if let Some(old) = self.remove(&key) {
            drop(old);
        }
        if size > self.capacity {
            return Admission::Rejected;
        }
        let mut evicted = Vec::new();
        if self.used + size > self.capacity {
            match self.policy {
                EvictionPolicy::Pin => return Admission::Rejected,
                EvictionPolicy::Lru => {
                    let mut freed = 0;
                    let mut victims = Vec::new();
                    for (tick, candidate) in &self.recency {
                        if self.used - freed + size <= self.capacity {
                            break;
                        }
                        if let Some(slot) = self.entries.get(candidate) {
                            if evictable(&slot.value) {
                                freed += slot.size;
                                victims.push(*tick);
                            }
                        }
                    }
                    if self.used - freed + size > self.capacity {
                        return Admission::Rejected;
                    }
                    for tick in victims {
                        if let Some(victim) = self.recency.remove(&tick) {
                            if let Some(slot) = self.entries.remove(&victim) {
                                self.used -= slot.size;
                                evicted.push((victim, slot.value, slot.size));
                            }
                        }
                    }
                }
            }
        }
        let tick = self.next_tick();
        self.recency.insert(tick, key.clone());
        self.entries.insert(key, Slot { value, size, tick });
        self.used += size;
        Admission::Admitted { evicted }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lru_evicts_the_least_recently_used_and_stays_in_bounds() {
        let mut idx = BoundedIndex::new(10, EvictionPolicy::Lru);
        assert_eq!(idx.insert("a", 1, 4), Admission::Admitted { evicted: vec![] });
        assert_eq!(idx.insert("b", 2, 4), Admission::Admitted { evicted: vec![] });
        idx.get(&"a"); // b is now the oldest
        assert_eq!(
            idx.insert("c", 3, 4),
            Admission::Admitted {
                evicted: vec![("b", 2, 4)]
            }
        );
        assert!(idx.contains(&"a") && idx.contains(&"c") && !idx.contains(&"b"));
        assert_eq!(idx.used(), 8);
        assert_eq!(idx.insert("huge", 9, 11), Admission::Rejected);
    }

    #[test]
    fn demoted_entries_go_first_in_the_order_they_were_demoted() {
        let mut idx = BoundedIndex::new(100, EvictionPolicy::Lru);
        for (i, k) in ["a", "b", "c", "d"].into_iter().enumerate() {
            idx.insert(k, i, 1);
        }
        idx.demote(&"c");
        idx.demote(&"b");
        idx.demote(&"gone");
        let order: Vec<&str> = std::iter::from_fn(|| idx.pop_lru().map(|(k, ..)| k)).collect();
        assert_eq!(order, ["c", "b", "a", "d"]);
        idx.insert("e", 0, 1);
        idx.insert("f", 0, 1);
        idx.demote(&"e");
        idx.get(&"e");
        assert_eq!(idx.pop_lru().map(|(k, ..)| k), Some("f"), "a read undoes the demotion");
        idx.insert("g", 1, 1);
        idx.insert("h", 2, 1);
        assert_eq!(idx.pop_lru_where(|v| *v == 2).map(|(k, ..)| k), Some("h"));
        idx.demote(&"e");
        assert_eq!(idx.pop_lru_where(|_| true).map(|(k, ..)| k), Some("e"), "demoted first");
        assert!(idx.pop_lru_where(|v| *v == 9).is_none());
        assert_eq!(idx.len(), 1);
    }

    #[test]
    fn entries_that_may_not_be_evicted_are_kept() {
        let mut idx = BoundedIndex::new(10, EvictionPolicy::Lru);
        idx.insert("busy", false, 6);
        idx.insert("idle", true, 4);
        // Only "idle" may go, and it is not enough for 7 bytes: nothing is evicted.
        assert_eq!(idx.insert_evicting("new", true, 7, |v| *v), Admission::Rejected);
        assert!(idx.contains(&"busy") && idx.contains(&"idle"));
        assert_eq!(
            idx.insert_evicting("new", true, 4, |v| *v),
            Admission::Admitted {
                evicted: vec![("idle", true, 4)]
            }
        );
    }

    #[test]
    fn pin_admits_until_full_and_never_evicts() {
        let mut idx = BoundedIndex::new(10, EvictionPolicy::Pin);
        assert!(matches!(idx.insert("a", (), 6), Admission::Admitted { .. }));
        assert_eq!(idx.insert("b", (), 6), Admission::Rejected);
        assert!(idx.contains(&"a"));
        assert!(matches!(idx.insert("c", (), 4), Admission::Admitted { .. }));
        assert_eq!(idx.used(), 10);
    }

    #[test]
    fn replacing_an_entry_accounts_its_new_size() {
        let mut idx = BoundedIndex::new(10, EvictionPolicy::Lru);
        idx.insert("a", (), 4);
        idx.insert("a", (), 6);
        assert_eq!(idx.used(), 6);
        assert_eq!(idx.len(), 1);
        assert_eq!(idx.remove(&"a"), Some(()));
        assert_eq!(idx.used(), 0);
    }
}
