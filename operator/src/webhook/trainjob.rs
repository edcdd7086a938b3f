//! Which field of a TrainJob carries pod changes, read from the CRD the API server serves.
//!
//! Kubeflow Trainer v2.1 has `spec.podTemplateOverrides`; v2.2 replaced it with
//! `spec.runtimePatches`, and the API server prunes a field its CRD does not declare, so a
//! patch to the wrong one is silently dropped: the job would run without its volumes or its
//! gate. Both versions serve `trainer.kubeflow.org/v1alpha1`, so the served schema is the only
//! way to tell. A TrainJob whose CRD has neither is denied, never "patched" into nothing.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{Api, Client};
use serde_json::Value;

pub const TRAINJOB_CRD: &str = "trainjobs.trainer.kubeflow.org";

/// How long a read of the served CRD is trusted (a Trainer upgrade is seen within this).
const SCHEMA_TTL: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrainJobLayout {
    /// Trainer ≥ v2.2: `spec.runtimePatches[].trainingRuntimeSpec.template.spec.replicatedJobs[]`.
    RuntimePatches,
    /// Trainer v2.1: `spec.podTemplateOverrides[]`.
    PodTemplateOverrides,
}

/// The layout a CRD's `version` declares, from its structural schema.
pub fn layout_of(crd: &Value, version: &str) -> Result<TrainJobLayout, String> {
    let versions = crd
        .pointer("/spec/versions")
        .and_then(Value::as_array)
        .ok_or_else(|| format!("the CRD {TRAINJOB_CRD} has no versions"))?;
    let served = versions
        .iter()
        .find(|v| v["name"] == version)
        .ok_or_else(|| format!("the CRD {TRAINJOB_CRD} does not serve {version}"))?;
    let spec = served
        .pointer("/schema/openAPIV3Schema/properties/spec/properties")
        .ok_or_else(|| format!("the CRD {TRAINJOB_CRD} {version} has no schema for spec"))?;
    if spec.get("runtimePatches").is_some() {
        Ok(TrainJobLayout::RuntimePatches)
    } else if spec.get("podTemplateOverrides").is_some() {
        Ok(TrainJobLayout::PodTemplateOverrides)
    } else {
        Err(format!(
            "the served TrainJob CRD ({TRAINJOB_CRD} {version}) declares neither spec.runtimePatches (Trainer ≥ 2.2) nor spec.podTemplateOverrides (Trainer 2.1), so granary cannot add volumes to a TrainJob on this cluster; mount into the runtime's pod template, or use a supported Trainer"
        ))
    }
}

/// One read of the served CRD: when, for which version, and what it said.
struct Cached {
    at: Instant,
    version: String,
    layout: Result<TrainJobLayout, String>,
}

/// The served layout, read from the API server and kept for [`SCHEMA_TTL`].
pub struct TrainJobSchema {
    cached: Mutex<Option<Cached>>,
}

impl Default for TrainJobSchema {
    fn default() -> Self {
        TrainJobSchema {
            cached: Mutex::new(None),
        }
    }
}

impl TrainJobSchema {
    pub async fn layout(&self, client: &Client, version: &str) -> Result<TrainJobLayout, String> {
        if let Ok(cached) = self.cached.lock() {
            if let Some(c) = cached.as_ref() {
                if c.at.elapsed() < SCHEMA_TTL && c.version == version {
                    return c.layout.clone();
                }
            }
        }
        let api: Api<CustomResourceDefinition> = Api::all(client.clone());
        // A failed read is not cached: the next TrainJob asks again.
        let crd = api.get(TRAINJOB_CRD).await.map_err(|e| {
            format!("reading the CRD {TRAINJOB_CRD} to know which TrainJob field carries pod changes: {e}")
        })?;
        let value = serde_json::to_value(&crd).map_err(|e| format!("the CRD {TRAINJOB_CRD}: {e}"))?;
        let layout = layout_of(&value, version);
        if let Ok(mut cached) = self.cached.lock() {
            *cached = Some(Cached {
                at: Instant::now(),
                version: version.to_string(),
                layout: layout.clone(),
            });
        }
        layout
    }
}
