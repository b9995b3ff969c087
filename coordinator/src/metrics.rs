//! The coordinator's Prometheus metrics (`nanoinfer_coordinator_` + vLLM's
//! names where one exists), and [`RequestRecorder`], which turns one request's
//! life into them.

use std::sync::Arc;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tonic::Code;

use nanoinfer_telemetry::http::{histogram, LATENCY_BUCKETS, TOKEN_BUCKETS};

use crate::admission::AdmissionMetrics;

/// Which public API a request came through (the `api` metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// `nanoinfer.InferService/Infer`.
    Grpc,
    /// `/v1/chat/completions`, `/v1/completions`.
    Http,
}

impl Api {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Api::Grpc => "grpc",
            Api::Http => "http",
        }
    }
}

/// How a prefix-affinity pick went.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AffinityLabel {
    /// `hit`, `miss` or `overloaded`.
    pub outcome: &'static str,
}

/// Why a cache-aware pick went where it did.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabel {
    /// `cache` (a worker holding part of the prompt won), `load` (no
    /// candidate holds any of it: by load), `no_index` (no vocabulary yet,
    /// or no candidate's index is in sync).
    pub reason: &'static str,
}

/// Cache-aware routing's metrics.
#[derive(Clone, Default)]
pub struct KvMetrics {
    /// Picks by reason.
    pub decisions: Family<DecisionLabel, Counter>,
    /// KV events applied to the index.
    pub events: Counter,
    /// Snapshots received (first subscriptions and resyncs).
    pub snapshots: Counter,
    /// Streams that had to resync (gap, restart, bound) or broke.
    pub resyncs: Family<WorkerLabel, Counter>,
    /// Blocks indexed per worker (-1 while unsynced).
    pub blocks: Family<WorkerLabel, Gauge>,
    /// Finished requests whose worker reused exactly the predicted blocks
    /// (`agree`), more (`more`) or fewer (`fewer`).
    pub predictions: Family<DecisionLabel, Counter>,
}

/// The router's metrics (registered by [`crate::metrics`]).
#[derive(Clone, Default)]
pub struct RouterMetrics {
    /// Cache-aware routing's.
    pub kv: KvMetrics,
    /// Prefix-affinity picks by outcome.
    pub affinity: Family<AffinityLabel, Counter>,
    /// Requests in flight per worker.
    pub in_flight: Family<WorkerLabel, Gauge>,
    /// Ejections per worker.
    pub ejections: Family<WorkerLabel, Counter>,
    /// Re-admissions per worker.
    pub readmissions: Family<WorkerLabel, Counter>,
    /// Workers that can take requests now.
    pub routable: Gauge,
    /// The admission queue's.
    pub admission: AdmissionMetrics,
}

/// Outcome of a request.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// The public API: `grpc` or `http`.
    pub api: &'static str,
    /// The model name of the worker that served it (empty when none did).
    pub model_name: String,
    /// gRPC status code name (`OK`, `INVALID_ARGUMENT`, …; `CANCELLED` when
    /// the client left mid-stream).
    pub code: &'static str,
    /// Finish reason of a successful request (`length`, `stop_sequence`,
    /// `eos`, `context_length`, `cancelled`); empty otherwise.
    pub finish_reason: &'static str,
}

/// A worker id.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerLabel {
    /// The worker's id.
    pub worker: String,
}

/// Why a request was refused at the door.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// `missing` or `invalid`.
    pub reason: &'static str,
}

/// A gRPC status code.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    /// gRPC status code name.
    pub code: &'static str,
}

/// A worker and a gRPC status code.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerCodeLabel {
    /// The worker's id.
    pub worker: String,
    /// gRPC status code name.
    pub code: &'static str,
}

/// A model name.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabel {
    /// The worker's `--model-name`.
    pub model_name: String,
}

/// Buckets for per-request token counts (vLLM's
/// `request_prompt_tokens` / `request_generation_tokens`).
pub const TOKEN_COUNT_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0, 20000.0,
    50000.0, 100000.0,
];

fn token_count_histogram() -> Histogram {
    histogram(TOKEN_COUNT_BUCKETS)
}

type TokenCounts = Family<ModelLabel, Histogram, fn() -> Histogram>;

