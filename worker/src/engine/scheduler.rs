//! The engine thread: continuous batching over a fixed set of sequence slots.
//!
//! Each step: admit waiting requests into free slots, deliver queued events,
//! plan the batch ([`plan_step`]: one decode token for every sequence that
//! can take one, then prompt chunks within the step budget), decode it, then
//! sample for every sequence whose logits were computed. Finished sequences
//! leave between steps.
//!
//! Prefix reuse: a slot keeps the KV cells of the last sequence it ran
//! (tokens known in [`Scheduler::cache`]). A new request takes the slot whose
//! cached tokens, or a running sequence's prompt, share the longest prefix
//! with its prompt, and starts prefill after that prefix (copying the cells
//! from a running sequence when that is where they are). Kept cells are not
//! free: the KV cache is unified, so every step's attention spans every used
//! cell, kept ones included. At most `--prefix-cache-tokens` are kept, the
//! most recently finished first ([`trim_warm`]).

use std::num::NonZeroU32;
use std::sync::atomic::Ordering;
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::Duration;

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use tokio::sync::oneshot;

use super::sequence::{Delivery, Sequence};
use super::{EngineConfig, EngineError, FinishReason, Job, Shared};
use crate::metrics::FinishLabel;
use crate::sampler::{sample_all, Sampler};

/// What one sequence contributes to a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    /// Decode its last sampled token (one token, logits on).
    Decode,
    /// Decode prompt tokens `from..from + len` (logits on the prompt's last).
    Prefill {
        /// First prompt index.
        from: usize,
        /// How many tokens.
        len: usize,
    },
}

/// What the planner needs to know of a sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqView {
    /// Prompt tokens not yet in the KV cache.
    pub prompt_left: usize,
    /// Prompt tokens already in the KV cache.
    pub prefilled: usize,
    /// It has a sampled token waiting to be decoded.
    pub has_next: bool,
    /// Its client's channel is full, or it is over: skip it this step.
    pub blocked: bool,
}

/// Plans one step: every unblocked sequence with a token to decode gets one
/// decode slot (running streams never wait on prompts), then sequences still
/// in prefill get prompt chunks, oldest first, within `budget` tokens — or
/// within `decoding_budget` when the step decodes for some sequence, so that
/// a new prompt delays running streams' next token by a bounded amount
/// while an idle engine still prefills in large, fast chunks.
pub fn plan_step(seqs: &[SeqView], budget: usize, decoding_budget: usize) -> Vec<(usize, Work)> {
    let mut plan: Vec<(usize, Work)> = seqs
        .iter()
        .enumerate()
        .filter(|(_, s)| !s.blocked && s.has_next)
        .map(|(i, _)| (i, Work::Decode))
        .collect();
    let mut left = if plan.is_empty() {
        budget
    } else {
        decoding_budget.min(budget)
    };
    for (i, s) in seqs.iter().enumerate() {
        if left == 0 {
            break;
        }
        if s.blocked || s.prompt_left == 0 {
            continue;
        }
        let len = s.prompt_left.min(left);
        left -= len;
        plan.push((
            i,
            Work::Prefill {
                from: s.prefilled,
                len,
            },
        ));
    }
    plan
}

/// Length of the common prefix of two token lists.
pub fn common_prefix(a: &[LlamaToken], b: &[LlamaToken]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Which kept ("warm") caches to cut so that at most `budget` tokens stay
/// warm. `warm` lists (slot, cached tokens), least recently finished first;
/// the most recent keep theirs first. Returns (slot, tokens to keep) for
/// each cache to cut (0: drop it).
pub fn trim_warm(warm: &[(i32, usize)], budget: usize) -> Vec<(i32, usize)> {
    let mut left = budget;
    let mut cuts = Vec::new();
    for &(slot, len) in warm.iter().rev() {
        let keep = len.min(left);
        left -= keep;
        if keep < len {
            cuts.push((slot, keep));
        }
    }
    cuts
}

/// Where a new prompt should run and what it can reuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// The free slot it takes.
    pub slot: i32,
    /// Reuse `len` cached tokens from slot `from` (itself, or another slot
    /// whose cells are copied).
    pub reuse: Option<(i32, usize)>,
}

