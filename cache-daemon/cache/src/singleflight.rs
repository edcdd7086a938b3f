//! Single flight: concurrent misses of one block make one source read, and every waiter gets
//! its result. The fetch runs as a task of its own, so a reader that goes away (a cancelled
//! request) does not cancel the fetch for the others.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt, Shared};

use granary_store::StoreError;

type Flight<V, E> = Shared<BoxFuture<'static, Result<V, E>>>;

/// An error a shared fetch can end with; it must also describe a fetch task that died.
pub trait FlightError: Clone + Send + Sync + 'static {
    fn task_failed(detail: String) -> Self;
}

impl FlightError for StoreError {
    fn task_failed(detail: String) -> Self {
        StoreError::failed("fetch", "", detail)
    }
}

/// Flights of values `V` (a block's bytes unless told) keyed by `K`.
pub struct SingleFlight<K, E = StoreError, V = Bytes> {
    inflight: Mutex<HashMap<K, Flight<V, E>>>,
}

impl<K: Hash + Eq + Clone + Send + 'static, E: FlightError, V: Clone + Send + Sync + 'static> Default
    for SingleFlight<K, E, V>
{
    fn default() -> Self {
        SingleFlight {
            inflight: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Hash + Eq + Clone + Send + 'static, E: FlightError, V: Clone + Send + Sync + 'static> SingleFlight<K, E, V> {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, Flight<V, E>>> {
        self.inflight.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether a fetch of `key` is running.
    pub fn in_flight(&self, key: &K) -> bool {
        self.lock().contains_key(key)
    }

    /// Runs `fetch` for `key` unless a fetch of it is already running, and returns its result
    /// with whether it was shared (this caller did not start the fetch). `fetch` must store
    /// its result where later callers look first (the memory tier): the key is released when
    /// it ends.
    pub async fn run<F>(self: &Arc<Self>, key: K, fetch: F) -> (Result<V, E>, bool)
    where
        F: std::future::Future<Output = Result<V, E>> + Send + 'static,
    {
        let (flight, shared) = {
            let mut inflight = self.lock();
            match inflight.get(&key) {
                Some(flight) => (flight.clone(), true),
                None => {
                    let this = Arc::clone(self);
                    let task_key = key.clone();
                    let task = tokio::spawn(async move {
                        let result = fetch.await;
                        this.lock().remove(&task_key);
                        result
                    });
                    let flight = async move {
                        task.await
                            .unwrap_or_else(|e| Err(E::task_failed(format!("the fetch task failed: {e}"))))
                    }
                    .boxed()
                    .shared();
                    inflight.insert(key, flight.clone());
                    (flight, false)
                }
            }
        };
        (flight.await, shared)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_callers_share_one_fetch() {
        let flights = Arc::new(SingleFlight::<u32, StoreError>::default());
        let fetches = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..32 {
            let flights = flights.clone();
            let fetches = fetches.clone();
            tasks.push(tokio::spawn(async move {
                flights
                    .run(1, async move {
                        fetches.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        Ok(Bytes::from_static(b"block"))
                    })
                    .await
            }));
        }
        let mut shared = 0;
        for task in tasks {
            let (result, was_shared) = task.await.unwrap();
            assert_eq!(result.unwrap(), Bytes::from_static(b"block"));
            shared += was_shared as usize;
        }
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
        assert_eq!(shared, 31);
        assert!(flights.lock().is_empty(), "the key is released when the fetch ends");
    }
}
