//! `granary-cache commit-coordinator`: the commit coordinator of checkpoint volumes written
//! by several nodes (one per CheckpointPolicy in a cluster, a StatefulSet with a PVC).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Subcommand};
use granary_commit::metrics::CoordinatorMetrics;
use granary_commit::server::{self, CoordinatorService};
use granary_commit::CommitClient;
use prometheus_client::registry::Registry;

use super::exit::config_error;

#[derive(Debug, Args)]
pub struct CoordinatorArgs {
    #[command(subcommand)]
    pub command: Option<CoordinatorCommand>,
    /// Address to serve the nodes on.
    #[arg(long, default_value = "0.0.0.0:7071")]
    pub listen: SocketAddr,
    /// Directory of the coordinator's journal. Keep it (a PVC): a coordinator that forgets
    /// a node's pending files could let a checkpoint commit without them.
    #[arg(long, env = "GRANARY_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// File holding the token every request must carry (the operator writes it into the
    /// CheckpointPolicy's coordinator Secret). Without it any client is served.
    #[arg(long, env = "GRANARY_COMMIT_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Address for Prometheus /metrics and /ready.
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// How long after a start no checkpoint is committed, so every live node (reporting at
    /// least every 5 s) sends its whole unsettled set first; keep it above 5s.
    #[arg(long, default_value = "12s", value_parser = humantime::parse_duration)]
    pub resync_grace: std::time::Duration,
}

#[derive(Debug, Subcommand)]
pub enum CoordinatorCommand {
    /// Prints every volume's nodes and the checkpoints waiting on them, as JSON.
    Status(ClientArgs),
    /// Drops a node's unsettled files (its write-back area is lost for good): the
    /// checkpoints it held back may then commit without them.
    ForgetNode {
        #[command(flatten)]
        client: ClientArgs,
        /// The volume (its target store URI).
        #[arg(long)]
        volume: String,
        #[arg(long)]
        node: String,
    },
}

#[derive(Debug, Args)]
pub struct ClientArgs {
    /// The coordinator's address.
    #[arg(long, default_value = "127.0.0.1:7071")]
    pub coordinator: String,
    #[arg(long, env = "GRANARY_COMMIT_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
}

/// Reads a token file, trimmed; an empty one is a mistake.
pub fn read_token(path: &std::path::Path) -> anyhow::Result<String> {
    let token = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the commit token file {}", path.display()))?;
    let token = token.trim().to_string();
    if token.is_empty() {
        config_error!("the commit token file {} is empty", path.display());
    }
    Ok(token)
}

fn client(args: &ClientArgs) -> anyhow::Result<CommitClient> {
    let token = args.token_file.as_deref().map(read_token).transpose()?;
    Ok(CommitClient::new(
        &args.coordinator,
        token.as_deref(),
        std::time::Duration::from_secs(10),
    )?)
}

pub async fn run(args: CoordinatorArgs) -> anyhow::Result<()> {
    match &args.command {
        Some(CoordinatorCommand::Status(c)) => {
            let status = client(c)?.status().await?;
            let volumes: Vec<serde_json::Value> = status
                .volumes
                .iter()
                .map(|v| {
                    serde_json::json!({
                        "volume": v.volume,
                        "nodes": v.nodes.iter().map(|n| serde_json::json!({"node": n.node, "pending": n.pending, "silentSeconds": n.silent_seconds})).collect::<Vec<_>>(),
                        "waiting": v.waiting.iter().map(|w| serde_json::json!({
                            "dir": w.dir,
                            "waitingSeconds": w.waiting_seconds,
                            "blockers": w.blockers.iter().map(|b| serde_json::json!({"node": b.node, "pending": b.pending, "example": b.example, "silentSeconds": b.silent_seconds})).collect::<Vec<_>>(),
                        })).collect::<Vec<_>>(),
                    })
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&volumes)?);
            return Ok(());
        }
        Some(CoordinatorCommand::ForgetNode {
            client: c,
            volume,
            node,
        }) => {
            let forgotten = client(c)?.forget_node(volume, node).await?;
            println!("forgot {forgotten} unsettled paths of {node} in {volume}");
            return Ok(());
        }
        None => {}
    }
    let Some(state_dir) = args.state_dir.clone() else {
        config_error!("commit-coordinator needs --state-dir (a directory kept across restarts, e.g. a PVC)");
    };
    let token = args.token_file.as_deref().map(read_token).transpose()?;
    if token.is_none() {
        tracing::warn!("no --token-file: any client that reaches this port can report or commit");
    }
    let mut registry = Registry::default();
    let metrics = Arc::new(CoordinatorMetrics::register(&mut registry));
    if args.resync_grace < std::time::Duration::from_secs(6) {
        config_error!("--resync-grace must exceed the nodes' 5s heartbeat (e.g. 12s), or a restarted coordinator could commit before a node tells it its pending files");
    }
    let service = CoordinatorService::open(&state_dir, token, args.resync_grace, metrics)?;
    let ready = Arc::new(AtomicBool::new(false));
    let shutdown = super::shutdown_signal();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    if let Some(addr) = args.metrics_listen {
        let (bound, _) = granary_process::metrics_http::serve(
            addr,
            Arc::new(registry),
            Arc::clone(&ready),
            stopped(stop_rx.clone()),
        )
        .await
        .with_context(|| format!("cannot serve metrics on {addr}"))?;
        tracing::info!(%bound, "metrics served");
    }
    let (addr, server) = server::serve(args.listen, service, stopped(stop_rx)).await?;
    ready.store(true, Ordering::Release);
    tracing::info!(%addr, state_dir = %state_dir.display(), "commit coordinator serving");
    println!("commit coordinator serving on {addr}");
    shutdown.await;
    let _ = stop_tx.send(true);
    server.await.context("the coordinator's server task failed")??;
    Ok(())
}
