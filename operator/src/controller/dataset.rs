//! Reconciling a Dataset: its workers, its volume, its prewarm and its status.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{finalizer, Event as Finalize};
use kube::{Api, ResourceExt};

use crate::api::common::{condition_is_true, now, set_condition};
use crate::api::dataset::{DatasetPhase, PrewarmPolicy, PrewarmStatus, PREWARMED, SOURCE_REACHABLE, WORKERS_READY};
use crate::api::{validate, Dataset, DatasetStatus};
use crate::resources::{names, volumes, workers};

use super::apply::{apply_namespaced, create_if_absent, delete_if_present, patch_status};
use super::prewarm::{gave_up, spec_hash, Outcome, Progress, MAX_PREWARM_ATTEMPTS};
use super::{gates, store_probe, Context, Error, WorkerAddressing, VOLUME_FINALIZER};

/// Status refresh while something moves (prewarm, workers starting), and at rest.
const BUSY_REQUEUE: Duration = Duration::from_secs(5);
const IDLE_REQUEUE: Duration = Duration::from_secs(300);

pub async fn reconcile(ds: Arc<Dataset>, ctx: Arc<Context>) -> Result<Action, Error> {
    let namespace = ds.namespace().ok_or_else(|| Error::NoNamespace(ds.name_any()))?;
    let api: Api<Dataset> = Api::namespaced(ctx.client.clone(), &namespace);
    let key = super::key(ds.as_ref());
    let started = std::time::Instant::now();
    let result = finalizer(&api, VOLUME_FINALIZER, ds, |event| async {
        match event {
            Finalize::Apply(ds) => apply(&ds, &namespace, &ctx).await,
            Finalize::Cleanup(ds) => cleanup(&ds, &namespace, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    ctx.metrics
        .observe_reconcile("Dataset", started.elapsed(), result.is_ok());
    if result.is_ok() {
        ctx.succeeded(&key);
    }
    result
}

/// The owned namespaced objects go with the Dataset (owner references); the PV is
/// cluster-scoped, so the finalizer removes it.
async fn cleanup(ds: &Dataset, namespace: &str, ctx: &Context) -> Result<Action, Error> {
    ctx.prewarms.stop(&super::key(ds));
    let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
    delete_if_present(&pvs, &names::dataset_pv(namespace, &ds.name_any())).await?;
    Ok(Action::await_change())
}

async fn apply(ds: &Dataset, namespace: &str, ctx: &Context) -> Result<Action, Error> {
    let mut status = ds.status.clone().unwrap_or_default();
    let generation = ds.metadata.generation;
    status.observed_generation = generation;

    if let Err(invalid) = validate::dataset(&ds.name_any(), &ds.spec) {
        let message = invalid.to_string();
        set_condition(
            &mut status.conditions,
            SOURCE_REACHABLE,
            false,
            "InvalidSpec",
            &message,
            generation,
        );
        status.phase = Some(DatasetPhase::Failed);
        if write_status(ds, namespace, ctx, status).await? {
            ctx.event(ds, EventType::Warning, "InvalidSpec", message).await;
        }
        return Ok(Action::await_change());
    }

    let build = |e: crate::api::common::QuantityError| Error::Build(e.to_string());
    apply_namespaced(&ctx.client, &workers::config_map(ds).map_err(build)?).await?;
    let addresses = worker_addresses(ds, namespace, &ctx.addressing);
    apply_namespaced(&ctx.client, &workers::members_config_map(ds, &addresses)).await?;
    apply_namespaced(&ctx.client, &workers::service(ds)).await?;
    let sts = apply_namespaced(
        &ctx.client,
        &workers::statefulset(ds, &ctx.worker_image).map_err(build)?,
    )
    .await?;
    let (pv, pvc) = volumes::dataset_volume(ds, &ctx.volume_key).map_err(build)?;
    let existing_pv = create_if_absent(&Api::<PersistentVolume>::all(ctx.client.clone()), &pv).await?;
    create_if_absent(
        &Api::<PersistentVolumeClaim>::namespaced(ctx.client.clone(), namespace),
        &pvc,
    )
    .await?;
    if !volume_is_current(&pv, &existing_pv, &ctx.volume_key) {
        // A PV's source cannot change; pods keep reading until the claim is recreated.
        ctx.event(
            ds,
            EventType::Warning,
            "VolumeOutdated",
            format!(
                "the PV {} was made for an earlier spec (source or options), or carries no valid mark of this installation's volume key (made by an older Granary, or under another key), which nodes refuse; delete the PVC {} when no pod uses it and it is made again",
                pv.name_any(),
                pvc.name_any()
            ),
        )
        .await;
    }

    // Reachability of the source, with the credentials the workers get.
    let options = store_probe::options_with_secret(&ctx.client, namespace, &ds.spec.source).await;
    let reachable = match options {
        Ok(options) => store_probe::probe(&ds.spec.source.uri, &options, ctx.store_timeout).await,
        Err(e) => Err(e),
    };
    let was_reachable = condition_is_true(&status.conditions, SOURCE_REACHABLE);
    match &reachable {
        Ok(()) => set_condition(
            &mut status.conditions,
            SOURCE_REACHABLE,
            true,
            "Listed",
            "the source store answered a listing",
            generation,
        ),
        Err(e) => set_condition(
            &mut status.conditions,
            SOURCE_REACHABLE,
            false,
            "Unreachable",
            e,
            generation,
        ),
    }

    let desired = ds.spec.cache.workers;
    let ready = sts.status.as_ref().and_then(|s| s.ready_replicas).unwrap_or(0);
    status.workers_desired = desired;
    status.workers_ready = ready;
    status.workers_summary = Some(format!("{ready}/{desired}"));
    let workers_ready = ready >= desired;
    set_condition(
        &mut status.conditions,
        WORKERS_READY,
        workers_ready,
        if workers_ready { "AllReady" } else { "Starting" },
        &format!("{ready} of {desired} workers ready"),
        generation,
    );

    let mut busy = !workers_ready;
    let mut events: Vec<(EventType, &str, String)> = Vec::new();
    if let (Err(e), true) = (&reachable, was_reachable || status.phase.is_none()) {
        events.push((EventType::Warning, "SourceUnreachable", e.clone()));
    }
    if ds.spec.prewarm.policy == PrewarmPolicy::None {
        set_condition(
            &mut status.conditions,
            PREWARMED,
            false,
            "Disabled",
            "prewarm policy is None: data is cached as it is read",
            generation,
        );
        status.prewarm = None;
    } else if workers_ready {
        busy |= drive_prewarm(ds, ctx, &addresses, &mut status, &mut events, generation);
    } else {
        set_condition(
            &mut status.conditions,
            PREWARMED,
            false,
            "WaitingForWorkers",
            "the prewarm starts when every worker is ready",
            generation,
        );
    }

    if workers_ready {
        if let Some(cached) = cached_bytes(&addresses, ds.spec.cache.replicas).await {
            status.cached_bytes = Some(cached);
        }
    }

    let prewarm_done = status.prewarm.as_ref().is_some_and(|p| p.finished.is_some());
    let prewarm_failed = status.prewarm.as_ref().is_some_and(gave_up);
    status.phase = Some(if reachable.is_err() && !workers_ready {
        DatasetPhase::Failed
    } else if !workers_ready {
        DatasetPhase::Pending
    } else if ds.spec.prewarm.policy == PrewarmPolicy::None || prewarm_done {
        DatasetPhase::Ready
    } else if prewarm_failed {
        DatasetPhase::Failed
    } else {
        DatasetPhase::Prewarming
    });

    let previous_phase = ds.status.as_ref().and_then(|s| s.phase);
    let phase = status.phase;
    let changed = write_status(ds, namespace, ctx, status.clone()).await?;
    if changed && previous_phase != phase {
        let type_ = if phase == Some(DatasetPhase::Failed) {
            EventType::Warning
        } else {
            EventType::Normal
        };
        let name = |p: Option<DatasetPhase>| p.map_or("New".to_string(), |p| p.to_string());
        events.push((
            type_,
            "PhaseChanged",
            format!("{} -> {}", name(previous_phase), name(phase)),
        ));
    }
    for (type_, reason, note) in events {
        ctx.event(ds, type_, reason, note).await;
    }

    // Pods held for this Dataset go once it is loaded, or once loading has failed for good.
    if prewarm_done || prewarm_failed {
        gates::release(ctx, namespace).await?;
    }
    Ok(Action::requeue(if busy { BUSY_REQUEUE } else { IDLE_REQUEUE }))
}

/// Whether the existing PV serves what the spec asks. Its worker list is only where mounts
/// first reach the workers (they follow the workers' member set), so a PV made with the full
/// list by an earlier Granary stays current as long as its mark is valid.
fn volume_is_current(
    wanted: &PersistentVolume,
    present: &PersistentVolume,
    key: &granary_node_api::volume_mark::VolumeKey,
) -> bool {
    let csi = |v: &PersistentVolume| v.spec.as_ref().and_then(|s| s.csi.clone());
    let (Some(wanted), Some(present)) = (csi(wanted), csi(present)) else {
        return false;
    };
    let attributes = |c: &k8s_openapi::api::core::v1::CSIPersistentVolumeSource| {
        let mut a = c.volume_attributes.clone().unwrap_or_default();
        a.remove("workers");
        a.remove(granary_node_api::volume_mark::MARK_ATTRIBUTE);
        a
    };
    let present_attributes = present.volume_attributes.clone().unwrap_or_default();
    wanted.volume_handle == present.volume_handle
        && attributes(&wanted) == attributes(&present)
        && key.verify(&present.volume_handle, &present_attributes).is_ok()
}

fn worker_addresses(ds: &Dataset, namespace: &str, addressing: &WorkerAddressing) -> Vec<String> {
    match addressing {
        WorkerAddressing::ClusterDns => (0..ds.spec.cache.workers)
            .map(|i| names::worker_address(&ds.name_any(), namespace, i))
            .collect(),
        WorkerAddressing::Fixed(addrs) => addrs.clone(),
    }
}

/// Advances the prewarm by one step: start or resume it, or copy its progress into the
/// status. Returns whether it is still running.
fn drive_prewarm(
    ds: &Dataset,
    ctx: &Context,
    addresses: &[String],
    status: &mut DatasetStatus,
    events: &mut Vec<(EventType, &str, String)>,
    generation: Option<i64>,
) -> bool {
    let key = super::key(ds);
    let hash = spec_hash(&ds.spec);
    let mut prewarm = status
        .prewarm
        .clone()
        .filter(|p| p.spec_hash == hash)
        .unwrap_or_else(|| PrewarmStatus {
            spec_hash: hash.clone(),
            ..PrewarmStatus::default()
        });
    if prewarm.finished.is_some() {
        status.prewarm = Some(prewarm);
        return false;
    }
    if gave_up(&prewarm) {
        return false;
    }
    let mut running = true;
    match ctx.prewarms.snapshot(&key, &hash) {
        None => {
            // Not running in this process: a first attempt, or one that an operator restart
            // (or a leader change) interrupted.
            if prewarm.attempts > 0 {
                events.push((
                    EventType::Normal,
                    "PrewarmResumed",
                    format!(
                        "attempt {} resumes the prewarm at {} of {} bytes; blocks already cached are skipped",
                        prewarm.attempts + 1,
                        prewarm.bytes_done,
                        prewarm.bytes_total
                    ),
                ));
            } else {
                events.push((
                    EventType::Normal,
                    "PrewarmStarted",
                    format!(
                        "loading {} over {} workers",
                        ds.spec.prewarm.paths.join(", "),
                        addresses.len()
                    ),
                ));
                prewarm.started = Some(now());
            }
            prewarm.attempts += 1;
            prewarm.last_error = None;
            let parallelism = ds.spec.prewarm.parallelism.unwrap_or(0).max(0) as u32;
            ctx.prewarms.start(
                &key,
                hash,
                addresses.to_vec(),
                ds.spec.cache.replicas.max(1) as usize,
                ds.spec.prewarm.paths.clone(),
                parallelism,
            );
        }
        Some(snapshot) => {
            // A resumed attempt starts counting again from zero; never show less than was
            // reached before while it catches up through the cached blocks.
            if snapshot.progress.bytes_done >= prewarm.bytes_done || snapshot.outcome != Outcome::Running {
                copy_progress(&snapshot.progress, &mut prewarm);
            }
            match snapshot.outcome {
                Outcome::Running => {}
                Outcome::Finished => {
                    copy_progress(&snapshot.progress, &mut prewarm);
                    prewarm.finished = Some(now());
                    running = false;
                    let p = &snapshot.progress;
                    let note = format!(
                        "{} files, {} bytes loaded ({} from the source), {} failed",
                        p.files_done, p.bytes_done, p.bytes_from_source, p.files_failed
                    );
                    if p.files_failed > 0 {
                        events.push((
                            EventType::Warning,
                            "PrewarmFinishedWithFailures",
                            format!("{note}: {}", p.failed_files.join("; ")),
                        ));
                    } else {
                        events.push((EventType::Normal, "Prewarmed", note));
                    }
                }
                Outcome::Interrupted(reason) => {
                    prewarm.last_error = Some(reason.clone());
                    running = false;
                    ctx.prewarms.stop(&key);
                    let (type_, reason_word) = if prewarm.attempts >= MAX_PREWARM_ATTEMPTS {
                        (EventType::Warning, "PrewarmFailed")
                    } else {
                        (EventType::Warning, "PrewarmInterrupted")
                    };
                    events.push((type_, reason_word, format!("attempt {}: {reason}", prewarm.attempts)));
                }
            }
        }
    }
    prewarm.summary = Some(summary(&prewarm));
    let (ok, reason, message) = match (&prewarm.finished, &prewarm.last_error) {
        (Some(_), _) if prewarm.failures == 0 => (true, "Loaded", prewarm.summary.clone().unwrap_or_default()),
        (Some(_), _) => (
            false,
            "FilesFailed",
            format!(
                "{} files could not be loaded: {}",
                prewarm.failures,
                prewarm.failed_files.join("; ")
            ),
        ),
        (None, Some(e)) if prewarm.attempts >= MAX_PREWARM_ATTEMPTS => (false, "PrewarmFailed", e.clone()),
        (None, Some(e)) => (false, "Retrying", e.clone()),
        (None, None) => (false, "Loading", prewarm.summary.clone().unwrap_or_default()),
    };
    set_condition(&mut status.conditions, PREWARMED, ok, reason, &message, generation);
    if prewarm.finished.is_some() {
        status.files = Some(prewarm.files_total);
        status.total_bytes = Some(prewarm.bytes_total);
    }
    status.prewarm = Some(prewarm);
    running
}

fn copy_progress(p: &Progress, status: &mut PrewarmStatus) {
    status.bytes_done = p.bytes_done;
    status.bytes_total = p.bytes_total;
    status.bytes_from_source = p.bytes_from_source;
    status.files_done = p.files_done;
    status.files_total = p.files_total;
    status.failures = p.files_failed;
    status.failed_files = p.failed_files.clone();
    status.listing_done = p.listing_done;
}

fn summary(p: &PrewarmStatus) -> String {
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    if !p.listing_done && p.finished.is_none() {
        // A percentage of what is listed so far would read 85% of a dataset barely begun.
        return format!(
            "listing: {:.2} GiB loaded of {:.2}+ GiB listed so far",
            gib(p.bytes_done),
            gib(p.bytes_total)
        );
    }
    let percent = match (p.bytes_done * 100).checked_div(p.bytes_total) {
        Some(percent) => percent,
        None if p.finished.is_some() => 100,
        None => 0,
    };
    format!("{percent}% ({:.2}/{:.2} GiB)", gib(p.bytes_done), gib(p.bytes_total))
}

/// Bytes of the dataset the workers hold, each block once: per worker the larger tier (the
/// tiers are inclusive: a block read into memory is also written to the cache directory,
/// which for a Memory-only Dataset is a tmpfs), summed, divided by the replicas.
async fn cached_bytes(addresses: &[String], replicas: i32) -> Option<u64> {
    let pool = granary_cache::client::WorkerPool::new(addresses, 1).ok()?;
    let stats = tokio::time::timeout(Duration::from_secs(5), pool.stats()).await.ok()?;
    let mut total = 0u64;
    for (_, result) in stats {
        let s = result.ok()?;
        let memory = s.memory.map(|t| t.used_bytes).unwrap_or(0);
        let disk = s.disk.map(|t| t.used_bytes).unwrap_or(0);
        total += memory.max(disk);
    }
    Some(total / replicas.max(1) as u64)
}

async fn write_status(ds: &Dataset, namespace: &str, ctx: &Context, status: DatasetStatus) -> Result<bool, Error> {
    let api: Api<Dataset> = Api::namespaced(ctx.client.clone(), namespace);
    patch_status(&api, &ds.name_any(), ds.status.as_ref(), &status).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_percentage_only_once_the_listing_has_finished() {
        let gib = 1u64 << 30;
        // Early in a 0.59 GiB dataset: 0.06 of 0.07 GiB listed so far is not "85%".
        let listing = PrewarmStatus {
            bytes_done: gib * 6 / 100,
            bytes_total: gib * 7 / 100,
            listing_done: false,
            ..PrewarmStatus::default()
        };
        let text = summary(&listing);
        assert!(!text.contains('%'), "{text}");
        assert_eq!(text, "listing: 0.06 GiB loaded of 0.07+ GiB listed so far");
        let listed = PrewarmStatus {
            bytes_done: gib * 6 / 100,
            bytes_total: gib * 59 / 100,
            listing_done: true,
            ..PrewarmStatus::default()
        };
        assert_eq!(summary(&listed), "10% (0.06/0.59 GiB)");
        let empty_and_done = PrewarmStatus {
            finished: Some(now()),
            ..PrewarmStatus::default()
        };
        assert_eq!(summary(&empty_and_done), "100% (0.00/0.00 GiB)");
    }
}
