//! `granary-operator run`: metrics, the webhook on every replica, and the controllers on the
//! leader.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt;
use granary_node_api::volume_mark::VolumeKey;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::events::Reporter;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{watcher, Controller};
use kube::{Api, Client, ResourceExt};
use prometheus_client::registry::Registry;

use crate::api::{CheckpointPolicy, Dataset};
use crate::controller::gates::{GATED_SELECTOR, WAITS_FOR_ANNOTATION};
use crate::controller::{self, Context, WorkerAddressing};
use crate::leader::LeaderElection;
use crate::metrics::OperatorMetrics;
use crate::webhook::server::{router, WebhookServer};
use crate::webhook::tls::{patch_ca_bundle, service_dns_names, shared_self_signed, Certificate, ServingCertificate};

/// How often a certificate given as files is re-read (cert-manager renewals).
const CERTIFICATE_RELOAD: Duration = Duration::from_secs(10);

pub struct RunConfig {
    pub namespace: Option<String>,
    pub webhook_listen: Option<SocketAddr>,
    pub tls_files: Option<(PathBuf, PathBuf)>,
    pub webhook_service: String,
    /// Extra names or IP addresses a generated certificate is valid for.
    pub webhook_hosts: Vec<String>,
    /// Where the generated certificate is kept, in the operator's namespace.
    pub webhook_secret: String,
    pub webhook_configuration: String,
    pub metrics_listen: Option<SocketAddr>,
    /// The key marking the PVs' attributes (see `granary_node_api::volume_mark`).
    pub volume_key_file: PathBuf,
    pub worker_image: String,
    pub pod_namespace: String,
    pub identity: String,
    pub leader_election: bool,
    pub lease_duration: Duration,
    pub worker_addresses: Vec<String>,
    /// Pods may name a Dataset or CheckpointPolicy in an inline csi volume.
    pub inline_volumes: bool,
}

