//! Worker choice: the live worker with the fewest requests in flight.
//!
//! Ties rotate, so sequential requests spread over equally idle workers.
//! Each pick holds an [`InFlight`] guard that counts the request against its
//! worker until the relay ends (whatever way it ends).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use nanoinfer_registry::WorkerSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tonic::transport::{Channel, Endpoint};

use crate::metrics::WorkerLabel;

/// Counts one request against a worker while alive.
#[derive(Debug)]
pub struct InFlight(Gauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A chosen worker.
#[derive(Debug)]
pub struct Picked {
    /// Worker id.
    pub id: String,
    /// Its address.
    pub address: String,
    /// A (lazily connected, shared) channel to it.
    pub channel: Channel,
    /// The in-flight guard.
    pub guard: InFlight,
}

struct WorkerState {
    address: String,
    channel: Channel,
    /// The worker's series of `worker_requests_in_flight`: the count itself.
    in_flight: Gauge,
}

/// Per-worker channels and in-flight counts, kept in step with the live set.
#[derive(Default)]
pub struct Router {
    workers: Mutex<HashMap<String, WorkerState>>,
    rotation: AtomicUsize,
    in_flight: Family<WorkerLabel, Gauge>,
}

/// Index of the candidate with the fewest in flight; among ties, the one at
/// `rotation` modulo the number of ties.
pub fn choose(in_flight: &[usize], rotation: usize) -> Option<usize> {
    let min = *in_flight.iter().min()?;
    let ties: Vec<usize> = (0..in_flight.len())
        .filter(|&i| in_flight[i] == min)
        .collect();
    Some(ties[rotation % ties.len()])
}

impl Router {
    /// A router that keeps its in-flight counts in `in_flight`.
    pub fn new(in_flight: Family<WorkerLabel, Gauge>) -> Self {
        Self {
            in_flight,
            ..Self::default()
        }
    }

    /// Picks a worker from `live`, skipping ids in `exclude`.
    pub fn pick(&self, live: &WorkerSet, exclude: &[String]) -> Option<Picked> {
        let mut workers = self.workers.lock().expect("router lock");
        workers.retain(|id, w| {
            let keep = live.get(id).is_some_and(|info| info.address == w.address);
            if !keep {
                self.in_flight.remove(&WorkerLabel { worker: id.clone() });
            }
            keep
        });
        let candidates: Vec<&String> = live.keys().filter(|id| !exclude.contains(id)).collect();
        for id in &candidates {
            if !workers.contains_key(*id) {
                let address = live[*id].address.clone();
                let channel = Endpoint::from_shared(format!("http://{address}"))
                    .ok()?
                    .connect_timeout(Duration::from_secs(1))
                    .tcp_nodelay(true)
                    .connect_lazy();
                let label = WorkerLabel {
                    worker: (*id).clone(),
                };
                let in_flight = self.in_flight.get_or_create_owned(&label);
                workers.insert(
                    (*id).clone(),
                    WorkerState {
                        address,
                        channel,
                        in_flight,
                    },
                );
            }
        }
        let counts: Vec<usize> = candidates
            .iter()
            .map(|id| workers[*id].in_flight.get().max(0) as usize)
            .collect();
        let index = choose(&counts, self.rotation.fetch_add(1, Ordering::Relaxed))?;
        let id = candidates[index].clone();
        let w = &workers[&id];
        w.in_flight.inc();
        Some(Picked {
            address: w.address.clone(),
            channel: w.channel.clone(),
            guard: InFlight(w.in_flight.clone()),
            id,
        })
    }

    /// Requests in flight per worker id.
    pub fn in_flight(&self) -> HashMap<String, usize> {
        let workers = self.workers.lock().expect("router lock");
        workers
            .iter()
            .map(|(id, w)| (id.clone(), w.in_flight.get().max(0) as usize))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nanoinfer_registry::{Capacity, WorkerInfo};
    use std::collections::BTreeMap;
    use std::sync::Arc;

    fn set(ids: &[&str]) -> WorkerSet {
        let mut m = BTreeMap::new();
        for (i, id) in ids.iter().enumerate() {
            m.insert(
                id.to_string(),
                WorkerInfo {
                    id: id.to_string(),
                    address: format!("127.0.0.1:{}", 40000 + i),
                    model: "m".into(),
                    capacity: Capacity {
                        slots: 1,
                        queue: 1,
                        context_length: 1,
                    },
                    version: "0".into(),
                },
            );
        }
        Arc::new(m)
    }

    #[test]
    fn choose_prefers_least_loaded_and_rotates_ties() {
        assert_eq!(choose(&[], 0), None);
        assert_eq!(choose(&[3, 1, 2], 5), Some(1));
        assert_eq!(choose(&[0, 0], 0), Some(0));
        assert_eq!(choose(&[0, 0], 1), Some(1));
        assert_eq!(choose(&[2, 0, 0], 1), Some(2));
    }

    #[tokio::test]
    async fn picks_spread_while_in_flight_and_release_on_drop() {
        let router = Router::default();
        let live = set(&["a", "b"]);
        let first = router.pick(&live, &[]).unwrap();
        let second = router.pick(&live, &[]).unwrap();
        assert_ne!(
            first.id, second.id,
            "a busy worker is not picked while another is idle"
        );
        drop(first);
        drop(second);
        assert!(router.in_flight().values().all(|&n| n == 0));
    }

    #[tokio::test]
    async fn excluded_and_departed_workers_are_skipped() {
        let family = Family::<WorkerLabel, Gauge>::default();
        let router = Router::new(family.clone());
        let live = set(&["a", "b"]);
        for _ in 0..4 {
            assert_eq!(router.pick(&live, &["a".to_string()]).unwrap().id, "b");
        }
        assert!(router
            .pick(&live, &["a".to_string(), "b".to_string()])
            .is_none());
        let _ = router.pick(&live, &[]);
        let only_b = set(&["b"]);
        let _ = router.pick(&only_b, &[]);
        assert_eq!(family.len(), 1, "a departed worker's series is removed");
        assert_eq!(
            router.in_flight().len(),
            1,
            "state of a departed worker is dropped"
        );
    }
}
