//! The worker's Prometheus metrics, named after vLLM's where one exists
//! (`nanoinfer_worker_` + the vLLM name). The gauges of running and waiting
//! requests are also the engine's own load counters, so `/metrics` and the
//! `Load` RPC can never disagree.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

use nanoinfer_telemetry::http::{histogram, LATENCY_BUCKETS, TOKEN_BUCKETS};

/// Label of finished requests.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FinishLabel {
    /// `length`, `stop_sequence`, `eos`, `context_length`, `cancelled`,
    /// `client_left`, `error`, `kv_cache_full`, `deadline_exceeded` or
    /// `queue_timeout`.
    pub finish_reason: &'static str,
}

/// Labels of the model-info series.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelInfoLabel {
    /// `--model-name` (or the GGUF's name).
    pub model_name: String,
    /// The GGUF file name.
    pub file: String,
    /// The worker's version.
    pub version: &'static str,
}

/// Buckets for tokens per engine step: 1 to 8192.
pub const STEP_TOKEN_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0,
];

/// Every worker metric.
pub struct WorkerMetrics {
    /// Requests generating now.
    pub running: Gauge,
    /// Requests waiting in the queue.
    pub waiting: Gauge,
    /// Requests finished, by how.
    pub requests: Family<FinishLabel, Counter>,
    /// Prompt tokens processed.
    pub prompt_tokens: Counter,
    /// Tokens generated.
    pub generation_tokens: Counter,
    /// Prompt tokens whose KV cells were reused instead of recomputed.
    pub prefix_cache_hit_tokens: Counter,
    /// Tokens proposed by draft-free speculation.
    pub spec_proposed_tokens: Counter,
    /// Proposed tokens the sampler agreed with (kept).
    pub spec_accepted_tokens: Counter,
    /// Per request that had proposals: the share of them kept.
    pub spec_acceptance: Histogram,
    /// Time from arrival to the first token sent.
    pub time_to_first_token: Histogram,
    /// Decode time per generated token after the first, per request.
    pub time_per_output_token: Histogram,
    /// Time spent waiting in the queue.
    pub queue_time: Histogram,
    /// Prompt processing time per request.
    pub prefill_time: Histogram,
    /// Decode time per request.
    pub decode_time: Histogram,
    /// Duration of one engine step (llama.cpp decode plus sampling).
    pub step_duration: Histogram,
    /// Tokens computed in one engine step (decodes plus prompt chunk).
    pub step_tokens: Histogram,
    /// Tokens of finished requests kept in the KV cache for prefix reuse.
    pub prefix_cache_tokens: Gauge,
    /// Admissions whose prefix was restored from the host-RAM tier.
    pub prefix_ram_hits: Counter,
    /// Admissions (with the RAM tier on) that found nothing in it longer
    /// than what the KV cache offered.
    pub prefix_ram_misses: Counter,
    /// Prompt tokens restored from the RAM tier instead of recomputed.
    pub prefix_ram_restored_tokens: Counter,
    /// Prefixes saved into the RAM tier.
    pub prefix_ram_saves: Counter,
    /// Prefixes dropped from the RAM tier for room.
    pub prefix_ram_evictions: Counter,
    /// Bytes of KV state the RAM tier keeps.
    pub prefix_ram_bytes: Gauge,
    /// Prefixes the RAM tier keeps.
    pub prefix_ram_entries: Gauge,
    /// Time to restore one prefix from the RAM tier.
    pub prefix_ram_restore_time: Histogram,
    /// Share of the KV cache (context window) in use, 0..=1.
    pub kv_cache_usage: Gauge<f64, AtomicU64>,
    /// Seconds it took to load the model.
    pub model_load_seconds: Gauge<f64, AtomicU64>,
    /// Concurrent generation slots.
    pub capacity_slots: Gauge,
    /// Wait-queue capacity.
    pub queue_capacity: Gauge,
    /// Context window in tokens.
    pub context_length: Gauge,
    /// 1 for the model served (name, file, version as labels).
    pub model_info: Family<ModelInfoLabel, Gauge>,
    /// Times the worker's etcd record was found overwritten or deleted and
    /// written back.
    pub etcd_record_repairs: Counter,
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        Self {
            running: Gauge::default(),
            waiting: Gauge::default(),
            requests: Family::default(),
            prompt_tokens: Counter::default(),
            generation_tokens: Counter::default(),
            prefix_cache_hit_tokens: Counter::default(),
            spec_proposed_tokens: Counter::default(),
            spec_accepted_tokens: Counter::default(),
            spec_acceptance: histogram(&[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]),
            time_to_first_token: histogram(LATENCY_BUCKETS),
            time_per_output_token: histogram(TOKEN_BUCKETS),
            queue_time: histogram(LATENCY_BUCKETS),
            prefill_time: histogram(LATENCY_BUCKETS),
            decode_time: histogram(LATENCY_BUCKETS),
            step_duration: histogram(TOKEN_BUCKETS),
            step_tokens: histogram(STEP_TOKEN_BUCKETS),
            prefix_cache_tokens: Gauge::default(),
            prefix_ram_hits: Counter::default(),
            prefix_ram_misses: Counter::default(),
            prefix_ram_restored_tokens: Counter::default(),
            prefix_ram_saves: Counter::default(),
            prefix_ram_evictions: Counter::default(),
            prefix_ram_bytes: Gauge::default(),
            prefix_ram_entries: Gauge::default(),
            prefix_ram_restore_time: histogram(TOKEN_BUCKETS),
            kv_cache_usage: Gauge::default(),
            model_load_seconds: Gauge::default(),
            capacity_slots: Gauge::default(),
            queue_capacity: Gauge::default(),
            context_length: Gauge::default(),
            model_info: Family::default(),
            etcd_record_repairs: Counter::default(),
        }
    }
}

