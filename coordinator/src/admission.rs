//! The coordinator's admission queue: where a request waits while every
//! worker that could run it is full, instead of being refused.
//!
//! A worker has room while its load (this coordinator's requests on it plus
//! the other coordinators' from its load report) is below its slots plus
//! `--dispatch-queue-depth` (see [`crate::routing`]). A request that finds
//! no worker with room joins this queue and is woken when a request ends
//! somewhere (or a worker joins or is re-admitted), then picks again.
//!
//! - **Bounded**: at most `--admission-queue` new requests wait; beyond it a
//!   request is refused at once with RESOURCE_EXHAUSTED (HTTP 429) and a
//!   retry hint, before any output. A request waits at most
//!   `--admission-timeout` (or until its deadline).
//! - **Urgent first**: a request moving to another worker (a retry, or a
//!   resume after tokens were streamed) goes ahead of every new request and
//!   is never refused for a full queue: a stream that has sent output is
//!   never failed because a queue is full.
//! - **Fair across API keys**: new requests wait in one FIFO per tenant (the
//!   API key they presented, hashed; everyone shares one without keys) and
//!   tenants take turns, so one key's burst does not starve the others.
//!
//! No lost wake-up: a waiter reads [`Admission::epoch`] before it picks, and
//! [`Admission::wait`] sends it back at once when a release happened since.
//! Waiters also look again every [`RECHECK`], since capacity can appear
//! without a release here (another coordinator's load report ageing out).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::oneshot;

/// How often a waiter looks again without being woken.
pub const RECHECK: Duration = Duration::from_millis(500);

/// Who a request belongs to, for turn-taking: a hash of its API key.
pub type Tenant = u64;

/// The admission queue's metrics (registered by [`crate::metrics`]).
#[derive(Clone, Default)]
pub struct AdmissionMetrics {
    /// Requests waiting now (urgent ones included).
    pub waiting: Gauge,
    /// Requests that had to wait at all.
    pub queued: Counter,
    /// Requests refused because the queue was full.
    pub rejected_full: Counter,
    /// Requests that waited past `--admission-timeout`.
    pub timed_out: Counter,
}

/// The queue was full: the request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full {
    /// The queue's bound.
    pub capacity: usize,
}

struct Slot {
    id: u64,
    wake: oneshot::Sender<()>,
}

#[derive(Default)]
struct Inner {
    /// Retries and resumes, oldest first.
    urgent: VecDeque<Slot>,
    /// New requests, one FIFO per tenant.
    tenants: HashMap<Tenant, VecDeque<Slot>>,
    /// Tenants with waiters, in turn order.
    turns: VecDeque<Tenant>,
    /// New requests waiting (the bounded count).
    new_waiting: usize,
    next_id: u64,
}

impl Inner {
    /// Wakes the next waiter: urgent ones first, then the tenant whose turn
    /// it is. Returns false when nobody waits.
    fn wake_next(&mut self) -> bool {
        while let Some(slot) = self.urgent.pop_front() {
            if slot.wake.send(()).is_ok() {
                return true;
            }
        }
        while let Some(tenant) = self.turns.pop_front() {
            let Some(queue) = self.tenants.get_mut(&tenant) else {
                continue;
            };
            let woken = loop {
                match queue.pop_front() {
                    Some(slot) => {
                        self.new_waiting -= 1;
                        if slot.wake.send(()).is_ok() {
                            break true;
                        }
                    }
                    None => break false,
                }
            };
            if queue.is_empty() {
                self.tenants.remove(&tenant);
            } else {
                // Its next request waits for its next turn.
                self.turns.push_back(tenant);
            }
            if woken {
                return true;
            }
        }
        false
    }

    /// Removes waiter `id` (it gave up), if still queued.
    fn remove(&mut self, id: u64, tenant: Option<Tenant>) {
        match tenant {
            None => self.urgent.retain(|s| s.id != id),
            Some(t) => {
                if let Some(queue) = self.tenants.get_mut(&t) {
                    let before = queue.len();
                    queue.retain(|s| s.id != id);
                    self.new_waiting -= before - queue.len();
                    if queue.is_empty() {
                        self.tenants.remove(&t);
                        self.turns.retain(|x| *x != t);
                    }
                }
            }
        }
    }

