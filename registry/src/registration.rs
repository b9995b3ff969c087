//! Worker side: publish a [`WorkerInfo`] under a lease, keep it alive, and
//! keep it ours.
//!
//! **Claiming the key.** The record is written with a transaction that
//! succeeds only if the key is absent, or holds a record on no lease or on
//! this worker's own lease, compared by revision so that two writers cannot
//! both win ([`reconcile`]). A key held by another lease belongs to a live
//! process (etcd deletes a lease's keys when it ends): at start the worker
//! waits out that lease's remaining TTL, in case it is its own previous run
//! killed a moment ago, and then fails with [`RegistryError::IdInUse`] if the
//! lease is still there, i.e. kept alive by another worker with the same id.
//!
//! **Keeping it.** One task renews the lease every `ttl / 3` and watches the
//! worker's own key from the revision after its write. If the record is
//! deleted, or overwritten (another value, or detached from the lease), it
//! writes it back at once with the same transaction, logs a warning and
//! counts it ([`Registration::repairs`]). It does not take the key from
//! another *live* lease: with per-worker etcd roles only a process holding
//! this worker's own credential (or root) can write the key, so such a holder
//! is a second process with this id — typically a replacement started while
//! this one was cut off long enough to lose its lease — and taking the key
//! back would make the two overwrite each other forever. That is logged as an
//! error, [`Registration::listed`] turns false (the worker reports itself not
//! ready) and the record is written again as soon as that lease ends.
//!
//! If the lease is lost (etcd restarted, a long pause let it expire) the
//! task grants a new one and claims the key again, retrying with backoff, so
//! a worker re-appears by itself. [`Registration::register_with_retry`] does
//! the same at start, for a worker started while etcd is down. Retries back
//! off exponentially from 200 ms to 5 s, with jitter so that workers cut off
//! together do not all come back in the same instant ([`backoff`]).

use std::hash::BuildHasher;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, EventType, LeaseKeepAliveStream, LeaseKeeper, PutOptions, Txn,
    TxnOp, TxnOpResponse, WatchOptions, WatchStream,
};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

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
    repairs: Counter,
    listed: watch::Receiver<bool>,
}

impl Registration {
    /// Claims the key under a new lease of `ttl_secs` (waiting out the
    /// lease of a previous run that still holds it), and starts the task
    /// that keeps the lease alive and the record intact.
    ///
    /// Fails with [`RegistryError::Config`] for a bad TTL or a record the
    /// coordinator would refuse, and with [`RegistryError::IdInUse`] when a
    /// live process holds the id. `repairs` counts the times the record was
    /// found overwritten or deleted and written back (a metric's counter).
    pub async fn register(
        etcd: &EtcdConfig,
        info: WorkerInfo,
        ttl_secs: i64,
        repairs: Counter,
    ) -> Result<Self, RegistryError> {
        if !(2..=3600).contains(&ttl_secs) {
            return Err(RegistryError::Config(format!(
                "lease TTL must be 2..=3600 seconds, got {ttl_secs}"
            )));
        }
        // The same check the coordinator applies to what it reads: a record
        // it would skip is an error here, not a worker that never gets a
        // request.
        info.validate()
            .map_err(|e| RegistryError::Config(format!("worker record: {e}")))?;
        let mut client = connect(etcd).await?;
        let value = info.to_json();
        let (lease, revision) = claim_at_start(&mut client, &info, &value, ttl_secs).await?;
        tracing::info!(key = %info.key(), lease, ttl_secs, "registered in etcd");
        let (lease_tx, lease_rx) = watch::channel(lease);
        let (stop_tx, stop_rx) = watch::channel(false);
        let (listed_tx, listed) = watch::channel(true);
        let key = info.key();
        let keeper = Keeper {
            client: client.clone(),
            key: key.clone(),
            value,
            ttl_secs,
            period: Duration::from_millis((ttl_secs as u64 * 1000 / 3).max(500)),
            lease_tx,
            repairs: repairs.clone(),
            listed: listed_tx,
            held_by: None,
        };
        let task = tokio::spawn(keeper.run(revision, stop_rx));
        Ok(Self {
            client,
            lease_rx,
            stop_tx,
            task,
            key,
            repairs,
            listed,
        })
    }