/// Every coordinator metric.
pub struct CoordinatorMetrics {
    /// Requests by outcome.
    pub requests: Family<OutcomeLabel, Counter>,
    /// Requests in flight (validated, not finished).
    pub running: Gauge,
    /// Arrival → worker stream opened (routing and worker admission).
    pub queue_time: Histogram,
    /// Arrival → first token relayed.
    pub time_to_first_token: Histogram,
    /// Gap between consecutive relayed tokens.
    pub inter_token_latency: Histogram,
    /// Arrival → final message relayed.
    pub e2e_latency: Histogram,
    /// Live workers in the set from etcd.
    pub live_workers: Gauge,
    /// In-flight counts, ejections, re-admissions, routable workers.
    pub router: RouterMetrics,
    /// Errors from workers: refusals when opening a stream and failures
    /// mid-stream.
    pub worker_errors: Family<WorkerCodeLabel, Counter>,
    /// Prompt tokens per finished request (each of `n` completions counts).
    pub prompt_tokens: TokenCounts,
    /// Generated tokens per finished request.
    pub generation_tokens: TokenCounts,
    /// Requests moved to another worker before their first token.
    pub retries: Counter,
    /// Streams resumed on another worker after tokens were relayed.
    pub resumes: Counter,
    /// Streams cancelled because their client read nothing for the
    /// stalled-stream timeout.
    pub stalled_streams: Counter,
    /// Worker records in etcd skipped as malformed.
    pub malformed_worker_records: Gauge,
    /// Whether etcd answers (1) or not (0).
    pub etcd_up: Gauge,
    /// Requests refused for a missing or wrong API key.
    pub auth_rejections: Family<ReasonLabel, Counter>,
}

impl Default for CoordinatorMetrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            running: Gauge::default(),
            queue_time: histogram(LATENCY_BUCKETS),
            time_to_first_token: histogram(LATENCY_BUCKETS),
            inter_token_latency: histogram(TOKEN_BUCKETS),
            e2e_latency: histogram(LATENCY_BUCKETS),
            live_workers: Gauge::default(),
            router: RouterMetrics::default(),
            worker_errors: Family::default(),
            prompt_tokens: Family::new_with_constructor(token_count_histogram),
            generation_tokens: Family::new_with_constructor(token_count_histogram),
            retries: Counter::default(),
            resumes: Counter::default(),
            stalled_streams: Counter::default(),
            malformed_worker_records: Gauge::default(),
            etcd_up: Gauge::default(),
            auth_rejections: Family::default(),
        }
    }
}

