//! The engine thread's loop: continuous batching over a fixed set of
//! sequence slots.
//!
//! Each turn: move submitted jobs into the engine's own queue, drop the
//! queued requests that are dead (client gone, deadline passed, waited past
//! the queue timeout), admit waiting requests into free slots ([`Slots`]),
//! then run one step ([`step`]). Finished sequences leave between
//! steps ([`Scheduler::retire`]). With nothing running the thread blocks on
//! the channel for at most [`IDLE_POLL`], so queue deadlines are still
//! checked while it is idle.

mod step;

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use tokio::sync::oneshot;

use super::policy::common_prefix;
use super::sequence::Sequence;
use super::slots::Slots;
use super::speculate::StepCost;
use super::Shared;
use super::{outcome, EngineConfig, EngineError, Event, Failpoint, Failure, FinishReason, Job};

/// Longest the idle engine blocks on its channel between queue checks.
const IDLE_POLL: Duration = Duration::from_millis(50);

/// The engine thread's body. `Err` means the engine died (llama.cpp failed
/// beyond a full KV cache): the sequences it ran have been failed.
pub(super) fn run(
    backend: Arc<LlamaBackend>,
    model: Arc<LlamaModel>,
    config: EngineConfig,
    jobs: std_mpsc::Receiver<Job>,
    shared: Arc<Shared>,
    ready: oneshot::Sender<Result<u32, EngineError>>,
) -> Result<(), String> {
    let parallel = config.parallel.max(1);
    // A step holds the prompt chunk and every sequence's next token with
    // its proposals.
    let per_sequence = 1 + config.spec.draft_max as u32;
    let batch_capacity = config.step_tokens.max(super::ROW_GROUP as u32) + parallel * per_sequence;
    // One unified KV cache with room for every slot's full window.
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(config.ctx_size * parallel))
        .with_n_batch(batch_capacity)
        .with_n_ubatch(batch_capacity)
        .with_n_seq_max(parallel)
        .with_kv_unified(true)
        // Keep every cell of sliding-window layers, so any cached prefix
        // can be reused (Gemma 3's SWA would otherwise drop old cells).
        .with_swa_full(true)
        .with_n_threads(config.threads)
        .with_n_threads_batch(config.threads)
        .with_type_k(config.kv_cache_type.llama())
        .with_type_v(config.kv_cache_type.llama());
    let mut ctx = match model.new_context(&backend, params) {
        Ok(ctx) => ctx,
        Err(e) => {
            let _ = ready.send(Err(EngineError::Context(e.to_string())));
            return Ok(());
        }
    };
    let window = config.ctx_size.min(ctx.n_ctx() / parallel);
    let draft_model = config.draft.clone();
    let drafter = match &draft_model {
        Some(draft) => match super::draft::Drafter::new(
            &backend,
            &draft.0,
            parallel,
            window,
            config.threads,
            config.kv_cache_type,
        ) {
            Ok(d) => Some(d),
            Err(e) => {
                let _ = ready.send(Err(EngineError::Context(e)));
                return Ok(());
            }
        },
        None => None,
    };
    let mut batch = LlamaBatch::new(batch_capacity as usize, 1);
    let max_rows = per_sequence as usize;
    let step_cost = match config.spec.step_ratio {
        _ if !config.spec.enabled() => StepCost::linear(1.0, max_rows),
        Some(ratio) => StepCost::linear(ratio, max_rows),
        None => match super::calibrate::step_cost(&mut ctx, &model, &mut batch, max_rows) {
            Ok(cost) => cost,
            Err(e) => {
                let _ = ready.send(Err(EngineError::Context(e)));
                return Ok(());
            }
        },
    };
    let _ = ready.send(Ok(window));
    let mut engine = Scheduler {
        model: &model,
        batch,
        shared: &shared,
        window,
        // Chunks that leave some prompt are whole row groups: a smaller
        // budget would never move a long prompt.
        step_tokens: (config.step_tokens as usize).max(super::ROW_GROUP),
        step_tokens_decoding: (config.step_tokens_decoding as usize).max(super::ROW_GROUP),
        sample_threads: {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            (1 + cores.saturating_sub(config.threads.max(1) as usize)).min(parallel as usize)
        },
        kv_total: ctx.n_ctx(),
        spec: config.spec,
        step_cost: Rc::new(step_cost),
        drafter,
        active: Vec::new(),
        queue: VecDeque::new(),
        slots: Slots::new(
            parallel,
            config.prefix_cache_tokens as usize,
            config.prefix_cache_ram_bytes as usize,
            shared.metrics.clone(),
        ),
        prefill_seconds_per_token: None,
        kv: crate::kv_events::KvPublisher::new(parallel as usize, shared.kv.clone()),
        ram_version: None,
        queue_timeout: config.queue_timeout,
        panic_after_tokens: config.failpoint.map(|f| match f {
            Failpoint::EnginePanicAfterTokens(n) => n,
        }),
        tokens_generated: 0,
    };
    while engine.receive(&jobs) {
        let queued = !engine.queue.is_empty();
        engine.expire_queue();
        engine.admit(&mut ctx);
        if queued {
            // Prompts just received (or still waiting) are computing from
            // now on: say so before the step, which may prefill for a
            // second or more. (Nothing changed: nothing is sent.)
            engine.publish_kv();
        }
        engine.step(&mut ctx)?;
        engine.publish_kv();
        engine.publish_restore_cost();
    }
    tracing::debug!("engine thread exiting");
    Ok(())
}

