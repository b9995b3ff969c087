//! nanoinfer coordinator: the public `nanoinfer.InferService` front door.
//!
//! # Layout
//! - [`config`]: flags and env vars, validated into [`CoordinatorConfig`].
//! - [`validate`]: public request → [`validate::InferParams`] with defaults.
//! - [`front`]: what both public APIs share: the key check, the request's
//!   span, validation, and the start of its completions.
//! - [`service`]: the gRPC front: `Health`, and `Infer` (validate, span,
//!   hand over to the relay).
//! - [`http`]: the OpenAI-compatible HTTP API (request parsing, whole and
//!   streamed answers, its error type, tools, the Responses API, the
//!   connection handling, CORS).
//! - [`relay`]: one request's task: pick, wait for room, open, relay, retry
//!   before the first token, resume mid-stream, deadline, stalled clients.
//! - [`admission`]: the bounded, fair queue requests wait in while no
//!   worker has room.
//! - [`upstream`]: `Generate` calls and the retry/ejection rule.
//! - [`routing`]: the worker table (fed by discovery), the routing
//!   policies, passive ejection and re-admission probes.
//! - [`affinity`]: the routing policies' names and prefix-affinity hashes.
//! - [`kv_index`]: what each worker's KV cache holds, from its events.
//! - [`vocab`]: per model, the workers' tokenizer and chat template.
//! - [`auth`]: API keys at the door (`--api-keys-file`).
//! - [`error`]: the one status-code table.
//! - [`metrics`]: Prometheus metrics, served with `/healthz` and `/readyz`.
//! - [`run`], [`run_with`]: discovery (etcd's, or a worker set the caller
//!   hands over, as the in-process tests do), health, reflection, serve
//!   (the gRPC, HTTP API and metrics listeners, each a
//!   [`nanoinfer_proto::server::Server`]), drain.

#![forbid(unsafe_code)]

pub mod admission;
pub mod affinity;
pub mod auth;
pub mod config;
pub mod error;
pub mod front;
pub mod http;
pub mod kv_index;
pub mod metrics;
pub mod relay;
pub mod routing;
pub mod service;
pub mod upstream;
pub mod validate;
pub mod vocab;

use std::future::Future;
use std::sync::Arc;

use nanoinfer_proto::nanoinfer::infer_service_server::InferServiceServer;
use nanoinfer_proto::server::{ServeError, Server};
use tokio::net::TcpListener;
use tonic_health::ServingStatus;

pub use config::{Args, CoordinatorConfig};

/// Raises this process's soft limit on open files to its hard limit, as
/// servers of many connections do: each client connection is a file, and a
/// service manager's default soft limit (often 1,024) would refuse
/// connections long before memory runs out. Returns the limit now in force
/// (`None`: unlimited).
pub fn raise_open_file_limit() -> std::io::Result<Option<u64>> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: limit.maximum,
                maximum: limit.maximum,
            },
        )?;
    }
    Ok(getrlimit(Resource::Nofile).current)
}

/// Why the coordinator could not serve.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A server (gRPC, the HTTP API, metrics) failed, or its task panicked.
    #[error("{0}")]
    Serve(#[from] ServeError),
    /// Socket setup failed.
    #[error("{0}")]
    Setup(String),
}

const SERVICE_NAME: &str =
    <InferServiceServer<service::InferServiceImpl> as tonic::server::NamedService>::NAME;

/// Serves gRPC on `listener` and metrics/probes on `metrics_listener` until
/// `shutdown` completes; then health goes NOT_SERVING and open streams get
/// the grace period to finish. Workers come from etcd (`config.etcd`).
pub async fn run(
    config: CoordinatorConfig,
    listener: TcpListener,
    metrics_listener: TcpListener,
    http_listener: Option<TcpListener>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let discovery = nanoinfer_registry::spawn_discovery(config.etcd.clone());
    let listeners = Listeners {
        grpc: listener,
        metrics: metrics_listener,
        http: http_listener,
    };
    run_with(config, listeners, discovery, shutdown).await
}