    /// [`Registration::register`], retried with [`backoff`] while etcd is
    /// unreachable or refuses, logging each failure. Resolves once the
    /// record is in etcd; fails only on a bad configuration or an id held
    /// by another live process. Drop the future to give up (on shutdown).
    pub async fn register_with_retry(
        etcd: &EtcdConfig,
        info: WorkerInfo,
        ttl_secs: i64,
        repairs: Counter,
    ) -> Result<Self, RegistryError> {
        let mut attempt = 0u32;
        loop {
            match Self::register(etcd, info.clone(), ttl_secs, repairs.clone()).await {
                Ok(registration) => return Ok(registration),
                Err(e @ (RegistryError::Config(_) | RegistryError::IdInUse { .. })) => {
                    return Err(e)
                }
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

    /// How many times the record was found overwritten or deleted and
    /// written back since registration.
    pub fn repairs(&self) -> u64 {
        self.repairs.get()
    }

    /// Whether the key holds this worker's record: `false` while another
    /// live lease holds it (another process runs with this id and its etcd
    /// credential), so the coordinators route this worker nothing. The
    /// worker reports itself not ready meanwhile.
    pub fn listed(&self) -> watch::Receiver<bool> {
        self.listed.clone()
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

/// What the key held before [`reconcile`] wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Was {
    /// No key.
    Absent,
    /// A record on no lease (a plain `put`), or another value on this
    /// worker's lease.
    Overwritten,
    /// This worker's record on its previous lease.
    Moved,
}

impl Was {
    fn describe(self) -> &'static str {
        match self {
            Was::Absent => "deleted",
            Was::Overwritten => "overwritten",
            Was::Moved => "moved to a new lease",
        }
    }
}

/// What [`reconcile`] found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reconciled {
    /// The key holds this worker's value on its lease; `revision` is the
    /// store's revision when that was seen or written.
    Ours { revision: i64, was: Option<Was> },
    /// Another live lease holds the key (as of `revision`); nothing was
    /// written.
    Held { lease: i64, revision: i64 },
}

/// Compare-and-put rounds before [`reconcile`] gives up on a key that
/// changes under it.
const CAS_ROUNDS: usize = 8;

/// Makes `key` hold `value` on `lease` unless another lease holds it: puts
/// it if the key is absent, or holds a record on no lease, another value on
/// `lease`, or anything on `previous` (this process's lease before `lease`,
/// which it is moving away from), each time on the condition that the key
/// has not changed since it was read.
async fn reconcile(
    client: &mut Client,
    key: &str,
    value: &str,
    lease: i64,
    previous: Option<i64>,
) -> Result<Reconciled, RegistryError> {
    let put = || TxnOp::put(key, value, Some(PutOptions::new().with_lease(lease)));
    // The first round assumes the common case, no key, and reads it in the
    // same transaction otherwise.
    let mut condition = Compare::create_revision(key, CompareOp::Equal, 0);
    let mut was = Was::Absent;
    for _ in 0..CAS_ROUNDS {
        let txn = Txn::new()
            .when([condition])
            .and_then([put()])
            .or_else([TxnOp::get(key, None)]);
        let resp = client.txn(txn).await.map_err(lease_error(lease))?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        if resp.succeeded() {
            return Ok(Reconciled::Ours {
                revision,
                was: Some(was),
            });
        }
        let current = resp.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Get(get) => get.kvs().first().cloned(),
            _ => None,
        });
        (condition, was) = match current {
            None => (
                Compare::create_revision(key, CompareOp::Equal, 0),
                Was::Absent,
            ),
            Some(kv) if kv.lease() == lease && kv.value() == value.as_bytes() => {
                return Ok(Reconciled::Ours {
                    revision,
                    was: None,
                })
            }
            Some(kv) if kv.lease() == 0 || kv.lease() == lease => (
                Compare::mod_revision(key, CompareOp::Equal, kv.mod_revision()),
                Was::Overwritten,
            ),
            Some(kv) if Some(kv.lease()) == previous => (
                Compare::mod_revision(key, CompareOp::Equal, kv.mod_revision()),
                Was::Moved,
            ),
            Some(kv) => {
                return Ok(Reconciled::Held {
                    lease: kv.lease(),
                    revision,
                })
            }
        };
    }
    Err(RegistryError::Contended(format!(
        "{key} changed under {CAS_ROUNDS} writes in a row"
    )))
}