pub(super) struct Scheduler<'m> {
    model: &'m LlamaModel,
    batch: LlamaBatch<'static>,
    shared: &'m Shared,
    /// Per-sequence context window.
    window: u32,
    /// Prompt tokens per step.
    step_tokens: usize,
    /// Prompt tokens per step while some sequence decodes.
    step_tokens_decoding: usize,
    /// Threads to sample a step's sequences on: 1 plus the cores llama.cpp's
    /// threads leave free. (On a machine where they take every core, a
    /// sampling thread only competes with them: measured here, 8 sequences
    /// took 4.2 ms to sample either way.)
    sample_threads: usize,
    kv_total: u32,
    /// Speculation settings.
    spec: super::SpecConfig,
    /// What a step costs by rows (measured at start, or `--spec-step-ratio`).
    step_cost: Rc<StepCost>,
    /// Proposals from a draft model, when the worker has one.
    drafter: Option<super::draft::Drafter<'m>>,
    /// Running sequences, oldest first.
    active: Vec<Sequence>,
    /// Requests waiting for a slot, oldest first. The `waiting` gauge counts
    /// them together with those still in the channel.
    queue: VecDeque<Job>,
    slots: Slots,
    /// Publishes what the slots hold as KV events.
    kv: crate::kv_events::KvPublisher,
    /// The RAM tier's version last published.
    ram_version: Option<u64>,
    queue_timeout: Duration,
    /// Test-only failpoint: panic once this many tokens were generated.
    panic_after_tokens: Option<u64>,
    /// Tokens generated since the engine started.
    tokens_generated: u64,
    /// Seconds per token of the recent prompt-heavy steps (see
    /// [`step::PROMPT_STEP_TOKENS`]), smoothed; `None` before the first.
    prefill_seconds_per_token: Option<f64>,
}