/// The coordinator's sockets: the public gRPC port, the metrics and probes
/// port, and the OpenAI-compatible HTTP port when it has one.
pub struct Listeners {
    /// `nanoinfer.InferService`, health and reflection.
    pub grpc: TcpListener,
    /// `/metrics`, `/healthz`, `/readyz`.
    pub metrics: TcpListener,
    /// The HTTP API (`--http-listen`; none when it is `off`).
    pub http: Option<TcpListener>,
}

/// [`run`] with the worker set from `discovery` (etcd's, or any other
/// source of [`nanoinfer_registry::WorkerSet`]s); its task is aborted when
/// the coordinator stops.
pub async fn run_with(
    config: CoordinatorConfig,
    listeners: Listeners,
    discovery: nanoinfer_registry::Discovery,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let local = listeners
        .grpc
        .local_addr()
        .map_err(|e| RunError::Setup(e.to_string()))?;
    tracing::info!("nanoinfer-coordinator listening on {local}");
    check_cluster_cert(&config)?;
    let metrics = Arc::new(metrics::CoordinatorMetrics::default());
    let mut registry = prometheus_client::registry::Registry::default();
    metrics.register(&mut registry);
    let http_metrics = Arc::new(http::HttpMetrics::default());
    http_metrics.register(&mut registry);
    let (ready_tx, ready_rx) = tokio::sync::watch::channel(false);
    let ready_tx = Arc::new(ready_tx);
    let metrics_http = nanoinfer_telemetry::http::spawn(listeners.metrics, registry, ready_rx);

    let router = Arc::new(routing::Router::new(
        metrics.router.clone(),
        config.upstream.clone(),
    ));
    let (health, health_service) = tonic_health::server::health_reporter();
    let health_task = tokio::spawn(track_health(
        discovery.workers.clone(),
        discovery.status.clone(),
        router.clone(),
        health.clone(),
        ready_tx.clone(),
        metrics.clone(),
    ));
    let mut tasks = vec![discovery.task];
    let api_keys = load_api_keys(&config, &mut tasks)?;
    let front = Arc::new(front::Front {
        routable: router.routable(),
        router: router.clone(),
        discovery: discovery.status.clone(),
        limits: config.limits.clone(),
        upstream: config.upstream.clone(),
        metrics: metrics.clone(),
        api_keys,
    });
    let public_tls = load_public_tls(&config, &mut tasks)?;
    let http_server = listeners
        .http
        .map(|l| {
            let (tls, config) = (public_tls.clone(), config.http.clone());
            http::spawn(l, front.clone(), tls, config, http_metrics)
        })
        .transpose()
        .map_err(|e| RunError::Setup(e.to_string()))?;
    let routes = grpc_routes(&config, health_service, front);
    let grpc = Server::grpc(routes, listeners.grpc, public_tls);
    follow_cluster(&config, &router, &mut tasks);
    let mut coordinator = Serving {
        grpc,
        http: http_server,
        metrics: metrics_http,
        health,
        health_task,
        ready: ready_tx,
        tasks,
    };
    tokio::select! {
        _ = shutdown => tracing::info!("shutdown requested; draining"),
        res = coordinator.ended() => {
            coordinator.stop();
            return res.map_err(RunError::from);
        }
    }
    coordinator.drain(config.grace_period, &router).await
}

/// Workers serve only the coordinator role: a certificate without it would
/// have every call refused, so it is an error at start.
fn check_cluster_cert(config: &CoordinatorConfig) -> Result<(), RunError> {
    if let Some(cluster) = &config.upstream.cluster_tls {
        nanoinfer_proto::tls::check_client_name(
            &cluster.cert,
            &cluster.ca,
            nanoinfer_proto::tls::COORDINATOR_NAME,
        )
        .map_err(|e| RunError::Setup(format!("--cluster-cert: {e}")))?;
    }
    Ok(())
}

