//! Process exit codes, decided in one place.

use granary_cache::client::ClientError;
use granary_cache::fuse::MountError;
use granary_cache::worker::StartError;

/// The command did its job.
pub const OK: i32 = 0;
/// The command ran but part of the work failed (a load with failed files, an unreachable
/// store, a missing file).
pub const FAILED: i32 = 1;
/// The command could not start: bad flags or configuration (clap also uses 2).
pub const CONFIG: i32 = 2;

pub fn code_for(err: &anyhow::Error) -> i32 {
    for cause in err.chain() {
        if let Some(e) = cause.downcast_ref::<MountError>() {
            return match e {
                MountError::Mount { .. } | MountError::Workers(ClientError::WorkerUnavailable { .. }) => FAILED,
                _ => CONFIG,
            };
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
