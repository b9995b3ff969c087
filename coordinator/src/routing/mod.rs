//! Worker choice, among workers with room: cache-aware (the default), by
//! prefix affinity ([`crate::affinity`]), the fewest requests in flight, or
//! at random.
//!
//! The [`Router`] owns the one table of workers (channel, in-flight count,
//! ejection state, capacity). Only [`Router::sync`], fed by the discovery
//! watch, adds or removes workers, so no request can delete another's count
//! from a stale snapshot. Ties rotate, so sequential requests spread over
//! equally idle workers. Each pick holds an [`InFlight`] guard that counts
//! the request against its worker until the attempt ends (whatever way);
//! its drop wakes the next request in the [`Admission`] queue.
//!
//! **Room**: a worker has room while its load (this coordinator's requests
//! plus the others' from its load report) is below its registered slots
//! plus `--dispatch-queue-depth` (at most its own queue). The rest wait in
//! the coordinator's admission queue, where retries and resumes go first
//! and API keys take turns, rather than in a worker's FIFO.
//!
//! # Layout
//! - this module: the worker table ([`Router`], fed by discovery), the
//!   guards a pick holds, room, and the KV event streams it follows;
//! - [`policy`]: the routing policies, cache-aware cost and the picks;
//! - [`health`]: passive ejection and re-admission probes.

mod health;
mod policy;

pub use health::{jitter, probe_delay};
pub use policy::{cache_aware_cost, choose, two_choices, DEFAULT_RAM_RESTORE_COST, SCORE_TIE};

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nanoinfer_registry::WorkerSet;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};

use crate::admission::Admission;
use crate::config::UpstreamConfig;
use crate::kv_index::KvIndex;
use crate::metrics::{KvMetrics, RouterMetrics, WorkerLabel};

/// Prompt blocks a worker still has to prefill for requests this
/// coordinator sent it, until their first token: added at the pick,
/// removed on drop.
#[derive(Debug)]
pub struct PendingPrefill(Arc<AtomicUsize>, usize);

impl Drop for PendingPrefill {
    fn drop(&mut self) {
        self.0.fetch_sub(self.1, Ordering::Relaxed);
    }
}

/// Per worker: the prompt blocks of requests this coordinator sent it that
/// have not ended, with their counts. The worker will hold them (its events
/// say so once it has computed them); until they are in the index, a later
/// request with the same prefix counts them as the worker's, so that two
/// requests of one tenant sent in quick succession go to the same worker.
pub type SentBlocks = Arc<Mutex<HashMap<u64, usize>>>;

/// A request's blocks in its worker's [`SentBlocks`], until dropped.
#[derive(Debug)]
pub struct Sent(SentBlocks, Vec<u64>);

impl Sent {
    fn new(sent: &SentBlocks, blocks: &[u64]) -> Self {
        let mut map = sent.lock().expect("sent blocks lock");
        for h in blocks {
            *map.entry(*h).or_insert(0) += 1;
        }
        Self(sent.clone(), blocks.to_vec())
    }
}

impl Drop for Sent {
    fn drop(&mut self) {
        let mut map = self.0.lock().expect("sent blocks lock");
        for h in &self.1 {
            if let Some(n) = map.get_mut(h) {
                *n -= 1;
                if *n == 0 {
                    map.remove(h);
                }
            }
        }
    }
}

/// Counts one request against a worker while alive; its drop gives the
/// room to the next waiting request.
pub struct InFlight(Gauge, Arc<Admission>);

impl std::fmt::Debug for InFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("InFlight").field(&self.0.get()).finish()
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
        self.1.release();
    }
}

/// What a pick found.
#[derive(Debug)]
pub enum Pick {
    /// A worker with room, counted in flight.
    Worker(Picked),
    /// Workers could run the request, but none has room now: wait in the
    /// admission queue.
    Busy,
    /// No routable worker could run it.
    None,
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
    /// The model name it serves.
    pub model_name: String,
    /// The in-flight guard.
    pub guard: InFlight,
    /// Cache-aware routing: the prompt's leading blocks the index said this
    /// worker holds (`None`: not known, or another policy).
    pub predicted_blocks: Option<usize>,
    /// Cache-aware routing: the prefill this request adds to the worker's
    /// pending work; drop it at the first token.
    pub prefill: Option<PendingPrefill>,
    /// Cache-aware routing: the prompt's blocks among those sent to the
    /// worker; drop it when the attempt ends.
    pub sent: Option<Sent>,
}

