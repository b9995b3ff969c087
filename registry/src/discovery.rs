//! Coordinator side: the live worker set, fed by etcd.
//!
//! A supervisor task lists `/nanoinfer/workers/`, publishes the set, then
//! watches the prefix from the listed revision + 1 so no event between the
//! two is lost, applying PUT and DELETE. On any failure it keeps the last
//! published set (requests keep flowing while etcd is down), backs off and
//! starts over with a fresh list.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{EventType, GetOptions, WatchOptions};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::schema::{worker_id, WORKERS_PREFIX};
use crate::{connect, RegistryError, WorkerInfo};

/// Live workers by id.
pub type WorkerSet = Arc<BTreeMap<String, WorkerInfo>>;

/// Starts the discovery supervisor. The receiver always holds the latest
/// known set (empty until the first successful list). The task runs until
/// the returned handle is aborted or every receiver is dropped.
pub fn spawn_discovery(endpoints: Vec<String>) -> (watch::Receiver<WorkerSet>, JoinHandle<()>) {
    let (tx, rx) = watch::channel(WorkerSet::default());
    let task = tokio::spawn(supervise(endpoints, tx));
    (rx, task)
}

async fn supervise(endpoints: Vec<String>, tx: watch::Sender<WorkerSet>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match list_and_watch(&endpoints, &tx, &mut backoff).await {
            Ok(()) => return, // no receivers left
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, live = tx.borrow().len(),
                    "etcd discovery interrupted; serving the last known worker set");
            }
        }
        tokio::select! {
            _ = tx.closed() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Returns `Ok` only when every receiver is gone.
async fn list_and_watch(
    endpoints: &[String],
    tx: &watch::Sender<WorkerSet>,
    backoff: &mut Duration,
) -> Result<(), RegistryError> {
    let mut client = connect(endpoints).await?;
    let listing = client
        .get(WORKERS_PREFIX, Some(GetOptions::new().with_prefix()))
        .await?;
    let revision = listing.header().map(|h| h.revision()).unwrap_or(0);
    let mut set = BTreeMap::new();
    for kv in listing.kvs() {
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        if let Some((id, info)) = decode(&key, kv.value()) {
            set.insert(id, info);
        }
    }
    tracing::info!(workers = set.len(), revision, "listed workers from etcd");
    publish(tx, &set);

    let mut stream = client
        .watch(
            WORKERS_PREFIX,
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(revision + 1),
            ),
        )
        .await?;
    *backoff = Duration::from_millis(100);
    loop {
        let message = tokio::select! {
            _ = tx.closed() => return Ok(()),
            m = stream.message() => m?,
        };
        let Some(resp) = message else {
            return Err(RegistryError::Watch("watch stream ended".into()));
        };
        if resp.canceled() {
            return Err(RegistryError::Watch(format!(
                "cancelled (compacted at {}): {}",
                resp.compact_revision(),
                resp.cancel_reason()
            )));
        }
        let mut changed = false;
        for event in resp.events() {
            let Some(kv) = event.kv() else { continue };
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            match event.event_type() {
                EventType::Put => {
                    if let Some((id, info)) = decode(&key, kv.value()) {
                        tracing::info!(worker = %id, address = %info.address, "worker joined");
                        set.insert(id, info);
                        changed = true;
                    }
                }
                EventType::Delete => {
                    if let Some(id) = worker_id(&key) {
                        if set.remove(id).is_some() {
                            tracing::info!(worker = %id, "worker left");
                            changed = true;
                        }
                    }
                }
            }
        }
        if changed {
            publish(tx, &set);
        }
    }
}

fn decode(key: &str, value: &[u8]) -> Option<(String, WorkerInfo)> {
    let id = worker_id(key)?;
    match WorkerInfo::from_json(value) {
        Ok(info) => Some((id.to_string(), info)),
        Err(e) => {
            tracing::warn!(%key, error = %e, "ignoring malformed worker record");
            None
        }
    }
}

fn publish(tx: &watch::Sender<WorkerSet>, set: &BTreeMap<String, WorkerInfo>) {
    tx.send_replace(Arc::new(set.clone()));
}