impl CoordinatorMetrics {
    /// Registers every metric under `nanoinfer_coordinator_`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("nanoinfer_coordinator");
        r.register(
            "build",
            "The coordinator's version",
            prometheus_client::metrics::info::Info::new(vec![(
                "version".to_string(),
                env!("CARGO_PKG_VERSION").to_string(),
            )]),
        );
        r.register(
            "requests",
            "Requests by API, model, gRPC code and finish reason",
            self.requests.clone(),
        );
        r.register(
            "request_prompt_tokens",
            "Prompt tokens per finished request, by model",
            self.prompt_tokens.clone(),
        );
        r.register(
            "request_generation_tokens",
            "Generated tokens per finished request, by model",
            self.generation_tokens.clone(),
        );
        r.register(
            "num_requests_running",
            "Requests in flight",
            self.running.clone(),
        );
        r.register(
            "request_queue_time_seconds",
            "Arrival to worker stream opened",
            self.queue_time.clone(),
        );
        r.register(
            "time_to_first_token_seconds",
            "Arrival to first token relayed",
            self.time_to_first_token.clone(),
        );
        r.register(
            "inter_token_latency_seconds",
            "Gap between consecutive relayed tokens",
            self.inter_token_latency.clone(),
        );
        r.register(
            "e2e_request_latency_seconds",
            "Arrival to final message relayed",
            self.e2e_latency.clone(),
        );
        r.register(
            "live_workers",
            "Live workers known from etcd",
            self.live_workers.clone(),
        );
        r.register(
            "worker_requests_in_flight",
            "Requests in flight per worker",
            self.router.in_flight.clone(),
        );
        r.register(
            "routable_workers",
            "Workers that take requests now (live and not ejected)",
            self.router.routable.clone(),
        );
        r.register(
            "worker_ejections",
            "Workers taken out of routing after a transport failure",
            self.router.ejections.clone(),
        );
        r.register(
            "admission_queue_waiting",
            "Requests waiting in the admission queue for a worker with room (retries and resumes included)",
            self.router.admission.waiting.clone(),
        );
        r.register(
            "admission_queued",
            "Requests that waited in the admission queue at all",
            self.router.admission.queued.clone(),
        );
        r.register(
            "admission_rejected_full",
            "Requests refused because the admission queue was full (RESOURCE_EXHAUSTED / 429)",
            self.router.admission.rejected_full.clone(),
        );
        r.register(
            "admission_timeouts",
            "Requests refused after waiting --admission-timeout for a worker with room",
            self.router.admission.timed_out.clone(),
        );
        r.register(
            "worker_readmissions",
            "Ejected workers re-admitted after a healthy probe",
            self.router.readmissions.clone(),
        );
        r.register(
            "worker_errors",
            "Worker refusals and mid-stream failures, by worker and gRPC code",
            self.worker_errors.clone(),
        );
        r.register(
            "prefix_affinity_picks",
            "Prefix-affinity routing decisions: hit (the prefix's worker), miss (no worker holds it), overloaded (its worker was past the load gap)",
            self.router.affinity.clone(),
        );
        let kv = &self.router.kv;
        r.register(
            "cache_aware_picks",
            "Cache-aware routing decisions: cache (a worker holding part of the prompt won), load (none holds any: by load), no_index (no vocabulary or no synced index yet)",
            kv.decisions.clone(),
        );
        r.register(
            "kv_events",
            "KV events from the workers applied to the index",
            kv.events.clone(),
        );
        r.register(
            "kv_snapshots",
            "KV snapshots received (first subscriptions and resyncs)",
            kv.snapshots.clone(),
        );
        r.register(
            "kv_resyncs",
            "Workers' KV event streams that broke or fell out of step and were subscribed again",
            kv.resyncs.clone(),
        );
        r.register(
            "kv_index_blocks",
            "KV blocks the index holds per worker (-1 while its stream is out of sync)",
            kv.blocks.clone(),
        );
        r.register(
            "kv_predictions",
            "Finished requests by how the worker's reused prompt blocks compared with the index's prediction: agree, more, fewer",
            kv.predictions.clone(),
        );
        r.register(
            "retries",
            "Requests moved to another worker before their first token",
            self.retries.clone(),
        );
        r.register(
            "resumes",
            "Streams resumed on another worker after tokens were relayed",
            self.resumes.clone(),
        );
        r.register(
            "stalled_streams",
            "Streams cancelled because their client stopped reading",
            self.stalled_streams.clone(),
        );
        r.register(
            "malformed_worker_records",
            "Worker records in etcd skipped as malformed",
            self.malformed_worker_records.clone(),
        );
        r.register(
            "etcd_up",
            "Whether the etcd watch is running (1) or etcd is unreachable (0)",
            self.etcd_up.clone(),
        );
        r.register(
            "auth_rejections",
            "Requests refused for a missing or wrong API key",
            self.auth_rejections.clone(),
        );
        r.register_collector(Box::new(nanoinfer_telemetry::http::FnCounter {
            name: "request_decode_errors",
            help: "Request messages that did not decode (e.g. invalid UTF-8)",
            read: nanoinfer_proto::codec::decode_errors,
        }));
        r.register_collector(Box::new(nanoinfer_telemetry::http::FnCounter {
            name: "tls_handshake_failures",
            help: "TLS handshakes refused or timed out on this process's gRPC port (plaintext clients, unknown certificates)",
            read: nanoinfer_proto::tls::handshake_failures,
        }));
    }
}

pub use nanoinfer_proto::code_name;

/// Records one request: counted in flight while alive, timings as tokens
/// pass, and exactly one outcome — `CANCELLED` if it is dropped (the client
/// left) before [`finished`](Self::finished) or [`failed`](Self::failed).
pub struct RequestRecorder {
    metrics: Arc<CoordinatorMetrics>,
    api: Api,
    model_name: String,
    started: Instant,
    last_token: Option<Instant>,
    recorded: bool,
}

