//! One running sequence: its sampler, detokenizer, stop matcher, its cells
//! in the KV cache, and the outbox of events waiting for room in its channel.
//!
//! The state is private behind methods that keep one promise: the tokens
//! [`Sequence::reusable`] lists are exactly those whose KV cells a
//! successful decode wrote, at positions `0..len` of the sequence's slot.
//! Tokens move from "staged" (in the batch being decoded) to "decoded" only
//! after `ctx.decode` succeeded, and a sequence whose decode failed offers
//! nothing ([`Cells`]). Only those cells may be copied to another slot or
//! kept for a later prompt.

use std::collections::VecDeque;
use std::time::Instant;

use llama_cpp_2::llama_batch::{BatchAddError, LlamaBatch};
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::vocab::LlamaVocab;
use tokio::sync::mpsc::error::TrySendError;
use tracing::field::Empty;

use super::policy::{SeqView, Work, ROW_GROUP};
use super::speculate::{propose, Adapt, SpecStep};
use super::{Alternative, Event, Failure, FinishReason, Generation, Job, TokenLogprobs};
use crate::detok::Utf8Carry;
use crate::sampler::{Logprobs, Sampler};
use crate::stop::{StopMatcher, StopOutcome};

/// Where a sequence is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Delivery {
    /// Every event so far is in the channel.
    Clear,
    /// The channel is full; the sequence waits.
    Blocked,
    /// The receiver is gone: the client left.
    Gone,
}

/// The tokens whose KV cells hold a sequence's positions, by how far they
/// got: `decoded` ones (positions `0..decoded.len()`) were written by a
/// successful decode, `staged` ones (the positions after) are in the batch
/// being decoded. Only decoded cells may be reused; once a decode failed
/// for the sequence, none are (what llama.cpp left in them is unknown).
///
/// Of the decoded cells, the leading `exact` ones hold what a cold prompt
/// computes at those positions (issue 20's seed promise): prompt rows
/// that ggml multiplied in a full row group, as every row of a prompt but
/// its last `len % ROW_GROUP` is when the prompt is computed alone.
/// Generated tokens' cells (one-row decodes) and a prompt's trailing rows
/// are not, so only the exact prefix is offered for reuse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Cells<T> {
    decoded: Vec<T>,
    staged: Vec<T>,
    /// Per staged cell: its row in the step's batch and whether it is a
    /// prompt row.
    rows: Vec<(usize, bool)>,
    exact: usize,
    broken: bool,
}

impl<T: Copy> Cells<T> {
    /// Cells that start with `reused`, whose cells an earlier decode wrote
    /// (a kept prefix, or a copy of one), the first `exact` of them exactly.
    pub fn starting_with(reused: &[T], exact: usize) -> Self {
        Self {
            decoded: reused.to_vec(),
            staged: Vec::new(),
            rows: Vec::new(),
            exact: exact.min(reused.len()),
            broken: false,
        }
    }

    /// Puts `token` at the next position, as row `row` of the batch being
    /// built (`prompt`: a prompt row, not a generated token), and returns
    /// that position.
    pub fn stage(&mut self, token: T, row: usize, prompt: bool) -> i32 {
        self.staged.push(token);
        self.rows.push((row, prompt));
        (self.decoded.len() + self.staged.len() - 1) as i32
    }

    /// The batch of `batch_rows` rows decoded: its cells are written.
    pub fn commit(&mut self, batch_rows: usize) {
        let grouped = batch_rows - batch_rows % ROW_GROUP;
        if !self.broken {
            // The exact prefix grows over the staged cells (in position
            // order) up to the first one that is not exact.
            let mut run = self.exact == self.decoded.len();
            for &(row, prompt) in &self.rows {
                run &= prompt && row < grouped;
                self.exact += usize::from(run);
            }
            self.decoded.append(&mut self.staged);
        }
        self.rows.clear();
    }

    /// A decode failed for this sequence: nothing of it is reusable.
    pub fn break_all(&mut self) {
        self.broken = true;
        self.staged.clear();
        self.rows.clear();
    }

