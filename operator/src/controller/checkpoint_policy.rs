//! Reconciling a CheckpointPolicy: its volume, and a status read from the target store.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use granary_commit::CommitClient;
use granary_store::retention::oldest_first;
use granary_store::source::SourceTuning;
use granary_store::target::TargetStore;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{finalizer, Event as Finalize};
use kube::{Api, ResourceExt};

use crate::api::checkpoint_policy::{
    IncompleteCheckpoint, PendingNode, COMMITS_FLOWING, READY, TARGET_REACHABLE, UPLOADS_ACCEPTED,
};
use crate::api::common::{condition_is_true, set_condition};
use crate::api::{validate, CheckpointPolicy, CheckpointPolicyStatus};
use crate::resources::{commit_coordinator, names, volumes};

use super::apply::{apply_namespaced, create_if_absent, delete_if_present, patch_status};
use super::{store_probe, Context, Error, VOLUME_FINALIZER};

/// How often the target store is listed for new checkpoints.
const REFRESH: Duration = Duration::from_secs(60);

pub async fn reconcile(policy: Arc<CheckpointPolicy>, ctx: Arc<Context>) -> Result<Action, Error> {
    let namespace = policy
        .namespace()
        .ok_or_else(|| Error::NoNamespace(policy.name_any()))?;
    let api: Api<CheckpointPolicy> = Api::namespaced(ctx.client.clone(), &namespace);
    let key = super::key(policy.as_ref());
    let started = std::time::Instant::now();
    let result = finalizer(&api, VOLUME_FINALIZER, policy, |event| async {
        match event {
            Finalize::Apply(p) => apply(&p, &namespace, &ctx).await,
            Finalize::Cleanup(p) => {
                let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
                delete_if_present(&pvs, &names::checkpoint_pv(&namespace, &p.name_any())).await?;
                Ok(Action::await_change())
            }
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    ctx.metrics
        .observe_reconcile("CheckpointPolicy", started.elapsed(), result.is_ok());
    if result.is_ok() {
        ctx.succeeded(&key);
    }
    result
}

async fn apply(policy: &CheckpointPolicy, namespace: &str, ctx: &Context) -> Result<Action, Error> {
    let mut status = policy.status.clone().unwrap_or_default();
    let generation = policy.metadata.generation;
    status.observed_generation = generation;
    if let Err(invalid) = validate::checkpoint_policy(&policy.spec) {
        let message = invalid.to_string();
        set_condition(
            &mut status.conditions,
            READY,
            false,
            "InvalidSpec",
            &message,
            generation,
        );
        if write_status(policy, namespace, ctx, status).await? {
            ctx.event(policy, EventType::Warning, "InvalidSpec", message).await;
        }
        return Ok(Action::await_change());
    }
    if policy.spec.commit_marker.is_some() {
        // Several nodes write the volume: its commits go through the policy's coordinator.
        let handle = volumes::checkpoint_handle(policy);
        create_if_absent(
            &Api::<Secret>::namespaced(ctx.client.clone(), namespace),
            &commit_coordinator::secret(policy, &ctx.volume_key, &handle),
        )
        .await?;
        apply_namespaced(&ctx.client, &commit_coordinator::service(policy)).await?;
        apply_namespaced(&ctx.client, &commit_coordinator::statefulset(policy, &ctx.worker_image)).await?;
    }
    let coordinator = ctx.commit_coordinator_address(policy, namespace);
    let (pv, pvc) =
        volumes::checkpoint_volume(policy, &ctx.volume_key, &coordinator).map_err(|e| Error::Build(e.to_string()))?;
    let existing = create_if_absent(&Api::<PersistentVolume>::all(ctx.client.clone()), &pv).await?;
    create_if_absent(
        &Api::<PersistentVolumeClaim>::namespaced(ctx.client.clone(), namespace),
        &pvc,
    )
    .await?;
    let attrs = |v: &PersistentVolume| {
        v.spec
            .as_ref()
            .and_then(|s| s.csi.as_ref())
            .and_then(|c| c.volume_attributes.clone())
    };
    if attrs(&existing) != attrs(&pv) {
        ctx.event(
            policy,
            EventType::Warning,
            "VolumeOutdated",
            format!(
                "the PV {} was made for an earlier spec, or carries no valid mark of this installation's volume key (made by an older Granary, or under another key), which nodes refuse; delete the PVC {} when no pod uses it and it is made again",
                pv.name_any(),
                pvc.name_any()
            ),
        )
        .await;
    }

    let was_reachable = condition_is_true(&status.conditions, TARGET_REACHABLE);
    let listed = list_committed(policy, namespace, ctx).await;
    match &listed {
        Ok((count, latest)) => {
            set_condition(
                &mut status.conditions,
                TARGET_REACHABLE,
                true,
                "Listed",
                "the target store answered a listing",
                generation,
            );
            set_condition(
                &mut status.conditions,
                READY,
                true,
                "VolumeReady",
                &format!("mount the PVC {}", pvc.name_any()),
                generation,
            );
            status.committed_count = *count;
            status.latest_checkpoint = latest.as_ref().map(|(dir, _)| dir.clone());
            status.latest_committed_at = latest
                .as_ref()
                .and_then(|(_, t)| *t)
                .and_then(|t| Timestamp::try_from(t).ok())
                .map(Time);
        }
        Err(e) => {
            set_condition(
                &mut status.conditions,
                TARGET_REACHABLE,
                false,
                "Unreachable",
                e,
                generation,
            );
            set_condition(&mut status.conditions, READY, false, "TargetUnreachable", e, generation);
        }
    }
    let (lost, refused) = match coordinator_status(policy, namespace, ctx).await {
        Ok((incomplete, refusals)) => {
            let lost: Vec<String> = incomplete
                .iter()
                .flat_map(|c| {
                    c.waiting_for
                        .iter()
                        .filter(|n| n.silent_seconds >= ctx.node_silent_after.as_secs())
                        .map(move |n| {
                            format!(
                                "{} is not committed: node {} has {} of its files not in the store (e.g. {}) and has not reported for {}s; restart its node daemon with its write-back area, or if that node is gone for good, `granary-cache commit-coordinator forget-node --volume {} --node {}` in the coordinator pod",
                                c.dir, n.node, n.pending_files, n.example, n.silent_seconds, policy.spec.target.uri, n.node
                            )
                        })
                })
                .collect();
            status.incomplete = incomplete;
            let refused: Vec<String> = refusals
                .into_iter()
                .map(|(node, refusal)| format!("node {node}: {refusal}"))
                .collect();
            (lost, refused)
        }
        Err(e) => {
            tracing::debug!(error = %e, "the commit coordinator did not answer");
            (Vec::new(), Vec::new())
        }
    };
    if policy.spec.commit_marker.is_some() {
        match refused.first() {
            Some(message) => set_condition(
                &mut status.conditions,
                UPLOADS_ACCEPTED,
                false,
                "UploadsRefused",
                message,
                generation,
            ),
            None => set_condition(
                &mut status.conditions,
                UPLOADS_ACCEPTED,
                true,
                "Accepted",
                "no node reports its uploads refused by the target",
                generation,
            ),
        }
    }
    if policy.spec.commit_marker.is_some() {
        match lost.first() {
            Some(message) => set_condition(
                &mut status.conditions,
                COMMITS_FLOWING,
                false,
                "NodeSilent",
                message,
                generation,
            ),
            None => set_condition(
                &mut status.conditions,
                COMMITS_FLOWING,
                true,
                "AllNodesReporting",
                "no checkpoint waits on a silent node",
                generation,
            ),
        }
    }
    let previous_latest = policy.status.as_ref().and_then(|s| s.latest_checkpoint.clone());
    let latest = status.latest_checkpoint.clone();
    if write_status(policy, namespace, ctx, status).await? {
        for message in &lost {
            ctx.event(policy, EventType::Warning, "CheckpointIncomplete", message.clone())
                .await;
        }
        for message in &refused {
            ctx.event(policy, EventType::Warning, "UploadsRefused", message.clone())
                .await;
        }
        if let Err(e) = &listed {
            if was_reachable || policy.status.is_none() {
                ctx.event(policy, EventType::Warning, "TargetUnreachable", e.clone())
                    .await;
            }
        }
        if latest != previous_latest {
            if let Some(latest) = latest {
                ctx.event(
                    policy,
                    EventType::Normal,
                    "CheckpointCommitted",
                    format!("{latest} is the latest committed checkpoint"),
                )
                .await;
            }
        }
    }
    Ok(Action::requeue(REFRESH))
}

type Latest = Option<(String, Option<SystemTime>)>;

type Refusals = Vec<(String, String)>;

/// From the policy's commit coordinator: the checkpoints it holds back and on whom, and the
/// nodes whose uploads the target refuses (and why).
async fn coordinator_status(
    policy: &CheckpointPolicy,
    namespace: &str,
    ctx: &Context,
) -> Result<(Vec<IncompleteCheckpoint>, Refusals), String> {
    if policy.spec.commit_marker.is_none() {
        return Ok((Vec::new(), Vec::new()));
    }
    let address = ctx.commit_coordinator_address(policy, namespace);
    let token = commit_coordinator::token(&ctx.volume_key, &volumes::checkpoint_handle(policy));
    let client = CommitClient::new(&address, Some(&token), ctx.store_timeout).map_err(|e| e.to_string())?;
    let status = client.status().await.map_err(|e| e.to_string())?;
    let volumes: Vec<_> = status
        .volumes
        .into_iter()
        .filter(|v| v.volume == policy.spec.target.uri)
        .collect();
    let refusals = volumes
        .iter()
        .flat_map(|v| &v.nodes)
        .filter(|n| !n.upload_refusal.is_empty())
        .map(|n| (n.node.clone(), n.upload_refusal.clone()))
        .collect();
    let incomplete = volumes
        .into_iter()
        .flat_map(|v| v.waiting)
        .map(|w| IncompleteCheckpoint {
            dir: w.dir,
            waiting_seconds: w.waiting_seconds,
            waiting_for: w
                .blockers
                .into_iter()
                .map(|b| PendingNode {
                    node: b.node,
                    pending_files: b.pending,
                    example: b.example,
                    silent_seconds: b.silent_seconds,
                })
                .collect(),
        })
        .collect();
    Ok((incomplete, refusals))
}

/// Committed checkpoints in the target: every directory holding the commit marker. Without a
/// marker nothing is called committed, and the listing only proves the store answers.
async fn list_committed(policy: &CheckpointPolicy, namespace: &str, ctx: &Context) -> Result<(u64, Latest), String> {
    let options = store_probe::options_with_secret(&ctx.client, namespace, &policy.spec.target).await?;
    let Some(marker) = &policy.spec.commit_marker else {
        store_probe::probe(&policy.spec.target.uri, &options, ctx.store_timeout).await?;
        return Ok((0, None));
    };
    let tuning = SourceTuning {
        retries: 0,
        timeout: ctx.store_timeout,
    };
    let target = TargetStore::open(&policy.spec.target.uri, &options, &tuning).map_err(|e| e.to_string())?;
    let committed = tokio::time::timeout(ctx.store_timeout * 3, target.committed(marker))
        .await
        .map_err(|_| format!("{} did not answer a listing in time", policy.spec.target.uri))?
        .map_err(|e| e.to_string())?;
    let count = committed.len() as u64;
    let latest = oldest_first(committed).pop().map(|c| (c.dir, c.modified));
    Ok((count, latest))
}

async fn write_status(
    policy: &CheckpointPolicy,
    namespace: &str,
    ctx: &Context,
    status: CheckpointPolicyStatus,
) -> Result<bool, Error> {
    let api: Api<CheckpointPolicy> = Api::namespaced(ctx.client.clone(), namespace);
    patch_status(&api, &policy.name_any(), policy.status.as_ref(), &status).await
}
