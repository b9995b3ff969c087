//! One engine step: deliver queued events and retire finished sequences,
//! plan the batch ([`plan_step`]: one decode token for every sequence that
//! can take one, then prompt chunks within the step budget), decode it,
//! then sample for every sequence whose logits were computed.
//!
//! A decode that finds no KV slot fails the step's sequences with
//! [`Failure::Capacity`] and the engine goes on; any other decode failure
//! leaves the context in an unknown state, so every sequence fails with
//! [`Failure::Internal`] and the engine stops.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::DecodeError;

use super::Scheduler;
use crate::engine::draft::Want;
use crate::engine::policy::{plan_step, SeqView, Work};
use crate::engine::sequence::Delivery;
use crate::engine::speculate::SpecStep;
use crate::engine::{Failure, FinishReason};
use crate::sampler::{sample_chains, Chain, Pick};

/// Steps of at least this many tokens are taken as prompt steps when
/// measuring what a prompt token costs (decode rows are few beside them).
pub(super) const PROMPT_STEP_TOKENS: usize = 64;

impl Scheduler<'_> {
    /// One step of the batch. `Err` means the engine must stop (its
    /// sequences have been failed).
    pub(super) fn step(&mut self, ctx: &mut LlamaContext<'_>) -> Result<(), String> {
        let views = self.deliver_and_retire(ctx);
        let plan = plan_step(&views, self.step_tokens, self.step_tokens_decoding);
        if plan.is_empty() {
            if !self.active.is_empty() {
                // Every sequence waits on a slow client: do not spin.
                std::thread::sleep(Duration::from_millis(2));
            }
            return Ok(());
        }
        let sample_at = self.build_batch(&plan);
        let step_started = Instant::now();
        let step_tokens = self.batch.n_tokens();
        if !self.decode_batch(ctx, &plan)? {
            return Ok(());
        }
        for &(i, _) in &plan {
            self.active[i].decoded(step_tokens as usize);
        }
        let picks = self.sample(ctx, sample_at);
        self.observe_step(step_started.elapsed().as_secs_f64(), step_tokens);
        for (i, chain) in picks {
            self.take_picks(ctx, i, chain);
        }
        // Proposals of sequences that did not sample (over before their
        // logits were read) are not theirs either.
        for i in 0..self.active.len() {
            if !self.active[i].drafts().is_empty() {
                self.drop_rejected(ctx, i, 0);
            }
        }
        let used: usize = self.active.iter().map(|s| s.cells_in_use()).sum();
        self.shared
            .metrics
            .kv_cache_usage
            .set(used as f64 / f64::from(self.kv_total));
        if let Some(n) = self.panic_after_tokens {
            if self.tokens_generated >= n {
                // Test-only (NANOINFER_FAILPOINT): the tokens above are in
                // their channels; now die as a crash in llama.cpp would.
                panic!("failpoint engine-panic-after-tokens={n} reached");
            }
        }
        Ok(())
    }

    /// Delivers what is queued and retires sequences that are over or whose
    /// client left; the views of those that stay, in order.
    fn deliver_and_retire(&mut self, ctx: &mut LlamaContext<'_>) -> Vec<SeqView> {
        let cancel = self.shared.cancel.load(Ordering::SeqCst);
        let now = Instant::now();
        let mut views = Vec::with_capacity(self.active.len());
        let mut i = 0;
        while i < self.active.len() {
            let seq = &mut self.active[i];
            if cancel {
                seq.end(FinishReason::Cancelled);
            }
            if seq.past_deadline(now) {
                // The caller gave up: stop computing for it. Tokens already
                // queued go first, then the failure.
                seq.fail(Failure::DeadlineExceeded, false);
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
            views.push(seq.view(delivery));
            i += 1;
        }
        views
    }

    /// Decides the step's proposals and stages every planned sequence's
    /// rows in the batch; returns `(sequence, first row, rows)` of each
    /// whose logits the step computes.
    fn build_batch(&mut self, plan: &[(usize, Work)]) -> Vec<(usize, i32, usize)> {
        self.batch.clear();
        let decoding = plan.iter().filter(|(_, w)| *w == Work::Decode).count();
        let prompt_rows: usize = plan
            .iter()
            .map(|(_, w)| match w {
                Work::Decode => 0,
                Work::Prefill { len, .. } => *len,
            })
            .sum();
        let step_cost = std::rc::Rc::clone(&self.step_cost);
        let mut spec = SpecStep {
            config: self.spec,
            cost: &step_cost,
            rows: decoding + prompt_rows,
            tokens: decoding as f64,
            drafter: self.drafter.is_some(),
        };
        self.propose(plan, &mut spec);
        let mut sample_at = Vec::new();
        for &(i, work) in plan {
            let seq = &mut self.active[i];
            match seq.stage(work, &mut self.batch) {
                Ok(0) => {}
                Ok(rows) => sample_at.push((i, self.batch.n_tokens() - rows as i32, rows)),
                Err(e) => {
                    let failure = Failure::Internal(format!("batch: {e}"));
                    seq.fail(failure, true);
                }
            }
        }
        sample_at
    }

    /// Decodes the batch: `Ok(true)` when its logits are ready, `Ok(false)`
    /// when the cache had no room (the step's sequences failed, the engine
    /// goes on), `Err` when the engine must stop.
    fn decode_batch(
        &mut self,
        ctx: &mut LlamaContext<'_>,
        plan: &[(usize, Work)],
    ) -> Result<bool, String> {
        let Err(e) = ctx.decode(&mut self.batch) else {
            return Ok(true);
        };
        tracing::error!(error = %e, sequences = plan.len(), "decode failed");
        if matches!(e, DecodeError::NoKvCacheSlot) {
            // The cache is full: these sequences cannot go on here, the
            // others can. Their cells are not reusable.
            for &(i, _) in plan {
                let failure = Failure::Capacity(format!("decode: {e}"));
                self.active[i].fail(failure, true);
            }
            return Ok(false);
        }
        // The context is in an unknown state: fail everything, deliver
        // what fits, and stop the engine.
        for seq in &mut self.active {
            seq.fail(Failure::Internal(format!("decode: {e}")), true);
            seq.flush();
        }
        Err(format!("llama.cpp decode failed: {e}"))
    }

    /// Samples every sequence whose logits were computed, position by
    /// position over its proposals; split over spare cores when there are
    /// any and the work is worth a thread.
    fn sample(
        &mut self,
        ctx: &LlamaContext<'_>,
        sample_at: Vec<(usize, i32, usize)>,
    ) -> Vec<(usize, Vec<Pick>)> {
        let mut logits_at: Vec<Option<(i32, usize)>> = vec![None; self.active.len()];
        for (i, first, rows) in sample_at {
            if !self.active[i].is_over() {
                logits_at[i] = Some((first, rows));
            }
        }
        let mut order = Vec::new();
        let mut jobs: Vec<Chain> = Vec::new();
        for (i, seq) in self.active.iter_mut().enumerate() {
            if let Some((first, rows)) = logits_at[i] {
                order.push(i);
                let drafts = seq.drafts().iter().map(|t| t.0 as u32).collect();
                jobs.push(Chain {
                    sampler: seq.sampler_mut(),
                    logits: (0..rows as i32)
                        .map(|r| ctx.get_logits_ith(first + r))
                        .collect(),
                    drafts,
                    picks: Vec::new(),
                });
            }
        }
        let costly = jobs
            .iter()
            .filter(|c| !c.sampler.is_cheap() || c.logits.len() > 1)
            .count();
        let threads = if costly >= 2 { self.sample_threads } else { 1 };
        sample_chains(&mut jobs, threads);
        let picks = jobs.into_iter().map(|c| c.picks);
        order.into_iter().zip(picks).collect()
    }

    /// Books a step of `step_tokens` rows that took `seconds` (decode and
    /// sampling).
    fn observe_step(&mut self, seconds: f64, step_tokens: i32) {
        let metrics = &self.shared.metrics;
        metrics.step_duration.observe(seconds);
        metrics.step_tokens.observe(f64::from(step_tokens));
        if step_tokens as usize >= PROMPT_STEP_TOKENS {
            // Mostly prompt rows: what computing a prompt token costs, the
            // yardstick of a restore from the RAM tier.
            let per_token = seconds / f64::from(step_tokens);
            self.prefill_seconds_per_token = Some(crate::engine::slots::smoothed(
                self.prefill_seconds_per_token,
                per_token,
            ));
        }
    }

    /// Gives sequence `i` its picks in order until one differs from its
    /// proposal (or it ends), drops the rest of its proposals' cells and
    /// delivers at once rather than a step later.
    fn take_picks(&mut self, ctx: &mut LlamaContext<'_>, i: usize, chain: Vec<Pick>) {
        let (model, shared) = (self.model, self.shared);
        let vocab = model.vocab();
        let metrics = &shared.metrics;
        let seq = &mut self.active[i];
        let mut taken: usize = 0;
        for pick in chain {
            let token = LlamaToken(pick.token as i32);
            if seq.decode_started().is_none() {
                metrics
                    .prefill_time
                    .observe(seq.admitted().elapsed().as_secs_f64());
                metrics.prompt_tokens.inc_by(seq.input_len() as u64);
            }
            taken += 1;
            if seq.accept(token, pick.logprobs, &vocab, self.window) {
                self.tokens_generated += 1;
                metrics.generation_tokens.inc();
                if seq.new_tokens() == 1 {
                    metrics
                        .time_to_first_token
                        .observe(seq.submitted().elapsed().as_secs_f64());
                }
            }
            if seq.is_over() {
                break;
            }
        }
        // Every pick but the last was a proposal the sampler agreed with
        // (see `Chain::run`); the sequence may have ended sooner.
        let proposed = seq.drafts().len();
        let kept = taken.saturating_sub(1).min(proposed);
        if proposed > 0 {
            metrics.spec_proposed_tokens.inc_by(proposed as u64);
            metrics.spec_accepted_tokens.inc_by(kept as u64);
        }
        self.drop_rejected(ctx, i, kept);
        self.active[i].flush();
    }

    /// Decides every decoding sequence's proposals for this step: its own
    /// context's (prompt lookup), else, with a draft model, the draft's
    /// guesses, drafted for all such sequences together.
    fn propose(&mut self, plan: &[(usize, Work)], spec: &mut SpecStep<'_>) {
        let mut wants: Vec<(usize, usize)> = Vec::new();
        for &(i, work) in plan {
            if work == Work::Decode {
                let room = self.active[i].plan_proposal(spec, self.window);
                if room > 0 {
                    wants.push((i, room));
                }
            }
        }
        let Some(drafter) = self.drafter.as_mut() else {
            return;
        };
        if wants.is_empty() {
            return;
        }
        let contexts: Vec<Vec<LlamaToken>> = wants
            .iter()
            .map(|&(i, _)| self.active[i].draft_context())
            .collect();
        let asks: Vec<Want<'_>> = wants
            .iter()
            .zip(&contexts)
            .map(|(&(i, max), context)| Want {
                slot: self.active[i].slot(),
                context,
                max,
            })
            .collect();
        let drafts = drafter.propose(&asks);
        for (&(i, _), drafts) in wants.iter().zip(drafts) {
            self.active[i].set_drafts(drafts);
        }
    }

    /// Keeps `kept` of sequence `i`'s proposals and removes the rest's KV
    /// cells; a sequence whose cells cannot be removed fails (a later token
    /// at those positions would sit beside the stale ones).
    fn drop_rejected(&mut self, ctx: &mut LlamaContext<'_>, i: usize, kept: usize) {
        let seq = &mut self.active[i];
        let Some(from) = seq.settle(kept) else {
            return;
        };
        if let Err(e) = ctx.kv_cache_seq_rm(seq.slot(), Some(from as u32), None) {
            let failure = Failure::Internal(format!("removing rejected proposals: {e}"));
            seq.fail(failure, true);
        }
    }
}