    /// Tokens whose cells may be copied or kept (positions `0..len`): the
    /// exact prefix.
    pub fn reusable(&self) -> &[T] {
        if self.broken {
            &[]
        } else {
            &self.decoded[..self.exact]
        }
    }

    /// Every decoded token (the context speculation looks up).
    pub fn decoded(&self) -> &[T] {
        &self.decoded
    }

    /// Tokens whose cells stay in the cache when the sequence ends (every
    /// decoded one, so that no hole opens behind a kept prefix, see
    /// [`super::slots`]), and how many of them lead exactly.
    pub fn kept(&self) -> (&[T], usize) {
        if self.broken {
            (&[], 0)
        } else {
            (&self.decoded, self.exact)
        }
    }

    /// Positions in use (decoded or staged).
    pub fn len(&self) -> usize {
        self.decoded.len() + self.staged.len()
    }

    /// Drops the decoded cells from position `len` on (rejected
    /// speculative tokens, whose cells the caller removes from the cache).
    pub fn truncate(&mut self, len: usize) {
        self.decoded.truncate(len);
        self.exact = self.exact.min(len);
    }
}

pub(super) struct Sequence {
    /// KV-cache sequence id (the slot).
    slot: i32,
    job: Job,
    sampler: Sampler,
    utf8: Utf8Carry,
    stop: StopMatcher,
    /// The prompt, then the resumed tokens: what prefill feeds the model.
    input: Vec<LlamaToken>,
    /// Input tokens already handed to a batch.
    prefilled: usize,
    /// Input tokens whose cells were reused from the cache at admission.
    reused: usize,
    cells: Cells<LlamaToken>,
    /// The last sampled token, decoded in the next step.
    next: Option<LlamaToken>,
    /// Tokens proposed this step, staged after `next` ([`super::speculate`]).
    drafts: Vec<LlamaToken>,
    /// When to propose again.
    adapt: Adapt,
    /// Tokens proposed and kept over the request.
    proposed: u32,
    kept: u32,
    /// Generated tokens, resumed ones included (the next token's index).
    generated: u32,
    outbox: VecDeque<Event>,
    /// Set once generation is over; the slot is freed when the outbox drains.
    finish: Option<FinishReason>,
    /// Set when the generation failed.
    failure: Option<Failure>,
    prefill_span: Option<tracing::Span>,
    decode_span: Option<tracing::Span>,
    admitted: Instant,
    decode_started: Option<Instant>,
}

impl Sequence {
    /// A sequence in `slot`, whose first `reused` input tokens already have
    /// their cells there, the first `exact` of them exactly ([`Cells`]).
    /// Replays the resumed tokens (see [`Generation::resume`]) before
    /// anything is generated.
    pub fn new(slot: i32, job: Job, reused: usize, exact: usize, vocab: &LlamaVocab<'_>) -> Self {
        let g = &job.generation;
        let input: Vec<LlamaToken> = g.prompt.iter().chain(&g.resume).copied().collect();
        let prefill_span = tracing::info_span!(
            parent: &g.span,
            "prefill",
            prompt_tokens = g.prompt.len(),
            resumed_tokens = g.resume.len(),
            reused_tokens = Empty
        );
        let mut seq = Self {
            slot,
            sampler: sampler(g),
            utf8: Utf8Carry::default(),
            stop: StopMatcher::new(g.stop.iter().cloned()),
            cells: Cells::starting_with(&input[..reused], exact),
            prefilled: reused,
            reused,
            input,
            next: None,
            drafts: Vec::new(),
            adapt: Adapt::default(),
            proposed: 0,
            kept: 0,
            generated: 0,
            outbox: VecDeque::new(),
            finish: None,
            failure: None,
            prefill_span: Some(prefill_span),
            decode_span: None,
            admitted: Instant::now(),
            decode_started: None,
            job,
        };
        seq.replay(vocab);
        seq
    }