pub async fn run(config: RunConfig) -> anyhow::Result<()> {
    // Configuration mistakes end the start here, before anything is bound or contacted.
    if config.lease_duration < Duration::from_secs(3) {
        anyhow::bail!(
            "--lease-duration {:?} is too short: renewals happen every third of it; use 15s (the default) or more",
            config.lease_duration
        );
    }
    let volume_key = Arc::new(
        VolumeKey::load(&config.volume_key_file)
            .context("the volume key (--volume-key-file): PVs made without it are refused by every node")?,
    );
    if !config.worker_addresses.is_empty() {
        granary_cache::client::WorkerPool::new(&config.worker_addresses, 1).context("--worker-address")?;
    }
    for host in &config.webhook_hosts {
        Certificate::valid_host(host).map_err(|e| anyhow::anyhow!("--webhook-host {e}"))?;
    }
    let client = Client::try_default()
        .await
        .context("no Kubernetes API to talk to: run in a cluster, or set KUBECONFIG / ~/.kube/config")?;
    let mut registry = Registry::default();
    let metrics = Arc::new(OperatorMetrics::new(&mut registry));
    let registry = Arc::new(registry);

    if let Some(listen) = config.metrics_listen {
        let (addr, _) = granary_process::metrics_http::serve(
            listen,
            registry,
            Arc::new(AtomicBool::new(true)),
            std::future::pending(),
        )
        .await
        .with_context(|| format!("binding the metrics endpoint {listen}"))?;
        tracing::info!(%addr, "metrics endpoint");
    }

    if let Some(listen) = config.webhook_listen {
        let serving = match &config.tls_files {
            Some((cert, key)) => {
                let certificate = Certificate::from_files(cert, key).context("loading the webhook certificate")?;
                let serving = ServingCertificate::new(&certificate).context("the webhook certificate")?;
                tokio::spawn(Arc::clone(&serving).reload_from(
                    certificate,
                    cert.clone(),
                    key.clone(),
                    CERTIFICATE_RELOAD,
                ));
                serving
            }
            None => {
                let mut names = service_dns_names(&config.webhook_service, &config.pod_namespace);
                names.extend(config.webhook_hosts.iter().cloned());
                let generated = shared_self_signed(&client, &config.pod_namespace, &config.webhook_secret, names)
                    .await
                    .context("the generated webhook certificate (give --tls-cert/--tls-key, or let the operator read and create its Secret)")?;
                patch_ca_bundle(&client, &config.webhook_configuration, &generated.cert_pem)
                    .await
                    .context("publishing the generated certificate (give --tls-cert/--tls-key, or let the operator update the webhook configurations)")?;
                ServingCertificate::new(&generated).context("the generated webhook certificate")?
            }
        };
        let tls = serving.server_config().context("the webhook certificate")?;
        let server = WebhookServer::bind(
            listen,
            tls,
            router(
                client.clone(),
                Arc::clone(&metrics),
                config.inline_volumes,
                config.worker_image.clone(),
            ),
        )
        .await
        .with_context(|| format!("binding the webhook listener {listen}"))?;
        tracing::info!(addr = %server.local_addr()?, "admission webhook serving");
        tokio::spawn(server.serve());
    }

    let mut ctx = Context::new(
        client.clone(),
        Reporter {
            controller: "granary-operator".into(),
            instance: Some(config.identity.clone()),
        },
        config.worker_image.clone(),
        Arc::clone(&metrics),
        volume_key,
    );
    if !config.worker_addresses.is_empty() {
        ctx.addressing = WorkerAddressing::Fixed(config.worker_addresses.clone());
    }
    let ctx = Arc::new(ctx);

    if config.leader_election {
        let election = LeaderElection::new(
            client.clone(),
            &config.pod_namespace,
            "granary-operator-leader",
            &config.identity,
            config.lease_duration,
        )
        .await
        .with_context(|| {
            format!(
                "the leader Lease {}/granary-operator-leader (the operator's Role must allow get, create, patch on leases)",
                config.pod_namespace
            )
        })?;
        tracing::info!(identity = election.identity(), "waiting for the leader Lease");
        tokio::select! {
            () = election.acquire() => {}
            () = granary_process::shutdown::shutdown_signal() => {
                tracing::info!("stopping before leading");
                return Ok(());
            }
        }
        metrics.leader.set(1);
        tracing::info!("leading: controllers start");
        tokio::select! {
            () = controllers(client, config.namespace.as_deref(), ctx) => {
                // SIGTERM: the controllers stopped; hand the Lease on at once.
                election.release().await;
                metrics.leader.set(0);
                tracing::info!("stopped; the leader Lease is released");
                Ok(())
            }
            lost = election.hold() => {
                metrics.leader.set(0);
                // Exiting ends every reconcile and prewarm of this term at once; the new
                // leader resumes them from the status.
                anyhow::bail!("leadership lost: {lost}")
            }
        }
    } else {
        controllers(client, config.namespace.as_deref(), ctx).await;
        tracing::info!("stopped");
        Ok(())
    }
}

fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Datasets a gated pod waits for: a new pod gets its gate lifted as soon as it is created
/// if its Datasets are loaded already.
fn datasets_of_pod(pod: Pod) -> Vec<ObjectRef<Dataset>> {
    let namespace = pod.namespace().unwrap_or_default();
    pod.annotations()
        .get(WAITS_FOR_ANNOTATION)
        .map(|names| {
            names
                .split(',')
                .map(str::trim)
                .filter(|n| !n.is_empty())
                .map(|n| ObjectRef::new(n).within(&namespace))
                .collect()
        })
        .unwrap_or_default()
}

async fn controllers(client: Client, namespace: Option<&str>, ctx: Arc<Context>) {
    let datasets = Controller::new(api::<Dataset>(&client, namespace), watcher::Config::default())
        .owns(
            api::<StatefulSet>(&client, namespace),
            watcher::Config::default().labels("app.kubernetes.io/managed-by=granary-operator"),
        )
        .watches(
            api::<Pod>(&client, namespace),
            // Gated pods only: never a watch (and a cache) of every pod in the cluster.
            watcher::Config::default().labels(GATED_SELECTOR),
            datasets_of_pod,
        )
        .shutdown_on_signal()
        .run(
            controller::dataset::reconcile,
            controller::error_policy,
            Arc::clone(&ctx),
        )
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "dataset controller");
            }
        });
    let policies = Controller::new(api::<CheckpointPolicy>(&client, namespace), watcher::Config::default())
        .shutdown_on_signal()
        .run(controller::checkpoint_policy::reconcile, controller::error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "checkpoint policy controller");
            }
        });
    futures::join!(datasets, policies);
}
