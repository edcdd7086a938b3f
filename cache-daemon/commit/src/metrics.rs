//! Metrics of the commit coordinator (`granary_commit_*`), listed in the README's metrics table.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeLabel {
    pub volume: String,
    pub node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabel {
    /// `ready` or `waiting`.
    pub decision: String,
}

pub struct CoordinatorMetrics {
    /// Paths a node has not settled in the store yet.
    pub pending_paths: Family<NodeLabel, Gauge>,
    /// Answers to markers asking to commit.
    pub decisions: Family<DecisionLabel, Counter>,
    pub reports: Counter,
    /// Requests refused for a missing or wrong token.
    pub unauthenticated: Counter,
}

impl CoordinatorMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = CoordinatorMetrics {
            pending_paths: Family::default(),
            decisions: Family::default(),
            reports: Counter::default(),
            unauthenticated: Counter::default(),
        };
        let r = registry.sub_registry_with_prefix("granary_commit");
        r.register(
            "pending_paths",
            "Paths a node of a checkpoint volume has not settled in the store yet",
            m.pending_paths.clone(),
        );
        r.register(
            "decisions",
            "Answers to a marker asking to commit its checkpoint: ready or waiting (for other nodes)",
            m.decisions.clone(),
        );
        r.register("reports", "Reports received from nodes", m.reports.clone());
        r.register(
            "unauthenticated_requests",
            "Requests refused for a missing or wrong token",
            m.unauthenticated.clone(),
        );
        m
    }
}
