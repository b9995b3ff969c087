//! One running sequence: its sampler, detokenizer, stop matcher, position in
//! the KV cache, and the outbox of events waiting for room in its channel.

use std::collections::VecDeque;
use std::time::Instant;

use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::vocab::LlamaVocab;
use tokio::sync::mpsc::error::TrySendError;
use tracing::field::Empty;

use super::{Event, FinishReason, Job};
use crate::detok::Utf8Carry;
use crate::sampler::Sampler;
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

pub(super) struct Sequence {
    /// KV-cache sequence id (the slot).
    pub slot: i32,
    pub job: Job,
    sampler: Sampler,
    utf8: Utf8Carry,
    stop: StopMatcher,
    /// Prompt tokens already in the KV cache.
    pub prefilled: usize,
    /// Next KV position to write.
    pub pos: i32,
    /// The last sampled token, decoded in the next step.
    pub next: Option<LlamaToken>,
    /// Generated tokens already decoded into the KV cache.
    pub decoded: Vec<LlamaToken>,
    pub generated: u32,
    outbox: VecDeque<Event>,
    /// Set once generation is over; the slot is freed when the outbox drains.
    pub finish: Option<FinishReason>,
    /// Set when llama.cpp failed for this sequence.
    pub error: Option<String>,
    pub prefill_span: Option<tracing::Span>,
    pub decode_span: Option<tracing::Span>,
    pub admitted: Instant,
    pub decode_started: Option<Instant>,
}

impl Sequence {
    pub fn new(slot: i32, job: Job) -> Self {
        let g = &job.generation;
        let sampler = Sampler::new(g.temperature, g.top_p, g.seed);
        let stop = StopMatcher::new(g.stop.iter().cloned());
        let prefill_span = tracing::info_span!(
            parent: &g.span,
            "prefill",
            prompt_tokens = g.prompt.len(),
            reused_tokens = Empty
        );
        Self {
            slot,
            sampler,
            utf8: Utf8Carry::default(),
            stop,
            prefilled: 0,
            pos: 0,
            next: None,
            decoded: Vec::new(),
            generated: 0,
            outbox: VecDeque::new(),
            finish: None,
            error: None,
            prefill_span: Some(prefill_span),
            decode_span: None,
            admitted: Instant::now(),
            decode_started: None,
            job,
        }
    }

    pub fn prompt_len(&self) -> usize {
        self.job.generation.prompt.len()
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
    pub fn accept(&mut self, token: LlamaToken, vocab: &LlamaVocab<'_>, window: u32) {
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
            return self.end(FinishReason::Eos);
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
    }

    /// Ends generation with `reason`: releases held-back text and queues the
    /// final event.
    pub fn end(&mut self, reason: FinishReason) {
        if self.finish.is_some() {
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
        });
    }

    /// Queues a failure as the last event.
    pub fn fail(&mut self, message: String) {
        self.next = None;
        self.error = Some(message.clone());
        self.outbox.push_back(Event::Failed(message));
    }

    /// Whether every queued event reached the channel.
    pub fn delivered(&self) -> bool {
        self.outbox.is_empty()
    }

    /// Whether the sequence is done and only its outbox is left to deliver.
    pub fn is_over(&self) -> bool {
        self.finish.is_some() || self.error.is_some()
    }
}
