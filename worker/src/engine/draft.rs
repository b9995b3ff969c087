//! Proposals from a draft model (`--draft-model`): a small model with the
//! served model's vocabulary guesses the next tokens of a decoding sequence
//! whose own context offers nothing to copy ([`super::speculate`]); the
//! step verifies them like prompt-lookup proposals, so every kept token is
//! still the served model's own pick.
//!
//! The drafter owns a second llama.cpp context over the draft model, one
//! sequence per slot. Per slot it remembers the tokens whose cells that
//! context holds; before drafting it removes the cells past what the
//! sequence's context still shares (rejected drafts, or another request in
//! the slot), computes the rest (a new prompt in one go), then drafts
//! greedily, all sequences in one batch per drafted position.

use std::num::NonZeroU32;

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;

use super::policy::common_prefix;
use super::KvCacheType;

/// Rows of one draft batch (a new prompt's catch-up goes in chunks of it).
const BATCH_ROWS: usize = 512;

/// One sequence to draft for: its slot, its context (every token with a
/// cell in the served model, then the token about to be decoded), and how
/// many tokens to draft at most.
pub(super) struct Want<'a> {
    pub slot: i32,
    pub context: &'a [LlamaToken],
    pub max: usize,
}

pub(super) struct Drafter<'m> {
    ctx: LlamaContext<'m>,
    batch: LlamaBatch<'static>,
    /// Per slot: the tokens whose cells the draft context holds
    /// (positions `0..len`).
    held: Vec<Vec<LlamaToken>>,
}

impl<'m> Drafter<'m> {
    /// A drafter over `model` with `parallel` sequences of `ctx_size`
    /// tokens each.
    pub fn new(
        backend: &LlamaBackend,
        model: &'m LlamaModel,
        parallel: u32,
        ctx_size: u32,
        threads: i32,
        kv_cache_type: KvCacheType,
    ) -> Result<Self, String> {
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(ctx_size * parallel))
            .with_n_batch(BATCH_ROWS as u32)
            .with_n_ubatch(BATCH_ROWS as u32)
            .with_n_seq_max(parallel)
            .with_kv_unified(true)
            .with_swa_full(true)
            .with_n_threads(threads)
            .with_n_threads_batch(threads)
            .with_type_k(kv_cache_type.llama())
            .with_type_v(kv_cache_type.llama());
        let ctx = model
            .new_context(backend, params)
            .map_err(|e| format!("draft model context: {e}"))?;
        Ok(Self {
            ctx,
            batch: LlamaBatch::new(BATCH_ROWS, 1),
            held: vec![Vec::new(); parallel as usize],
        })
    }

    /// Up to `want.max` tokens for each of `wants`, in order. On an error
    /// the draft context is cleared (the next call computes from scratch)
    /// and nothing is proposed.
    pub fn propose(&mut self, wants: &[Want<'_>]) -> Vec<Vec<LlamaToken>> {
        match self.draft(wants) {
            Ok(drafts) => drafts,
            Err(e) => {
                tracing::warn!(error = %e, "draft model failed; no proposals this step");
                self.ctx.clear_kv_cache();
                for held in &mut self.held {
                    held.clear();
                }
                vec![Vec::new(); wants.len()]
            }
        }
    }

    fn draft(&mut self, wants: &[Want<'_>]) -> Result<Vec<Vec<LlamaToken>>, String> {
        // Catch up: every sequence's context but its last token.
        let mut rows: Vec<(i32, LlamaToken, usize)> = Vec::new();
        for want in wants {
            let held = &mut self.held[want.slot as usize];
            let last = want.context.len() - 1;
            let keep = common_prefix(held, want.context).min(last);
            if keep < held.len() {
                self.ctx
                    .kv_cache_seq_rm(want.slot, Some(keep as u32), None)
                    .map_err(|e| format!("removing draft cells: {e}"))?;
                held.truncate(keep);
            }
            rows.extend((keep..last).map(|pos| (want.slot, want.context[pos], pos)));
            held.extend_from_slice(&want.context[keep..last]);
        }
        for chunk in rows.chunks(BATCH_ROWS) {
            self.batch.clear();
            for &(slot, token, pos) in chunk {
                self.batch
                    .add(token, pos as i32, &[slot], false)
                    .map_err(|e| e.to_string())?;
            }
            self.decode()?;
        }
        // Then each context's last token, and one drafted token per batch.
        let mut drafts: Vec<Vec<LlamaToken>> = vec![Vec::new(); wants.len()];
        let mut feed: Vec<(usize, LlamaToken)> = wants
            .iter()
            .enumerate()
            .filter(|(_, w)| w.max > 0)
            .map(|(i, w)| (i, w.context[w.context.len() - 1]))
            .collect();
        while !feed.is_empty() {
            self.batch.clear();
            for &(i, token) in &feed {
                let want = &wants[i];
                let pos = self.held[want.slot as usize].len();
                self.batch
                    .add(token, pos as i32, &[want.slot], true)
                    .map_err(|e| e.to_string())?;
                self.held[want.slot as usize].push(token);
            }
            self.decode()?;
            let mut next = Vec::with_capacity(feed.len());
            for (row, &(i, _)) in feed.iter().enumerate() {
                let logits = self.ctx.get_logits_ith(row as i32);
                let best = logits
                    .iter()
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .map(|(id, _)| LlamaToken(id as i32))
                    .ok_or("empty logits")?;
                drafts[i].push(best);
                if drafts[i].len() < wants[i].max {
                    next.push((i, best));
                }
            }
            feed = next;
        }
        Ok(drafts)
    }

    fn decode(&mut self) -> Result<(), String> {
        self.ctx
            .decode(&mut self.batch)
            .map_err(|e| format!("draft decode: {e}"))
    }
}
