//! What every node of every volume has not settled in the store yet, and the decision a
//! marker waits for. Pure state: the journal makes it durable, the server serves it.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::proto;

/// One durable change of the registry (a journal line).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Record {
    Report {
        volume: String,
        node: String,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pending: Vec<String>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        settled: Vec<String>,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        replace: bool,
    },
    Forget {
        volume: String,
        node: String,
    },
}

#[derive(Debug)]
struct NodeState {
    pending: BTreeSet<String>,
    last_seen: Instant,
    /// Why the target refuses the node's uploads (live, not journaled).
    upload_refusal: String,
}

impl NodeState {
    fn new(now: Instant) -> Self {
        NodeState {
            pending: BTreeSet::new(),
            last_seen: now,
            upload_refusal: String::new(),
        }
    }
}

#[derive(Debug)]
struct Waiting {
    since: Instant,
    node: String,
    marker: String,
}

#[derive(Debug, Default)]
struct VolumeState {
    nodes: BTreeMap<String, NodeState>,
    /// Directories whose marker was refused: since when, and whose marker (not journaled:
    /// the marker's node asks again within a second).
    waiting: BTreeMap<String, Waiting>,
}

#[derive(Debug, Default)]
pub struct Registry {
    volumes: BTreeMap<String, VolumeState>,
}

/// Whether `path` is `dir` itself or lies under it ("" holds everything).
fn is_under(path: &str, dir: &str) -> bool {
    dir.is_empty() || path == dir || path.strip_prefix(dir).is_some_and(|rest| rest.starts_with('/'))
}

/// The paths of `set` under `dir`, in order (a range scan, not a walk of the set).
fn under<'a>(set: &'a BTreeSet<String>, dir: &'a str) -> impl Iterator<Item = &'a String> + 'a {
    let start = if dir.is_empty() { String::new() } else { dir.to_string() };
    set.range(start..)
        .take_while(move |p| dir.is_empty() || p.starts_with(dir))
        .filter(move |p| is_under(p, dir))
}

impl Registry {
    /// Applies a record; returns the node's unsettled count after it.
    pub fn apply(&mut self, record: &Record, now: Instant) -> u64 {
        match record {
            Record::Report {
                volume,
                node,
                pending,
                settled,
                replace,
            } => {
                let vol = self.volumes.entry(volume.clone()).or_default();
                let state = vol.nodes.entry(node.clone()).or_insert_with(|| NodeState::new(now));
                state.last_seen = now;
                if *replace {
                    state.pending.clear();
                }
                for p in settled {
                    state.pending.remove(p);
                }
                state.pending.extend(pending.iter().cloned());
                state.pending.len() as u64
            }
            Record::Forget { volume, node } => {
                if let Some(vol) = self.volumes.get_mut(volume) {
                    vol.nodes.remove(node);
                }
                0
            }
        }
    }

    /// Marks `node` alive, with its uploads' state, without a change to its paths.
    pub fn seen(&mut self, volume: &str, node: &str, upload_refusal: &str, now: Instant) {
        let state = self
            .volumes
            .entry(volume.to_string())
            .or_default()
            .nodes
            .entry(node.to_string())
            .or_insert_with(|| NodeState::new(now));
        state.last_seen = now;
        state.upload_refusal = upload_refusal.to_string();
    }

    pub fn pending_of(&self, volume: &str, node: &str) -> u64 {
        self.volumes
            .get(volume)
            .and_then(|v| v.nodes.get(node))
            .map_or(0, |n| n.pending.len() as u64)
    }

    /// Who holds `dir` back from being committed by `node`'s `marker` (empty: it may be
    /// committed now). A refusal is remembered as a waiting checkpoint until it passes.
    pub fn may_commit(
        &mut self,
        volume: &str,
        node: &str,
        dir: &str,
        marker: &str,
        now: Instant,
    ) -> Vec<proto::Blocker> {
        let vol = self.volumes.entry(volume.to_string()).or_default();
        let blockers = blockers(vol, node, dir, marker, now);
        if blockers.is_empty() {
            vol.waiting.remove(dir);
        } else {
            vol.waiting.entry(dir.to_string()).or_insert_with(|| Waiting {
                since: now,
                node: node.to_string(),
                marker: marker.to_string(),
            });
        }
        blockers
    }

