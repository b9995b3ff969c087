//! Worker health as the router sees it.
//!
//! **Passive ejection**: a worker whose call fails at the transport level
//! (connection refused or reset, an unanswered HTTP/2 ping, a stream cut
//! short, no first token in time) is taken out of routing at once by
//! [`Router::eject`]. A probe task then asks its `grpc.health.v1` with
//! jittered exponential backoff and re-admits it when it answers SERVING.
//! A worker that leaves etcd is forgotten, probe and all.

use std::sync::Arc;
use std::time::Duration;

use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use super::Router;
use crate::metrics::WorkerLabel;

/// A random factor in [0, 1), to spread retries and probes apart.
pub fn jitter() -> f64 {
    f64::from(uuid::Uuid::new_v4().as_u128() as u16) / 65536.0
}

/// The probe delay after `failures` failed probes: 200 ms doubling to 5 s,
/// with ±25% jitter from `jitter` (in [0, 1)) so probes of many ejected
/// workers do not fall into step.
pub fn probe_delay(failures: u32, jitter: f64) -> Duration {
    let base = 200.0 * 2f64.powi(failures.min(5) as i32);
    let ms = base.min(5000.0) * (0.75 + 0.5 * jitter);
    Duration::from_millis(ms as u64)
}

impl Router {
    /// Takes `id` out of routing after a transport failure and starts
    /// probing it. A worker already ejected (or unknown) is left alone.
    pub fn eject(self: &Arc<Self>, id: &str, reason: &str) {
        let (channel, generation) = {
            let mut workers = self.workers.lock().expect("router lock");
            let Some(w) = workers.get_mut(id) else { return };
            if w.ejected {
                return;
            }
            w.ejected = true;
            let probe = (w.channels[0].clone(), w.generation);
            self.publish(&workers);
            probe
        };
        tracing::warn!(worker = %id, reason = %reason.escape_debug(),
            "worker ejected from routing; probing it");
        self.metrics
            .ejections
            .get_or_create(&WorkerLabel { worker: id.into() })
            .inc();
        tokio::spawn(self.clone().probe(id.to_string(), channel, generation));
    }

    /// Asks the worker's health service until it is SERVING (re-admitted)
    /// or it is gone from the table.
    async fn probe(self: Arc<Self>, id: String, channel: Channel, generation: u64) {
        let mut failures = 0u32;
        loop {
            tokio::time::sleep(probe_delay(failures, jitter())).await;
            let still_ours = {
                let workers = self.workers.lock().expect("router lock");
                workers
                    .get(&id)
                    .is_some_and(|w| w.generation == generation && w.ejected)
            };
            if !still_ours {
                return;
            }
            let mut health = HealthClient::new(channel.clone());
            let answer = tokio::time::timeout(
                Duration::from_secs(1),
                health.check(HealthCheckRequest {
                    service: String::new(),
                }),
            )
            .await;
            let serving =
                matches!(&answer, Ok(Ok(r)) if r.get_ref().status() == ServingStatus::Serving);
            if serving {
                let mut workers = self.workers.lock().expect("router lock");
                if let Some(w) = workers.get_mut(&id).filter(|w| w.generation == generation) {
                    w.ejected = false;
                    let room = w.limit;
                    self.publish(&workers);
                    drop(workers);
                    self.admission.release_many(room);
                    tracing::info!(worker = %id, probes = failures + 1, "worker re-admitted to routing");
                    self.metrics
                        .readmissions
                        .get_or_create(&WorkerLabel { worker: id.clone() })
                        .inc();
                }
                return;
            }
            failures += 1;
            tracing::debug!(worker = %id, failures, "probe failed; worker stays ejected");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_backoff_grows_to_a_cap_with_jitter() {
        assert_eq!(probe_delay(0, 0.5), Duration::from_millis(200));
        assert_eq!(probe_delay(1, 0.5), Duration::from_millis(400));
        assert_eq!(probe_delay(10, 0.5), Duration::from_millis(5000));
        assert_eq!(probe_delay(0, 0.0), Duration::from_millis(150));
        assert!(probe_delay(30, 0.999) <= Duration::from_millis(6250));
    }
}
