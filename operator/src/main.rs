//! `granary-operator`: print the CRDs, or run the controllers and the admission webhook.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use granary_operator::run::{self, RunConfig};
use granary_process::logging::LogArgs;

#[derive(Parser)]
#[command(
    name = "granary-operator",
    version,
    about = "Granary's Kubernetes operator: Datasets, CheckpointPolicies and the mounts webhook"
)]
struct Cli {
    #[command(flatten)]
    logging: LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the CustomResourceDefinitions (YAML): `granary-operator crd > crds/granary.dev.yaml`.
    Crd,
    /// Run the controllers (leader-elected) and, with --webhook-listen, the admission webhook.
    Run(Box<RunArgs>),
}

#[derive(clap::Args)]
struct RunArgs {
    /// Watch this namespace only (default: every namespace).
    #[arg(long, env = "GRANARY_WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// Serve the mutating admission webhook (HTTPS) here, e.g. 0.0.0.0:9443.
    #[arg(long)]
    webhook_listen: Option<SocketAddr>,
    /// The webhook's certificate (PEM), e.g. from cert-manager; without it one is generated.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The webhook certificate's key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// The Service in front of the webhook: the names a generated certificate is valid for.
    #[arg(long, default_value = "granary-webhook")]
    webhook_service: String,
    /// Extra names or IP addresses (repeatable) a generated certificate is valid for, e.g.
    /// 10.0.0.5 when the API server calls the webhook by URL from outside the cluster.
    #[arg(long = "webhook-host", conflicts_with = "tls_cert")]
    webhook_hosts: Vec<String>,
    /// The Secret (in the operator's namespace) that keeps a generated certificate, shared by
    /// every replica.
    #[arg(long, default_value = "granary-webhook-tls")]
    webhook_secret: String,
    /// The Mutating- and ValidatingWebhookConfiguration whose caBundle a generated certificate
    /// is written to.
    #[arg(long, default_value = "granary")]
    webhook_configuration: String,
    /// The volume key (the release's volume-key Secret, mounted): the operator marks every
    /// PV's attributes with it, and granary-csi serves only volumes carrying that mark.
    #[arg(long, env = "GRANARY_VOLUME_KEY_FILE")]
    volume_key_file: PathBuf,
    /// Prometheus metrics and /healthz.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// The image of the cache workers, unless a Dataset names its own.
    #[arg(long, env = "GRANARY_WORKER_IMAGE", default_value = granary_operator::resources::DEFAULT_IMAGE)]
    worker_image: String,
    /// The operator's own namespace: where the leader Lease lives.
    #[arg(long, env = "POD_NAMESPACE", default_value = "granary-system")]
    pod_namespace: String,
    /// This replica's name in the Lease.
    #[arg(long, env = "POD_NAME")]
    pod_name: Option<String>,
    /// Run the controllers without leader election (one replica only!).
    #[arg(long)]
    no_leader_election: bool,
    /// How long a leader's Lease lasts without renewal.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    lease_duration: Duration,
    /// Let pods name a Dataset or CheckpointPolicy of their namespace in an inline csi volume
    /// (`volumeAttributes: {dataset: <name>}`): the webhook turns it into that PVC. Without
    /// it such pods are denied (the node plugin never serves inline volumes either way).
    #[arg(long)]
    inline_volumes: bool,
    /// Reach every Dataset's workers at these addresses instead of their cluster DNS names
    /// (an operator run outside the cluster, with port-forwards).
    #[arg(long = "worker-address")]
    worker_addresses: Vec<String>,
}

fn main() -> ExitCode {
    // Before any TLS: kube's client to the API server and the webhook's listener.
    granary_store::tls::install();
    let cli = Cli::parse();
    if let Err(e) = cli.logging.init() {
        eprintln!("granary-operator: {e}");
        return ExitCode::from(2);
    }
    let result = match cli.command {
        Command::Crd => granary_operator::api::crd::yaml()
            .map(|yaml| print!("{yaml}"))
            .map_err(anyhow::Error::from),
        Command::Run(args) => {
            let config = RunConfig {
                namespace: args.namespace,
                webhook_listen: args.webhook_listen,
                tls_files: args.tls_cert.zip(args.tls_key),
                webhook_service: args.webhook_service,
                webhook_hosts: args.webhook_hosts,
                webhook_secret: args.webhook_secret,
                webhook_configuration: args.webhook_configuration,
                metrics_listen: args.metrics_listen,
                volume_key_file: args.volume_key_file,
                worker_image: args.worker_image,
                pod_namespace: args.pod_namespace,
                identity: args
                    .pod_name
                    .unwrap_or_else(|| format!("granary-operator-{}", std::process::id())),
                leader_election: !args.no_leader_election,
                lease_duration: args.lease_duration,
                worker_addresses: args.worker_addresses,
                inline_volumes: args.inline_volumes,
            };
            match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
                Ok(rt) => rt.block_on(run::run(config)),
                Err(e) => Err(anyhow::Error::from(e).context("starting the runtime")),
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("granary-operator: {e:#}");
            ExitCode::FAILURE
        }
    }
}