/// The API keys (`--api-keys-file`), reloaded every second by a task
/// pushed onto `tasks`; `None` when authentication is off.
fn load_api_keys(
    config: &CoordinatorConfig,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) -> Result<Option<Arc<auth::ApiKeys>>, RunError> {
    let Some(path) = &config.api_keys_file else {
        tracing::warn!("authentication is off: no --api-keys-file, so any client may call Infer");
        return Ok(None);
    };
    let keys = Arc::new(auth::ApiKeys::load(path).map_err(RunError::Setup)?);
    tracing::info!(keys = keys.len(), file = %path.display(),
        "API keys required on Infer (reloaded every second)");
    tasks.push(keys.clone().spawn_reload());
    Ok(Some(keys))
}

/// TLS on the public ports (`--tls-cert`/`--tls-key`), its files reloaded
/// on change by a task pushed onto `tasks`; `None` for plaintext.
fn load_public_tls(
    config: &CoordinatorConfig,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) -> Result<Option<Arc<nanoinfer_proto::tls::ServerTls>>, RunError> {
    let Some(files) = &config.public_tls else {
        tracing::warn!("the public port is plaintext: no --tls-cert/--tls-key");
        return Ok(None);
    };
    let tls =
        nanoinfer_proto::tls::ServerTls::load(files.clone(), "public").map_err(RunError::Setup)?;
    tracing::info!(cert = %files.cert.display(),
        client_certificates = files.client_ca.is_some(),
        "TLS on the public ports (certificate files reloaded on change)");
    tasks.push(tls.clone().spawn_reload());
    Ok(Some(tls))
}

/// The public gRPC services: health, reflection and `InferService`.
fn grpc_routes(
    config: &CoordinatorConfig,
    health: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
    front: Arc<front::Front>,
) -> tonic::transport::server::Router {
    nanoinfer_proto::add_reflection(
        tonic::transport::Server::builder()
            // Many streams opened at once on one client connection.
            .initial_connection_window_size(nanoinfer_proto::windows::CONNECTION)
            .max_concurrent_streams(Some(config.grpc_max_concurrent_streams))
            .add_service(health),
        nanoinfer_proto::INFERENCE_DESCRIPTOR_SET,
    )
    .add_service(InferServiceServer::new(service::InferServiceImpl::new(
        front,
    )))
}

/// With mutual TLS to workers, follows the cluster's certificate files (a
/// task pushed onto `tasks`).
fn follow_cluster(
    config: &CoordinatorConfig,
    router: &Arc<routing::Router>,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) {
    match &config.upstream.cluster_tls {
        Some(cluster) => {
            tracing::info!(ca = %cluster.ca.display(),
                "mutual TLS to workers: each must present <id>.worker.nanoinfer from the cluster CA");
            tasks.push(tokio::spawn(follow_cluster_files(cluster.clone(), router.clone())));
        }
        None => tracing::warn!(
            "workers are reached over plaintext: no --cluster-ca/--cluster-cert/--cluster-key, so any address registered in etcd gets prompts"
        ),
    }
}