    /// Puts the resumed tokens through the detokenizer, the stop matcher and
    /// the sampler's random sequence as if this worker had generated them,
    /// discarding their text (the client has it): text the first worker
    /// held back (a partial character or stop sequence) is held back here
    /// too, and a seeded request continues the same random sequence.
    fn replay(&mut self, vocab: &LlamaVocab<'_>) {
        let resume = std::mem::take(&mut self.job.generation.resume);
        let ids: Vec<u32> = resume.iter().map(|t| t.0 as u32).collect();
        self.sampler.resume(&ids);
        for &token in &resume {
            if vocab.is_eog(token) {
                // The first worker would have ended here.
                self.end(FinishReason::Eos);
                break;
            }
            self.generated += 1;
            let text = self.utf8.push(&vocab.token_to_piece(token, false, None));
            if let StopOutcome::Stop(_) = self.stop.push(&text) {
                self.end(FinishReason::StopSequence);
                break;
            }
        }
        self.job.generation.resume = resume;
    }

    /// The KV slot.
    pub fn slot(&self) -> i32 {
        self.slot
    }

    /// The request.
    pub fn generation(&self) -> &Generation {
        &self.job.generation
    }

    /// When the request was submitted.
    pub fn submitted(&self) -> Instant {
        self.job.submitted
    }

    /// When the sequence was admitted.
    pub fn admitted(&self) -> Instant {
        self.admitted
    }

    /// When its first token was sampled.
    pub fn decode_started(&self) -> Option<Instant> {
        self.decode_started
    }

    /// The open `prefill` span, until the first token.
    pub fn prefill_span(&self) -> Option<&tracing::Span> {
        self.prefill_span.as_ref()
    }

    /// The open `decode` span, from the first token.
    pub fn decode_span(&self) -> Option<&tracing::Span> {
        self.decode_span.as_ref()
    }

    /// Prompt tokens (resumed ones not included).
    pub fn prompt_len(&self) -> usize {
        self.job.generation.prompt.len()
    }

    /// Prompt plus resumed tokens.
    pub fn input_len(&self) -> usize {
        self.input.len()
    }

    /// Prompt plus resumed tokens, the ids.
    pub fn input(&self) -> &[LlamaToken] {
        &self.input
    }

    /// The input's whole blocks' hashes, while its prefill is not done
    /// (the KV events' computing tier); empty after.
    pub fn computing_blocks(&self) -> &[u64] {
        if self.cells.decoded().len() < self.input.len() && !self.is_over() {
            &self.job.blocks
        } else {
            &[]
        }
    }

    /// Generated tokens, resumed ones included.
    pub fn generated(&self) -> u32 {
        self.generated
    }

    /// Tokens this worker generated (resumed ones not included).
    pub fn new_tokens(&self) -> u32 {
        self.generated - self.job.generation.resume.len() as u32
    }

    /// Why the sequence ended, if it did without failing.
    pub fn finish(&self) -> Option<FinishReason> {
        self.finish
    }

    /// Why the sequence failed, if it did.
    pub fn failure(&self) -> Option<&Failure> {
        self.failure.as_ref()
    }

    /// Tokens whose KV cells at positions `0..len` a successful decode
    /// wrote exactly as a cold prompt would ([`Cells`]); empty once a
    /// decode failed for this sequence.
    pub fn reusable(&self) -> &[LlamaToken] {
        self.cells.reusable()
    }

    /// Tokens whose cells stay in the cache when it ends, and how many of
    /// them lead exactly ([`Cells::kept`]).
    pub fn kept(&self) -> (&[LlamaToken], usize) {
        self.cells.kept()
    }

    /// KV positions in use.
    pub fn cells_in_use(&self) -> usize {
        self.cells.len()
    }

    /// Whether the deadline of the request has passed at `now`.
    pub fn past_deadline(&self, now: Instant) -> bool {
        self.job.generation.deadline.is_some_and(|d| now >= d)
    }

    /// What the step planner needs to know; `delivery` is the state of the
    /// channel after the last flush.
    pub fn view(&self, delivery: Delivery) -> SeqView {
        SeqView {
            prompt_left: self.input.len() - self.prefilled,
            prefilled: self.prefilled,
            has_next: self.next.is_some(),
            blocked: delivery == Delivery::Blocked || self.is_over(),
        }
    }

