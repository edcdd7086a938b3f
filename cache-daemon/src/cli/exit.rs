//! Process exit codes, decided in one place.

use granary_cache::client::ClientError;
use granary_cache::worker::StartError;
use granary_fs::checkpoint::CheckpointMountError;
use granary_fs::dataset::MountError;

/// The command did its job.
pub const OK: i32 = 0;
/// The command ran but part of the work failed (a load with failed files, an unreachable
/// store, a missing file).
pub const FAILED: i32 = 1;
/// The command could not start: bad flags or configuration (clap also uses 2).
pub const CONFIG: i32 = 2;

/// A load onto the node ended with every file that fits on the node and some left on the
/// workers (the node-local cache is full of loaded files).
pub const PARTIAL: i32 = 3;

/// Some files of a load onto the node did not fit: exit code [`PARTIAL`].
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PartialLoad(pub String);

/// A mistake in the command line that clap cannot see (flags that need each other, values
/// out of range): exit code [`CONFIG`].
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Returns early with a [`ConfigError`].
macro_rules! config_error {
    ($($arg:tt)*) => {
        return Err(anyhow::Error::new($crate::cli::exit::ConfigError(format!($($arg)*))))
    };
}
pub(crate) use config_error;

pub fn code_for(err: &anyhow::Error) -> i32 {
    for cause in err.chain() {
        if cause.downcast_ref::<ConfigError>().is_some() {
            return CONFIG;
        }
        if cause.downcast_ref::<PartialLoad>().is_some() {
            return PARTIAL;
        }
        if let Some(e) = cause.downcast_ref::<MountError>() {
            return if e.is_config() { CONFIG } else { FAILED };
        }
        if let Some(e) = cause.downcast_ref::<CheckpointMountError>() {
            return if e.is_config() { CONFIG } else { FAILED };
        }
        if cause.downcast_ref::<StartError>().is_some() {
            return CONFIG;
        }
        if let Some(e) = cause.downcast_ref::<ClientError>() {
            return match e {
                ClientError::NoWorkers | ClientError::BadAddress { .. } => CONFIG,
                _ => FAILED,
            };
        }
    }
    FAILED
}