struct WorkerState {
    address: String,
    /// The model name it registered (`--model-name`).
    model_name: String,
    /// Its connections (`--upstream-connections`), taken in turn.
    channels: Vec<Channel>,
    /// Which connection the next request takes.
    next: std::sync::atomic::AtomicUsize,
    /// The worker's series of `worker_requests_in_flight`: the count itself.
    in_flight: Gauge,
    /// Set while ejected.
    ejected: bool,
    /// Its last load report.
    reported: Option<Reported>,
    /// What restoring a block from its RAM tier costs against computing
    /// it, as it last reported (0: not reported).
    ram_restore_cost: f32,
    /// Distinguishes this registration from a later one under the same id
    /// (a probe of an old one must not re-admit a new one).
    generation: u64,
    /// Requests it may hold before it has no room: its slots plus the
    /// dispatch queue depth (at most its own queue).
    limit: usize,
    /// Cache-aware routing: prompt blocks sent to it by this coordinator
    /// and not prefilled yet (see [`PendingPrefill`]).
    pending: Arc<AtomicUsize>,
    /// Cache-aware routing: prompt blocks of this coordinator's requests
    /// on it.
    sent: SentBlocks,
    /// Cache-aware routing: the task following its KV events (aborted
    /// when the worker leaves the table, replaced when the channels are
    /// rebuilt).
    kv_task: Option<AbortOnDrop>,
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What a worker last said about its load (in the final message of a
/// request it served), reduced to the requests this coordinator did not
/// send it: those of other coordinators.
#[derive(Debug, Clone, Copy)]
struct Reported {
    foreign: usize,
    at: tokio::time::Instant,
}

/// How long a load report counts. A worker this coordinator no longer sends
/// to no longer reports to it, and an old report must not keep it away for
/// ever.
pub const REPORT_TTL: Duration = Duration::from_secs(10);

impl WorkerState {
    /// What routing compares: this coordinator's requests on the worker
    /// plus, from a recent report, everyone else's.
    fn load(&self, now: tokio::time::Instant) -> usize {
        let own = self.in_flight.get().max(0) as usize;
        let foreign = self
            .reported
            .filter(|r| now.duration_since(r.at) < REPORT_TTL)
            .map_or(0, |r| r.foreign);
        own + foreign
    }

    /// The connection the next request takes.
    fn channel(&self) -> &Channel {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        &self.channels[i % self.channels.len()]
    }

    /// This worker, counted in flight.
    fn picked(&self, id: &str, admission: &Arc<Admission>) -> Picked {
        self.in_flight.inc();
        Picked {
            id: id.to_string(),
            address: self.address.clone(),
            channel: self.channel().clone(),
            model_name: self.model_name.clone(),
            guard: InFlight(self.in_flight.clone(), admission.clone()),
            predicted_blocks: None,
            prefill: None,
            sent: None,
        }
    }
}

/// Per-worker channels, in-flight counts and ejections.
pub struct Router {
    workers: Mutex<HashMap<String, WorkerState>>,
    /// Prompt prefixes routed to each worker (prefix affinity).
    prefixes: Mutex<crate::affinity::PrefixTable>,
    rotation: AtomicUsize,
    generations: AtomicU64,
    metrics: RouterMetrics,
    upstream: UpstreamConfig,
    routable: watch::Sender<usize>,
    admission: Arc<Admission>,
    /// Cache-aware routing: what each worker's KV cache holds.
    kv: Arc<KvIndex>,
    /// Cache-aware routing: each model's tokenizer.
    vocabs: Arc<crate::vocab::Vocabs>,
    /// Every model name a worker has registered since this coordinator
    /// started: with all its workers gone (a restart), a request for one
    /// is UNAVAILABLE (retry), not NOT_FOUND (give up).
    served: Mutex<std::collections::BTreeSet<String>>,
}

/// Follows worker `id`'s `KvEvents` into `index` for as long as the task
/// runs (it is aborted when the worker leaves the table): on a broken
/// stream, a gap or a restart, the worker is unsynced (routed by load) and
/// the subscription starts again, from a snapshot, after a backoff of
/// 0.2–5 s. A worker without the RPC (UNIMPLEMENTED: a test double, an
/// older worker) is asked again every minute.
async fn follow_kv_events(index: Arc<KvIndex>, metrics: KvMetrics, id: String, channel: Channel) {
    use nanoinfer_proto::worker::{worker_service_client::WorkerServiceClient, KvEventsRequest};
    let label = WorkerLabel { worker: id.clone() };
    let mut backoff = Duration::from_millis(200);
    loop {
        let mut client = WorkerServiceClient::new(channel.clone());
        let mut wait = backoff;
        match client.kv_events(KvEventsRequest {}).await {
            Ok(response) => {
                let mut stream = response.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(batch)) => {
                            if batch.snapshot {
                                metrics.snapshots.inc();
                            }
                            match index.apply(&id, &batch) {
                                Ok(()) => {
                                    backoff = Duration::from_millis(200);
                                    metrics.events.inc_by(batch.events.len() as u64);
                                    let held = index.held(&id).map_or(-1, |n| n as i64);
                                    metrics.blocks.get_or_create(&label).set(held);
                                }
                                Err(e) => {
                                    tracing::warn!(worker = %id, error = %e,
                                        "KV event stream out of step; resyncing (routed by load meanwhile)");
                                    wait = Duration::ZERO;
                                    break;
                                }
                            }
                        }
                        Ok(None) => break,
                        Err(status) => {
                            tracing::debug!(worker = %id, status = %status.message(), "KV event stream ended");
                            break;
                        }
                    }
                }
            }
            Err(status) if status.code() == tonic::Code::Unimplemented => {
                wait = Duration::from_secs(60);
            }
            Err(status) => {
                tracing::debug!(worker = %id, status = %status.message(), "cannot subscribe to KV events");
            }
        }
        index.unsync(&id);
        metrics.blocks.get_or_create(&label).set(-1);
        metrics.resyncs.get_or_create(&label).inc();
        tokio::time::sleep(wait.mul_f64(0.75 + 0.5 * jitter())).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Requests a worker with `slots` and a queue of `queue` may hold before it
/// has no room: its slots plus `depth` of its queue.
pub fn worker_limit(slots: u32, queue: u32, depth: usize) -> usize {
    (slots as usize).max(1) + depth.min(queue as usize)
}

impl Router {
    /// A router whose channels follow `upstream`'s timeouts.
    pub fn new(metrics: RouterMetrics, upstream: UpstreamConfig) -> Self {
        let admission = Arc::new(Admission::new(
            upstream.admission_queue,
            metrics.admission.clone(),
        ));
        Self {
            admission,
            workers: Mutex::default(),
            prefixes: Mutex::new(crate::affinity::PrefixTable::new(
                upstream.affinity_cache_bytes,
            )),
            rotation: AtomicUsize::new(0),
            generations: AtomicU64::new(0),
            metrics,
            kv: Arc::new(KvIndex::new(upstream.kv_index_max_blocks)),
            vocabs: Arc::default(),
            served: Mutex::default(),
            upstream,
            routable: watch::channel(0).0,
        }
    }

