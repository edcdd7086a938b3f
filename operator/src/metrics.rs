//! The operator's Prometheus metrics (`granary_operator_*`).

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReconcileLabels {
    pub kind: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

pub struct OperatorMetrics {
    pub reconciles: Family<ReconcileLabels, Counter>,
    pub reconcile_seconds: Family<KindLabel, Histogram>,
    pub leader: Gauge,
    pub admissions: Family<ReconcileLabels, Counter>,
    pub failing_objects: Gauge,
}

/// The kinds reconciled; their series exist from the start, so dashboards show 0, not nothing.
const KINDS: [&str; 2] = ["Dataset", "CheckpointPolicy"];

impl OperatorMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = OperatorMetrics {
            reconciles: Family::default(),
            reconcile_seconds: Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.005, 2.0, 14))),
            leader: Gauge::default(),
            admissions: Family::default(),
            failing_objects: Gauge::default(),
        };
        for kind in KINDS {
            for result in ["ok", "error"] {
                let _ = m.reconciles.get_or_create(&ReconcileLabels {
                    kind: kind.into(),
                    result: result.into(),
                });
            }
            let _ = m.reconcile_seconds.get_or_create(&KindLabel { kind: kind.into() });
        }
        let r = registry.sub_registry_with_prefix("granary_operator");
        r.register(
            "reconciles",
            "Reconciles by resource kind and result (ok, error)",
            m.reconciles.clone(),
        );
        r.register(
            "reconcile_duration_seconds",
            "Time one reconcile took",
            m.reconcile_seconds.clone(),
        );
        r.register(
            "leader",
            "1 while this replica holds the leader Lease",
            m.leader.clone(),
        );
        r.register(
            "admissions",
            "Admission reviews by kind and result (patched, allowed, denied)",
            m.admissions.clone(),
        );
        r.register(
            "failing_objects",
            "Objects whose last reconcile failed, queued for a retry with backoff",
            m.failing_objects.clone(),
        );
        m
    }

    pub fn observe_reconcile(&self, kind: &str, took: Duration, ok: bool) {
        self.reconciles
            .get_or_create(&ReconcileLabels {
                kind: kind.into(),
                result: if ok { "ok" } else { "error" }.into(),
            })
            .inc();
        self.reconcile_seconds
            .get_or_create(&KindLabel { kind: kind.into() })
            .observe(took.as_secs_f64());
    }

    pub fn admission(&self, kind: &str, result: &str) {
        self.admissions
            .get_or_create(&ReconcileLabels {
                kind: kind.into(),
                result: result.into(),
            })
            .inc();
    }
}