    /// Adds this sequence's `work` to `batch`. Returns how many positions
    /// get logits (the last ones it added): 0, 1, or with speculation 1
    /// plus the tokens proposed after the next one
    /// ([`Sequence::plan_proposal`] decided them before).
    pub fn stage(&mut self, work: Work, batch: &mut LlamaBatch) -> Result<usize, BatchAddError> {
        match work {
            Work::Decode => {
                // This step's proposals were set before (`plan_proposal`,
                // `set_drafts`).
                let token = self.next.take().expect("planned decode has a token");
                let pos = self.cells.stage(token, batch.n_tokens() as usize, false);
                batch.add(token, pos, &[self.slot], true)?;
                for k in 0..self.drafts.len() {
                    let draft = self.drafts[k];
                    let pos = self.cells.stage(draft, batch.n_tokens() as usize, false);
                    batch.add(draft, pos, &[self.slot], true)?;
                }
                Ok(1 + self.drafts.len())
            }
            Work::Prefill { from, len } => {
                for k in from..from + len {
                    let token = self.input[k];
                    let pos = self.cells.stage(token, batch.n_tokens() as usize, true);
                    // Logits only for the input's last token: they start
                    // generation.
                    batch.add(token, pos, &[self.slot], k + 1 == self.input.len())?;
                }
                self.prefilled = from + len;
                Ok(usize::from(self.prefilled == self.input.len()))
            }
        }
    }

    /// Decides what this step proposes after the next token, before the
    /// sequence is staged: the tokens that followed the latest n-gram's
    /// earlier occurrence, as many as pay in this step ([`Adapt::choose`];
    /// kept as the step's proposals), or, when the
    /// context offers nothing to copy, how many tokens a draft model may
    /// propose instead ([`Sequence::set_drafts`]; 0: none). Nothing when
    /// speculation is off or backing off, and never past what the request
    /// may still generate or the window.
    pub fn plan_proposal(&mut self, step: &mut SpecStep<'_>, window: u32) -> usize {
        self.drafts.clear();
        let spec = &step.config;
        let Some(next) = self.next else {
            return 0;
        };
        if !spec.enabled() || self.adapt.waiting() {
            return 0;
        }
        let g = &self.job.generation;
        // `next` is generated token `generated - 1`; the picks after it are
        // the request's last `max_tokens - generated`.
        let picks_left = g.max_tokens.saturating_sub(self.generated) as usize;
        let next_pos = self.cells.len();
        let room = (window as usize).saturating_sub(next_pos + 1);
        let max = spec.draft_max.min(picks_left.saturating_sub(1)).min(room);
        if max == 0 {
            return 0;
        }
        let mut drafts = propose(
            self.cells.decoded(),
            next,
            spec.ngram_min,
            spec.ngram_max,
            max,
        );
        if drafts.is_empty() {
            // Nothing to copy: a draft model may propose.
            return if step.drafter {
                self.adapt.choose(max, step)
            } else {
                0
            };
        }
        let k = self.adapt.choose(drafts.len(), step);
        drafts.truncate(k);
        self.drafts = drafts;
        0
    }

    /// A draft model's proposals for this step (at most what
    /// [`Sequence::plan_proposal`] allowed).
    pub fn set_drafts(&mut self, drafts: Vec<LlamaToken>) {
        self.drafts = drafts;
    }

    /// What a draft model continues: every token with a cell, then the
    /// token this step decodes.
    pub fn draft_context(&self) -> Vec<LlamaToken> {
        let mut context = self.cells.decoded().to_vec();
        context.extend(self.next);
        context
    }

    /// The tokens proposed this step (staged after the next token).
    pub fn drafts(&self) -> &[LlamaToken] {
        &self.drafts
    }

    /// The step's picks are handled: `kept` of this step's proposals were
    /// kept. Returns the first KV position to remove from the sequence's
    /// slot when some were rejected (their cells are written, but hold
    /// tokens that are not the sequence's).
    pub fn settle(&mut self, kept: usize) -> Option<usize> {
        let proposed = std::mem::take(&mut self.drafts).len();
        if proposed == 0 {
            return None;
        }
        self.adapt.verified(proposed, kept);
        self.proposed += proposed as u32;
        self.kept += kept as u32;
        if kept == proposed {
            return None;
        }
        let end = self.cells.len() - (proposed - kept);
        self.cells.truncate(end);
        Some(end)
    }

