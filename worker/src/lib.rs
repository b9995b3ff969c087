//! nanoinfer worker: runs a real GGUF model through llama.cpp (ggml) and
//! streams generated tokens over the internal `nanoinfer.worker.v1` API.
//!
//! # Layout
//! - [`config`]: flags and env vars, validated into [`WorkerConfig`].
//! - [`model`]: loading the GGUF and tokenizing prompts.
//! - [`engine`]: the dedicated llama.cpp thread, its bounded queue, sampling
//!   and per-request event channels.
//! - [`sampler`]: sampling on raw logits: penalties, temperature, top-k,
//!   min-p, exact top-p, log-probabilities.
//! - [`grammar`]: structured outputs (a JSON Schema the sampler's picks
//!   are constrained to).
//! - [`stop`], [`detok`]: stop-sequence matching and UTF-8-safe detokenizing.
//! - [`kv_events`]: what the KV cache holds, published as events for the
//!   coordinators' cache-aware routing.
//! - [`service`]: the gRPC service; [`error`]: the status-code table.
//! - [`metrics`]: Prometheus metrics, served with `/healthz` and `/readyz`.
//! - [`run`]: serve, register in etcd (retrying while etcd is down), and
//!   shut down in order — or, if the engine dies, stop serving and fail so
//!   a supervisor restarts the process.

pub mod config;
pub mod detok;
pub mod engine;
pub mod error;
pub mod grammar;
pub mod kv_events;
pub mod metrics;
pub mod model;
pub mod sampler;
pub mod service;
pub mod stop;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nanoinfer_proto::server::{ServeError, Server};
use nanoinfer_proto::worker::worker_service_server::WorkerServiceServer;
use nanoinfer_registry::{Capacity, Registration, WorkerInfo};
use tokio::net::TcpListener;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

pub use config::{Args, WorkerConfig};
use engine::{Engine, EngineConfig};