/// Maps etcd's "requested lease not found" (the lease expired or was
/// revoked) to [`RegistryError::Lease`], which makes the keeper grant a new
/// one.
fn lease_error(lease: i64) -> impl Fn(etcd_client::Error) -> RegistryError {
    move |e| match &e {
        etcd_client::Error::GRpcStatus(s) if s.message().contains("lease not found") => {
            RegistryError::Lease(format!("lease {lease} is gone"))
        }
        _ => RegistryError::Etcd(e),
    }
}

/// Added to a holder's remaining TTL when waiting for it to expire: etcd
/// checks for expired leases every half second, and the TTL it reports is
/// rounded to whole seconds.
const EXPIRY_SLACK: Duration = Duration::from_secs(2);

/// Grants a lease and claims the key with it. A key held by another lease
/// is waited on for that lease's remaining TTL (a previous run of this
/// worker, killed without revoking, leaves one behind); if the same lease
/// still holds it then, a live process keeps it alive and the id is in use.
/// Returns the lease and the revision of the write.
async fn claim_at_start(
    client: &mut Client,
    info: &WorkerInfo,
    value: &str,
    ttl_secs: i64,
) -> Result<(i64, i64), RegistryError> {
    let key = info.key();
    let mut waiting: Option<(i64, Instant)> = None;
    loop {
        let lease = client.lease_grant(ttl_secs, None).await?.id();
        let holder = match reconcile(client, &key, value, lease, None).await {
            Ok(Reconciled::Ours { revision, .. }) => return Ok((lease, revision)),
            Ok(Reconciled::Held { lease: holder, .. }) => holder,
            Err(e) => {
                let _ = client.lease_revoke(lease).await;
                return Err(e);
            }
        };
        // Our lease would only run down while we wait.
        let _ = client.lease_revoke(lease).await;
        let deadline = match waiting {
            Some((h, deadline)) if h == holder => deadline,
            _ => {
                let remaining = match client.lease_time_to_live(holder, None).await {
                    Ok(r) if r.ttl() >= 0 => Duration::from_secs(r.ttl() as u64),
                    // Gone already, or not ours to ask about: assume it is
                    // as long as ours.
                    _ => Duration::from_secs(ttl_secs as u64),
                };
                tracing::info!(key = %key, holder, ?remaining,
                    "the worker id is held by another lease; waiting to see whether it expires (a previous run of this worker?)");
                let deadline = Instant::now() + remaining + EXPIRY_SLACK;
                waiting = Some((holder, deadline));
                deadline
            }
        };
        if Instant::now() >= deadline {
            return Err(RegistryError::IdInUse {
                id: info.id.clone(),
                key,
                lease: holder,
            });
        }
        wait_until_key_changes(client, &key, holder, deadline).await;
    }
}

/// Returns once `key` is no longer held by `holder` or at `deadline`,
/// polling (a watch would need its own stream for a wait this short).
async fn wait_until_key_changes(client: &mut Client, key: &str, holder: i64, deadline: Instant) {
    loop {
        let now = Instant::now();
        if now >= deadline {
            return;
        }
        tokio::time::sleep((deadline - now).min(Duration::from_millis(250))).await;
        match client.get(key, None).await {
            Ok(r) if r.kvs().first().is_some_and(|kv| kv.lease() == holder) => {}
            Ok(_) => return,
            Err(e) => tracing::debug!(error = %e, "reading the held key failed"),
        }
    }
}

/// The task behind a [`Registration`]: keeps the lease alive and the record
/// intact.
struct Keeper {
    client: Client,
    key: String,
    value: String,
    ttl_secs: i64,
    period: Duration,
    lease_tx: watch::Sender<i64>,
    repairs: Counter,
    /// Whether the key holds our record (see [`Registration::listed`]).
    listed: watch::Sender<bool>,
    /// The foreign lease last reported as holding the key (reported once).
    held_by: Option<i64>,
}