    /// What each worker's KV cache holds (cache-aware routing).
    pub fn kv_index(&self) -> &Arc<KvIndex> {
        &self.kv
    }

    /// The tokenizer of `model` (any model when `None` and the workers
    /// serve one), when cache-aware routing is on: at once when it is
    /// loaded; while it loads, after waiting for it (up to
    /// [`crate::vocab::LOAD_WAIT`]); otherwise `None`, after starting to
    /// fetch it from a worker serving it.
    pub async fn tokenizer(&self, model: Option<&str>) -> Option<Arc<crate::vocab::Tokenizer>> {
        if self.upstream.routing != crate::affinity::Routing::CacheAware {
            return None;
        }
        self.vocabulary(model).await
    }

    /// The tokenizer of `model` as [`Self::tokenizer`] gets it, under any
    /// routing policy (the OpenAI API reads a model's chat template from it).
    pub async fn vocabulary(&self, model: Option<&str>) -> Option<Arc<crate::vocab::Tokenizer>> {
        let model = match model {
            Some(m) => m.to_string(),
            None => {
                let models = self.models();
                match models.as_slice() {
                    [(only, _)] => only.clone(),
                    _ => return None,
                }
            }
        };
        let channel = || {
            let workers = self.workers.lock().expect("router lock");
            workers
                .values()
                .find(|w| !w.ejected && w.model_name == model)
                .map(|w| w.channels[0].clone())
        };
        self.vocabs
            .get_waiting(&model, channel, crate::vocab::LOAD_WAIT)
            .await
    }

