//! The `granary-cache` command line: one module per subcommand, plus the one place that maps
//! errors to exit codes.

pub mod bench;
pub mod cat;
pub mod checkpoint_mount;
pub mod commit_coordinator;
pub mod exit;
pub mod load;
pub mod load_onto_node;
pub mod mount;
pub mod node;
pub mod stats;
pub mod worker;

use clap::Args;
use granary_cache::client::{parse_worker_list, WorkerPool};

/// How to reach the workers; shared by every client subcommand.
#[derive(Debug, Args)]
pub struct WorkersArgs {
    /// Worker addresses, comma-separated: host-0:7070,host-1:7070. Workers started with a
    /// member set (--members, --members-file) answer with it, and it replaces this list, so
    /// any one worker will do; otherwise all clients of a dataset must list the same workers,
    /// as placement is computed from this list.
    #[arg(long, env = "GRANARY_WORKERS", value_name = "HOST:PORT,...")]
    pub workers: String,
    /// Cache each block on this many workers (its top owners), and spread reads over them:
    /// for files read by many nodes at once.
    #[arg(long, default_value_t = 1)]
    pub replicas: usize,
}

/// How long a client tool waits for the workers' member set before using --workers as given.
const MEMBERS_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

impl WorkersArgs {
    /// The pool over the workers' own member set, or over --workers when they have none.
    pub async fn pool(&self) -> anyhow::Result<WorkerPool> {
        let pool = WorkerPool::new(&parse_worker_list(&self.workers), self.replicas)?;
        match tokio::time::timeout(MEMBERS_WAIT, pool.refresh_members()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, "no member set from the workers; using --workers"),
            Err(_) => tracing::debug!("the workers did not send their member set in time; using --workers"),
        }
        Ok(pool)
    }
}

/// Parses `key=value` for --source-option.
pub fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(format!(
            "expected key=value, got {s:?} (e.g. --source-option region=us-east-1)"
        )),
    }
}

pub use granary_process::shutdown::shutdown_signal;
