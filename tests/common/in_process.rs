//! The coordinator in the test's own process: [`nanoinfer_coordinator::run_with`]
//! on ephemeral loopback ports, its worker set handed over by the test
//! instead of read from etcd. No binary, no etcd: a test of routing, relay,
//! retry, resume and deadlines starts in milliseconds. The real-process
//! tiers (`tests/chaos.rs`, the end-to-end tests) keep the whole path.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use clap::Parser;
use nanoinfer_coordinator::{Args, Listeners, RunError};
use nanoinfer_registry::{Discovery, DiscoveryStatus, WorkerSet};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};

use super::fake_worker::FakeWorker;

/// A coordinator running on the test's runtime.
pub struct InProcess {
    /// `http://127.0.0.1:PORT`, the public gRPC port.
    pub addr: String,
    /// `127.0.0.1:PORT`, `/metrics` and the probes.
    pub metrics_addr: String,
    /// `127.0.0.1:PORT`, the OpenAI-compatible HTTP API.
    pub http_addr: String,
    workers: watch::Sender<WorkerSet>,
    status: watch::Sender<DiscoveryStatus>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), RunError>>>,
}

impl InProcess {
    /// Starts a coordinator with `args` (its flags, as on the command line)
    /// whose worker set is `workers`.
    pub async fn start(args: &[&str], workers: &[&FakeWorker]) -> Self {
        let args = Args::try_parse_from(["nanoinfer-coordinator"].iter().chain(args))
            .unwrap_or_else(|e| panic!("coordinator flags: {e}"));
        let config = args.validate().expect("coordinator config");
        let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let metrics = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = format!("http://{}", grpc.local_addr().unwrap());
        let metrics_addr = metrics.local_addr().unwrap().to_string();
        let http_addr = http.local_addr().unwrap().to_string();
        let (workers_tx, workers_rx) = watch::channel(set_of(workers));
        let (status_tx, status_rx) = watch::channel(DiscoveryStatus {
            listed: true,
            ..DiscoveryStatus::default()
        });
        let discovery = Discovery {
            workers: workers_rx,
            status: status_rx,
            // The test is the discovery: nothing to run.
            task: tokio::spawn(async {}),
        };
        let listeners = Listeners {
            grpc,
            metrics,
            http: Some(http),
        };
        let (shutdown, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(nanoinfer_coordinator::run_with(
            config,
            listeners,
            discovery,
            async {
                let _ = stopped.await;
            },
        ));
        Self {
            addr,
            metrics_addr,
            http_addr,
            workers: workers_tx,
            status: status_tx,
            shutdown: Some(shutdown),
            task: Some(task),
        }
    }

    /// Replaces the worker set, as etcd's watch would when workers
    /// register or leave.
    pub fn set_workers(&self, workers: &[&FakeWorker]) {
        self.workers.send_replace(set_of(workers));
    }

    /// Says etcd is unreachable (`Some(error)`) or reachable again.
    pub fn set_etcd_error(&self, error: Option<&str>) {
        self.status
            .send_modify(|s| s.etcd_error = error.map(str::to_string));
    }

    /// Its metrics now.
    pub async fn scrape(&self) -> HashMap<String, f64> {
        let (status, body) = super::http_get(&self.metrics_addr, "/metrics").await;
        assert_eq!(status, 200);
        super::parse_metrics(&body)
    }

    /// Shuts it down (the drain of SIGTERM) and returns how `run` ended.
    pub async fn stop(mut self) -> Result<(), RunError> {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        self.task.take().unwrap().await.expect("coordinator task")
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

fn set_of(workers: &[&FakeWorker]) -> WorkerSet {
    let set: BTreeMap<String, nanoinfer_registry::WorkerInfo> =
        workers.iter().map(|w| (w.id.clone(), w.info())).collect();
    Arc::new(set)
}