    fn len(&self) -> usize {
        self.urgent.len() + self.new_waiting
    }
}

/// The queue. One per coordinator, shared by both public APIs.
pub struct Admission {
    inner: Mutex<Inner>,
    epoch: AtomicU64,
    capacity: usize,
    metrics: AdmissionMetrics,
}

/// A place in the queue; dropping it leaves the queue.
pub struct Waiter {
    admission: Arc<Admission>,
    id: u64,
    /// `None`: urgent.
    tenant: Option<Tenant>,
    woken: Option<oneshot::Receiver<()>>,
}

impl Waiter {
    /// Waits until woken, or [`RECHECK`] passed (then the caller looks
    /// again and, if still nothing has room, waits anew).
    pub async fn woken(mut self) {
        if let Some(rx) = self.woken.as_mut() {
            let _ = tokio::time::timeout(RECHECK, rx).await;
        }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let mut inner = self.admission.inner.lock().expect("admission lock");
        inner.remove(self.id, self.tenant);
        self.admission.metrics.waiting.set(inner.len() as i64);
    }
}

impl Admission {
    /// A queue holding at most `capacity` new requests.
    pub fn new(capacity: usize, metrics: AdmissionMetrics) -> Self {
        Self {
            inner: Mutex::default(),
            epoch: AtomicU64::new(0),
            capacity,
            metrics,
        }
    }

    /// The queue's bound.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The metrics.
    pub fn metrics(&self) -> &AdmissionMetrics {
        &self.metrics
    }

    /// Requests waiting now.
    pub fn len(&self) -> usize {
        self.inner.lock().expect("admission lock").len()
    }

    /// Whether nobody waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The release count; read it before looking for a worker and pass it
    /// to [`Admission::wait`].
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// Joins the queue after a pick found no worker with room. `urgent`
    /// (retries and resumes) go first and are never refused. `Ok(None)`:
    /// capacity was released since `seen` (look again now).
    pub fn wait(
        self: &Arc<Self>,
        tenant: Tenant,
        urgent: bool,
        seen: u64,
    ) -> Result<Option<Waiter>, Full> {
        let mut inner = self.inner.lock().expect("admission lock");
        // Under the lock: a release bumps the epoch before it takes the
        // lock to wake someone, so either we see the bump or it sees us.
        if self.epoch.load(Ordering::SeqCst) != seen {
            return Ok(None);
        }
        if !urgent && inner.new_waiting >= self.capacity {
            self.metrics.rejected_full.inc();
            return Err(Full {
                capacity: self.capacity,
            });
        }
        let id = inner.next_id;
        inner.next_id += 1;
        let (wake, woken) = oneshot::channel();
        let slot = Slot { id, wake };
        if urgent {
            inner.urgent.push_back(slot);
        } else {
            inner.new_waiting += 1;
            let queue = inner.tenants.entry(tenant).or_default();
            queue.push_back(slot);
            if queue.len() == 1 {
                inner.turns.push_back(tenant);
            }
        }
        self.metrics.waiting.set(inner.len() as i64);
        Ok(Some(Waiter {
            admission: self.clone(),
            id,
            tenant: (!urgent).then_some(tenant),
            woken: Some(woken),
        }))
    }

    /// A request ended (or a worker gained room): wakes the next waiter.
    pub fn release(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        let mut inner = self.inner.lock().expect("admission lock");
        if inner.wake_next() {
            self.metrics.waiting.set(inner.len() as i64);
        }
    }

    /// Wakes up to `n` waiters (a worker joined or came back).
    pub fn release_many(&self, n: usize) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        let mut inner = self.inner.lock().expect("admission lock");
        for _ in 0..n {
            if !inner.wake_next() {
                break;
            }
        }
        self.metrics.waiting.set(inner.len() as i64);
    }
}

