//! `granary-cache load`: prewarm a path over the workers with a progress bar; exits 1 when
//! any file failed, after naming each. With `--mount`, onto this node instead
//! ([`super::load_onto_node`]).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use futures::StreamExt;
use granary_cache::proto::LoadProgress;
use granary_store::units::ByteSize;
use indicatif::{ProgressBar, ProgressStyle};

use std::path::PathBuf;

use super::exit::config_error;
use super::WorkersArgs;

#[derive(Debug, Args)]
pub struct LoadArgs {
    /// Worker addresses, comma-separated (prewarm the workers): host-0:7070,host-1:7070.
    /// Workers with a member set answer with it, so one will do. Not needed with --mount.
    #[arg(
        long,
        env = "GRANARY_WORKERS",
        value_name = "HOST:PORT,...",
        required_unless_present = "mount"
    )]
    pub workers: Option<String>,
    /// Cache each block on this many workers (its top owners).
    #[arg(long, default_value_t = 1)]
    pub replicas: usize,
    /// Load onto this node instead: fill the node-local cache of the dataset mounted here
    /// (the node daemon's mount, or a pod's view of it) with whole files, so the kernel reads
    /// them itself (passthrough) from their first byte. Files that do not fit beside those
    /// loaded before stay on the workers. Run it again to resume.
    #[arg(long, value_name = "MOUNTPOINT")]
    pub mount: Option<PathBuf>,
    /// Blocks fetched at once across the workers (0: the worker's default); with --mount,
    /// files filled at once (0: 8).
    #[arg(long, default_value_t = 0)]
    pub parallelism: u32,
    /// With --mount: exit 0 when files did not fit on the node (they stay on the workers),
    /// instead of 3. For an init container that must not hold its pod back.
    #[arg(long, requires = "mount")]
    pub allow_partial: bool,
    /// File or directory to prewarm, relative to the source root: /train. With --mount,
    /// relative to the mount, several allowed, default all of it.
    pub paths: Vec<String>,
}

pub(super) fn bar() -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(0);
    let style = ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {binary_bytes_per_sec} {msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

fn files_line(p: &LoadProgress) -> String {
    let more = if p.listing_done { "" } else { "+" };
    format!(
        "files {}/{}{more}, failed {}",
        p.files_done + p.files_failed,
        p.files_total,
        p.files_failed
    )
}

pub async fn run(args: LoadArgs) -> anyhow::Result<()> {
    if let Some(mount) = &args.mount {
        let parallelism = match args.parallelism {
            0 => 8,
            n => n as usize,
        };
        let paths = match args.paths.is_empty() {
            true => vec!["/".to_string()],
            false => args.paths.clone(),
        };
        return super::load_onto_node::run(mount, &paths, parallelism, args.allow_partial).await;
    }
    let path = match args.paths.as_slice() {
        [path] => path.clone(),
        [] => config_error!(
            "name the path to prewarm on the workers (/ for all of it): granary-cache load --workers … /train"
        ),
        _ => config_error!("the workers prewarm one path at a time; run granary-cache load once per path"),
    };
    let workers = WorkersArgs {
        workers: args.workers.clone().unwrap_or_default(),
        replicas: args.replicas,
    };
    let pool = workers.pool().await?;
    let started = Instant::now();
    let mut progress = std::pin::pin!(pool
        .load(&path, args.parallelism)
        .await
        .with_context(|| format!("cannot start the prewarm of {}", path))?);
    let bar = bar();
    let mut last_line = Instant::now();
    let mut failures = Vec::new();
    let mut last = LoadProgress::default();
    while let Some(update) = progress.next().await {
        let update = update.with_context(|| format!("the prewarm of {} stopped", path))?;
        for failure in &update.new_failures {
            bar.suspend(|| eprintln!("failed: {}: {}", failure.path, failure.error));
        }
        failures.extend(update.new_failures.iter().cloned());
        bar.set_length(update.bytes_total);
        bar.set_position(update.bytes_done);
        bar.set_message(files_line(&update));
        if bar.is_hidden() && last_line.elapsed() >= Duration::from_secs(2) {
            let rate = update.bytes_done as f64 / started.elapsed().as_secs_f64().max(1e-3);
            eprintln!(
                "loading {}: {}/{} {}/s, {}",
                path,
                ByteSize(update.bytes_done),
                ByteSize(update.bytes_total),
                ByteSize(rate as u64),
                files_line(&update)
            );
            last_line = Instant::now();
        }
        let finished = update.finished;
        last = update;
        if finished {
            break;
        }
    }
    bar.finish_and_clear();
    if !last.finished {
        bail!(
            "the prewarm of {} ended before it finished (the worker went away)",
            path
        );
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "loaded {}: {} files, {} in {:.1}s ({}/s), {} fetched from the source, {} already cached, {} failed",
        path,
        last.files_done,
        ByteSize(last.bytes_done),
        secs,
        ByteSize((last.bytes_done as f64 / secs.max(1e-3)) as u64),
        ByteSize(last.bytes_from_source),
        ByteSize(last.bytes_done - last.bytes_from_source.min(last.bytes_done)),
        last.files_failed
    );
    if last.files_failed > 0 {
        bail!("{} of {} files failed to load", last.files_failed, last.files_total);
    }
    Ok(())
}