    pub fn status(&self, now: Instant) -> Vec<proto::VolumeStatus> {
        self.volumes
            .iter()
            .map(|(volume, vol)| proto::VolumeStatus {
                volume: volume.clone(),
                nodes: vol
                    .nodes
                    .iter()
                    .map(|(node, n)| proto::NodeStatus {
                        node: node.clone(),
                        pending: n.pending.len() as u64,
                        silent_seconds: now.saturating_duration_since(n.last_seen).as_secs(),
                        upload_refusal: n.upload_refusal.clone(),
                    })
                    .collect(),
                waiting: vol
                    .waiting
                    .iter()
                    .map(|(dir, w)| proto::WaitingCheckpoint {
                        dir: dir.clone(),
                        waiting_seconds: now.saturating_duration_since(w.since).as_secs(),
                        blockers: blockers(vol, &w.node, dir, &w.marker, now),
                    })
                    .collect(),
            })
            .collect()
    }

    /// The registry as records that rebuild it (a compacted journal).
    pub fn snapshot(&self) -> Vec<Record> {
        self.volumes
            .iter()
            .flat_map(|(volume, vol)| {
                vol.nodes.iter().map(move |(node, n)| Record::Report {
                    volume: volume.clone(),
                    node: node.clone(),
                    pending: n.pending.iter().cloned().collect(),
                    settled: Vec::new(),
                    replace: true,
                })
            })
            .collect()
    }
}

fn blockers(vol: &VolumeState, node: &str, dir: &str, marker: &str, now: Instant) -> Vec<proto::Blocker> {
    vol.nodes
        .iter()
        .filter_map(|(name, n)| {
            let mut paths = under(&n.pending, dir).filter(|p| !(name == node && p.as_str() == marker));
            let example = paths.next()?.clone();
            Some(proto::Blocker {
                node: name.clone(),
                pending: 1 + paths.count() as u64,
                example,
                silent_seconds: now.saturating_duration_since(n.last_seen).as_secs(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(node: &str, pending: &[&str], settled: &[&str]) -> Record {
        Record::Report {
            volume: "v".into(),
            node: node.into(),
            pending: pending.iter().map(|s| s.to_string()).collect(),
            settled: settled.iter().map(|s| s.to_string()).collect(),
            replace: false,
        }
    }

    fn nodes(b: &[proto::Blocker]) -> Vec<&str> {
        b.iter().map(|b| b.node.as_str()).collect()
    }

    #[test]
    fn a_marker_waits_for_every_node_and_only_for_its_directory() {
        let now = Instant::now();
        let mut r = Registry::default();
        r.apply(&report("n1", &["step-2/.metadata", "step-2/__0_0.distcp"], &[]), now);
        r.apply(&report("n2", &["step-2/__1_0.distcp", "step-3/__1_0.distcp"], &[]), now);
        r.apply(&report("n3", &["step-20/__2_0.distcp", "step-2x"], &[]), now);
        let b = r.may_commit("v", "n1", "step-2", "step-2/.metadata", now);
        assert_eq!(nodes(&b), vec!["n1", "n2"], "step-20 and step-2x are other directories");
        assert_eq!(b[1].example, "step-2/__1_0.distcp");
        r.apply(&report("n1", &[], &["step-2/__0_0.distcp"]), now);
        r.apply(&report("n2", &[], &["step-2/__1_0.distcp"]), now);
        let status = r.status(now);
        assert_eq!(status[0].waiting.len(), 1, "remembered as waiting");
        assert_eq!(
            nodes(&status[0].waiting[0].blockers),
            Vec::<&str>::new(),
            "all settled now; the marker is not its own blocker"
        );
        assert!(r.may_commit("v", "n1", "step-2", "step-2/.metadata", now).is_empty());
        assert!(r.status(now)[0].waiting.is_empty());
        // The marker itself holds back a commit asked for by another node.
        assert_eq!(
            nodes(&r.may_commit("v", "n2", "step-2", "step-2/.metadata", now)),
            vec!["n1"]
        );
    }

    #[test]
    fn replace_forget_and_the_snapshot_rebuild_the_same_sets() {
        let now = Instant::now();
        let mut r = Registry::default();
        r.apply(&report("n1", &["a/x", "a/y"], &[]), now);
        r.apply(&report("n2", &["a/z"], &[]), now);
        let replaced = Record::Report {
            volume: "v".into(),
            node: "n1".into(),
            pending: vec!["b/q".into()],
            settled: vec![],
            replace: true,
        };
        assert_eq!(r.apply(&replaced, now), 1);
        let mut copy = Registry::default();
        for rec in r.snapshot() {
            copy.apply(&rec, now);
        }
        assert_eq!(copy.pending_of("v", "n1"), 1);
        assert_eq!(nodes(&copy.may_commit("v", "n3", "a", "a/m", now)), vec!["n2"]);
        r.apply(
            &Record::Forget {
                volume: "v".into(),
                node: "n2".into(),
            },
            now,
        );
        assert!(r.may_commit("v", "n3", "a", "a/m", now).is_empty());
        assert_eq!(
            nodes(&r.may_commit("v", "n3", "", "m", now)),
            vec!["n1"],
            "the root holds everything"
        );
    }
}
