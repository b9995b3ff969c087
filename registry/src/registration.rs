//! Worker side: publish a [`WorkerInfo`] under a lease and keep it alive.
//!
//! The keep-alive task renews the lease every `ttl / 3`. If the lease is lost
//! (etcd restarted, a long pause let it expire) it grants a new one and puts the
//! record again, retrying with backoff, so a worker re-appears by itself.

use std::time::Duration;

use etcd_client::{Client, PutOptions};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::{connect, RegistryError, WorkerInfo};

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
        endpoints: &[String],
        info: WorkerInfo,
        ttl_secs: i64,
    ) -> Result<Self, RegistryError> {
        if !(2..=3600).contains(&ttl_secs) {
            return Err(RegistryError::Config(format!(
                "lease TTL must be 2..=3600 seconds, got {ttl_secs}"
            )));
        }
        let mut client = connect(endpoints).await?;
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
    let mut backoff = Duration::from_millis(200);
    loop {
        let lease = *lease_tx.borrow();
        match renew_until_lost(&mut client, lease, period, &mut stop_rx).await {
            Ok(()) => return, // stop requested
            Err(e) => tracing::warn!(lease, error = %e, "lease keep-alive failed; re-registering"),
        }
        loop {
            tokio::select! {
                _ = stop_rx.changed() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            match put_under_new_lease(&mut client, &info, ttl_secs).await {
                Ok(new_lease) => {
                    tracing::info!(key = %info.key(), lease = new_lease, "re-registered in etcd");
                    let _ = lease_tx.send(new_lease);
                    backoff = Duration::from_millis(200);
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "re-registration failed");
                    backoff = (backoff * 2).min(Duration::from_secs(5));
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