/// The tenant of a request: a hash of its `authorization` header's value
/// (keyed per process, never logged), or 0 without one.
pub fn tenant_of(authorization: Option<&[u8]>) -> Tenant {
    use std::hash::{BuildHasher, Hasher};
    static KEY: std::sync::OnceLock<std::collections::hash_map::RandomState> =
        std::sync::OnceLock::new();
    let Some(value) = authorization else { return 0 };
    let mut h = KEY.get_or_init(Default::default).build_hasher();
    h.write(value);
    h.finish() | 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(capacity: usize) -> Arc<Admission> {
        Arc::new(Admission::new(capacity, AdmissionMetrics::default()))
    }

    fn is_woken(w: &mut Waiter) -> bool {
        matches!(w.woken.as_mut().unwrap().try_recv(), Ok(()))
    }

    #[test]
    fn a_full_queue_refuses_new_requests_but_never_urgent_ones() {
        let q = queue(2);
        let e = q.epoch();
        let _a = q.wait(1, false, e).unwrap().unwrap();
        let _b = q.wait(2, false, e).unwrap().unwrap();
        assert_eq!(q.wait(3, false, e).err(), Some(Full { capacity: 2 }));
        let _urgent = q.wait(3, true, e).unwrap().expect("urgent: never refused");
        assert_eq!(q.len(), 3);
        assert_eq!(q.metrics().rejected_full.get(), 1);
    }

    #[test]
    fn a_release_since_the_pick_sends_the_waiter_back_at_once() {
        let q = queue(4);
        let seen = q.epoch();
        q.release();
        assert!(q.wait(1, false, seen).unwrap().is_none());
        assert!(q.is_empty());
    }

    #[test]
    fn urgent_requests_go_first_then_tenants_take_turns() {
        let q = queue(16);
        let e = q.epoch();
        // Tenant 1 sends three, then tenant 2 one, then a resume arrives.
        let mut a1 = q.wait(1, false, e).unwrap().unwrap();
        let mut a2 = q.wait(1, false, e).unwrap().unwrap();
        let mut a3 = q.wait(1, false, e).unwrap().unwrap();
        let mut b1 = q.wait(2, false, e).unwrap().unwrap();
        let mut r = q.wait(1, true, e).unwrap().unwrap();
        q.release();
        assert!(is_woken(&mut r), "the resume first");
        q.release();
        assert!(is_woken(&mut a1));
        q.release();
        assert!(
            is_woken(&mut b1),
            "tenant 2's turn before tenant 1's second"
        );
        q.release();
        assert!(is_woken(&mut a2));
        assert!(!is_woken(&mut a3));
        q.release();
        assert!(is_woken(&mut a3));
        q.release();
        assert!(q.is_empty());
    }

    #[test]
    fn a_waiter_that_gives_up_leaves_the_queue_and_is_skipped() {
        let q = queue(1);
        let e = q.epoch();
        let gone = q.wait(1, false, e).unwrap().unwrap();
        drop(gone);
        assert!(q.is_empty());
        let mut next = q.wait(2, false, e).unwrap().unwrap();
        q.release();
        assert!(is_woken(&mut next));
        assert!(q.is_empty(), "woken waiters no longer count");
    }

    #[test]
    fn release_many_wakes_several() {
        let q = queue(8);
        let e = q.epoch();
        let mut w: Vec<Waiter> = (0..3)
            .map(|t| q.wait(t, false, e).unwrap().unwrap())
            .collect();
        q.release_many(2);
        let mut woken = 0;
        for waiter in &mut w {
            woken += usize::from(is_woken(waiter));
        }
        assert_eq!(woken, 2);
        assert_eq!(q.len(), 1);
    }

    #[test]
    fn tenants_hash_their_key_and_share_one_without() {
        assert_eq!(tenant_of(None), 0);
        let a = tenant_of(Some(b"Bearer a"));
        assert_eq!(a, tenant_of(Some(b"Bearer a")));
        assert_ne!(a, tenant_of(Some(b"Bearer b")));
        assert_ne!(a, 0);
    }
}
