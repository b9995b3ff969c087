//! The generation engine: one dedicated thread owns the llama.cpp context.
//!
//! Requests reach it through a bounded queue ([`Engine::submit`] fails fast
//! with [`EngineError::QueueFull`] when it is full). The thread runs one
//! request at a time: prefill in `n_batch` chunks, then a decode loop that
//! samples, detokenizes, matches stop sequences and sends one [`Event`] per
//! token through the request's own bounded channel. A full channel blocks the
//! engine (backpressure, memory stays bounded); a closed one means the client
//! left, and the request stops before its next decode step.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use tokio::sync::{mpsc, oneshot};
use tracing::field::Empty;

use crate::detok::Utf8Carry;
use crate::metrics::{FinishLabel, WorkerMetrics};
use crate::stop::{StopMatcher, StopOutcome};

/// Requests generated at the same time (no batching yet: one at a time).
pub const SLOTS: u32 = 1;

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
    /// Context window in tokens.
    pub ctx_size: u32,
    /// Prompt tokens decoded per llama.cpp call.
    pub batch_size: u32,
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
/// its current request is done.
#[derive(Clone)]
pub struct Engine {
    jobs: std_mpsc::SyncSender<Job>,
    shared: Arc<Shared>,
    queue: u32,
    ctx_size: u32,
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
                engine_thread(backend, model, thread_config, rx, thread_shared, ready_tx)
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

fn engine_thread(
    backend: Arc<LlamaBackend>,
    model: Arc<LlamaModel>,
    config: EngineConfig,
    jobs: std_mpsc::Receiver<Job>,
    shared: Arc<Shared>,
    ready: oneshot::Sender<Result<u32, EngineError>>,
) {
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(config.ctx_size))
        .with_n_batch(config.batch_size)
        .with_n_ubatch(config.batch_size)
        .with_n_seq_max(1)
        .with_n_threads(config.threads)
        .with_n_threads_batch(config.threads);
    let mut ctx = match model.new_context(&backend, params) {
        Ok(ctx) => ctx,
        Err(e) => {
            let _ = ready.send(Err(EngineError::Context(e.to_string())));
            return;
        }
    };
    // llama.cpp may round the context up (to a multiple of 256); the window
    // we enforce and advertise is the configured one.
    let window = config.ctx_size.min(ctx.n_ctx());
    let _ = ready.send(Ok(window));
    let mut batch = LlamaBatch::new(config.batch_size as usize, 1);
    while let Ok(job) = jobs.recv() {
        let metrics = &shared.metrics;
        metrics.waiting.dec();
        metrics.running.inc();
        metrics
            .queue_time
            .observe(job.submitted.elapsed().as_secs_f64());
        let request_id = job.generation.request_id.clone();
        // Log lines about this request carry its span's fields (request_id).
        let span = job.generation.span.clone();
        let _entered = span.enter();
        let started = Instant::now();
        let outcome = generate(&model, &mut ctx, &mut batch, window, &shared, job);
        metrics.running.dec();
        metrics.kv_cache_usage.set(0.0);
        let finish_reason = match &outcome {
            Ok(Some((reason, _, _))) => reason.label(),
            Ok(None) => "client_left",
            Err(_) => "error",
        };
        metrics
            .requests
            .get_or_create(&FinishLabel { finish_reason })
            .inc();
        match &outcome {
            Ok(Some((reason, _, generated))) => {
                span.record("gen_ai.usage.output_tokens", generated);
                span.record("gen_ai.response.finish_reasons", reason.label());
            }
            Ok(None) => {
                span.record("gen_ai.response.finish_reasons", "client_left");
            }
            Err(e) => {
                span.record("otel.status_code", "ERROR");
                span.record("otel.status_description", e.as_str());
            }
        }
        match outcome {
            Ok(Some((reason, prompt, generated))) => tracing::info!(
                request_id = %request_id, ?reason, prompt_tokens = prompt, generated_tokens = generated,
                elapsed_ms = started.elapsed().as_millis() as u64, "generation finished"),
            Ok(None) => tracing::info!(request_id = %request_id, "client left; generation stopped"),
            Err(e) => tracing::error!(request_id = %request_id, error = %e, "generation failed"),
        }
    }
    tracing::debug!("engine thread exiting");
}

/// Builds the sampler for one request: greedy at temperature 0, otherwise
/// temperature → top-p → seeded draw.
fn sampler_for(g: &Generation) -> LlamaSampler {
    if g.temperature == 0.0 {
        return LlamaSampler::greedy();
    }
    // llama.cpp reads u32::MAX (LLAMA_DEFAULT_SEED) as "pick a random seed";
    // keep every request seed deterministic by folding it onto its neighbour.
    let seed = ((g.seed ^ (g.seed >> 32)) as u32).min(u32::MAX - 1);
    let mut chain = vec![LlamaSampler::temp(g.temperature)];
    if g.top_p < 1.0 {
        chain.push(LlamaSampler::top_p(g.top_p, 1));
    }
    chain.push(LlamaSampler::dist(seed));
    LlamaSampler::chain_simple(chain)
}

type Outcome = Option<(FinishReason, u32, u32)>;

