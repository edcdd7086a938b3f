//! The controllers: level-based reconcilers of Datasets and CheckpointPolicies, the prewarm
//! they drive, and the scheduling gates they lift.

pub mod apply;
pub mod checkpoint_policy;
pub mod dataset;
pub mod gates;
pub mod prewarm;
pub mod store_probe;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource, ResourceExt};

use granary_node_api::volume_mark::VolumeKey;

use crate::metrics::OperatorMetrics;

pub use prewarm::Prewarms;

/// On Datasets and CheckpointPolicies: their cluster-scoped PV is deleted before they go.
pub const VOLUME_FINALIZER: &str = "granary.dev/volume-cleanup";

/// How the operator reaches a Dataset's workers.
#[derive(Debug, Clone, Default)]
pub enum WorkerAddressing {
    /// Each worker by its stable DNS name through the headless Service (in the cluster).
    #[default]
    ClusterDns,
    /// These addresses for every Dataset (an operator run outside the cluster, tests).
    Fixed(Vec<String>),
}

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    /// One recorder, so repeated Events are folded into a series rather than each posted anew.
    recorder: Recorder,
    pub worker_image: String,
    pub addressing: WorkerAddressing,
    /// Where every CheckpointPolicy's nodes reach its commit coordinator instead of its
    /// Service (an operator run outside the cluster, tests).
    pub commit_coordinator: Option<String>,
    /// A node silent this long while a checkpoint waits on it is reported as likely lost.
    pub node_silent_after: Duration,
    pub prewarms: Prewarms,
    pub metrics: Arc<OperatorMetrics>,
    /// Marks the attributes of every PV made, so the nodes serve them.
    pub volume_key: Arc<VolumeKey>,
    /// How long a store may take to answer the reachability probe.
    pub store_timeout: Duration,
    /// Consecutive failures per object, for the error backoff.
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    /// Where the nodes of `policy`'s volume, and the operator, reach its commit coordinator.
    pub fn commit_coordinator_address(&self, policy: &crate::api::CheckpointPolicy, namespace: &str) -> String {
        use kube::ResourceExt;
        self.commit_coordinator
            .clone()
            .unwrap_or_else(|| crate::resources::names::commit_coordinator_address(&policy.name_any(), namespace))
    }

    pub fn new(
        client: Client,
        reporter: Reporter,
        worker_image: String,
        metrics: Arc<OperatorMetrics>,
        volume_key: Arc<VolumeKey>,
    ) -> Self {
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            worker_image,
            addressing: WorkerAddressing::ClusterDns,
            commit_coordinator: None,
            node_silent_after: Duration::from_secs(60),
            prewarms: Prewarms::default(),
            metrics,
            volume_key,
            store_timeout: Duration::from_secs(10),
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// Publishes an Event about `obj`; a failure to publish is logged, never fatal.
    pub async fn event<K: Resource<DynamicType = ()>>(&self, obj: &K, type_: EventType, reason: &str, note: String) {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: reason.into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &obj.object_ref(&())).await {
            tracing::warn!(object = %obj.name_any(), reason, error = %e, "could not publish an event");
        }
    }

    fn succeeded(&self, key: &str) {
        if let Ok(mut f) = self.failures.lock() {
            f.remove(key);
            self.metrics.failing_objects.set(f.len() as i64);
        }
    }

    /// Requeue delay after a failed reconcile: 1 s doubling to 5 min.
    fn backoff(&self, key: &str) -> Duration {
        let n = match self.failures.lock() {
            Ok(mut f) => {
                let n = f.entry(key.to_string()).or_insert(0);
                *n = n.saturating_add(1);
                let n = *n;
                self.metrics.failing_objects.set(f.len() as i64);
                n
            }
            Err(_) => 1,
        };
        Duration::from_secs(1u64 << n.saturating_sub(1).min(9)).min(Duration::from_secs(300))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0} has no namespace")]
    NoNamespace(String),
    #[error("building the objects: {0}")]
    Build(String),
    #[error(transparent)]
    Finalizer(Box<kube::runtime::finalizer::Error<Error>>),
}

fn key<K: Resource>(obj: &K) -> String {
    format!(
        "{}/{}",
        obj.meta().namespace.as_deref().unwrap_or(""),
        obj.meta().name.as_deref().unwrap_or("")
    )
}

/// The controllers' error policy: log, count, and retry with a per-object backoff.
pub fn error_policy<K: Resource>(obj: Arc<K>, error: &Error, ctx: Arc<Context>) -> Action {
    let key = key(obj.as_ref());
    let delay = ctx.backoff(&key);
    tracing::warn!(object = %key, error = %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}