    /// The admission queue requests wait in while no worker has room.
    pub fn admission(&self) -> &Arc<Admission> {
        &self.admission
    }

    /// The number of routable (known, not ejected) workers, as it changes.
    pub fn routable(&self) -> watch::Receiver<usize> {
        self.routable.subscribe()
    }

    /// The endpoint of worker `id` at `address`: over mutual TLS when the
    /// cluster has a CA, expecting the certificate name
    /// `<id>.worker.nanoinfer` (a record pointing elsewhere fails the
    /// handshake before any request is sent).
    fn endpoint(&self, id: &str, address: &str) -> Result<Endpoint, String> {
        let u = &self.upstream;
        let scheme = if u.cluster_tls.is_some() {
            "https"
        } else {
            "http"
        };
        let mut endpoint =
            Endpoint::from_shared(format!("{scheme}://{address}")).map_err(|e| e.to_string())?;
        if let Some(tls) = &u.cluster_tls {
            endpoint = endpoint
                .tls_config(tls.client_for_worker(id)?)
                .map_err(|e| e.to_string())?;
        }
        Ok(endpoint
            .connect_timeout(u.connect_timeout)
            .tcp_nodelay(true)
            .initial_connection_window_size(nanoinfer_proto::windows::CONNECTION)
            .initial_stream_window_size(nanoinfer_proto::windows::UPSTREAM_STREAM)
            // A hung worker (stopped, or its host gone) answers no ping: the
            // connection closes after interval + timeout, its streams fail
            // and move elsewhere, long before its lease would expire.
            .http2_keep_alive_interval(u.keepalive_interval)
            .keep_alive_timeout(u.keepalive_timeout)
            .keep_alive_while_idle(true))
    }

    /// `--upstream-connections` lazily connected channels to `endpoint`.
    fn connections(&self, endpoint: &Endpoint) -> Vec<Channel> {
        (0..self.upstream.connections.max(1))
            .map(|_| endpoint.connect_lazy())
            .collect()
    }

    /// Builds every worker's channel again (new connections; calls in
    /// flight keep theirs): after the cluster certificate files changed.
    pub fn rebuild_channels(&self) {
        let mut workers = self.workers.lock().expect("router lock");
        for (id, w) in workers.iter_mut() {
            match self.endpoint(id, &w.address) {
                Ok(e) => {
                    w.channels = self.connections(&e);
                    // The KV event stream too: it reconnects with the new
                    // certificates (a snapshot resyncs the index).
                    if w.kv_task.is_some() {
                        w.kv_task = self.follow_kv(id, &w.channels[0]);
                    }
                }
                Err(e) => tracing::error!(worker = %id, error = %e,
                    "cannot rebuild the worker channel; keeping the old one"),
            }
        }
    }

    /// With cache-aware routing, in a runtime: a task following worker
    /// `id`'s KV events over `channel` into the index, aborted on drop.
    fn follow_kv(&self, id: &str, channel: &Channel) -> Option<AbortOnDrop> {
        if self.upstream.routing != crate::affinity::Routing::CacheAware {
            return None;
        }
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let task = runtime.spawn(follow_kv_events(
            self.kv.clone(),
            self.metrics.kv.clone(),
            id.to_string(),
            channel.clone(),
        ));
        Some(AbortOnDrop(task.abort_handle()))
    }