impl WorkerMetrics {
    /// Registers every metric under `nanoinfer_worker_`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("nanoinfer_worker");
        r.register(
            "model_info",
            "The model this worker serves (1), with its name, file and the worker's version",
            self.model_info.clone(),
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
        r.register(
            "etcd_record_repairs",
            "Times this worker found its etcd record overwritten or deleted while its lease lived, and wrote it back",
            self.etcd_record_repairs.clone(),
        );
        r.register(
            "num_requests_running",
            "Requests generating now",
            self.running.clone(),
        );
        r.register(
            "num_requests_waiting",
            "Requests waiting for a slot",
            self.waiting.clone(),
        );
        r.register(
            "requests",
            "Requests finished, by finish reason",
            self.requests.clone(),
        );
        r.register(
            "prompt_tokens",
            "Prompt tokens processed",
            self.prompt_tokens.clone(),
        );
        r.register(
            "generation_tokens",
            "Tokens generated",
            self.generation_tokens.clone(),
        );
        r.register(
            "prefix_cache_hit_tokens",
            "Prompt tokens reused from the KV cache instead of recomputed",
            self.prefix_cache_hit_tokens.clone(),
        );
        r.register(
            "spec_proposed_tokens",
            "Tokens proposed by draft-free (n-gram) speculation",
            self.spec_proposed_tokens.clone(),
        );
        r.register(
            "spec_accepted_tokens",
            "Proposed tokens the sampler agreed with; proposed minus accepted were rejected",
            self.spec_accepted_tokens.clone(),
        );
        r.register(
            "spec_acceptance_ratio",
            "Per request with proposals: the share of its proposed tokens kept",
            self.spec_acceptance.clone(),
        );
        r.register(
            "time_to_first_token_seconds",
            "Arrival at the worker to first token sent",
            self.time_to_first_token.clone(),
        );
        r.register(
            "time_per_output_token_seconds",
            "Decode time per output token after the first, per request",
            self.time_per_output_token.clone(),
        );
        r.register(
            "step_duration_seconds",
            "Engine step: llama.cpp decode of the batch plus sampling",
            self.step_duration.clone(),
        );
        r.register(
            "step_tokens",
            "Tokens computed per engine step (one per generating request, its proposed tokens, and prompt tokens)",
            self.step_tokens.clone(),
        );
        r.register(
            "prefix_cache_tokens",
            "Tokens of finished requests kept in the KV cache for prefix reuse",
            self.prefix_cache_tokens.clone(),
        );
        r.register(
            "prefix_ram_hits",
            "Admissions whose prompt prefix was restored from the host-RAM tier",
            self.prefix_ram_hits.clone(),
        );
        r.register(
            "prefix_ram_misses",
            "Admissions that found no longer prefix in the host-RAM tier than in the KV cache",
            self.prefix_ram_misses.clone(),
        );
        r.register(
            "prefix_ram_restored_tokens",
            "Prompt tokens restored from the host-RAM tier instead of recomputed",
            self.prefix_ram_restored_tokens.clone(),
        );
        r.register(
            "prefix_ram_saves",
            "Prefixes saved into the host-RAM tier when evicted from the KV cache",
            self.prefix_ram_saves.clone(),
        );
        r.register(
            "prefix_ram_evictions",
            "Prefixes dropped from the host-RAM tier for room",
            self.prefix_ram_evictions.clone(),
        );
        r.register(
            "prefix_ram_bytes",
            "Bytes of KV state the host-RAM tier keeps",
            self.prefix_ram_bytes.clone(),
        );
        r.register(
            "prefix_ram_entries",
            "Prefixes the host-RAM tier keeps",
            self.prefix_ram_entries.clone(),
        );
        r.register(
            "prefix_ram_restore_seconds",
            "Time to restore one prefix from the host-RAM tier",
            self.prefix_ram_restore_time.clone(),
        );
        r.register(
            "request_queue_time_seconds",
            "Time waiting in the queue",
            self.queue_time.clone(),
        );
        r.register(
            "request_prefill_time_seconds",
            "Prompt processing time",
            self.prefill_time.clone(),
        );
        r.register(
            "request_decode_time_seconds",
            "Decode time",
            self.decode_time.clone(),
        );
        r.register(
            "kv_cache_usage_perc",
            "Share of the KV cache in use (0 to 1)",
            self.kv_cache_usage.clone(),
        );
        r.register(
            "model_load_seconds",
            "Time to load the model",
            self.model_load_seconds.clone(),
        );
        r.register(
            "capacity_slots",
            "Concurrent generation slots",
            self.capacity_slots.clone(),
        );
        r.register(
            "queue_capacity",
            "Requests that may wait",
            self.queue_capacity.clone(),
        );
        r.register(
            "context_length",
            "Context window in tokens",
            self.context_length.clone(),
        );
    }
}