/// Places `prompt` in one of the `free` slots (slot, cached tokens), reusing
/// the longest prefix found there or in `running` (slot, known tokens). At
/// least one prompt token is always left to compute (its logits start
/// generation). Without any reuse, the free slot with the least cached is
/// taken, to keep the rest warm.
pub fn place(
    prompt: &[LlamaToken],
    free: &[(i32, &[LlamaToken])],
    running: &[(i32, &[LlamaToken])],
) -> Option<Placement> {
    let limit = prompt.len().saturating_sub(1);
    let best = |slots: &[(i32, &[LlamaToken])]| {
        slots
            .iter()
            .map(|(slot, tokens)| (*slot, common_prefix(prompt, tokens).min(limit)))
            .filter(|(_, len)| *len > 0)
            .max_by_key(|(slot, len)| (*len, -slot))
    };
    let in_free = best(free);
    let in_running = best(running);
    let coldest = free.iter().min_by_key(|(slot, t)| (t.len(), *slot))?.0;
    Some(match (in_free, in_running) {
        (Some((slot, len)), r) if r.is_none_or(|(_, rl)| rl <= len) => Placement {
            slot,
            reuse: Some((slot, len)),
        },
        (_, Some((from, len))) => Placement {
            slot: coldest,
            reuse: Some((from, len)),
        },
        _ => Placement {
            slot: coldest,
            reuse: None,
        },
    })
}

/// The engine thread's body.
pub(super) fn run(
    backend: Arc<LlamaBackend>,
    model: Arc<LlamaModel>,
    config: EngineConfig,
    jobs: std_mpsc::Receiver<Job>,
    shared: Arc<Shared>,
    ready: oneshot::Sender<Result<u32, EngineError>>,
) {
    let parallel = config.parallel.max(1);
    let batch_capacity = config.step_tokens.max(1) + parallel;
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
        .with_n_threads_batch(config.threads);
    let mut ctx = match model.new_context(&backend, params) {
        Ok(ctx) => ctx,
        Err(e) => {
            let _ = ready.send(Err(EngineError::Context(e.to_string())));
            return;
        }
    };
    let window = config.ctx_size.min(ctx.n_ctx() / parallel);
    let _ = ready.send(Ok(window));
    let mut engine = Scheduler {
        model: &model,
        batch: LlamaBatch::new(batch_capacity as usize, 1),
        shared: &shared,
        window,
        step_tokens: config.step_tokens.max(1) as usize,
        step_tokens_decoding: config.step_tokens_decoding.max(1) as usize,
        sample_threads: {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            (1 + cores.saturating_sub(config.threads.max(1) as usize)).min(parallel as usize)
        },
        kv_total: ctx.n_ctx(),
        active: Vec::new(),
        free: (0..parallel as i32).rev().collect(),
        cache: vec![Vec::new(); parallel as usize],
        warm: Vec::new(),
        prefix_cache_tokens: config.prefix_cache_tokens as usize,
    };
    while engine.admit(&jobs, &mut ctx) {
        engine.step(&mut ctx);
    }
    tracing::debug!("engine thread exiting");
}

struct Scheduler<'m> {
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
    /// Running sequences, oldest first.
    active: Vec<Sequence>,
    /// Free slots.
    free: Vec<i32>,
    /// Per slot: the tokens whose KV cells (positions 0..len) a free slot
    /// still holds from its last sequence.
    cache: Vec<Vec<LlamaToken>>,
    /// Free slots whose cache is not empty, least recently finished first.
    warm: Vec<i32>,
    /// Most tokens kept in `cache` over all free slots.
    prefix_cache_tokens: usize,
}

