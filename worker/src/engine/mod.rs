//! The generation engine: one dedicated thread owns the llama.cpp context
//! and runs continuous batching over `parallel` sequence slots.
//!
//! Requests reach it through a bounded queue ([`Engine::submit`] fails fast
//! with [`EngineError::QueueFull`] when it is full). Each step of the
//! [`scheduler`] decodes one token for every running sequence plus a budgeted
//! chunk of prompt tokens of sequences still in prefill (chunked prefill), so
//! a long new prompt never stalls running streams for more than one step.
//! Sequences join and leave between steps. Each token goes out as an
//! [`Event`] through the request's own bounded channel: a full channel pauses
//! that sequence only (backpressure; memory stays bounded), a closed one means
//! the client left and the sequence leaves the batch, its KV cells freed.
//!
//! Nothing waits for ever: a queued request leaves the queue as soon as its
//! client goes away, its deadline passes ([`Failure::DeadlineExceeded`]) or
//! it has waited `queue_timeout` ([`Failure::QueueTimeout`]); a running one
//! stops at its deadline. If the engine thread dies (a panic, or a decode
//! failure that is not a full KV cache), its requests fail with
//! [`Failure::Internal`] and [`Engine::died`] resolves, so the worker can
//! stop serving and exit.
//!
//! # Layout
//! - this module: the public handle, requests, events, errors;
//! - [`scheduler`]: the engine thread's loop: the queue, admission and
//!   retirement, and (its `step`) one step: build the batch, decode,
//!   sample;
//! - [`policy`]: pure step planning and placement rules;
//! - [`slots`]: the KV slot table and prefix cache (every cell copy or
//!   removal);
//! - [`ram_tier`]: evicted prefixes kept in host memory, restored on a hit;
//! - [`sequence`]: one sequence's sampling, stop matching, KV cells and
//!   outbox;
//! - [`speculate`]: draft-free speculation (prompt lookup), proposal
//!   lengths and back-off;
//! - [`calibrate`]: measures a step's cost by rows at start (for
//!   speculation);
//! - [`draft`]: proposals from a draft model (`--draft-model`);
//! - [`outcome`]: spans, logs and metrics when a request leaves.

mod calibrate;
mod draft;
mod outcome;
mod policy;
mod ram_tier;
mod scheduler;
mod sequence;
mod slots;
mod speculate;
#[cfg(test)]
mod tests;

pub use policy::{plan_step, SeqView, Work, ROW_GROUP};
pub use speculate::{propose, SpecConfig, StepCost};

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use nanoinfer_proto::limits::SamplingControls;
use tokio::sync::{mpsc, oneshot, watch};

use crate::metrics::WorkerMetrics;

/// Tokens buffered per request between the engine and the gRPC stream.
const EVENT_BUFFER: usize = 32;

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// `max_tokens` were generated.
    Length,
    /// A stop sequence completed.
    StopSequence,
    /// The model emitted an end-of-generation token.
    Eos,
    /// The context window is full.
    ContextLength,
    /// Cancelled by the worker (shutdown past the grace period).
    Cancelled,
}

impl FinishReason {
    /// The metric label of this reason.
    pub fn label(self) -> &'static str {
        match self {
            Self::Length => "length",
            Self::StopSequence => "stop_sequence",
            Self::Eos => "eos",
            Self::ContextLength => "context_length",
            Self::Cancelled => "cancelled",
        }
    }
}

/// One validated generation request, already tokenized.
#[derive(Debug, Clone)]
pub struct Generation {
    /// Correlation id, for logs.
    pub request_id: String,
    /// Prompt tokens (with BOS).
    pub prompt: Vec<LlamaToken>,
    /// Tokens another worker already generated (mid-stream failover):
    /// prefilled after the prompt and replayed, never sent again.
    pub resume: Vec<LlamaToken>,
    /// Tokens to generate at most, `resume` included (> `resume.len()`).
    pub max_tokens: u32,
    /// 0 = greedy.
    pub temperature: f32,
    /// Nucleus mass in (0, 1].
    pub top_p: f32,
    /// Sampler seed.
    pub seed: u64,
    /// Top-k, min-p, penalties and log-probabilities (checked).
    pub controls: SamplingControls,
    /// Token id → bias added to its logit, sorted by id (ids in the
    /// vocabulary).
    pub logit_bias: Vec<(u32, f32)>,
    /// The structured-output constraint (each sequence advances a copy).
    pub grammar: Option<crate::grammar::Grammar>,
    /// Stop sequences.
    pub stop: Vec<String>,
    /// When the caller gives up (its `grpc-timeout`): the request leaves
    /// the queue, or stops generating, then.
    pub deadline: Option<Instant>,
    /// The request's `Generate` span: parent of the engine's `queue`,
    /// `prefill` and `decode` spans, ended when the engine is done with it.
    pub span: tracing::Span,
}

