//! `granary-cache stats`: per worker, bytes per tier, hits, misses and source bytes.

use anyhow::bail;
use clap::Args;
use granary_store::units::ByteSize;

use super::WorkersArgs;

#[derive(Debug, Args)]
pub struct StatsArgs {
    #[command(flatten)]
    pub workers: WorkersArgs,
    /// Print JSON (one object per worker) instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: StatsArgs) -> anyhow::Result<()> {
    let pool = args.workers.pool().await?;
    let results = pool.stats().await;
    let failed = results.iter().filter(|(_, r)| r.is_err()).count();
    if args.json {
        let rows: Vec<serde_json::Value> = results
            .iter()
            .map(|(worker, r)| match r {
                Ok(stats) => serde_json::json!({ "worker": worker, "stats": stats }),
                Err(e) => serde_json::json!({ "worker": worker, "error": e.to_string() }),
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        println!(
            "{:<24} {:>21} {:>21} {:>10} {:>10} {:>10} {:>7} {:>12}",
            "WORKER", "MEMORY USED/CAP", "DISK USED/CAP", "MEM HITS", "DISK HITS", "MISSES", "HIT %", "SOURCE READ"
        );
        for (worker, r) in &results {
            match r {
                Err(e) => println!("{worker:<24} error: {e}"),
                Ok(s) => {
                    let mem = s.memory.unwrap_or_default();
                    let disk = s.disk.unwrap_or_default();
                    let hits = mem.hits + disk.hits;
                    let total = hits + s.misses;
                    let ratio = if total == 0 {
                        0.0
                    } else {
                        100.0 * hits as f64 / total as f64
                    };
                    println!(
                        "{:<24} {:>21} {:>21} {:>10} {:>10} {:>10} {:>6.1}% {:>12}",
                        worker,
                        format!("{}/{}", ByteSize(mem.used_bytes), ByteSize(mem.capacity_bytes)),
                        format!("{}/{}", ByteSize(disk.used_bytes), ByteSize(disk.capacity_bytes)),
                        mem.hits,
                        disk.hits,
                        s.misses,
                        ratio,
                        ByteSize(s.source_bytes_read).to_string(),
                    );
                }
            }
        }
    }
    if failed > 0 {
        bail!("{failed} of {} workers did not answer", results.len());
    }
    Ok(())
}
