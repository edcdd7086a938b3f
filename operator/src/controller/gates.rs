//! Scheduling gates: the webhook gives pods that mount a BeforeScheduling Dataset the gate
//! `granary.dev/prewarm` and lists the Datasets in an annotation; the gate is lifted once
//! every one of them is prewarmed, or has failed to (the pod then runs on a cold cache, and
//! an Event on the pod says why).

use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};

use crate::api::dataset::DatasetPhase;
use crate::api::Dataset;

use super::{Context, Error};

pub const GATE: &str = "granary.dev/prewarm";
/// On a gated pod: the Datasets (comma-separated names) it waits for.
pub const WAITS_FOR_ANNOTATION: &str = "granary.dev/prewarm-datasets";
/// On a gated pod (label `granary.dev/prewarm-gated=true`): what the operator lists and
/// watches, so it never reads every pod of a namespace.
pub const GATED_LABEL: &str = "granary.dev/prewarm-gated";
/// The label selector of gated pods.
pub const GATED_SELECTOR: &str = "granary.dev/prewarm-gated=true";

enum Readiness {
    Prewarmed,
    Failed(String),
    Waiting,
}

async fn readiness(api: &Api<Dataset>, name: &str) -> Result<Readiness, Error> {
    let Some(ds) = api.get_opt(name).await? else {
        return Ok(Readiness::Failed(format!("the Dataset {name} does not exist")));
    };
    let status = ds.status.unwrap_or_default();
    if status.prewarm.as_ref().is_some_and(|p| p.finished.is_some()) {
        return Ok(Readiness::Prewarmed);
    }
    if status.prewarm.as_ref().is_some_and(super::prewarm::gave_up) || status.phase == Some(DatasetPhase::Failed) {
        let why = status
            .prewarm
            .and_then(|p| p.last_error)
            .unwrap_or_else(|| "the Dataset failed (kubectl describe dataset shows why)".into());
        return Ok(Readiness::Failed(format!("the prewarm of {name} failed: {why}")));
    }
    Ok(Readiness::Waiting)
}

/// Lifts the gate of every pod in `namespace` whose Datasets are all done.
pub async fn release(ctx: &Context, namespace: &str) -> Result<(), Error> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), namespace);
    let datasets: Api<Dataset> = Api::namespaced(ctx.client.clone(), namespace);
    let gated = ListParams::default().labels(GATED_SELECTOR);
    // Each Dataset read once per pass, however many gated pods wait for it.
    let mut known: std::collections::HashMap<String, Readiness> = std::collections::HashMap::new();
    for pod in pods.list(&gated).await? {
        let gates = pod
            .spec
            .as_ref()
            .and_then(|s| s.scheduling_gates.clone())
            .unwrap_or_default();
        if !gates.iter().any(|g| g.name == GATE) {
            continue;
        }
        let waits_for = pod.annotations().get(WAITS_FOR_ANNOTATION).cloned().unwrap_or_default();
        let mut failures = Vec::new();
        let mut waiting = false;
        for name in waits_for.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if !known.contains_key(name) {
                known.insert(name.to_string(), readiness(&datasets, name).await?);
            }
            match known.get(name).unwrap_or(&Readiness::Waiting) {
                Readiness::Prewarmed => {}
                Readiness::Failed(why) => failures.push(why.clone()),
                Readiness::Waiting => waiting = true,
            }
        }
        if waiting {
            continue;
        }
        let remaining: Vec<_> = gates.into_iter().filter(|g| g.name != GATE).collect();
        // Only removing gates is allowed on a created pod; the JSON patch tests the list
        // first, so a concurrent change fails the patch instead of being overwritten.
        let patch = json_patch::Patch(vec![
            json_patch::PatchOperation::Test(json_patch::TestOperation {
                path: "/spec/schedulingGates"
                    .parse()
                    .map_err(|e| Error::Build(format!("{e}")))?,
                value: serde_json::to_value(pod.spec.as_ref().and_then(|s| s.scheduling_gates.clone()))
                    .unwrap_or_default(),
            }),
            json_patch::PatchOperation::Replace(json_patch::ReplaceOperation {
                path: "/spec/schedulingGates"
                    .parse()
                    .map_err(|e| Error::Build(format!("{e}")))?,
                value: serde_json::to_value(&remaining).unwrap_or_default(),
            }),
            // Out of the gated set: later reconciles neither list nor watch it again.
            json_patch::PatchOperation::Remove(json_patch::RemoveOperation {
                path: format!("/metadata/labels/{}", GATED_LABEL.replace('/', "~1"))
                    .parse()
                    .map_err(|e| Error::Build(format!("{e}")))?,
            }),
        ]);
        pods.patch(&pod.name_any(), &PatchParams::default(), &Patch::<()>::Json(patch))
            .await?;
        if failures.is_empty() {
            ctx.event(
                &pod,
                EventType::Normal,
                "Prewarmed",
                format!("{waits_for} loaded into the cache; the pod can be scheduled"),
            )
            .await;
        } else {
            ctx.event(
                &pod,
                EventType::Warning,
                "PrewarmFailed",
                format!("scheduled without a warm cache: {}", failures.join("; ")),
            )
            .await;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_selector_selects_the_label() {
        assert_eq!(super::GATED_SELECTOR, format!("{}=true", super::GATED_LABEL));
    }
}
