//! The KV slot table and the prefix cache. Every KV cell copy or removal
//! happens here, so what a slot's cells hold is known in one place.
//!
//! A free slot keeps the cells of the last sequence it ran (the tokens are
//! in `cache`) for a later prompt with the same prefix. A new request takes
//! the slot whose kept tokens, or a running sequence's decoded tokens, share
//! the longest prefix with its input ([`policy::place`]), and starts prefill
//! after that prefix, copying the cells from the running sequence when that
//! is where they are. Callers offer only cells a successful decode wrote
//! ([`super::sequence::Sequence::reusable`]). Kept cells are not free: the
//! KV cache is unified, so every step's attention spans every used cell,
//! kept ones included; at most `prefix_cache_tokens` distinct cells are
//! kept (a prefix several slots keep counts once: a reused prefix's cells
//! are shared, not copied, in the unified cache), the most recently
//! finished first ([`policy::trim_warm`]).

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::token::LlamaToken;

use super::policy::{self, Placement};

pub(super) struct Slots {
    /// Free slots.
    free: Vec<i32>,
    /// Per slot: the tokens whose KV cells (positions 0..len) a free slot
    /// still holds from its last sequence.
    cache: Vec<Vec<LlamaToken>>,
    /// Per slot: how many of `cache` lead exactly (a cold prompt would
    /// compute the same cells, see `sequence::Cells`): what is offered for
    /// reuse.
    exact: Vec<usize>,
    /// Free slots whose cache is not empty, least recently finished first.
    warm: Vec<i32>,
    /// Most tokens kept in `cache` over all free slots.
    prefix_cache_tokens: usize,
}

impl Slots {
    /// `parallel` empty slots.
    pub fn new(parallel: u32, prefix_cache_tokens: usize) -> Self {
        Self {
            free: (0..parallel as i32).rev().collect(),
            cache: vec![Vec::new(); parallel as usize],
            exact: vec![0; parallel as usize],
            warm: Vec::new(),
            prefix_cache_tokens,
        }
    }

    /// Whether a slot is free.
    pub fn has_free(&self) -> bool {
        !self.free.is_empty()
    }

    /// Takes a free slot for `input` (there must be one), reusing the
    /// longest cached prefix among the free slots and `running` (slot,
    /// tokens it offers, how many of them lead exactly). A new prompt
    /// (`resume` false) reuses only exact cells, in whole row groups; a
    /// resumed stream any kept cells ([`policy::place`]). Returns the slot,
    /// how many input tokens' cells it holds already, and how many of those
    /// are exact.
    pub fn take(
        &mut self,
        ctx: &mut LlamaContext<'_>,
        input: &[LlamaToken],
        running: &[(i32, &[LlamaToken], usize)],
        resume: bool,
    ) -> (i32, usize, usize) {
        let placement = {
            let offered = |s: i32| {
                if resume {
                    self.cache[s as usize].as_slice()
                } else {
                    self.kept(s)
                }
            };
            let free: Vec<(i32, &[LlamaToken])> =
                self.free.iter().map(|&s| (s, offered(s))).collect();
            let running: Vec<(i32, &[LlamaToken])> = running
                .iter()
                .map(|&(s, tokens, exact)| (s, if resume { tokens } else { &tokens[..exact] }))
                .collect();
            policy::place(input, &free, &running, !resume).expect("a free slot exists")
        };
        // How many of the reused cells are exact, read before `prepare`
        // forgets the source slot's count.
        let exact = placement.reuse.map_or(0, |(from, len)| {
            let source = if self.free.contains(&from) {
                self.exact[from as usize]
            } else {
                running
                    .iter()
                    .find(|r| r.0 == from)
                    .map_or(0, |&(_, _, exact)| exact)
            };
            len.min(source)
        });
        let slot = placement.slot;
        self.free.retain(|&s| s != slot);
        self.warm.retain(|&s| s != slot);
        let reused = self.prepare(ctx, placement);
        (slot, reused, exact.min(reused))
    }

    /// Makes `placement.slot` hold exactly the reused prefix; returns its
    /// length (0 when nothing could be reused).
    fn prepare(&mut self, ctx: &mut LlamaContext<'_>, placement: Placement) -> usize {
        let slot = placement.slot;
        self.cache[slot as usize].clear();
        self.exact[slot as usize] = 0;
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

    /// Frees `slot`. `keep` lists the tokens whose cells (positions
    /// `0..len`) a successful decode wrote; they stay, within the budget,
    /// and every other cell of the slot is removed. The first `exact` of
    /// them are offered for prefix reuse; the rest stay too (generated
    /// tokens, a prompt's last rows), so that no hole opens right behind a
    /// kept prefix: llama.cpp puts new cells in the first free ones it
    /// finds, and a later prompt reusing a prefix computes the same logits
    /// as a cold one only when its new cells follow its reused ones.
    pub fn release(
        &mut self,
        ctx: &mut LlamaContext<'_>,
        slot: i32,
        keep: &[LlamaToken],
        exact: usize,
    ) {
        // Cells past `keep` (staged for a batch that failed, or never
        // decoded) must not survive under the slot.
        let start = (!keep.is_empty()).then_some(keep.len() as u32);
        if let Err(e) = ctx.kv_cache_seq_rm(slot, start, None) {
            tracing::warn!(slot, error = %e, "could not free KV cells");
        }
        let cache = &mut self.cache[slot as usize];
        cache.clear();
        cache.extend_from_slice(keep);
        self.exact[slot as usize] = exact.min(keep.len());
        self.free.push(slot);
        if !keep.is_empty() {
            self.warm.push(slot);
            self.trim(ctx);
        }
    }

    /// Cuts the kept caches down to `prefix_cache_tokens` in all.
    fn trim(&mut self, ctx: &mut LlamaContext<'_>) {
        let warm: Vec<(i32, &[LlamaToken])> = self
            .warm
            .iter()
            .map(|&s| (s, self.cache[s as usize].as_slice()))
            .collect();
        for (slot, keep) in policy::trim_warm(&warm, self.prefix_cache_tokens) {
            let start = (keep > 0).then_some(keep as u32);
            if let Err(e) = ctx.kv_cache_seq_rm(slot, start, None) {
                tracing::warn!(slot, error = %e, "could not free kept KV cells");
            }
            self.cache[slot as usize].truncate(keep);
            self.exact[slot as usize] = self.exact[slot as usize].min(keep);
            if keep == 0 {
                self.warm.retain(|&s| s != slot);
            }
        }
    }

    /// The tokens whose cells free slot `slot` keeps and offers for reuse
    /// (its exact prefix; empty for a slot in use).
    pub fn kept(&self, slot: i32) -> &[LlamaToken] {
        &self.cache[slot as usize][..self.exact[slot as usize]]
    }

    /// Distinct cells the free slots keep warm (a prefix kept by several
    /// counts once).
    pub fn warm_tokens(&self) -> usize {
        let caches: Vec<&[LlamaToken]> = self
            .warm
            .iter()
            .map(|&s| self.cache[s as usize].as_slice())
            .collect();
        policy::distinct_tokens(&caches)
    }
}