/// What the engine sends for a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The request left the queue for a generation slot; sent once, before
    /// any token (the coordinator's first-token clock starts here).
    Admitted,
    /// A generated token and the text it releases (may be empty).
    Token {
        /// Text released by this token.
        text: String,
        /// Vocabulary id.
        id: i32,
        /// 0-based index among generated tokens (resumed ones included).
        index: u32,
        /// With `logprobs`: this token's (`id`'s, whatever text the event
        /// carries: text may be held back to a later event).
        logprobs: Option<TokenLogprobs>,
    },
    /// The last event of a successful generation.
    Finished {
        /// Why it ended.
        reason: FinishReason,
        /// Text held back until the end (partial stop-sequence match,
        /// incomplete character); may be empty.
        text: String,
        /// Prompt tokens (resumed tokens not included).
        prompt_tokens: u32,
        /// Generated tokens: resumed ones plus one per `Token` event.
        generated_tokens: u32,
        /// Prompt tokens whose cells were reused from the cache.
        cached_tokens: u32,
    },
    /// The generation failed; the last event.
    Failed(Failure),
}

/// A generated token's log-probabilities under the model's distribution
/// (the log-softmax of its raw logits, before penalties and temperature).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    /// The token's (natural log).
    pub logprob: f32,
    /// The most likely tokens at its position, most likely first (up to
    /// `top_logprobs`).
    pub top: Vec<Alternative>,
}

/// One of the most likely tokens at a position.
#[derive(Debug, Clone, PartialEq)]
pub struct Alternative {
    /// Vocabulary id.
    pub id: i32,
    /// Its text alone (special tokens in their text form; a piece of a
    /// multi-byte character as U+FFFD).
    pub text: String,
    /// Its log-probability.
    pub logprob: f32,
}

/// Why the engine gave up on a request (mapped to a gRPC code in
/// [`crate::error`], the one place that does it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    /// The KV cache had no room for the step (llama.cpp found no slot);
    /// another worker, or this one later, may have room.
    #[error("no room in the KV cache: {0}")]
    Capacity(String),
    /// llama.cpp or the engine failed.
    #[error("engine failure: {0}")]
    Internal(String),
    /// The caller's deadline passed.
    #[error("the call's deadline passed")]
    DeadlineExceeded,
    /// The request waited in the queue longer than the queue timeout.
    #[error("waited in the queue longer than the worker's queue timeout ({0:?})")]
    QueueTimeout(Duration),
}

impl Failure {
    /// The `finish_reason` metric label of requests that ended this way.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Capacity(_) => "kv_cache_full",
            Self::Internal(_) => "error",
            Self::DeadlineExceeded => "deadline_exceeded",
            Self::QueueTimeout(_) => "queue_timeout",
        }
    }
}

/// Test-only fault injection, in the manner of etcd's failpoints: set with
/// the `NANOINFER_FAILPOINT` env var, never in production.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failpoint {
    /// The engine thread panics once it has generated this many tokens in
    /// all (after sending them), as a crash in llama.cpp would end it.
    EnginePanicAfterTokens(u64),
}

/// Errors of [`Engine::submit`] and [`Engine::start`].
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The wait queue is full.
    #[error("worker queue is full ({0} requests waiting)")]
    QueueFull(u32),
    /// The worker is shutting down and takes no new work.
    #[error("worker is shutting down")]
    ShuttingDown,
    /// The llama.cpp context could not be created.
    #[error("cannot create llama.cpp context: {0}")]
    Context(String),
}

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Context window of each sequence, in tokens.
    pub ctx_size: u32,
    /// Sequences generated concurrently (batch slots).
    pub parallel: u32,
    /// Prompt tokens decoded per step, shared by sequences in prefill.
    pub step_tokens: u32,
    /// The same while some sequence decodes (≤ `step_tokens`).
    pub step_tokens_decoding: u32,
    /// Tokens of finished sequences kept in the KV cache for prefix reuse.
    pub prefix_cache_tokens: u32,
    /// Bytes of evicted prefixes kept in host memory (the RAM tier; 0:
    /// none).
    pub prefix_cache_ram_bytes: u64,
    /// CPU threads for llama.cpp.
    pub threads: i32,
    /// Requests that may wait for the engine.
    pub queue: u32,
    /// How long a request may wait in the queue before it fails with
    /// [`Failure::QueueTimeout`] (so the coordinator tries elsewhere).
    pub queue_timeout: Duration,
    /// Speculation ([`SpecConfig::OFF`]: none).
    pub spec: SpecConfig,
    /// A draft model with the served model's vocabulary, proposing when a
    /// sequence's own context offers nothing to copy (needs `spec` on).
    pub draft: Option<DraftModel>,
    /// What the KV cache stores keys and values as.
    pub kv_cache_type: KvCacheType,
    /// Test-only fault injection.
    pub failpoint: Option<Failpoint>,
}