    /// Brings the table in step with the live set from etcd: new workers
    /// join (routable), departed ones and ones whose address changed are
    /// dropped with their series.
    pub fn sync(&self, live: &WorkerSet) {
        let mut workers = self.workers.lock().expect("router lock");
        workers.retain(|id, w| {
            let keep = live
                .get(id)
                .is_some_and(|info| info.address == w.address && info.model_name == w.model_name);
            if !keep {
                self.metrics
                    .in_flight
                    .remove(&WorkerLabel { worker: id.clone() });
                self.prefixes.lock().expect("prefix lock").forget(id);
                self.kv.remove(id);
                self.metrics
                    .kv
                    .blocks
                    .remove(&WorkerLabel { worker: id.clone() });
            }
            keep
        });
        let mut room = 0;
        for (id, info) in live.iter() {
            if workers.contains_key(id) {
                continue;
            }
            // Discovery already checked the address; a URI tonic still
            // refuses is skipped here rather than poisoning every pick.
            let channels = match self.endpoint(id, &info.address) {
                Ok(e) => self.connections(&e),
                Err(e) => {
                    tracing::warn!(worker = %id, address = %info.address.escape_debug(), error = %e,
                        "skipping worker with an unusable address");
                    continue;
                }
            };
            let label = WorkerLabel { worker: id.clone() };
            let limit = worker_limit(
                info.capacity.slots,
                info.capacity.queue,
                self.upstream.dispatch_queue_depth,
            );
            room += limit;
            let kv_task = self.follow_kv(id, &channels[0]);
            if kv_task.is_some() {
                // Fetch the model's vocabulary now, not on its first
                // request: a coordinator that starts while workers run
                // routes exactly from its first request on.
                self.vocabs
                    .get(&info.model_name, || Some(channels[0].clone()));
            }
            self.served
                .lock()
                .expect("served models lock")
                .insert(info.model_name.clone());
            workers.insert(
                id.clone(),
                WorkerState {
                    address: info.address.clone(),
                    model_name: info.model_name.clone(),
                    channels,
                    next: Default::default(),
                    in_flight: self.metrics.in_flight.get_or_create_owned(&label),
                    ejected: false,
                    reported: None,
                    ram_restore_cost: 0.0,
                    generation: self.generations.fetch_add(1, Ordering::Relaxed),
                    limit,
                    pending: Arc::default(),
                    sent: Arc::default(),
                    kv_task,
                },
            );
        }
        self.publish(&workers);
        drop(workers);
        if room > 0 {
            self.admission.release_many(room);
        }
    }

    fn publish(&self, workers: &HashMap<String, WorkerState>) {
        let n = workers.values().filter(|w| !w.ejected).count();
        self.metrics.routable.set(n as i64);
        self.routable.send_if_modified(|old| {
            let changed = *old != n;
            *old = n;
            changed
        });
    }

    /// Wants prompt prefix blocks for [`Router::pick`] (prefix affinity).
    pub fn wants_prefix(&self) -> bool {
        self.upstream.routing == crate::affinity::Routing::PrefixAffinity
    }

    /// The routing policy.
    pub fn routing(&self) -> crate::affinity::Routing {
        self.upstream.routing
    }

    /// Books worker `id`'s load report, sent in the final message of a
    /// request of this coordinator's that is still counted in flight.
    pub fn report(&self, id: &str, load: &nanoinfer_proto::worker::WorkerLoad) {
        let mut workers = self.workers.lock().expect("router lock");
        let Some(w) = workers.get_mut(id) else { return };
        let own = w.in_flight.get().max(0) as usize;
        let total = (load.running + load.queued) as usize;
        w.reported = Some(Reported {
            foreign: total.saturating_sub(own),
            at: tokio::time::Instant::now(),
        });
        if load.ram_restore_cost.is_finite() && load.ram_restore_cost > 0.0 {
            w.ram_restore_cost = load.ram_restore_cost.min(1.0);
        }
    }

    /// Picks worker `id` if it is routable (the `n` completions of one
    /// request go where the first went, so the worker shares the prompt's
    /// KV cells between them).
    pub fn pick_worker(&self, id: &str) -> Option<Picked> {
        let workers = self.workers.lock().expect("router lock");
        let w = workers.get(id).filter(|w| !w.ejected)?;
        Some(w.picked(id, &self.admission))
    }

    /// The model names known workers serve, and those served before whose
    /// workers are all gone, each with its number of routable (not ejected)
    /// workers, sorted by name.
    pub fn models(&self) -> Vec<(String, usize)> {
        let mut names: std::collections::BTreeMap<String, usize> = self
            .served
            .lock()
            .expect("served models lock")
            .iter()
            .map(|m| (m.clone(), 0))
            .collect();
        let workers = self.workers.lock().expect("router lock");
        for w in workers.values() {
            *names.entry(w.model_name.clone()).or_default() += usize::from(!w.ejected);
        }
        names.into_iter().collect()
    }

