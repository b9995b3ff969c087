//! Coordinator side: the live worker set, fed by etcd.
//!
//! A supervisor task lists `/nanoinfer/workers/`, publishes the set, then
//! watches the prefix from the listed revision + 1 so no event between the
//! two is lost, applying PUT and DELETE. On any failure it keeps the last
//! published set (requests keep flowing while etcd is down), backs off and
//! starts over with a fresh list.
//!
//! Beside the set it publishes [`DiscoveryStatus`]: whether etcd answers now
//! (so the coordinator can tell "etcd is down" from "no worker registered")
//! and which records it skipped as malformed. A malformed record (JSON that
//! does not decode, an id that is not a DNS label or differs from its key's,
//! a model name outside [`crate::schema::validate_model_name`]'s set, an
//! address that is not `host:port`, a control character anywhere) is skipped
//! with a warning whose text is escaped; it never reaches routing.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{EventType, GetOptions, WatchOptions};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::schema::{worker_id, WORKERS_PREFIX};
use crate::{connect, EtcdConfig, RegistryError, WorkerInfo};

/// Live workers by id.
pub type WorkerSet = Arc<BTreeMap<String, WorkerInfo>>;

/// How discovery stands with etcd.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiscoveryStatus {
    /// The last etcd error, while etcd is unreachable (or has never been
    /// reached); `None` while the watch runs.
    pub etcd_error: Option<String>,
    /// Whether a listing ever succeeded (before that the set is empty
    /// because nothing is known, not because no worker is registered).
    pub listed: bool,
    /// Records skipped as malformed: worker key → why.
    pub skipped: BTreeMap<String, String>,
}

/// The running discovery: the live set, its status and the task.
pub struct Discovery {
    /// The latest known set (empty until the first successful list).
    pub workers: watch::Receiver<WorkerSet>,
    /// etcd reachability and skipped records.
    pub status: watch::Receiver<DiscoveryStatus>,
    /// The supervisor task; abort it to stop.
    pub task: JoinHandle<()>,
}

/// Starts the discovery supervisor. The task runs until it is aborted or
/// every receiver of the set is dropped.
pub fn spawn_discovery(etcd: EtcdConfig) -> Discovery {
    let (tx, workers) = watch::channel(WorkerSet::default());
    let (status_tx, status) = watch::channel(DiscoveryStatus {
        etcd_error: Some("not connected yet".into()),
        ..DiscoveryStatus::default()
    });
    let task = tokio::spawn(supervise(etcd, tx, status_tx));
    Discovery {
        workers,
        status,
        task,
    }
}

async fn supervise(
    etcd: EtcdConfig,
    tx: watch::Sender<WorkerSet>,
    status: watch::Sender<DiscoveryStatus>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match list_and_watch(&etcd, &tx, &status, &mut backoff).await {
            Ok(()) => return, // no receivers left
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, live = tx.borrow().len(),
                    "etcd discovery interrupted; serving the last known worker set");
                status.send_modify(|s| s.etcd_error = Some(e.to_string()));
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
    etcd: &EtcdConfig,
    tx: &watch::Sender<WorkerSet>,
    status: &watch::Sender<DiscoveryStatus>,
    backoff: &mut Duration,
) -> Result<(), RegistryError> {
    let mut client = connect(etcd).await?;
    let listing = client
        .get(WORKERS_PREFIX, Some(GetOptions::new().with_prefix()))
        .await?;
    let revision = listing.header().map(|h| h.revision()).unwrap_or(0);
    let mut set = BTreeMap::new();
    let mut skipped = BTreeMap::new();
    for kv in listing.kvs() {
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        match decode(&key, kv.value()) {
            Ok(Some((id, info))) => {
                set.insert(id, info);
            }
            Ok(None) => {}
            Err(why) => {
                skipped.insert(key, why);
            }
        }
    }
    tracing::info!(
        workers = set.len(),
        skipped = skipped.len(),
        revision,
        "listed workers from etcd"
    );
    publish(tx, &set);
    status.send_replace(DiscoveryStatus {
        etcd_error: None,
        listed: true,
        skipped: skipped.clone(),
    });

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
        let skipped_before = skipped.clone();
        for event in resp.events() {
            let Some(kv) = event.kv() else { continue };
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            skipped.remove(&key);
            match event.event_type() {
                EventType::Put => match decode(&key, kv.value()) {
                    Ok(Some((id, info))) => {
                        tracing::info!(worker = %id, address = %info.address, "worker joined");
                        set.insert(id, info);
                        changed = true;
                    }
                    Ok(None) => {}
                    Err(why) => {
                        // A record that turned bad takes its worker out.
                        if let Some(id) = worker_id(&key) {
                            changed |= set.remove(id).is_some();
                        }
                        skipped.insert(key, why);
                    }
                },
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
        if skipped != skipped_before {
            let skipped = skipped.clone();
            status.send_modify(|s| s.skipped = skipped);
        }
        if changed {
            publish(tx, &set);
        }
    }
}

/// The record at `key`: `Ok(None)` for a key outside the schema, `Err`
/// (with the reason, already logged) for a malformed record.
fn decode(key: &str, value: &[u8]) -> Result<Option<(String, WorkerInfo)>, String> {
    match WorkerInfo::from_record(key, value) {
        None => Ok(None),
        Some(Ok(info)) => Ok(Some((info.id.clone(), info))),
        Some(Err(why)) => {
            tracing::warn!(key = %key.escape_debug(), error = %why.escape_debug(),
                "skipping malformed worker record");
            Err(why)
        }
    }
}

fn publish(tx: &watch::Sender<WorkerSet>, set: &BTreeMap<String, WorkerInfo>) {
    tx.send_replace(Arc::new(set.clone()));
}
