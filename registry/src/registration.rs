//! Worker side: publish a [`WorkerInfo`] under a lease and keep it alive.
//!
//! The keep-alive task renews the lease every `ttl / 3`. If the lease is lost
//! (etcd restarted, a long pause let it expire) it grants a new one and puts the
//! record again, retrying with backoff, so a worker re-appears by itself.
//! [`Registration::register_with_retry`] does the same at start, for a
//! worker started while etcd is down. Retries back off exponentially from
//! 200 ms to 5 s, with jitter so that workers cut off together do not all
//! come back in the same instant ([`backoff`]).

use std::hash::BuildHasher;
use std::time::Duration;

use etcd_client::{Client, PutOptions};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::{connect, EtcdConfig, RegistryError, WorkerInfo};

/// A live registration. Call [`Registration::revoke`] on graceful shutdown;
/// if it is merely dropped, the keep-alive stops and the lease expires after
/// its TTL.
pub struct Registration {
    client: Client,
    lease_rx: watch::Receiver<i64>,
    stop_tx: watch::Sender<bool>,
    task: JoinHandle<()>,
    key: String,
}

impl Registration {
    /// Grants a lease of `ttl_secs`, puts `info` under it and starts the
    /// keep-alive task.
    pub async fn register(
        etcd: &EtcdConfig,
        info: WorkerInfo,
        ttl_secs: i64,
    ) -> Result<Self, RegistryError> {
        if !(2..=3600).contains(&ttl_secs) {
            return Err(RegistryError::Config(format!(
                "lease TTL must be 2..=3600 seconds, got {ttl_secs}"
            )));
        }
        let mut client = connect(etcd).await?;
        let lease = put_under_new_lease(&mut client, &info, ttl_secs).await?;
        tracing::info!(key = %info.key(), lease = lease, ttl_secs, "registered in etcd");
        let (lease_tx, lease_rx) = watch::channel(lease);
        let (stop_tx, stop_rx) = watch::channel(false);
        let key = info.key();
        let task = tokio::spawn(keep_alive(
            client.clone(),
            info,
            ttl_secs,
            lease_tx,
            stop_rx,
        ));
        Ok(Self {
            client,
            lease_rx,
            stop_tx,
            task,
            key,
        })
    }

    /// [`Registration::register`], retried with [`backoff`] while etcd is
    /// unreachable or refuses, logging each failure. Resolves once the
    /// record is in etcd; fails only on a bad configuration. Drop the
    /// future to give up (on shutdown).
    pub async fn register_with_retry(
        etcd: &EtcdConfig,
        info: WorkerInfo,
        ttl_secs: i64,
    ) -> Result<Self, RegistryError> {
        let mut attempt = 0u32;
        loop {
            match Self::register(etcd, info.clone(), ttl_secs).await {
                Ok(registration) => return Ok(registration),
                Err(e @ RegistryError::Config(_)) => return Err(e),
                Err(e) => {
                    let delay = backoff(attempt, jitter());
                    tracing::warn!(key = %info.key(), attempt = attempt + 1, error = %e,
                        retry_in = ?delay, "registration in etcd failed; retrying");
                    tokio::time::sleep(delay).await;
                    attempt = attempt.saturating_add(1);
                }
            }
        }
    }

    /// The lease the record is attached to now.
    pub fn lease_id(&self) -> i64 {
        *self.lease_rx.borrow()
    }

