//! The worker's fellow workers: the member set (from `--members`, or a file the operator keeps
//! current, re-read periodically), the set before its last change, and the fills from peers
//! that keep the store's egress at one read per block:
//!
//! - a worker asked for a block it is not the top owner of (a replica, or a failover target)
//!   fills it from the top owner, which reads the store once for all of them;
//! - after the member set changed, a block's new owner copies it from its owner in the set
//!   before, if that one still holds it, instead of reading the store again.
//!
//! A request from a peer is never filled from another peer, so two workers holding different
//! member sets cannot wait on each other; the worst a disagreement costs is a store read.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;

use crate::block::{block_range, BlockKey, BlockName};
use crate::client::{placement, ClientError, WorkerPool};
use crate::metrics::{StateLabel, WorkerMetrics};
use crate::proto::BlockRef;

/// A peer that failed to answer is skipped this long, so a dead node costs one connect
/// timeout, not one per block.
const DOWN_FOR: Duration = Duration::from_secs(10);
/// A fill from a peer that takes longer than this falls back to the store.
const PEER_TIMEOUT: Duration = Duration::from_secs(30);

/// Member addresses as given: split on commas and whitespace, sorted, without repeats.
pub fn parse_members(text: &str) -> Vec<String> {
    let mut members: Vec<String> = text
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    members.sort_unstable();
    members.dedup();
    members
}

struct View {
    current: Vec<String>,
    /// The set before the last change (empty before any change).
    previous: Vec<String>,
}

pub struct Peers {
    me: String,
    view: ArcSwap<View>,
    client: WorkerPool,
    down: Mutex<HashMap<String, Instant>>,
    metrics: Arc<WorkerMetrics>,
}

impl Peers {
    /// `me` is this worker's address as it appears in the member set.
    pub fn new(me: String, members: Vec<String>, metrics: Arc<WorkerMetrics>) -> Result<Self, ClientError> {
        let client = WorkerPool::new(&members, 1)?;
        if !members.contains(&me) {
            tracing::warn!(advertise = %me, ?members,
                "this worker's --advertise address is not in the member set; it fills every block from its owner");
        }
        Ok(Peers {
            me,
            view: ArcSwap::from_pointee(View {
                current: members,
                previous: Vec::new(),
            }),
            client,
            down: Mutex::new(HashMap::new()),
            metrics,
        })
    }

    pub fn me(&self) -> &str {
        &self.me
    }

    pub fn members(&self) -> Vec<String> {
        self.view.load().current.clone()
    }

    /// Adopts a new member set; returns whether it changed. An empty set is refused (a
    /// half-written file), keeping the current one.
    pub fn update(&self, members: Vec<String>) -> bool {
        let view = self.view.load_full();
        if members.is_empty() || members == view.current {
            return false;
        }
        // Connections to the set before stay open too: a moved block is copied from there.
        let reachable: Vec<String> = members.iter().chain(&view.current).cloned().collect();
        if let Err(e) = self.client.set_members(&reachable) {
            tracing::warn!(error = %e, "refused a member set with a bad address; keeping the current one");
            return false;
        }
        let added: Vec<&String> = members.iter().filter(|m| !view.current.contains(m)).collect();
        let removed: Vec<&String> = view.current.iter().filter(|m| !members.contains(m)).collect();
        tracing::info!(?added, ?removed, members = members.len(), "the member set changed");
        self.view.store(Arc::new(View {
            current: members,
            previous: view.current.clone(),
        }));
        true
    }

    /// Peers to fill a block from before the store, in order, each with whether it should
    /// answer from its cache only: the block's top owner (which fills from the store itself),
    /// then its top owner before the last change (only if it still holds the block).
    pub fn sources(&self, name: &BlockName) -> Vec<(String, bool)> {
        let view = self.view.load();
        let top = |set: &[String]| placement::rank(set, name).first().map(|&i| set[i].clone());
        let mut sources = Vec::new();
        let owner = top(&view.current);
        if let Some(owner) = &owner {
            if *owner != self.me {
                sources.push((owner.clone(), false));
            }
        }
        if let Some(before) = top(&view.previous) {
            if before != self.me && Some(&before) != owner.as_ref() {
                sources.push((before, true));
            }
        }
        sources
    }