    /// Whether any known worker (routable or ejected) serves `model`, or
    /// one did since this coordinator started.
    pub fn knows_model(&self, model: &str) -> bool {
        if self
            .served
            .lock()
            .expect("served models lock")
            .contains(model)
        {
            return true;
        }
        let workers = self.workers.lock().expect("router lock");
        workers.values().any(|w| w.model_name == model)
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

    fn set(ids: &[&str]) -> WorkerSet {
        let mut m = BTreeMap::new();
        for (i, id) in ids.iter().enumerate() {
            m.insert(
                id.to_string(),
                WorkerInfo {
                    id: id.to_string(),
                    // Nothing listens there: probes fail.
                    address: format!("127.0.0.1:{}", 1 + i),
                    model: "m".into(),
                    model_name: "m".into(),
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

    fn router() -> Arc<Router> {
        Arc::new(Router::new(
            RouterMetrics::default(),
            UpstreamConfig::default(),
        ))
    }

    #[tokio::test]
    async fn a_load_report_adds_other_coordinators_requests_until_it_ages() {
        let router = router();
        router.sync(&set(&["a", "b"]));
        let on_a = router.pick_worker("a").unwrap();
        // "a" has 5 running and 2 queued; one of them is ours.
        let report = nanoinfer_proto::worker::WorkerLoad {
            running: 5,
            queued: 2,
            slots: 4,
            kv_cache_usage: 0.5,
            ..Default::default()
        };
        router.report("a", &report);
        router.report("zz", &report);
        drop(on_a);
        for _ in 0..4 {
            let picked = router.pick(&[], None, &[]).unwrap();
            assert_eq!(picked.id, "b", "6 foreign requests outweigh ours");
            std::mem::forget(picked.guard);
        }
        {
            let mut workers = router.workers.lock().unwrap();
            let w = workers.get_mut("a").unwrap();
            assert_eq!(w.reported.unwrap().foreign, 6);
            w.reported.as_mut().unwrap().at -= REPORT_TTL;
        }
        assert_eq!(
            router.pick(&[], None, &[]).unwrap().id,
            "a",
            "an old report no longer counts"
        );
    }

    #[tokio::test]
    async fn a_worker_without_room_is_busy_and_its_end_wakes_a_waiter() {
        // Slots 1, queue 1, depth 2: room for 1 + min(2, 1) = 2 each.
        assert_eq!(worker_limit(1, 1, 2), 2);
        assert_eq!(worker_limit(4, 16, 2), 6);
        assert_eq!(worker_limit(4, 16, 0), 4);
        let router = router();
        router.sync(&set(&["a"]));
        let held: Vec<Picked> = (0..2)
            .map(|_| match router.pick_with_room(&[], None, &[]) {
                Pick::Worker(p) => p,
                other => panic!("room expected: {other:?}"),
            })
            .collect();
        assert!(matches!(router.pick_with_room(&[], None, &[]), Pick::Busy));
        assert!(
            router.pick(&[], None, &[]).is_some(),
            "one-shot calls ignore room"
        );
        assert!(matches!(
            router.pick_with_room(&["a".into()], None, &[]),
            Pick::None
        ));
        let admission = router.admission().clone();
        let epoch = admission.epoch();
        let waiter = admission.wait(0, false, epoch).unwrap().unwrap();
        drop(held);
        tokio::time::timeout(Duration::from_millis(100), waiter.woken())
            .await
            .expect("the end of a request wakes the waiter");
        assert!(matches!(
            router.pick_with_room(&[], None, &[]),
            Pick::Worker(_)
        ));
    }

    /// A snapshot batch saying `worker` holds `blocks`.
    fn holds(router: &Router, worker: &str, blocks: &[u64]) {
        use nanoinfer_proto::worker::{kv_event, KvBlocks, KvEvent, KvEventBatch};
        router
            .kv_index()
            .apply(
                worker,
                &KvEventBatch {
                    instance: format!("{worker}-1"),
                    block_tokens: 16,
                    snapshot: true,
                    seq: 1,
                    events: vec![KvEvent {
                        seq: 1,
                        tier: 1,
                        kind: Some(kv_event::Kind::Stored(KvBlocks {
                            block_hashes: blocks.to_vec(),
                        })),
                    }],
                },
            )
            .unwrap();
    }

    #[test]
    fn cache_aware_picks_the_holder_waits_for_it_when_full_and_counts_pending_prefill() {
        // A runtime that is never driven: the event-stream tasks never run,
        // and the index is fed by hand. Slots 1, queue 1, depth 2: room
        // for 2 each.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _context = runtime.enter();
        let router = router();
        router.sync(&set(&["a", "b"]));
        let prompt: Vec<u64> = (1..=16).collect();
        holds(&router, "a", &prompt[..14]);
        holds(&router, "b", &[]);
        let pick = |prefix: &[u64]| match router.pick_with_room(&[], None, prefix) {
            Pick::Worker(p) => p,
            other => panic!("a worker expected: {other:?}"),
        };
        // The holder, and again though busier: 2 blocks to prefill, 2
        // pending and 1 request (4) against 16 blocks on "b".
        let first = pick(&prompt);
        assert_eq!((first.id.as_str(), first.predicted_blocks), ("a", Some(14)));
        let second = pick(&prompt);
        assert_eq!(second.id, "a");
        // "a" is full with this coordinator's requests: wait for it, rather
        // than prefill 16 blocks on "b".
        assert!(matches!(
            router.pick_with_room(&[], None, &prompt),
            Pick::Busy
        ));
        drop(second);
        assert_eq!(pick(&prompt).id, "a");
        drop(first);

        // A prompt nobody holds goes to the idle worker; its 8 blocks are
        // pending there until the first token, so the next one, also held
        // by nobody, goes to the other.
        let other: Vec<u64> = (100..108).collect();
        let cold = pick(&other);
        let other2: Vec<u64> = (200..208).collect();
        let cold2 = pick(&other2);
        assert_ne!(cold.id, cold2.id, "pending prefill counts as work");
        // The first cold prompt again, before the worker reported its
        // blocks: where it was sent (held there soon), not a second copy.
        // Its 8 pending blocks are the ones it shares: not work ahead of it
        // (cost 0 + 0 + 4 there, 8 + 8 + 4 on the other).
        let again = pick(&other);
        assert_eq!((&again.id, again.predicted_blocks), (&cold.id, Some(8)));
        drop((cold, cold2, again));
        let again = pick(&other);
        assert_eq!(
            again.predicted_blocks,
            Some(0),
            "ended requests are forgotten"
        );
        drop(again);
        assert!(router.in_flight().values().all(|&n| n == 0));
    }

    #[tokio::test]
    async fn picks_spread_while_in_flight_and_release_on_drop() {
        let router = router();
        router.sync(&set(&["a", "b"]));
        let first = router.pick(&[], None, &[]).unwrap();
        let second = router.pick(&[], None, &[]).unwrap();
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
        let metrics = RouterMetrics::default();
        let router = Arc::new(Router::new(metrics.clone(), UpstreamConfig::default()));
        router.sync(&set(&["a", "b"]));
        for _ in 0..4 {
            assert_eq!(router.pick(&["a".to_string()], None, &[]).unwrap().id, "b");
        }
        assert!(router
            .pick(&["a".to_string(), "b".to_string()], None, &[])
            .is_none());
        assert_eq!(router.pick_worker("b").unwrap().id, "b");
        assert!(router.pick_worker("zz").is_none());
        router.sync(&set(&["b"]));
        assert_eq!(
            metrics.in_flight.len(),
            1,
            "a departed worker's series is removed"
        );
        assert_eq!(router.in_flight().len(), 1);
        assert_eq!(*router.routable().borrow(), 1);
    }

    #[tokio::test]
    async fn only_discovery_changes_the_table() {
        // A request holding a worker that the table still has keeps its
        // count, whatever the request saw when it started.
        let router = router();
        router.sync(&set(&["a"]));
        let held = router.pick(&[], None, &[]).unwrap();
        router.sync(&set(&["a", "b"]));
        assert_eq!(router.in_flight()["a"], 1);
        assert_eq!(router.in_flight()["b"], 0);
        assert_eq!(
            router.pick(&[], None, &[]).unwrap().id,
            "b",
            "b is idle, a is busy"
        );
        drop(held);
    }

    #[tokio::test]
    async fn ejected_workers_get_no_requests_until_readmitted() {
        let router = router();
        router.sync(&set(&["a", "b"]));
        let routable = router.routable();
        router.eject("a", "test");
        router.eject("a", "twice is once");
        assert_eq!(*routable.borrow(), 1);
        for _ in 0..4 {
            assert_eq!(router.pick(&[], None, &[]).unwrap().id, "b");
        }
        router.eject("b", "test");
        assert!(router.pick(&[], None, &[]).is_none());
        // The probe finds nothing listening: still ejected a while later.
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(router.pick(&[], None, &[]).is_none());
        // Re-registering (a new record) makes it routable again.
        let mut moved = (*set(&["a", "b"])).clone();
        moved.get_mut("a").unwrap().address = "127.0.0.1:9".into();
        router.sync(&Arc::new(moved));
        assert_eq!(router.pick(&[], None, &[]).unwrap().id, "a");
    }
}