/// A loaded draft model (`--draft-model`), checked to share the served
/// model's vocabulary ([`crate::model::load_draft`]).
#[derive(Clone)]
pub struct DraftModel(pub Arc<LlamaModel>);

impl std::fmt::Debug for DraftModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DraftModel")
            .field("params", &self.0.n_params())
            .finish()
    }
}

/// What the KV cache stores keys and values as (`--kv-cache-type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum KvCacheType {
    /// 8-bit blocks (half of f16's memory). ggml's CPU attention then takes
    /// one path for every batch shape and cache layout, which the seed
    /// promise needs (docs/operations.md, "Same seed, same text").
    #[default]
    #[value(name = "q8_0")]
    Q8_0,
    /// 16-bit floats: llama.cpp's default. ggml's CPU attention then splits
    /// a one-token step over the cache, and tiles a step of 64 tokens or
    /// more, by cell index, so a seeded request's text may change with
    /// what the cache holds.
    #[value(name = "f16")]
    F16,
}

impl KvCacheType {
    /// llama.cpp's type.
    pub fn llama(self) -> llama_cpp_2::context::params::KvCacheType {
        match self {
            Self::Q8_0 => llama_cpp_2::context::params::KvCacheType::Q8_0,
            Self::F16 => llama_cpp_2::context::params::KvCacheType::F16,
        }
    }
}

/// State shared by the handles and the engine thread.
struct Shared {
    /// Also the source of the running / waiting counts.
    metrics: Arc<WorkerMetrics>,
    draining: AtomicBool,
    cancel: AtomicBool,
    /// Set once, with the reason, when the engine thread dies.
    died: watch::Sender<Option<String>>,
    /// What the KV cache holds, for `KvEvents` subscribers.
    kv: Arc<crate::kv_events::KvHub>,
    /// What restoring a prefix from the RAM tier costs per token, as a
    /// fraction of computing it (f32 bits; 0 until measured).
    ram_restore_cost: AtomicU32,
}

struct Job {
    generation: Generation,
    events: mpsc::Sender<Event>,
    submitted: Instant,
    /// Open while the job waits; dropped when the engine takes it.
    queue_span: tracing::Span,
    /// The block hashes of the input (prompt and resumed tokens), published
    /// in the computing tier until its prefill ends.
    blocks: Vec<u64>,
}

/// Handle to the engine thread. Dropping every handle stops the thread once
/// the sequences it is running are done (queued requests are still served).
#[derive(Clone)]
pub struct Engine {
    /// Unbounded: the bound is the `waiting` count checked in
    /// [`Engine::submit`], and the engine thread moves jobs at once into its
    /// own queue, where it can drop the dead ones.
    jobs: std_mpsc::Sender<Job>,
    shared: Arc<Shared>,
    queue: u32,
    ctx_size: u32,
    parallel: u32,
}

/// A snapshot of the engine's load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Load {
    /// Requests generating now.
    pub running: u32,
    /// Requests waiting.
    pub queued: u32,
}