    /// Tokens proposed and kept over the request.
    pub fn speculation(&self) -> (u32, u32) {
        (self.proposed, self.kept)
    }

    /// The step's decode of `batch_rows` rows succeeded: the staged cells
    /// are written.
    pub fn decoded(&mut self, batch_rows: usize) {
        self.cells.commit(batch_rows);
    }

    /// Moves queued events into the channel, as far as it has room.
    pub fn flush(&mut self) -> Delivery {
        while let Some(event) = self.outbox.pop_front() {
            match self.job.events.try_send(event) {
                Ok(()) => {}
                Err(TrySendError::Full(event)) => {
                    self.outbox.push_front(event);
                    return Delivery::Blocked;
                }
                Err(TrySendError::Closed(_)) => return Delivery::Gone,
            }
        }
        if self.job.events.is_closed() {
            Delivery::Gone
        } else {
            Delivery::Clear
        }
    }

    /// This sequence's sampler (the engine samples a step's sequences
    /// together, then hands each its token through [`Sequence::accept`]).
    pub fn sampler_mut(&mut self) -> &mut Sampler {
        &mut self.sampler
    }

    /// Handles a sampled token: queues its event and decides whether
    /// generation is over. `window` is the per-sequence context window.
    /// `logprobs` are the token's, when the request asked for them. Returns
    /// whether the token was emitted (an end-of-generation token is not).
    pub fn accept(
        &mut self,
        token: LlamaToken,
        logprobs: Option<Logprobs>,
        vocab: &LlamaVocab<'_>,
        window: u32,
    ) -> bool {
        if self.decode_started.is_none() {
            self.decode_started = Some(Instant::now());
            self.prefill_span = None;
            self.decode_span = Some(tracing::info_span!(
                parent: &self.job.generation.span,
                "decode",
                generated_tokens = Empty
            ));
        }
        if vocab.is_eog(token) {
            self.end(FinishReason::Eos);
            return false;
        }
        let index = self.generated;
        self.generated += 1;
        let piece = vocab.token_to_piece(token, false, None);
        let text = self.utf8.push(&piece);
        let (text, stopped) = match self.stop.push(&text) {
            StopOutcome::Emit(t) => (t, false),
            StopOutcome::Stop(t) => (t, true),
        };
        self.outbox.push_back(Event::Token {
            text,
            id: token.0,
            index,
            logprobs: logprobs.map(|l| with_text(l, vocab)),
        });
        let g = &self.job.generation;
        if stopped {
            self.end(FinishReason::StopSequence)
        } else if self.generated >= g.max_tokens {
            self.end(FinishReason::Length)
        } else if g.prompt.len() as u32 + self.generated >= window {
            // Prompt + generated tokens never exceed the window.
            self.end(FinishReason::ContextLength)
        } else {
            self.next = Some(token);
        }
        true
    }

    /// Ends generation with `reason`: releases held-back text and queues the
    /// final event.
    pub fn end(&mut self, reason: FinishReason) {
        if self.is_over() {
            return;
        }
        let text = if reason == FinishReason::StopSequence {
            String::new()
        } else {
            let rest = self.utf8.finish();
            match self.stop.push(&rest) {
                StopOutcome::Emit(t) => t + &self.stop.flush(),
                StopOutcome::Stop(t) => t,
            }
        };
        self.next = None;
        self.finish = Some(reason);
        self.outbox.push_back(Event::Finished {
            reason,
            text,
            prompt_tokens: self.prompt_len() as u32,
            generated_tokens: self.generated,
            cached_tokens: self.reused.min(self.prompt_len()) as u32,
        });
    }

    /// Ends the sequence with `failure` as its last event. When a decode
    /// failed (`cells_broken`), none of its KV cells may be reused.
    pub fn fail(&mut self, failure: Failure, cells_broken: bool) {
        if cells_broken {
            self.cells.break_all();
        }
        if self.is_over() {
            return;
        }
        self.next = None;
        self.failure = Some(failure.clone());
        self.outbox.push_back(Event::Failed(failure));
    }

    /// Whether every queued event reached the channel.
    pub fn delivered(&self) -> bool {
        self.outbox.is_empty()
    }

