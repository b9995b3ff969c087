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
//! # Layout
//! - this module: the public handle, requests, events, errors;
//! - [`scheduler`]: the engine thread's step loop and step planning;
//! - [`sequence`]: one sequence's sampling, stop matching and outbox.

mod scheduler;
mod sequence;

pub use scheduler::{plan_step, SeqView, Work};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use tokio::sync::{mpsc, oneshot};

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
    /// Tokens to generate at most (≥ 1).
    pub max_tokens: u32,
    /// 0 = greedy.
    pub temperature: f32,
    /// Nucleus mass in (0, 1].
    pub top_p: f32,
    /// Sampler seed.
    pub seed: u64,
    /// Stop sequences.
    pub stop: Vec<String>,
    /// The request's `Generate` span: parent of the engine's `queue`,
    /// `prefill` and `decode` spans, ended when the engine is done with it.
    pub span: tracing::Span,
}

/// What the engine sends for a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A generated token and the text it releases (may be empty).
    Token {
        /// Text released by this token.
        text: String,
        /// Vocabulary id.
        id: i32,
        /// 0-based index among generated tokens.
        index: u32,
    },
    /// The last event of a successful generation.
    Finished {
        /// Why it ended.
        reason: FinishReason,
        /// Text held back until the end (partial stop-sequence match,
        /// incomplete character); may be empty.
        text: String,
        /// Prompt tokens.
        prompt_tokens: u32,
        /// Generated tokens (= number of `Token` events).
        generated_tokens: u32,
    },
    /// llama.cpp failed; the last event.
    Failed(String),
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
    /// CPU threads for llama.cpp.
    pub threads: i32,
    /// Requests that may wait for the engine.
    pub queue: u32,
}

/// State shared by the handles and the engine thread.
struct Shared {
    /// Also the source of the running / waiting counts.
    metrics: Arc<WorkerMetrics>,
    draining: AtomicBool,
    cancel: AtomicBool,
}

struct Job {
    generation: Generation,
    events: mpsc::Sender<Event>,
    submitted: Instant,
    /// Open while the job waits; dropped when the engine takes it.
    queue_span: tracing::Span,
}

/// Handle to the engine thread. Dropping every handle stops the thread once
/// the sequences it is running are done (queued requests are still served).
#[derive(Clone)]
pub struct Engine {
    jobs: std_mpsc::SyncSender<Job>,
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
        let (jobs, rx) = std_mpsc::sync_channel::<Job>(config.queue as usize);
        let shared = Arc::new(Shared {
            metrics,
            draining: AtomicBool::new(false),
            cancel: AtomicBool::new(false),
        });
        let (ready_tx, ready_rx) = oneshot::channel();
        let thread_shared = shared.clone();
        let thread_config = config.clone();
        std::thread::Builder::new()
            .name("nanoinfer-engine".into())
            .spawn(move || {
                scheduler::run(backend, model, thread_config, rx, thread_shared, ready_tx)
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

    /// Queues a generation. The receiver yields its events; dropping it
    /// cancels the request.
    pub fn submit(&self, generation: Generation) -> Result<mpsc::Receiver<Event>, EngineError> {
        if self.shared.draining.load(Ordering::SeqCst) {
            return Err(EngineError::ShuttingDown);
        }
        let (events, rx) = mpsc::channel(EVENT_BUFFER);
        let waiting = &self.shared.metrics.waiting;
        waiting.inc();
        let queue_span = tracing::info_span!(parent: &generation.span, "queue");
        let job = Job {
            generation,
            events,
            submitted: Instant::now(),
            queue_span,
        };
        match self.jobs.try_send(job) {
            Ok(()) => Ok(rx),
            Err(e) => {
                waiting.dec();
                match e {
                    std_mpsc::TrySendError::Full(_) => Err(EngineError::QueueFull(self.queue)),
                    std_mpsc::TrySendError::Disconnected(_) => Err(EngineError::ShuttingDown),
                }
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
}