    fn is_down(&self, addr: &str) -> bool {
        let mut down = self.down.lock().unwrap_or_else(|p| p.into_inner());
        match down.get(addr) {
            Some(until) if Instant::now() < *until => true,
            Some(_) => {
                down.remove(addr);
                false
            }
            None => false,
        }
    }

    fn mark_down(&self, addr: &str) {
        let mut down = self.down.lock().unwrap_or_else(|p| p.into_inner());
        down.insert(addr.to_string(), Instant::now() + DOWN_FOR);
    }

    fn count(&self, outcome: &'static str) {
        self.metrics
            .peer_fills
            .get_or_create(&StateLabel { state: outcome })
            .inc();
    }

    /// The block from the first of `sources` that has it whole, or `None` (read the store).
    pub async fn fill(
        &self,
        sources: &[(String, bool)],
        key: &BlockKey,
        file_size: u64,
        block_size: u64,
    ) -> Option<Bytes> {
        let range = block_range(file_size, block_size, key.index);
        let expected = range.end - range.start;
        for (addr, cached_only) in sources {
            if self.is_down(addr) {
                continue;
            }
            let block = BlockRef {
                path: key.path.clone(),
                version: key.version.clone(),
                file_size,
                block_size,
                index: key.index,
            };
            let answer =
                tokio::time::timeout(PEER_TIMEOUT, self.client.read_block_from(addr, block, *cached_only)).await;
            match answer {
                Ok(Ok(Some((data, _)))) if data.len() as u64 == expected => {
                    self.count("filled");
                    self.metrics.peer_fill_bytes.inc_by(data.len() as u64);
                    return Some(data);
                }
                Ok(Ok(Some((data, _)))) => {
                    tracing::warn!(peer = %addr, path = %key.path, index = key.index, got = data.len(), expected,
                        "a peer sent a block of the wrong length; reading the store");
                    self.count("failed");
                }
                Ok(Ok(None)) => self.count("missed"),
                Ok(Err(e)) if e.is_worker_failure() => {
                    tracing::debug!(peer = %addr, error = %e, "peer unreachable; skipping it for a while");
                    self.mark_down(addr);
                    self.count("failed");
                }
                // The peer answered with an error of the block itself (changed, gone): the
                // store gives the reader the authoritative one.
                Ok(Err(_)) => self.count("failed"),
                Err(_) => {
                    tracing::warn!(peer = %addr, path = %key.path, index = key.index,
                        "a peer took over {PEER_TIMEOUT:?} for a block; reading the store");
                    self.mark_down(addr);
                    self.count("failed");
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::registry::Registry;

    fn peers(me: &str, members: &[&str]) -> Peers {
        let metrics = Arc::new(WorkerMetrics::register(&mut Registry::default(), Default::default()));
        Peers::new(me.into(), members.iter().map(|m| m.to_string()).collect(), metrics).unwrap()
    }

    #[test]
    fn members_parse_from_lines_or_commas() {
        assert_eq!(parse_members("b:1\na:1, c:1\n\nb:1 "), vec!["a:1", "b:1", "c:1"]);
        assert!(parse_members(" \n").is_empty());
    }

    #[tokio::test]
    async fn replicas_fill_from_the_owner_and_moved_blocks_from_the_old_owner() {
        let all = ["w0:1", "w1:1", "w2:1", "w3:1"];
        let name = BlockName::of("f", "v", 7);
        let owner = all[placement::rank(&all, &name)[0]];
        let other = all.iter().find(|w| **w != owner).unwrap();
        assert!(
            peers(owner, &all).sources(&name).is_empty(),
            "the owner reads the store"
        );
        assert_eq!(peers(other, &all).sources(&name), vec![(owner.to_string(), false)]);

        // The owner leaves: the new owner copies from it while it still answers.
        let p = peers(owner, &all);
        let rest: Vec<String> = all.iter().filter(|w| **w != owner).map(|w| w.to_string()).collect();
        let new_owner = rest[placement::rank(&rest, &name)[0]].clone();
        let q = peers(&new_owner, &all);
        assert!(q.update(rest.clone()));
        assert!(!q.update(rest.clone()), "same set");
        assert!(!q.update(Vec::new()), "an empty set is refused");
        assert_eq!(q.sources(&name), vec![(owner.to_string(), true)]);
        assert!(p.update(rest));
        assert_eq!(
            p.sources(&name),
            vec![(new_owner, false)],
            "the leaver fills from the new owner"
        );
    }
}
