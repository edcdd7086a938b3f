//! `granary-cache cat`: a file's bytes, through the workers, to stdout.

use anyhow::{bail, Context};
use clap::Args;
use futures::StreamExt;
use tokio::io::AsyncWriteExt;

use super::WorkersArgs;

#[derive(Debug, Args)]
pub struct CatArgs {
    #[command(flatten)]
    pub workers: WorkersArgs,
    /// Blocks read ahead at once.
    #[arg(long, default_value_t = 8)]
    pub parallelism: usize,
    /// File path relative to the source root: /train/0001.jpg
    pub path: String,
}

pub async fn run(args: CatArgs) -> anyhow::Result<()> {
    let pool = args.workers.pool().await?;
    let file = pool
        .stat(&args.path, false)
        .await
        .with_context(|| format!("cannot stat {}", args.path))?;
    if file.is_dir {
        bail!("{} is a directory; cat reads files", args.path);
    }
    let mut out = tokio::io::stdout();
    let mut blocks = std::pin::pin!(pool.read_range(&file, 0..file.size, args.parallelism));
    let mut written = 0u64;
    while let Some(block) = blocks.next().await {
        let block = block.with_context(|| format!("reading {} at byte {written}", args.path))?;
        out.write_all(&block).await.context("writing to stdout")?;
        written += block.len() as u64;
    }
    out.flush().await.context("writing to stdout")?;
    if written != file.size {
        bail!("{} ended after {written} of {} bytes", args.path, file.size);
    }
    Ok(())
}
