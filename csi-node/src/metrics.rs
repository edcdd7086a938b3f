//! granary-csi's Prometheus metrics (`granary_csi_*`): the kubelet's calls by method and
//! outcome, and how long they took. A slow or failing NodePublishVolume is what a user sees
//! as a pod stuck in ContainerCreating.

use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tonic::{Code, Status};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    pub method: &'static str,
    /// The gRPC status code's name, e.g. Ok, NotFound, Internal.
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabel {
    pub method: &'static str,
}

/// The calls whose series exist from the start, so a dashboard shows 0 rather than nothing.
const METHODS: [&str; 3] = ["NodePublishVolume", "NodeUnpublishVolume", "NodeGetVolumeStats"];

pub struct CsiMetrics {
    pub calls: Family<CallLabels, Counter>,
    pub call_duration: Family<MethodLabel, Histogram>,
}

impl CsiMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = CsiMetrics {
            calls: Family::default(),
            // 1 ms .. ~65 s: a publish waits for the node daemon's mount.
            call_duration: Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.001, 2.0, 17))),
        };
        for method in METHODS {
            let _ = m.calls.get_or_create(&CallLabels {
                method,
                code: format!("{:?}", Code::Ok),
            });
            let _ = m.call_duration.get_or_create(&MethodLabel { method });
        }
        let r = registry.sub_registry_with_prefix("granary_csi");
        r.register("calls", "CSI calls by method and gRPC status code", m.calls.clone());
        r.register(
            "call_duration_seconds",
            "Time one CSI call took, by method",
            m.call_duration.clone(),
        );
        m
    }

    /// Runs one call, counting its outcome and time under `method`.
    pub async fn timed<T>(
        &self,
        method: &'static str,
        call: impl std::future::Future<Output = Result<T, Status>>,
    ) -> Result<T, Status> {
        let started = Instant::now();
        let result = call.await;
        self.observe(method, started, &result);
        result
    }

    fn observe<T>(&self, method: &'static str, started: Instant, result: &Result<T, Status>) {
        let code = match result {
            Ok(_) => Code::Ok,
            Err(status) => status.code(),
        };
        self.calls
            .get_or_create(&CallLabels {
                method,
                code: format!("{code:?}"),
            })
            .inc();
        self.call_duration
            .get_or_create(&MethodLabel { method })
            .observe(started.elapsed().as_secs_f64());
    }
}
