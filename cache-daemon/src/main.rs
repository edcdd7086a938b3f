//! `granary-cache`: cache workers and the tools that talk to them.

mod cli;

use clap::{Parser, Subcommand};
use granary_process::logging::LogArgs;

#[derive(Debug, Parser)]
#[command(
    name = "granary-cache",
    version,
    about = "Granary cache workers and their client tools"
)]
struct Cli {
    #[command(flatten)]
    logging: LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve a tiered block cache of one source store over gRPC.
    Worker(cli::worker::WorkerArgs),
    /// Prewarm a file or directory over the workers, or onto this node (--mount), with progress; exit 1 on failed files, 3 when some did not fit on the node.
    Load(cli::load::LoadArgs),
    /// Write a file's bytes, read through the workers, to stdout.
    Cat(cli::cat::CatArgs),
    /// Show per-worker cache usage, hits, misses and source bytes.
    Stats(cli::stats::StatsArgs),
    /// Mount a dataset read-only, or with --checkpoint a write-back checkpoint volume
    /// (foreground, or --daemon).
    Mount(Box<cli::mount::MountArgs>),
    /// Run the node daemon: every FUSE mount of this node, driven over a unix socket.
    Node(cli::node::NodeArgs),
    /// Measure warm and cold reads through the workers against local disk and the store.
    Bench(cli::bench::BenchArgs),
    /// Serves the commit coordinator of checkpoint volumes written by several nodes: a
    /// checkpoint's marker is uploaded only once every node's files are in the store.
    CommitCoordinator(cli::commit_coordinator::CoordinatorArgs),
}

/// Blocks travel as multi-MiB buffers, allocated and freed per request. The two kinds of
/// process want opposite things from glibc's allocator:
/// - a worker wants speed: glibc serves allocations that large with fresh mmaps and hands
///   freed heap back to the kernel, so every block paid its size in page faults; keeping them
///   in the heap took warm reads from about 1.0 to 1.8 GB/s on the benchmark machine;
/// - a FUSE daemon wants a bounded footprint (its `--max-memory` is a promise): blocks kept
///   in per-thread heaps outlive their use, and a benchmark run measured 2.5 GiB of resident
///   memory under a 1 GiB budget. Blocks are mapped and unmapped instead, in few arenas.
fn tune_allocator(bounded_footprint: bool) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes the allocator's thresholds; it is called once, in main,
    // before any other thread exists.
    unsafe {
        if bounded_footprint {
            libc::mallopt(libc::M_ARENA_MAX, 2);
            libc::mallopt(libc::M_MMAP_THRESHOLD, 512 << 10);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 8 << 20);
        } else {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = bounded_footprint;
}

fn main() {
    granary_store::tls::install();
    let cli = Cli::parse();
    tune_allocator(matches!(cli.command, Command::Mount(_) | Command::Node(_)));
    if let Err(e) = cli.logging.init() {
        eprintln!("error: {e}");
        std::process::exit(cli::exit::CONFIG);
    }
    // Thread names say the role, in `top -H` and in profiles.
    let role = match cli.command {
        Command::Worker(_) => "granary-worker",
        Command::Mount(_) | Command::Node(_) => "granary-fuse",
        _ => "granary-client",
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name(role)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(cli::exit::FAILED);
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Worker(args) => cli::worker::run(args).await,
            Command::Load(args) => cli::load::run(args).await,
            Command::Cat(args) => cli::cat::run(args).await,
            Command::Stats(args) => cli::stats::run(args).await,
            Command::Bench(args) => cli::bench::run(args).await,
            Command::Mount(args) => cli::mount::run(*args).await,
            Command::Node(args) => cli::node::run(args).await,
            Command::CommitCoordinator(args) => cli::commit_coordinator::run(args).await,
        }
    });
    let code = match result {
        Ok(()) => cli::exit::OK,
        Err(e) => {
            eprintln!("error: {e:#}");
            cli::exit::code_for(&e)
        }
    };
    std::process::exit(code);
}
