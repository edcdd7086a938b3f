//! Structured logs on stderr for every Granary binary: one filter syntax (`--log`, or
//! `RUST_LOG` when set), text or JSON lines.

use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid log filter {filter:?}: {source} (e.g. info, or granary_cache=debug,info)")]
pub struct LogFilterError {
    filter: String,
    source: tracing_subscriber::filter::ParseError,
}

/// The logging flags of every Granary binary (`#[command(flatten)]`), global to subcommands.
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value = "text", env = "GRANARY_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// Log filter, e.g. info or granary_cache=debug (RUST_LOG, when set, wins).
    #[arg(long, global = true, default_value = "info", env = "GRANARY_LOG")]
    pub log: String,
}

impl LogArgs {
    /// Installs the global subscriber these flags describe.
    pub fn init(&self) -> Result<(), LogFilterError> {
        init(self.log_format, &self.log)
    }
}

/// Installs the global subscriber; `RUST_LOG`, when set, wins over `filter`.
pub fn init(format: LogFormat, filter: &str) -> Result<(), LogFilterError> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(env) if !env.is_empty() => env,
        _ => filter.to_string(),
    };
    let env_filter = EnvFilter::try_new(&filter).map_err(|source| LogFilterError { filter, source })?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(env_filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}