/// A serving coordinator: its servers and the tasks beside them.
struct Serving {
    /// `nanoinfer.InferService`, health and reflection.
    grpc: Server,
    /// The OpenAI-compatible HTTP API (none with `--http-listen off`).
    http: Option<Server>,
    /// `/metrics` and the probes.
    metrics: Server,
    health: tonic_health::server::HealthReporter,
    /// Keeps health in step with the routable workers until the drain.
    health_task: tokio::task::JoinHandle<()>,
    ready: Arc<tokio::sync::watch::Sender<bool>>,
    /// Discovery and reloads: aborted at the end.
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Serving {
    /// Completes when one of its servers ends by itself (an error or a
    /// panic); cancel-safe.
    async fn ended(&mut self) -> Result<(), ServeError> {
        tokio::select! {
            res = self.grpc.ended() => res,
            res = nanoinfer_proto::server::ended(&mut self.http) => res,
            res = self.metrics.ended() => res,
        }
    }

    /// Goes NOT_SERVING, stops accepting on both public ports and gives
    /// open streams `grace` to finish, then closes what is left.
    async fn drain(
        mut self,
        grace: std::time::Duration,
        router: &routing::Router,
    ) -> Result<(), RunError> {
        self.health_task.abort();
        self.ready.send_replace(false);
        for name in ["", SERVICE_NAME] {
            self.health
                .set_service_status(name, ServingStatus::NotServing)
                .await;
        }
        let http = async {
            match self.http.take() {
                Some(http) => http.drain(grace).await,
                None => Ok(true),
            }
        };
        // Both stop accepting at once and wait for their open streams.
        let grpc = self.grpc.drain(grace);
        let (grpc, http) = tokio::join!(grpc, http);
        if !(matches!(grpc, Ok(true)) && matches!(http, Ok(true))) {
            tracing::warn!(open = ?router.in_flight(), "grace period over; closing open streams");
        }
        for task in &self.tasks {
            task.abort();
        }
        grpc?;
        http?;
        tracing::info!("coordinator stopped");
        Ok(())
    }

    /// Stops everything now (the servers close their connections as they
    /// are dropped).
    fn stop(self) {
        self.health_task.abort();
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Rebuilds the worker channels when the cluster CA, certificate or key
/// file changes, so new connections use the rotated files.
async fn follow_cluster_files(
    cluster: nanoinfer_proto::tls::ClusterTls,
    router: Arc<routing::Router>,
) {
    let mut seen = cluster.stamp();
    let mut tick = tokio::time::interval(nanoinfer_proto::tls::RELOAD_INTERVAL);
    loop {
        tick.tick().await;
        let now = cluster.stamp();
        if now != seen {
            seen = now;
            match cluster.client_for_worker("check") {
                Ok(_) => {
                    router.rebuild_channels();
                    tracing::info!("cluster certificate files changed; worker connections rebuilt");
                }
                Err(e) => tracing::error!(error = %e,
                    "cluster certificate files changed but do not load; keeping the old connections"),
            }
        }
    }
}

/// Feeds the router from the discovery watch (the one place its worker
/// table changes) and keeps grpc.health.v1, `/readyz` and the gauges in step:
/// ready iff ≥ 1 routable worker.
async fn track_health(
    mut live: tokio::sync::watch::Receiver<nanoinfer_registry::WorkerSet>,
    mut status: tokio::sync::watch::Receiver<nanoinfer_registry::DiscoveryStatus>,
    router: Arc<routing::Router>,
    health: tonic_health::server::HealthReporter,
    ready: Arc<tokio::sync::watch::Sender<bool>>,
    metrics: Arc<metrics::CoordinatorMetrics>,
) {
    let mut routable = router.routable();
    let mut last = None;
    loop {
        let set = live.borrow_and_update().clone();
        router.sync(&set);
        metrics.live_workers.set(set.len() as i64);
        {
            let s = status.borrow_and_update();
            metrics.etcd_up.set(i64::from(s.etcd_error.is_none()));
            metrics.malformed_worker_records.set(s.skipped.len() as i64);
        }
        let n = *routable.borrow_and_update();
        ready.send_replace(n > 0);
        let serving = if n > 0 {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        if last != Some(n) {
            health.set_service_status("", serving).await;
            health.set_service_status(SERVICE_NAME, serving).await;
            tracing::info!(
                live_workers = set.len(),
                routable_workers = n,
                "routable worker set changed"
            );
            last = Some(n);
        }
        tokio::select! {
            r = live.changed() => if r.is_err() { return },
            r = status.changed() => if r.is_err() { return },
            r = routable.changed() => if r.is_err() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_open_file_limit_is_raised_to_the_hard_limit() {
        use rustix::process::{getrlimit, Resource};
        let now = super::raise_open_file_limit().unwrap();
        let limit = getrlimit(Resource::Nofile);
        assert_eq!(now, limit.current);
        assert_eq!(limit.current, limit.maximum);
    }
}