    /// Stops the keep-alive and revokes the lease, deleting the key at once.
    pub async fn revoke(mut self) -> Result<(), RegistryError> {
        let _ = self.stop_tx.send(true);
        let _ = (&mut self.task).await;
        let lease = *self.lease_rx.borrow();
        self.client.lease_revoke(lease).await?;
        tracing::info!(key = %self.key, lease, "lease revoked");
        Ok(())
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// First retry delay.
const BACKOFF_MIN: Duration = Duration::from_millis(200);
/// Longest retry delay.
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// The delay before retry `attempt` (0-based): 200 ms doubling up to 5 s,
/// scaled by `jitter` in [0, 1) into its upper half ("equal jitter"), so
/// the delay still grows but workers do not retry in lockstep.
pub fn backoff(attempt: u32, jitter: f64) -> Duration {
    let ceiling = BACKOFF_MIN
        .saturating_mul(1u32 << attempt.min(16))
        .min(BACKOFF_MAX);
    ceiling.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
}

/// A number in [0, 1) that differs between calls and processes (std's
/// randomly keyed hasher over the clock: no RNG dependency for this).
fn jitter() -> f64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let bits = std::collections::hash_map::RandomState::new().hash_one(now);
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

async fn put_under_new_lease(
    client: &mut Client,
    info: &WorkerInfo,
    ttl_secs: i64,
) -> Result<i64, RegistryError> {
    let lease = client.lease_grant(ttl_secs, None).await?.id();
    client
        .put(
            info.key(),
            info.to_json(),
            Some(PutOptions::new().with_lease(lease)),
        )
        .await?;
    Ok(lease)
}

async fn keep_alive(
    mut client: Client,
    info: WorkerInfo,
    ttl_secs: i64,
    lease_tx: watch::Sender<i64>,
    mut stop_rx: watch::Receiver<bool>,
) {
    let period = Duration::from_millis((ttl_secs as u64 * 1000 / 3).max(500));
    let mut attempt = 0u32;
    loop {
        let lease = *lease_tx.borrow();
        match renew_until_lost(&mut client, lease, period, &mut stop_rx).await {
            Ok(()) => return, // stop requested
            Err(e) => tracing::warn!(lease, error = %e, "lease keep-alive failed; re-registering"),
        }
        loop {
            let delay = backoff(attempt, jitter());
            tokio::select! {
                _ = stop_rx.changed() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            match put_under_new_lease(&mut client, &info, ttl_secs).await {
                Ok(new_lease) => {
                    tracing::info!(key = %info.key(), lease = new_lease, "re-registered in etcd");
                    let _ = lease_tx.send(new_lease);
                    attempt = 0;
                    break;
                }
                Err(e) => {
                    attempt = attempt.saturating_add(1);
                    tracing::warn!(error = %e, retry_in = ?backoff(attempt, 0.5),
                        "re-registration failed");
                }
            }
        }
    }
}

/// Renews `lease` every `period` until stop is requested (`Ok`) or the lease
/// is gone or etcd fails (`Err`).
async fn renew_until_lost(
    client: &mut Client,
    lease: i64,
    period: Duration,
    stop_rx: &mut watch::Receiver<bool>,
) -> Result<(), RegistryError> {
    let (mut keeper, mut responses) = client.lease_keep_alive(lease).await?;
    let mut tick = tokio::time::interval(period);
    loop {
        tokio::select! {
            _ = stop_rx.changed() => return Ok(()),
            _ = tick.tick() => {}
        }
        keeper.keep_alive().await?;
        let reply = tokio::time::timeout(period, responses.message())
            .await
            .map_err(|_| RegistryError::Lease("keep-alive reply timed out".into()))??;
        match reply {
            Some(r) if r.ttl() > 0 => {}
            _ => return Err(RegistryError::Lease(format!("lease {lease} expired"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_200ms_to_5s_within_its_jitter() {
        let ms = |attempt, jitter| backoff(attempt, jitter).as_millis();
        // No jitter draw: the upper half's bottom; the top approaches the
        // ceiling.
        assert_eq!((ms(0, 0.0), ms(0, 1.0)), (100, 200));
        assert_eq!((ms(1, 0.0), ms(1, 1.0)), (200, 400));
        assert_eq!((ms(4, 0.0), ms(4, 1.0)), (1600, 3200));
        assert_eq!((ms(5, 0.0), ms(5, 1.0)), (2500, 5000));
        assert_eq!(ms(1000, 1.0), 5000);
        let j = jitter();
        assert!((0.0..1.0).contains(&j), "{j}");
    }
}