    /// Whether the sequence is done and only its outbox is left to deliver.
    pub fn is_over(&self) -> bool {
        self.finish.is_some() || self.failure.is_some()
    }
}

/// The request's sampler, fed its prompt (the repetition penalty counts
/// it; resumed tokens are fed by [`Sequence::replay`]).
fn sampler(g: &Generation) -> Sampler {
    let mut sampler = Sampler::new(g.temperature, g.top_p, g.seed)
        .with_controls(g.controls)
        .with_bias(g.logit_bias.clone())
        .with_grammar(g.grammar.clone());
    sampler.prompt(g.prompt.iter().map(|t| t.0 as u32));
    sampler
}

/// The sampler's log-probabilities with each alternative's text (its own
/// piece, special tokens rendered).
fn with_text(l: Logprobs, vocab: &LlamaVocab<'_>) -> TokenLogprobs {
    let top = l
        .top
        .into_iter()
        .map(|(id, logprob)| {
            let id = id as i32;
            let piece = vocab.token_to_piece(LlamaToken(id), true, None);
            Alternative {
                id,
                text: String::from_utf8_lossy(&piece).into_owned(),
                logprob,
            }
        })
        .collect();
    TokenLogprobs {
        logprob: l.logprob,
        top,
    }
}

#[cfg(test)]
mod tests {
    use super::Cells;

    #[test]
    fn only_decoded_cells_are_reusable() {
        let mut cells = Cells::starting_with(&[1, 2], 2);
        assert_eq!(cells.reusable(), &[1, 2]);
        // Staged for a batch: positions 2 and 3, not yet reusable.
        assert_eq!(cells.stage(3, 0, true), 2);
        assert_eq!(cells.stage(4, 1, true), 3);
        cells.stage(5, 2, true);
        cells.stage(6, 3, true);
        assert_eq!(cells.len(), 6);
        assert_eq!(cells.reusable(), &[1, 2]);
        // The decode succeeded.
        cells.commit(4);
        assert_eq!(cells.reusable(), &[1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn a_failed_decode_leaves_nothing_reusable() {
        let mut cells = Cells::starting_with(&[1, 2], 2);
        cells.stage(3, 0, true);
        cells.break_all();
        assert_eq!(cells.reusable(), &[] as &[i32]);
        // A later commit (of a batch that still held it) changes nothing.
        cells.stage(4, 0, true);
        cells.commit(4);
        assert_eq!(cells.reusable(), &[] as &[i32]);
    }

    #[test]
    fn only_prompt_rows_of_full_row_groups_are_exact() {
        // A 7-row prompt alone: rows 0..4 are one full group, 4..7 go
        // through the one-row kernel.
        let mut cells = Cells::starting_with(&[], 0);
        for t in 0..7 {
            cells.stage(t, t as usize, true);
        }
        cells.commit(7);
        assert_eq!(cells.reusable(), &[0, 1, 2, 3]);
        assert_eq!(cells.decoded(), &[0, 1, 2, 3, 4, 5, 6]);
        // Generated tokens never are, even in a full group; nor is
        // anything after a cell that is not.
        cells.stage(7, 3, false);
        cells.commit(4);
        assert_eq!(cells.reusable(), &[0, 1, 2, 3]);
        assert_eq!(cells.len(), 8);

        // A prompt beside three decode rows: 8 prompt rows then 3 others
        // make 11 rows, 8 of them grouped.
        let mut cells = Cells::starting_with(&[], 0);
        for t in 0..8 {
            cells.stage(t, t as usize, true);
        }
        cells.commit(11);
        assert_eq!(cells.reusable().len(), 8);
        // The next chunk ends in the batch's ungrouped tail (rows 5 and 6
        // of 7): the exact prefix stops there and does not resume.
        for (row, t) in (3..7).zip(8..12) {
            cells.stage(t, row, true);
        }
        cells.commit(7);
        assert_eq!(cells.reusable().len(), 9);
        cells.stage(12, 0, true);
        cells.commit(4);
        assert_eq!(cells.reusable().len(), 9);
        // Rejected proposals cut the exact prefix too.
        cells.truncate(5);
        assert_eq!(cells.reusable().len(), 5);
    }
}