impl Keeper {
    async fn run(mut self, revision: i64, mut stop_rx: watch::Receiver<bool>) {
        let mut revision = Some(revision);
        let mut attempt = 0u32;
        loop {
            let lease = *self.lease_tx.borrow();
            match self.hold(lease, revision.take(), &mut stop_rx).await {
                Ok(()) => return, // stop requested
                Err(e) => {
                    tracing::warn!(lease, error = %e, "lease keep-alive failed; re-registering")
                }
            }
            loop {
                let delay = backoff(attempt, jitter());
                tokio::select! {
                    _ = stop_rx.changed() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
                match self.reregister(lease).await {
                    Ok(Some((lease, rev))) => {
                        tracing::info!(key = %self.key, lease, "re-registered in etcd");
                        let _ = self.lease_tx.send(lease);
                        revision = Some(rev);
                        attempt = 0;
                        break;
                    }
                    Ok(None) => attempt = attempt.saturating_add(1),
                    Err(e) => {
                        attempt = attempt.saturating_add(1);
                        tracing::warn!(error = %e, retry_in = ?backoff(attempt, 0.5),
                            "re-registration failed");
                    }
                }
            }
        }
    }

    /// A new lease and the key claimed with it (taken over from
    /// `previous`, the lease just lost, if etcd still holds it, as after an
    /// etcd restart); `None` while another live lease holds the key.
    async fn reregister(&mut self, previous: i64) -> Result<Option<(i64, i64)>, RegistryError> {
        let lease = self.client.lease_grant(self.ttl_secs, None).await?.id();
        match reconcile(
            &mut self.client,
            &self.key,
            &self.value,
            lease,
            Some(previous),
        )
        .await
        {
            Ok(Reconciled::Ours { revision, was }) => {
                if was == Some(Was::Moved) {
                    // Its last key moved; end it rather than let it run down.
                    let _ = self.client.lease_revoke(previous).await;
                }
                self.held_by = None;
                self.listed.send_replace(true);
                Ok(Some((lease, revision)))
            }
            Ok(Reconciled::Held { lease: holder, .. }) => {
                let _ = self.client.lease_revoke(lease).await;
                self.report_held(holder);
                Ok(None)
            }
            Err(e) => {
                let _ = self.client.lease_revoke(lease).await;
                Err(e)
            }
        }
    }

    /// Renews `lease` and guards the record until stop is requested (`Ok`)
    /// or the lease is gone or etcd fails (`Err`). `revision`: that of the
    /// write just made, to watch from; `None` to check the key first.
    async fn hold(
        &mut self,
        lease: i64,
        mut revision: Option<i64>,
        stop_rx: &mut watch::Receiver<bool>,
    ) -> Result<(), RegistryError> {
        let (mut keeper, mut responses) = self.client.lease_keep_alive(lease).await?;
        let mut tick = tokio::time::interval(self.period);
        let mut guard: Option<WatchStream> = None;
        let rewatch = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(rewatch);
        let mut watch_attempt = 0u32;
        loop {
            tokio::select! {
                _ = stop_rx.changed() => return Ok(()),
                _ = tick.tick() => renew(&mut keeper, &mut responses, lease, self.period).await?,
                _ = &mut rewatch, if guard.is_none() => {
                    match self.guard(lease, revision.take()).await {
                        Ok(stream) => {
                            guard = Some(stream);
                            watch_attempt = 0;
                        }
                        Err(e @ RegistryError::Lease(_)) => return Err(e),
                        Err(e) => {
                            let delay = backoff(watch_attempt, jitter());
                            watch_attempt = watch_attempt.saturating_add(1);
                            tracing::warn!(key = %self.key, error = %e, retry_in = ?delay,
                                "watching the worker's own record failed; retrying");
                            rewatch.as_mut().reset(Instant::now() + delay);
                        }
                    }
                }
                message = next_message(&mut guard) => {
                    let touched = match message {
                        Ok(Some(resp)) if !resp.canceled() => resp.events().iter().any(|event| {
                            let ours = event.event_type() == EventType::Put
                                && event.kv().is_some_and(|kv| {
                                    kv.lease() == lease && kv.value() == self.value.as_bytes()
                                });
                            !ours
                        }),
                        ended => {
                            let why = match ended {
                                Ok(Some(resp)) => format!("cancelled: {}", resp.cancel_reason()),
                                Ok(None) => "the stream ended".to_string(),
                                Err(e) => e.to_string(),
                            };
                            tracing::warn!(key = %self.key, why = %why,
                                "the watch of the worker's own record stopped; restarting it");
                            // The restart checks the key, so nothing that
                            // happened meanwhile is missed.
                            guard = None;
                            rewatch.as_mut().reset(Instant::now() + backoff(0, jitter()));
                            false
                        }
                    };
                    if touched {
                        if let Err(e) = self.repair(lease).await {
                            if matches!(e, RegistryError::Lease(_)) {
                                return Err(e);
                            }
                            let delay = backoff(watch_attempt, jitter());
                            watch_attempt = watch_attempt.saturating_add(1);
                            tracing::warn!(key = %self.key, error = %e, retry_in = ?delay,
                                "repairing the worker's own record failed; retrying");
                            guard = None;
                            rewatch.as_mut().reset(Instant::now() + delay);
                        }
                    }
                }
            }
        }
    }

    /// Checks the record (unless `revision`, that of our own write, says
    /// there is nothing to check) and watches the key from the revision
    /// after.
    async fn guard(
        &mut self,
        lease: i64,
        revision: Option<i64>,
    ) -> Result<WatchStream, RegistryError> {
        let revision = match revision {
            Some(r) => r,
            None => self.repair(lease).await?,
        };
        let stream = self
            .client
            .watch(
                self.key.as_str(),
                Some(WatchOptions::new().with_start_revision(revision + 1)),
            )
            .await?;
        Ok(stream)
    }

    /// Writes the record back if it was deleted or overwritten; returns the
    /// revision at which the key was seen or made right.
    async fn repair(&mut self, lease: i64) -> Result<i64, RegistryError> {
        match reconcile(&mut self.client, &self.key, &self.value, lease, None).await? {
            Reconciled::Ours { revision, was } => {
                if let Some(was) = was {
                    self.repairs.inc();
                    tracing::warn!(key = %self.key, lease, revision,
                        "the worker's etcd record was {}; repaired", was.describe());
                }
                self.held_by = None;
                self.listed.send_replace(true);
                Ok(revision)
            }
            Reconciled::Held {
                lease: holder,
                revision,
            } => {
                self.report_held(holder);
                Ok(revision)
            }
        }
    }

    fn report_held(&mut self, holder: i64) {
        self.listed.send_replace(false);
        if self.held_by != Some(holder) {
            self.held_by = Some(holder);
            tracing::error!(key = %self.key, holder,
                "the worker's etcd record is held by another live lease: another process runs with this worker id and its etcd credential; not taking it back, so this worker gets no requests until that lease ends");
        }
    }
}

/// The next message of the guard's watch; never, while there is none.
async fn next_message(
    guard: &mut Option<WatchStream>,
) -> Result<Option<etcd_client::WatchResponse>, etcd_client::Error> {
    match guard {
        Some(stream) => stream.message().await,
        None => std::future::pending().await,
    }
}

/// One keep-alive round for `lease`: `Err` once it is gone or unanswered.
async fn renew(
    keeper: &mut LeaseKeeper,
    responses: &mut LeaseKeepAliveStream,
    lease: i64,
    period: Duration,
) -> Result<(), RegistryError> {
    keeper.keep_alive().await?;
    let reply = tokio::time::timeout(period, responses.message())
        .await
        .map_err(|_| RegistryError::Lease("keep-alive reply timed out".into()))??;
    match reply {
        Some(r) if r.ttl() > 0 => Ok(()),
        _ => Err(RegistryError::Lease(format!("lease {lease} expired"))),
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