/// Why the worker could not start or serve.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The model could not be loaded.
    #[error("{0}")]
    Model(String),
    /// The engine could not start.
    #[error(transparent)]
    Engine(#[from] engine::EngineError),
    /// etcd registration failed.
    #[error("registering in etcd: {0}")]
    Registry(#[from] nanoinfer_registry::RegistryError),
    /// A server (gRPC, metrics) failed, or its task panicked.
    #[error("{0}")]
    Serve(#[from] ServeError),
    /// Socket setup failed.
    #[error("{0}")]
    Setup(String),
    /// The engine thread died (a panic, or llama.cpp failed); the worker
    /// stopped serving and revoked its registration.
    #[error("engine died: {0}")]
    EngineDied(String),
}

/// The least time the gRPC server gets, after the engine is done, to hand
/// the last buffered tokens and final messages to slow readers.
const SERVER_DRAIN_MIN: Duration = Duration::from_secs(2);

/// Why serving stopped.
enum Ended {
    Shutdown,
    EngineDied(String),
    /// The server ended by itself, or registration failed.
    Failed(RunError),
}

impl Ended {
    fn server(res: Result<(), ServeError>) -> Self {
        match res {
            Ok(()) => Ended::Shutdown,
            Err(e) => Ended::Failed(e.into()),
        }
    }

    fn into_result(self) -> Result<(), RunError> {
        match self {
            Ended::Shutdown => Ok(()),
            Ended::EngineDied(reason) => Err(RunError::EngineDied(reason)),
            Ended::Failed(e) => Err(e),
        }
    }
}

/// Serves gRPC on `listener` and metrics/probes on `metrics_listener` until
/// `shutdown` completes, then drains: health goes NOT_SERVING, the etcd lease
/// is revoked, in-flight requests get the grace period, and whatever is left
/// is cancelled; then the gRPC server finishes its streams (bounded), so a
/// slow reader still gets every token and the final message.
///
/// Until it is registered in etcd (retried while etcd is down) the worker
/// reports NOT_SERVING. If the engine dies, it goes NOT_SERVING, revokes its
/// lease and returns [`RunError::EngineDied`].
pub async fn run(
    config: WorkerConfig,
    listener: TcpListener,
    metrics_listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    tokio::pin!(shutdown);
    let local = listener
        .local_addr()
        .map_err(|e| RunError::Setup(e.to_string()))?;
    tracing::info!("nanoinfer-worker listening on {local}");
    let id = config.id.clone().unwrap_or_else(|| default_id(local));
    let tls = cluster_tls(&config, &id)?;

    let metrics = Arc::new(metrics::WorkerMetrics::default());
    let mut registry = prometheus_client::registry::Registry::default();
    metrics.register(&mut registry);
    let (ready_tx, ready_rx) = tokio::sync::watch::channel(false);
    let metrics_http = nanoinfer_telemetry::http::spawn(metrics_listener, registry, ready_rx);
    let (health, health_service) = tonic_health::server::health_reporter();
    let readiness = Readiness {
        health,
        ready: ready_tx,
    };
    readiness.set(false).await;

    let (model, engine) = start_engine(&config, &metrics).await?;
    let service =
        service::WorkerServiceImpl::new(model.clone(), engine.clone(), config.limits.clone());
    let routes = nanoinfer_proto::add_reflection(
        tonic::transport::Server::builder()
            // The coordinator opens every stream on one connection, in
            // bursts (nanoinfer_proto::windows).
            .initial_connection_window_size(nanoinfer_proto::windows::CONNECTION)
            .add_service(health_service),
        nanoinfer_proto::WORKER_DESCRIPTOR_SET,
    )
    .add_service(WorkerServiceServer::new(service));
    let tls_reload = tls.clone().map(|tls| tls.spawn_reload());
    let mut worker = Serving {
        server: Server::grpc(routes, listener, tls),
        metrics: metrics_http,
        engine,
        readiness,
    };
    let info = WorkerInfo {
        id,
        address: config
            .advertise
            .clone()
            .unwrap_or_else(|| advertise_for(local)),
        model: model.name.clone(),
        model_name: model.model_name.clone(),
        capacity: Capacity {
            slots: worker.engine.slots(),
            queue: config.queue,
            context_length: worker.engine.ctx_size(),
        },
        version: env!("CARGO_PKG_VERSION").to_string(),
    };
    let ended = match worker
        .register(&config, info, &metrics, &mut shutdown)
        .await
    {
        Ok(registration) => worker.serve(registration, &mut shutdown, &config).await,
        Err(ended) => worker.stop(ended, SERVER_DRAIN_MIN).await,
    };
    if let Some(task) = tls_reload {
        task.abort();
    }
    ended
}

/// The worker's TLS on its gRPC port: a certificate the coordinator would
/// refuse is an error now, not a worker that silently never gets a request.
fn cluster_tls(
    config: &WorkerConfig,
    id: &str,
) -> Result<Option<Arc<nanoinfer_proto::tls::ServerTls>>, RunError> {
    let Some(cluster) = &config.cluster_tls else {
        tracing::warn!("the worker port is plaintext: no --cluster-ca/--cluster-cert/--cluster-key, so anyone who reaches it can call Generate");
        return Ok(None);
    };
    let name = nanoinfer_proto::tls::worker_server_name(id);
    nanoinfer_proto::tls::check_server_name(&cluster.cert, &cluster.ca, &name)
        .map_err(|e| RunError::Setup(format!("--cluster-cert: {e} (the worker id is {id:?})")))?;
    // Callers need the coordinator role, not just the CA: etcd's and
    // other workers' certificates come from the same CA.
    let tls = cluster.worker_server().map_err(RunError::Setup)?;
    tracing::info!(%name, ca = %cluster.ca.display(),
        caller = nanoinfer_proto::tls::COORDINATOR_NAME,
        "mutual TLS on the worker port: callers need a certificate from the cluster CA naming the coordinator role");
    Ok(Some(tls))
}

/// Loads the model (and the draft model, if any) off the async threads and
/// starts the engine on them.
async fn start_engine(
    config: &WorkerConfig,
    metrics: &Arc<metrics::WorkerMetrics>,
) -> Result<(Arc<model::Model>, Engine), RunError> {
    let path = config.model.clone();
    let name = config.model_name.clone();
    let template = config.chat_template.clone();
    let model = tokio::task::spawn_blocking(move || model::load(&path, name.as_deref(), template))
        .await
        .map_err(|e| RunError::Model(e.to_string()))?
        .map_err(RunError::Model)?;
    let draft = match config.draft_model.clone() {
        Some(path) => {
            let (backend, main) = (model.backend.clone(), model.model.clone());
            let draft =
                tokio::task::spawn_blocking(move || model::load_draft(&backend, &path, &main))
                    .await
                    .map_err(|e| RunError::Model(e.to_string()))?
                    .map_err(RunError::Model)?;
            Some(engine::DraftModel(Arc::new(draft)))
        }
        None => None,
    };
    metrics.model_load_seconds.set(model.load_seconds);
    metrics
        .model_info
        .get_or_create(&crate::metrics::ModelInfoLabel {
            model_name: model.model_name.clone(),
            file: model.name.clone(),
            version: env!("CARGO_PKG_VERSION"),
        })
        .set(1);
    let model = Arc::new(model);
    let engine = Engine::start(
        model.backend.clone(),
        model.model.clone(),
        EngineConfig {
            ctx_size: config.ctx_size,
            parallel: config.parallel,
            step_tokens: config.prefill_chunk,
            step_tokens_decoding: config.prefill_chunk_decoding,
            prefix_cache_tokens: config.prefix_cache_tokens,
            prefix_cache_ram_bytes: config.prefix_cache_ram_bytes,
            threads: config.threads as i32,
            queue: config.queue,
            queue_timeout: config.queue_timeout,
            spec: config.spec,
            draft,
            kv_cache_type: config.kv_cache_type,
            failpoint: config.failpoint,
        },
        metrics.clone(),
    )
    .await?;
    metrics.capacity_slots.set(i64::from(engine.slots()));
    metrics.queue_capacity.set(i64::from(config.queue));
    metrics.context_length.set(i64::from(engine.ctx_size()));
    tracing::info!(
        ctx_size = engine.ctx_size(),
        threads = config.threads,
        queue = config.queue,
        queue_timeout = ?config.queue_timeout,
        "engine ready"
    );
    if let Some(failpoint) = config.failpoint {
        tracing::warn!(
            ?failpoint,
            "test-only failpoint armed (NANOINFER_FAILPOINT)"
        );
    }
    Ok((model, engine))
}

/// A worker whose gRPC server and engine run.
struct Serving {
    /// `worker.v1`, health and reflection.
    server: Server,
    /// `/metrics` and the probes; closed when the worker is done.
    metrics: Server,
    engine: Engine,
    readiness: Readiness,
}

impl Serving {
    /// Registers in etcd (retried while etcd is down) and goes ready; or,
    /// if something ends the worker first, why.
    async fn register(
        &mut self,
        config: &WorkerConfig,
        info: WorkerInfo,
        metrics: &metrics::WorkerMetrics,
        shutdown: &mut (impl Future<Output = ()> + Unpin),
    ) -> Result<Registration, Ended> {
        // Serve nothing (NOT_SERVING, /readyz 503) until registered; etcd may
        // come up after the worker.
        let registration = tokio::select! {
            r = Registration::register_with_retry(
                &config.etcd,
                info.clone(),
                config.lease_ttl as i64,
                metrics.etcd_record_repairs.clone(),
            ) => r.map_err(|e| Ended::Failed(e.into()))?,
            _ = shutdown => {
                tracing::info!("shutdown requested before registration");
                return Err(Ended::Shutdown);
            }
            reason = self.engine.died() => return Err(Ended::EngineDied(reason)),
            res = ended(&mut self.server, &mut self.metrics) => return Err(Ended::server(res)),
        };
        self.readiness.set(true).await;
        tracing::info!(id = %info.id, address = %info.address, "worker ready");
        Ok(registration)
    }

    /// Serves until shutdown, the engine's death or the server's end, then
    /// drains in order.
    async fn serve(
        mut self,
        registration: Registration,
        shutdown: &mut (impl Future<Output = ()> + Unpin),
        config: &WorkerConfig,
    ) -> Result<(), RunError> {
        // Not ready while another live process holds this worker's etcd
        // record (the coordinators route it nothing meanwhile).
        let mut listed = registration.listed();
        let mut is_listed = true;
        let ended = loop {
            tokio::select! {
                _ = &mut *shutdown => {
                    tracing::info!("shutdown requested; draining");
                    break Ended::Shutdown;
                }
                Ok(()) = listed.changed() => {
                    let now = *listed.borrow_and_update();
                    if now != is_listed {
                        is_listed = now;
                        self.listed(now).await;
                    }
                }
                reason = self.engine.died() => {
                    tracing::error!(%reason, "engine died; leaving the cluster");
                    break Ended::EngineDied(reason);
                }
                res = ended(&mut self.server, &mut self.metrics) => {
                    // A server only ends early on an error or a panic.
                    self.readiness.set(false).await;
                    let _ = registration.revoke().await;
                    return Ended::server(res).into_result();
                }
            }
        };
        let drain_started = Instant::now();
        self.readiness.set(false).await;
        self.engine.drain();
        if let Err(e) = registration.revoke().await {
            tracing::warn!(error = %e, "could not revoke the etcd lease; it will expire by itself");
        }
        if matches!(ended, Ended::Shutdown) && !self.engine.wait_idle(config.grace_period).await {
            tracing::warn!(grace = ?config.grace_period, "grace period over; cancelling in-flight requests");
            self.engine.cancel_all();
            self.engine.wait_idle(Duration::from_secs(5)).await;
        }
        // The engine is done, but the last tokens and final messages may
        // still sit in the streams' buffers for slow readers: let the server
        // finish its streams within what is left of the grace period, and at
        // least SERVER_DRAIN_MIN.
        let bound = config
            .grace_period
            .saturating_sub(drain_started.elapsed())
            .max(SERVER_DRAIN_MIN);
        self.stop(ended, bound).await
    }

    async fn listed(&self, now: bool) {
        self.readiness.set(now).await;
        if now {
            tracing::info!("the etcd record is this worker's again; ready");
        } else {
            tracing::warn!("another live process holds this worker's etcd record; not ready until it is ours again");
        }
    }

    /// Lets the server finish its streams within `bound` and says why the
    /// worker ended.
    async fn stop(self, ended: Ended, bound: Duration) -> Result<(), RunError> {
        match self.server.drain(bound).await {
            Ok(true) => {}
            Ok(false) => tracing::warn!(
                ?bound,
                "streams still open after the drain bound; closing them"
            ),
            Err(e) => tracing::warn!(error = %e, "gRPC server ended with an error"),
        }
        if matches!(ended, Ended::Shutdown) {
            tracing::info!("worker stopped");
        }
        ended.into_result()
    }
}

/// Completes when one of the worker's servers ends by itself (they only do
/// on an error or a panic); cancel-safe.
async fn ended(grpc: &mut Server, metrics: &mut Server) -> Result<(), ServeError> {
    tokio::select! {
        res = grpc.ended() => res,
        res = metrics.ended() => res,
    }
}

/// The worker's readiness, reported both by `grpc.health.v1` (for the whole
/// server "" and for its service) and by `/readyz`: not ready until the model
/// is loaded and registered, and again from the start of shutdown.
struct Readiness {
    health: HealthReporter,
    ready: tokio::sync::watch::Sender<bool>,
}

impl Readiness {
    async fn set(&self, ready: bool) {
        use tonic::server::NamedService;
        let status = if ready {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        self.health.set_service_status("", status).await;
        let name = <WorkerServiceServer<service::WorkerServiceImpl> as NamedService>::NAME;
        self.health.set_service_status(name, status).await;
        self.ready.send_replace(ready);
    }
}

/// `<hostname>-<port>`, made a DNS label (what a worker id must be): every
/// character outside `[A-Za-z0-9-]` becomes `-`, runs of `-` collapse, and the
/// host part is cut so that the whole fits in 63 bytes.
fn default_id(local: SocketAddr) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    id_from_host(&host, local.port())
}

fn id_from_host(host: &str, port: u16) -> String {
    let mut label = String::new();
    for c in host.trim().chars() {
        let c = if c.is_ascii_alphanumeric() { c } else { '-' };
        if !(c == '-' && (label.is_empty() || label.ends_with('-'))) {
            label.push(c);
        }
    }
    let suffix = format!("-{port}");
    label.truncate(nanoinfer_registry::schema::MAX_WORKER_ID_LEN - suffix.len());
    let label = label.trim_end_matches('-');
    let label = if label.is_empty() { "worker" } else { label };
    format!("{label}{suffix}")
}

fn advertise_for(local: SocketAddr) -> String {
    if local.ip().is_unspecified() {
        format!("127.0.0.1:{}", local.port())
    } else {
        local.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::id_from_host;
    use nanoinfer_registry::schema::validate_worker_id;

    #[test]
    fn the_default_id_is_a_valid_worker_id_for_any_hostname() {
        for (host, want) in [
            ("gpu-node-1\n", "gpu-node-1-7000"),
            ("node_3.example.com", "node-3-example-com-7000"),
            ("-.weird__host.-", "weird-host-7000"),
            ("", "worker-7000"),
            ("...", "worker-7000"),
        ] {
            assert_eq!(id_from_host(host, 7000), want, "{host:?}");
        }
        let long = "a".repeat(80) + ".b";
        let id = id_from_host(&long, 65535);
        assert_eq!(id.len(), 63, "{id}");
        for host in ["x", &long, "a-b-", "é.ü"] {
            let id = id_from_host(host, 1);
            assert!(validate_worker_id(&id).is_ok(), "{host:?} -> {id:?}");
        }
    }
}