impl Engine {
    /// Starts the engine thread and waits until its context is created.
    pub async fn start(
        backend: Arc<LlamaBackend>,
        model: Arc<LlamaModel>,
        config: EngineConfig,
        metrics: Arc<WorkerMetrics>,
    ) -> Result<Self, EngineError> {
        let (jobs, rx) = std_mpsc::channel::<Job>();
        let shared = Arc::new(Shared {
            metrics,
            draining: AtomicBool::new(false),
            cancel: AtomicBool::new(false),
            died: watch::channel(None).0,
            kv: crate::kv_events::KvHub::new(),
            ram_restore_cost: AtomicU32::new(0),
        });
        let (ready_tx, ready_rx) = oneshot::channel();
        let thread_shared = shared.clone();
        let thread_config = config.clone();
        std::thread::Builder::new()
            .name("nanoinfer-engine".into())
            .spawn(move || {
                let shared = thread_shared.clone();
                // A panic must not leave a worker that accepts requests no
                // one will serve: catch it and report the death. Unwinding
                // drops every sequence's and queued request's sender, and
                // the service turns a stream that ends without its final
                // event into INTERNAL.
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    scheduler::run(backend, model, thread_config, rx, thread_shared, ready_tx)
                }));
                let reason = match result {
                    Ok(Ok(())) => return,
                    Ok(Err(reason)) => reason,
                    Err(panic) => format!("engine thread panicked: {}", panic_message(&*panic)),
                };
                tracing::error!(%reason, "engine died");
                // Its context, and every cell in it, is gone.
                shared.kv.clear();
                shared.draining.store(true, Ordering::SeqCst);
                shared.died.send_replace(Some(reason));
            })
            .map_err(|e| EngineError::Context(e.to_string()))?;
        let ctx_size = ready_rx
            .await
            .map_err(|_| EngineError::Context("engine thread exited".into()))??;
        Ok(Self {
            jobs,
            shared,
            queue: config.queue,
            ctx_size,
            parallel: config.parallel,
        })
    }

    /// What the engine's KV cache holds, as events (`KvEvents`).
    pub fn kv_hub(&self) -> Arc<crate::kv_events::KvHub> {
        self.shared.kv.clone()
    }

    /// Queues a generation. The receiver yields its events; dropping it
    /// cancels the request.
    pub fn submit(&self, generation: Generation) -> Result<mpsc::Receiver<Event>, EngineError> {
        if self.shared.draining.load(Ordering::SeqCst) {
            return Err(EngineError::ShuttingDown);
        }
        let waiting = &self.shared.metrics.waiting;
        // The gauge is the queue's counter: the engine decrements it when a
        // job leaves the queue, whichever way.
        if waiting.inc() >= i64::from(self.queue) {
            waiting.dec();
            return Err(EngineError::QueueFull(self.queue));
        }
        let (events, rx) = mpsc::channel(EVENT_BUFFER);
        let queue_span = tracing::info_span!(parent: &generation.span, "queue");
        let ids: Vec<i32> = generation
            .prompt
            .iter()
            .chain(&generation.resume)
            .map(|t| t.0)
            .collect();
        let job = Job {
            blocks: nanoinfer_proto::kv::block_hashes(&ids),
            generation,
            events,
            submitted: Instant::now(),
            queue_span,
        };
        match self.jobs.send(job) {
            Ok(()) => Ok(rx),
            Err(_) => {
                // The engine thread is gone.
                waiting.dec();
                Err(EngineError::ShuttingDown)
            }
        }
    }

    /// Context window in tokens.
    pub fn ctx_size(&self) -> u32 {
        self.ctx_size
    }

    /// Concurrent generation slots.
    pub fn slots(&self) -> u32 {
        self.parallel
    }

    /// Wait-queue capacity.
    pub fn queue_capacity(&self) -> u32 {
        self.queue
    }

    /// Current load.
    pub fn load(&self) -> Load {
        Load {
            running: self.shared.metrics.running.get().max(0) as u32,
            queued: self.shared.metrics.waiting.get().max(0) as u32,
        }
    }

    /// Fraction of the KV cache's cells in use (the metric's value).
    pub fn kv_cache_usage(&self) -> f64 {
        self.shared.metrics.kv_cache_usage.get()
    }

    /// What restoring a prefix from the RAM tier costs per token, as a
    /// fraction of computing it: measured over the recent restores and
    /// prompt steps; 0 until both were seen.
    pub fn ram_restore_cost(&self) -> f32 {
        f32::from_bits(self.shared.ram_restore_cost.load(Ordering::Relaxed))
    }

    /// Refuses new work from now on.
    pub fn drain(&self) {
        self.shared.draining.store(true, Ordering::SeqCst);
    }

    /// Waits until no request is running or queued, for at most `grace`.
    /// Returns whether the engine went idle.
    pub async fn wait_idle(&self, grace: Duration) -> bool {
        let deadline = Instant::now() + grace;
        loop {
            if self.load()
                == (Load {
                    running: 0,
                    queued: 0,
                })
            {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Ends every running and queued request with [`FinishReason::Cancelled`].
    pub fn cancel_all(&self) {
        self.shared.cancel.store(true, Ordering::SeqCst);
    }

    /// Resolves, with the reason, once the engine thread has died (it
    /// panicked or llama.cpp failed beyond a full KV cache); never resolves
    /// while it runs.
    pub async fn died(&self) -> String {
        let mut rx = self.shared.died.subscribe();
        let reason = match rx.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone().unwrap_or_default(),
            // The sender lives in `shared`, which `self` holds.
            Err(_) => std::future::pending().await,
        };
        reason
    }
}

/// The text of a panic payload.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".into()
    }
}
