//! The client library of the cache workers: rendezvous placement over a worker list and the
//! calls everything else makes (CLI, node daemon, operator, workers prewarming for each other).

mod error;
pub mod placement;
mod pool;

pub use error::{ClientError, ORIGIN_KEY};
pub use pool::{parse_worker_list, WorkerPool, FRAME_SIZE, MAX_MESSAGE};