impl Scheduler<'_> {
    /// Moves submitted jobs into the queue, blocking up to [`IDLE_POLL`]
    /// when there is nothing else to do. Returns false when the engine
    /// should stop (every handle dropped and nothing left to serve).
    fn receive(&mut self, jobs: &std_mpsc::Receiver<Job>) -> bool {
        if self.active.is_empty() && self.queue.is_empty() {
            match jobs.recv_timeout(IDLE_POLL) {
                Ok(job) => self.queue.push_back(job),
                Err(std_mpsc::RecvTimeoutError::Timeout) => return true,
                Err(std_mpsc::RecvTimeoutError::Disconnected) => return false,
            }
        }
        self.queue.extend(jobs.try_iter());
        true
    }

    /// Drops queued requests nobody waits for any more: the client left
    /// (at once, so a dead request never holds a queue place), the deadline
    /// passed, or the request waited longer than the queue timeout (it fails
    /// with UNAVAILABLE, so the coordinator tries another worker).
    fn expire_queue(&mut self) {
        if self.queue.is_empty() {
            return;
        }
        let now = Instant::now();
        let metrics = &self.shared.metrics;
        let queue_timeout = self.queue_timeout;
        self.queue.retain(|job| {
            let failure = if job.events.is_closed() {
                None
            } else if job.generation.deadline.is_some_and(|d| now >= d) {
                Some(Failure::DeadlineExceeded)
            } else if now.duration_since(job.submitted) >= queue_timeout {
                Some(Failure::QueueTimeout(queue_timeout))
            } else {
                return true;
            };
            if let Some(failure) = &failure {
                // The channel is empty while the job waits: this fits.
                let _ = job.events.try_send(Event::Failed(failure.clone()));
            }
            metrics.waiting.dec();
            outcome::left_queue(metrics, job, failure.as_ref());
            false
        });
    }

    /// Fills free slots from the queue, oldest first.
    fn admit(&mut self, ctx: &mut LlamaContext<'_>) {
        while self.slots.has_free() {
            let Some(mut job) = self.queue.pop_front() else {
                break;
            };
            let input: Vec<LlamaToken> = job
                .generation
                .prompt
                .iter()
                .chain(&job.generation.resume)
                .copied()
                .collect();
            if waits_for_shared_prefill(&input, &self.active) {
                // Admitted after that prefill, it copies those cells (the
                // `n` completions of one request, or prompts that arrive
                // together with one system prompt). FIFO: later jobs wait
                // behind it; a prefill ends within a few steps.
                self.queue.push_front(job);
                break;
            }
            let (slot, reused, exact) = {
                // Only cells a decode wrote may be copied; a sequence whose
                // decode failed offers none (see `Sequence::kept`).
                let running: Vec<(i32, &[LlamaToken], usize)> = self
                    .active
                    .iter()
                    .map(|s| {
                        let (tokens, exact) = s.kept();
                        (s.slot(), tokens, exact)
                    })
                    .collect();
                let resume = !job.generation.resume.is_empty();
                self.slots.take(ctx, &input, &running, resume)
            };
            let metrics = &self.shared.metrics;
            metrics
                .prefix_cache_tokens
                .set(self.slots.warm_tokens() as i64);
            metrics.waiting.dec();
            metrics.running.inc();
            metrics
                .queue_time
                .observe(job.submitted.elapsed().as_secs_f64());
            // The wait is over: end the `queue` span, and tell the caller
            // (its channel is empty while the job waits, so this fits).
            job.queue_span = tracing::Span::none();
            let _ = job.events.try_send(Event::Admitted);
            let mut seq = Sequence::new(slot, job, reused, exact, &self.model.vocab());
            if reused > 0 {
                metrics.prefix_cache_hit_tokens.inc_by(reused as u64);
                if let Some(span) = seq.prefill_span() {
                    span.record("reused_tokens", reused);
                }
                let _entered = seq.generation().span.enter();
                tracing::info!(
                    reused_tokens = reused,
                    "prompt prefix reused from the KV cache"
                );
            }
            if self.shared.cancel.load(Ordering::SeqCst) {
                seq.end(FinishReason::Cancelled);
            }
            self.active.push(seq);
        }
    }

    /// Publishes the blocks every slot could lend a new prompt now: a
    /// running sequence's decoded cells, a free slot's kept prefix (what
    /// [`Slots::take`] places against).
    /// With them, the computing tier (the blocks of every queued prompt and
    /// every prompt still in prefill) and the ram tier (the blocks of every
    /// prefix kept in host memory).
    fn publish_kv(&mut self) {
        let (active, slots) = (&self.active, &self.slots);
        let computing = self
            .queue
            .iter()
            .map(|j| j.blocks.as_slice())
            .chain(active.iter().map(Sequence::computing_blocks));
        self.kv.sync_tiers(
            |slot| {
                active
                    .iter()
                    .find(|s| s.slot() as usize == slot)
                    .map_or_else(|| slots.kept(slot as i32), |s| s.reusable())
            },
            computing,
            {
                // Recomputed only when the tier changed.
                let (version, blocks) = slots.ram_blocks();
                let changed = self.ram_version != Some(version);
                self.ram_version = Some(version);
                changed.then_some(blocks)
            },
        );
    }

    /// Publishes what a restore from the RAM tier costs per token against
    /// computing one, once both were measured (the load report's
    /// `ram_restore_cost`).
    fn publish_restore_cost(&self) {
        if let (Some(restore), Some(prefill)) = (
            self.slots.restore_seconds_per_token(),
            self.prefill_seconds_per_token,
        ) {
            let cost = (restore / prefill) as f32;
            self.shared
                .ram_restore_cost
                .store(cost.to_bits(), Ordering::Relaxed);
        }
    }

    /// Frees a sequence's slot, keeping the cells a decode wrote for prefix
    /// reuse, and records its outcome.
    fn retire(&mut self, ctx: &mut LlamaContext<'_>, seq: Sequence, client_left: bool) {
        let (keep, exact) = seq.kept();
        self.slots.release(ctx, seq.slot(), keep, exact);
        let metrics = &self.shared.metrics;
        metrics
            .prefix_cache_tokens
            .set(self.slots.warm_tokens() as i64);
        metrics.running.dec();
        outcome::retired(metrics, &seq, client_left);
        if self.active.is_empty() {
            metrics.kv_cache_usage.set(0.0);
        }
    }
}

/// Prompt tokens a new prompt must share with one still being prefilled
/// before it waits for that prefill instead of computing them itself.
pub const SHARED_PREFILL_MIN_TOKENS: usize = 16;

/// Whether a prompt with `input` should wait: an active sequence is still
/// prefilling a prompt that shares at least [`SHARED_PREFILL_MIN_TOKENS`]
/// more tokens with it than that sequence has decoded so far (what could be
/// copied now).
fn waits_for_shared_prefill(input: &[LlamaToken], active: &[Sequence]) -> bool {
    let limit = input.len().saturating_sub(1);
    active.iter().any(|s| {
        let done = s.reusable().len();
        done < s.input_len()
            && common_prefix(input, s.input()).min(limit) >= done + SHARED_PREFILL_MIN_TOKENS
    })
}