/// Runs one request. `Ok(None)` means the client left.
fn generate(
    model: &LlamaModel,
    ctx: &mut LlamaContext<'_>,
    batch: &mut LlamaBatch<'_>,
    n_ctx: u32,
    shared: &Shared,
    job: Job,
) -> Result<Outcome, String> {
    let Job {
        generation: g,
        events,
        submitted,
        queue_span,
    } = job;
    drop(queue_span);
    let metrics = &shared.metrics;
    let n_prompt = g.prompt.len() as u32;
    let send = |event: Event| events.blocking_send(event).is_ok();
    let fail = |msg: String| {
        let _ = events.blocking_send(Event::Failed(msg.clone()));
        Err(msg)
    };
    if events.is_closed() {
        return Ok(None);
    }
    if shared.cancel.load(Ordering::SeqCst) {
        let reason = FinishReason::Cancelled;
        send(Event::Finished {
            reason,
            text: String::new(),
            prompt_tokens: n_prompt,
            generated_tokens: 0,
        });
        return Ok(Some((reason, n_prompt, 0)));
    }
    ctx.clear_kv_cache();
    let prefill_span = tracing::info_span!(parent: &g.span, "prefill", prompt_tokens = n_prompt);
    let prefill_entered = prefill_span.enter();
    let prefill_started = Instant::now();
    // Prefill in chunks; logits only for the prompt's last token.
    let chunk = batch_capacity(ctx);
    let mut pos: i32 = 0;
    for piece in g.prompt.chunks(chunk) {
        if events.is_closed() {
            return Ok(None);
        }
        batch.clear();
        for &token in piece {
            let last = pos as u32 == n_prompt - 1;
            if let Err(e) = batch.add(token, pos, &[0], last) {
                return fail(format!("batch: {e}"));
            }
            pos += 1;
        }
        if let Err(e) = ctx.decode(batch) {
            return fail(format!("prefill decode: {e}"));
        }
    }
    metrics
        .prefill_time
        .observe(prefill_started.elapsed().as_secs_f64());
    drop(prefill_entered);
    drop(prefill_span);
    let decode_span = tracing::info_span!(parent: &g.span, "decode", generated_tokens = Empty);
    let _decode_entered = decode_span.enter();
    metrics.prompt_tokens.inc_by(n_prompt as u64);
    let decode_started = Instant::now();
    let vocab = model.vocab();
    let mut sampler = sampler_for(&g);
    let mut utf8 = Utf8Carry::default();
    let mut stop = StopMatcher::new(g.stop.iter().cloned());
    let mut logits_at = batch.n_tokens() - 1;
    let mut generated: u32 = 0;
    let reason = loop {
        if events.is_closed() {
            return Ok(None);
        }
        if shared.cancel.load(Ordering::SeqCst) {
            break FinishReason::Cancelled;
        }
        let token = sampler.sample(ctx, logits_at);
        if vocab.is_eog(token) {
            break FinishReason::Eos;
        }
        let index = generated;
        generated += 1;
        let piece = vocab.token_to_piece(token, false, None);
        let text = utf8.push(&piece);
        let (text, stopped) = match stop.push(&text) {
            StopOutcome::Emit(t) => (t, false),
            StopOutcome::Stop(t) => (t, true),
        };
        let sent = send(Event::Token {
            text,
            id: token.0,
            index,
        });
        metrics.generation_tokens.inc();
        if index == 0 {
            metrics
                .time_to_first_token
                .observe(submitted.elapsed().as_secs_f64());
        }
        metrics
            .kv_cache_usage
            .set(f64::from(n_prompt + generated) / f64::from(n_ctx));
        if !sent {
            return Ok(None);
        }
        if stopped {
            break FinishReason::StopSequence;
        }
        if generated >= g.max_tokens {
            break FinishReason::Length;
        }
        // Prompt + generated tokens never exceed the window.
        if n_prompt + generated >= n_ctx {
            break FinishReason::ContextLength;
        }
        batch.clear();
        if let Err(e) = batch.add(token, pos, &[0], true) {
            return fail(format!("batch: {e}"));
        }
        pos += 1;
        if let Err(e) = ctx.decode(batch) {
            return fail(format!("decode: {e}"));
        }
        logits_at = 0;
    };
    let text = if reason == FinishReason::StopSequence {
        String::new()
    } else {
        let rest = utf8.finish();
        match stop.push(&rest) {
            StopOutcome::Emit(t) => t + &stop.flush(),
            StopOutcome::Stop(t) => t,
        }
    };
    decode_span.record("generated_tokens", generated);
    let decode = decode_started.elapsed().as_secs_f64();
    metrics.decode_time.observe(decode);
    if generated > 1 {
        metrics
            .time_per_output_token
            .observe(decode / f64::from(generated - 1));
    }
    send(Event::Finished {
        reason,
        text,
        prompt_tokens: n_prompt,
        generated_tokens: generated,
    });
    Ok(Some((reason, n_prompt, generated)))
}

fn batch_capacity(ctx: &LlamaContext<'_>) -> usize {
    ctx.n_batch().max(1) as usize
}