impl Scheduler<'_> {
    /// Fills free slots from the queue; blocks while there is nothing to do.
    /// Returns false when the engine should stop (every handle dropped and
    /// nothing left running).
    fn admit(&mut self, jobs: &std_mpsc::Receiver<Job>, ctx: &mut LlamaContext<'_>) -> bool {
        while !self.free.is_empty() {
            let job = if self.active.is_empty() {
                match jobs.recv() {
                    Ok(job) => job,
                    Err(_) => return false,
                }
            } else {
                match jobs.try_recv() {
                    Ok(job) => job,
                    Err(_) => break,
                }
            };
            let placement = {
                let free: Vec<(i32, &[LlamaToken])> = self
                    .free
                    .iter()
                    .map(|&s| (s, self.cache[s as usize].as_slice()))
                    .collect();
                let running: Vec<(i32, &[LlamaToken])> = self
                    .active
                    .iter()
                    .map(|q| (q.slot, &q.job.generation.prompt[..q.prefilled]))
                    .collect();
                place(&job.generation.prompt, &free, &running).expect("a free slot exists")
            };
            let slot = placement.slot;
            self.free.retain(|&s| s != slot);
            self.warm.retain(|&s| s != slot);
            self.report_warm();
            let reused = self.prepare_slot(ctx, placement);
            let metrics = &self.shared.metrics;
            metrics.waiting.dec();
            metrics.running.inc();
            metrics
                .queue_time
                .observe(job.submitted.elapsed().as_secs_f64());
            let mut job = job;
            // The wait is over: end the `queue` span.
            job.queue_span = tracing::Span::none();
            let mut seq = Sequence::new(slot, job);
            seq.prefilled = reused;
            seq.pos = reused as i32;
            if reused > 0 {
                metrics.prefix_cache_hit_tokens.inc_by(reused as u64);
                if let Some(span) = &seq.prefill_span {
                    span.record("reused_tokens", reused);
                }
                let _entered = seq.job.generation.span.enter();
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
        true
    }

    /// Makes `placement.slot` hold exactly the reused prefix; returns its
    /// length (0 when nothing could be reused).
    fn prepare_slot(&mut self, ctx: &mut LlamaContext<'_>, placement: Placement) -> usize {
        let slot = placement.slot;
        self.cache[slot as usize].clear();
        let reused = match placement.reuse {
            Some((from, len)) if from == slot => ctx
                .kv_cache_seq_rm(slot, Some(len as u32), None)
                .map(|()| len),
            Some((from, len)) => ctx
                .kv_cache_seq_rm(slot, None, None)
                .and_then(|()| ctx.copy_kv_cache_seq(from, slot, Some(0), Some(len as u32)))
                .map(|()| len),
            None => Ok(0),
        };
        match reused {
            Ok(len) if len > 0 => len,
            other => {
                if let Err(e) = other {
                    tracing::warn!(slot, error = %e, "cannot reuse cached prefix; recomputing");
                }
                if let Err(e) = ctx.kv_cache_seq_rm(slot, None, None) {
                    tracing::warn!(slot, error = %e, "could not clear KV cells");
                }
                0
            }
        }
    }

    /// One step of the batch.
    fn step(&mut self, ctx: &mut LlamaContext<'_>) {
        let cancel = self.shared.cancel.load(Ordering::SeqCst);
        // Deliver what is queued; retire sequences that are over or whose
        // client left.
        let mut views = Vec::with_capacity(self.active.len());
        let mut i = 0;
        while i < self.active.len() {
            let seq = &mut self.active[i];
            if cancel && !seq.is_over() {
                seq.end(FinishReason::Cancelled);
            }
            let delivery = seq.flush();
            // Over and fully delivered: done, even if the client has already
            // hung up after reading the final message.
            let done = seq.is_over() && seq.delivered();
            if done || delivery == Delivery::Gone {
                let seq = self.active.remove(i);
                self.retire(ctx, seq, !done);
                continue;
            }
            views.push(SeqView {
                prompt_left: seq.prompt_len() - seq.prefilled,
                prefilled: seq.prefilled,
                has_next: seq.next.is_some(),
                blocked: delivery == Delivery::Blocked || seq.is_over(),
            });
            i += 1;
        }
        let plan = plan_step(&views, self.step_tokens, self.step_tokens_decoding);
        if plan.is_empty() {
            if !self.active.is_empty() {
                // Every sequence waits on a slow client: do not spin.
                std::thread::sleep(Duration::from_millis(2));
            }
            return;
        }

        // Build the batch; remember which batch index holds whose logits.
        self.batch.clear();
        let mut sample_at: Vec<(usize, i32)> = Vec::new();
        for &(i, work) in &plan {
            let seq = &mut self.active[i];
            let added = match work {
                Work::Decode => {
                    let token = seq.next.take().expect("planned decode has a token");
                    seq.decoded.push(token);
                    let r = self.batch.add(token, seq.pos, &[seq.slot], true);
                    seq.pos += 1;
                    sample_at.push((i, self.batch.n_tokens() - 1));
                    r
                }
                Work::Prefill { from, len } => {
                    let prompt_len = seq.prompt_len();
                    let mut r = Ok(());
                    for k in from..from + len {
                        let token = seq.job.generation.prompt[k];
                        let last = k + 1 == prompt_len;
                        r = r.and(self.batch.add(token, seq.pos, &[seq.slot], last));
                        seq.pos += 1;
                    }
                    seq.prefilled += len;
                    if seq.prefilled == prompt_len {
                        sample_at.push((i, self.batch.n_tokens() - 1));
                    }
                    r
                }
            };
            if let Err(e) = added {
                seq.fail(format!("batch: {e}"));
            }
        }
        let step_started = std::time::Instant::now();
        let step_tokens = self.batch.n_tokens();
        if let Err(e) = ctx.decode(&mut self.batch) {
            tracing::error!(error = %e, sequences = plan.len(), "decode failed");
            for &(i, _) in &plan {
                self.active[i].fail(format!("decode: {e}"));
            }
            return;
        }

        // Sample every sequence whose logits were computed; split over
        // spare cores when there are any and the work is worth a thread.
        let mut logits_at: Vec<Option<i32>> = vec![None; self.active.len()];
        for (i, idx) in sample_at {
            if !self.active[i].is_over() {
                logits_at[i] = Some(idx);
            }
        }
        let picks: Vec<(usize, LlamaToken)> = {
            let ctx = &*ctx;
            let mut order = Vec::new();
            let mut jobs: Vec<(&mut Sampler, &[f32], u32)> = Vec::new();
            for (i, seq) in self.active.iter_mut().enumerate() {
                if let Some(idx) = logits_at[i] {
                    order.push(i);
                    jobs.push((seq.sampler_mut(), ctx.get_logits_ith(idx), 0));
                }
            }
            let sampled = jobs.iter().filter(|(s, _, _)| !s.is_greedy()).count();
            let threads = if sampled >= 2 { self.sample_threads } else { 1 };
            sample_all(&mut jobs, threads);
            let tokens = jobs.iter().map(|(_, _, token)| LlamaToken(*token as i32));
            order.into_iter().zip(tokens).collect()
        };

        let vocab = self.model.vocab();
        let metrics = &self.shared.metrics;
        metrics
            .step_duration
            .observe(step_started.elapsed().as_secs_f64());
        metrics.step_tokens.observe(f64::from(step_tokens));
        for (i, token) in picks {
            let seq = &mut self.active[i];
            let first = seq.decode_started.is_none();
            if first {
                metrics
                    .prefill_time
                    .observe(seq.admitted.elapsed().as_secs_f64());
                metrics.prompt_tokens.inc_by(seq.prompt_len() as u64);
            }
            let before = seq.generated;
            seq.accept(token, &vocab, self.window);
            if seq.generated > before {
                metrics.generation_tokens.inc();
                if before == 0 {
                    metrics
                        .time_to_first_token
                        .observe(seq.job.submitted.elapsed().as_secs_f64());
                }
            }
            // Deliver at once rather than a step later.
            if seq.flush() == Delivery::Gone {
                seq.next = None;
            }
        }
        let used: i64 = self.active.iter().map(|s| i64::from(s.pos)).sum();
        metrics
            .kv_cache_usage
            .set(used as f64 / f64::from(self.kv_total));
    }

    /// Cuts the kept caches down to `prefix_cache_tokens` in all.
    fn trim_warm(&mut self, ctx: &mut LlamaContext<'_>) {
        let warm: Vec<(i32, usize)> = self
            .warm
            .iter()
            .map(|&s| (s, self.cache[s as usize].len()))
            .collect();
        for (slot, keep) in trim_warm(&warm, self.prefix_cache_tokens) {
            let removed = if keep == 0 {
                ctx.kv_cache_seq_rm(slot, None, None)
            } else {
                ctx.kv_cache_seq_rm(slot, Some(keep as u32), None)
            };
            if let Err(e) = removed {
                tracing::warn!(slot, error = %e, "could not free kept KV cells");
            }
            self.cache[slot as usize].truncate(keep);
            if keep == 0 {
                self.warm.retain(|&s| s != slot);
            }
        }
        self.report_warm();
    }

    /// Publishes how many tokens the idle slots keep warm.
    fn report_warm(&self) {
        let kept: usize = self
            .warm
            .iter()
            .map(|&s| self.cache[s as usize].len())
            .sum();
        self.shared.metrics.prefix_cache_tokens.set(kept as i64);
    }

    /// Frees a sequence's slot and KV cells and records its outcome.
    fn retire(&mut self, ctx: &mut LlamaContext<'_>, seq: Sequence, client_left: bool) {
        // Keep the cells warm for a later prompt with the same prefix, unless
        // llama.cpp failed on this sequence.
        let cache = &mut self.cache[seq.slot as usize];
        cache.clear();
        if seq.error.is_none() {
            cache.extend_from_slice(&seq.job.generation.prompt[..seq.prefilled]);
            if seq.prefilled == seq.prompt_len() {
                cache.extend_from_slice(&seq.decoded);
            }
        } else if let Err(e) = ctx.kv_cache_seq_rm(seq.slot, None, None) {
            tracing::warn!(slot = seq.slot, error = %e, "could not free KV cells");
        }
        self.free.push(seq.slot);
        if !self.cache[seq.slot as usize].is_empty() {
            self.warm.push(seq.slot);
            self.trim_warm(ctx);
        }
        let metrics = &self.shared.metrics;
        metrics.running.dec();
        let span = &seq.job.generation.span;
        let _entered = span.enter();
        let elapsed_ms = seq.admitted.elapsed().as_millis() as u64;
        let finish_reason = match (&seq.error, seq.finish) {
            (Some(error), _) => {
                nanoinfer_telemetry::mark_span_error(span, error);
                tracing::error!(request_id = %seq.job.generation.request_id, %error, "generation failed");
                "error"
            }
            (None, Some(reason)) if !client_left => {
                span.record("gen_ai.usage.output_tokens", seq.generated);
                span.record("gen_ai.response.finish_reasons", reason.label());
                if let Some(decode_span) = &seq.decode_span {
                    decode_span.record("generated_tokens", seq.generated);
                }
                if let Some(started) = seq.decode_started {
                    let decode = started.elapsed().as_secs_f64();
                    metrics.decode_time.observe(decode);
                    if seq.generated > 1 {
                        metrics
                            .time_per_output_token
                            .observe(decode / f64::from(seq.generated - 1));
                    }
                }
                tracing::info!(request_id = %seq.job.generation.request_id, ?reason,
                    prompt_tokens = seq.prompt_len(), generated_tokens = seq.generated,
                    elapsed_ms, "generation finished");
                reason.label()
            }
            _ => {
                span.record("gen_ai.response.finish_reasons", "client_left");
                tracing::info!(request_id = %seq.job.generation.request_id,
                    generated_tokens = seq.generated, "client left; generation stopped");
                "client_left"
            }
        };
        metrics
            .requests
            .get_or_create(&FinishLabel { finish_reason })
            .inc();
        if self.active.is_empty() {
            metrics.kv_cache_usage.set(0.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(prompt_left: usize, prefilled: usize, has_next: bool, blocked: bool) -> SeqView {
        SeqView {
            prompt_left,
            prefilled,
            has_next,
            blocked,
        }
    }

    #[test]
    fn running_streams_decode_before_any_prefill() {
        let seqs = [
            view(0, 10, true, false),
            view(500, 0, false, false),
            view(0, 8, true, false),
        ];
        let plan = plan_step(&seqs, 64, 64);
        assert_eq!(
            plan,
            vec![
                (0, Work::Decode),
                (2, Work::Decode),
                (1, Work::Prefill { from: 0, len: 64 })
            ]
        );
    }

    #[test]
    fn prompts_get_the_smaller_budget_while_streams_decode() {
        let decoding = [view(0, 10, true, false), view(500, 0, false, false)];
        assert_eq!(
            plan_step(&decoding, 128, 32),
            vec![(0, Work::Decode), (1, Work::Prefill { from: 0, len: 32 })]
        );
        // Nothing decodes (the stream waits on its client): the full budget.
        let idle = [view(0, 10, true, true), view(500, 0, false, false)];
        assert_eq!(
            plan_step(&idle, 128, 32),
            vec![(1, Work::Prefill { from: 0, len: 128 })]
        );
        // The decoding budget never exceeds the other.
        assert_eq!(
            plan_step(&decoding, 16, 32),
            vec![(0, Work::Decode), (1, Work::Prefill { from: 0, len: 16 })]
        );
    }

    #[test]
    fn prefill_is_chunked_within_the_budget_oldest_first() {
        let seqs = [
            view(30, 100, false, false),
            view(50, 0, false, false),
            view(10, 0, false, false),
        ];
        assert_eq!(
            plan_step(&seqs, 64, 8),
            vec![
                (0, Work::Prefill { from: 100, len: 30 }),
                (1, Work::Prefill { from: 0, len: 34 })
            ]
        );
    }

    fn toks(v: &[i32]) -> Vec<LlamaToken> {
        v.iter().map(|&t| LlamaToken(t)).collect()
    }

    #[test]
    fn placement_reuses_the_longest_prefix() {
        let prompt = toks(&[1, 2, 3, 4, 5]);
        let (a, b, c) = (
            toks(&[1, 2, 9]),
            toks(&[1, 2, 3, 4, 7, 8]),
            toks(&[1, 2, 3]),
        );
        // Best in a free slot: take that very slot.
        let p = place(&prompt, &[(0, &a), (1, &b)], &[]).unwrap();
        assert_eq!(
            p,
            Placement {
                slot: 1,
                reuse: Some((1, 4))
            }
        );
        // Best in a running sequence: copy into the coldest free slot.
        let p = place(&prompt, &[(0, &a), (2, &[])], &[(1, &b)]).unwrap();
        assert_eq!(
            p,
            Placement {
                slot: 2,
                reuse: Some((1, 4))
            }
        );
        // A free slot ties with a running one: no copy needed.
        let p = place(&prompt, &[(0, &b)], &[(1, &b)]).unwrap();
        assert_eq!(p.reuse, Some((0, 4)));
        // Nothing shared: the coldest slot, no reuse.
        let short = toks(&[9]);
        let p = place(&toks(&[8, 8]), &[(0, &c), (3, &short)], &[]).unwrap();
        assert_eq!(
            p,
            Placement {
                slot: 3,
                reuse: None
            }
        );
        assert!(place(&prompt, &[], &[(1, &b)]).is_none());
    }

    #[test]
    fn at_least_one_prompt_token_is_computed() {
        let prompt = toks(&[1, 2, 3]);
        let p = place(&prompt, &[(0, &toks(&[1, 2, 3, 4]))], &[]).unwrap();
        assert_eq!(p.reuse, Some((0, 2)));
        assert_eq!(
            place(&toks(&[1]), &[(0, &toks(&[1]))], &[]).unwrap().reuse,
            None
        );
    }

    #[test]
    fn kept_caches_fit_the_budget_most_recent_first() {
        // Oldest first: slot 2 (100 tokens), slot 0 (300), slot 1 (200).
        let warm = [(2, 100), (0, 300), (1, 200)];
        assert_eq!(trim_warm(&warm, 1000), vec![]);
        assert_eq!(trim_warm(&warm, 512), vec![(2, 12)]);
        assert_eq!(trim_warm(&warm, 450), vec![(0, 250), (2, 0)]);
        assert_eq!(trim_warm(&warm, 150), vec![(1, 150), (0, 0), (2, 0)]);
        assert_eq!(trim_warm(&warm, 0), vec![(1, 0), (0, 0), (2, 0)]);
        assert_eq!(trim_warm(&[], 0), vec![]);
    }

    #[test]
    fn blocked_sequences_wait() {
        let seqs = [
            view(0, 5, true, true),
            view(20, 0, false, true),
            view(0, 5, true, false),
        ];
        assert_eq!(plan_step(&seqs, 64, 64), vec![(2, Work::Decode)]);
        assert!(plan_step(&[], 64, 64).is_empty());
    }
}