impl RequestRecorder {
    /// Starts recording a request that arrived now.
    pub fn start(metrics: Arc<CoordinatorMetrics>, api: Api) -> Self {
        metrics.running.inc();
        Self {
            metrics,
            api,
            model_name: String::new(),
            started: Instant::now(),
            last_token: None,
            recorded: false,
        }
    }

    /// Seconds since arrival.
    pub fn elapsed(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// A worker serving `model_name` took the request.
    pub fn served_by(&mut self, model_name: &str) {
        if self.model_name != model_name {
            self.model_name = model_name.to_string();
        }
    }

    /// Token counts of a finished request.
    pub fn tokens(&self, prompt: u32, generated: u32) {
        let label = ModelLabel {
            model_name: self.model_name.clone(),
        };
        self.metrics
            .prompt_tokens
            .get_or_create(&label)
            .observe(f64::from(prompt));
        self.metrics
            .generation_tokens
            .get_or_create(&label)
            .observe(f64::from(generated));
    }

    /// The worker's stream is open.
    pub fn upstream_opened(&self) {
        self.metrics.queue_time.observe(self.elapsed());
    }

    /// A token was relayed; returns the time to first token in seconds when
    /// this was the first.
    pub fn token(&mut self) -> Option<f64> {
        let now = Instant::now();
        let first = match self.last_token {
            None => {
                let ttft = (now - self.started).as_secs_f64();
                self.metrics.time_to_first_token.observe(ttft);
                Some(ttft)
            }
            Some(prev) => {
                self.metrics
                    .inter_token_latency
                    .observe((now - prev).as_secs_f64());
                None
            }
        };
        self.last_token = Some(now);
        first
    }

    /// The final message was relayed.
    pub fn finished(&mut self, finish_reason: &'static str) {
        self.metrics.e2e_latency.observe(self.elapsed());
        self.outcome(Code::Ok, finish_reason);
    }

    /// The request failed with `code`.
    pub fn failed(&mut self, code: Code) {
        self.outcome(code, "");
    }

    fn outcome(&mut self, code: Code, finish_reason: &'static str) {
        if !self.recorded {
            self.recorded = true;
            let label = OutcomeLabel {
                api: self.api.label(),
                model_name: std::mem::take(&mut self.model_name),
                code: code_name(code),
                finish_reason,
            };
            self.metrics.requests.get_or_create(&label).inc();
        }
    }
}

impl Drop for RequestRecorder {
    fn drop(&mut self) {
        self.outcome(Code::Cancelled, "");
        self.metrics.running.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(m: &CoordinatorMetrics, code: &'static str, finish_reason: &'static str) -> u64 {
        m.requests
            .get_or_create(&OutcomeLabel {
                api: "grpc",
                model_name: String::new(),
                code,
                finish_reason,
            })
            .get()
    }

    #[test]
    fn each_request_has_one_outcome_and_leaves_the_running_gauge() {
        let m = Arc::new(CoordinatorMetrics::default());
        {
            let mut r = RequestRecorder::start(m.clone(), Api::Grpc);
            assert_eq!(m.running.get(), 1);
            r.upstream_opened();
            assert!(r.token().is_some());
            assert!(r.token().is_none());
            r.finished("length");
        }
        assert_eq!(m.running.get(), 0);
        assert_eq!(count(&m, "OK", "length"), 1);
        assert_eq!(count(&m, "CANCELLED", ""), 0);
        assert_eq!(m.time_to_first_token.count(), 1);
        assert_eq!(m.inter_token_latency.count(), 1);
        assert_eq!(m.e2e_latency.count(), 1);

        drop(RequestRecorder::start(m.clone(), Api::Grpc));
        assert_eq!(
            count(&m, "CANCELLED", ""),
            1,
            "a dropped request was cancelled"
        );

        let mut r = RequestRecorder::start(m.clone(), Api::Grpc);
        r.failed(Code::InvalidArgument);
        drop(r);
        assert_eq!(count(&m, "INVALID_ARGUMENT", ""), 1);
        assert_eq!(count(&m, "CANCELLED", ""), 1);
    }
}
