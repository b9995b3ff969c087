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
//!
//! Below the KV cache sits the host-RAM tier ([`RamTier`]): a free slot's
//! exact prefix that is about to be lost (the slot is taken for another
//! prompt, or the budget cuts it) is saved there as llama.cpp's serialized
//! sequence state, and a prompt that finds a longer prefix there than in
//! the KV cache gets it restored into its slot instead of computing it.

use std::sync::Arc;
use std::time::Instant;

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::{LlamaStateSeqFlags, SeqState};

use super::policy::{self, Placement};
use super::ram_tier::{self, RamTier};
use crate::metrics::WorkerMetrics;

/// Weight of the newest sample in the cost averages (restore time here,
/// prompt time per token in `step`).
const COST_SMOOTHING: f64 = 0.2;

/// `avg` (`None` before the first sample) moved towards `sample`.
pub(super) fn smoothed(avg: Option<f64>, sample: f64) -> f64 {
    avg.map_or(sample, |avg| avg + COST_SMOOTHING * (sample - avg))
}

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
    /// Exact prefixes evicted from the KV cache, kept in host memory.
    ram: RamTier<LlamaToken, SeqState>,
    /// Seconds per token a restore from `ram` took, smoothed (`None`
    /// before the first).
    restore_seconds_per_token: Option<f64>,
    metrics: Arc<WorkerMetrics>,
}

impl Slots {
    /// `parallel` empty slots, keeping at most `prefix_cache_tokens` warm
    /// in the KV cache and `ram_bytes` of evicted prefixes in host memory.
    pub fn new(
        parallel: u32,
        prefix_cache_tokens: usize,
        ram_bytes: usize,
        metrics: Arc<WorkerMetrics>,
    ) -> Self {
        Self {
            free: (0..parallel as i32).rev().collect(),
            cache: vec![Vec::new(); parallel as usize],
            exact: vec![0; parallel as usize],
            warm: Vec::new(),
            prefix_cache_tokens,
            ram: RamTier::new(ram_bytes),
            restore_seconds_per_token: None,
            metrics,
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
        if self.ram.enabled() {
            let in_kv = placement.reuse.map_or(0, |(_, len)| len);
            match self.ram.best(input, !resume) {
                Some((_, len)) if len > in_kv => return self.restore(ctx, input, resume),
                _ => {
                    self.metrics.prefix_ram_misses.inc();
                }
            }
        }
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

    /// Takes the coldest free slot (the one [`policy::place`] gives a
    /// prompt that reuses nothing), saves what it kept, and restores the
    /// RAM entry sharing the longest prefix with `input` into it, cut to
    /// that prefix. Returns what [`Slots::take`] does (nothing reused if
    /// the restore failed: the prompt is computed).
    fn restore(
        &mut self,
        ctx: &mut LlamaContext<'_>,
        input: &[LlamaToken],
        resume: bool,
    ) -> (i32, usize, usize) {
        let slot = self
            .free
            .iter()
            .map(|&s| (s, self.cache[s as usize].len()))
            .min_by_key(|&(s, n)| (n, s))
            .map(|(s, _)| s)
            .expect("a free slot exists");
        self.free.retain(|&s| s != slot);
        self.warm.retain(|&s| s != slot);
        self.evict(ctx, slot);
        // Looked up again: saving the slot's prefix may have replaced
        // entries (and the slot's own prefix may now be the best one).
        let Some((entry, len)) = self.ram.best(input, !resume) else {
            self.metrics.prefix_ram_misses.inc();
            return (slot, 0, 0);
        };
        let started = Instant::now();
        let state = self.ram.get(entry);
        let restored = ctx
            .state_seq_set(state, slot)
            .map_err(|e| e.to_string())
            .and_then(|()| {
                ctx.kv_cache_seq_rm(slot, Some(len as u32), None)
                    .map_err(|e| e.to_string())
            });
        let metrics = &self.metrics;
        match restored {
            Ok(()) => {
                let seconds = started.elapsed().as_secs_f64();
                metrics.prefix_ram_hits.inc();
                metrics.prefix_ram_restored_tokens.inc_by(len as u64);
                metrics.prefix_ram_restore_time.observe(seconds);
                let per_token = seconds / len as f64;
                self.restore_seconds_per_token =
                    Some(smoothed(self.restore_seconds_per_token, per_token));
                tracing::debug!(
                    slot,
                    tokens = len,
                    seconds,
                    "prefix restored from the RAM tier"
                );
                (slot, len, len)
            }
            Err(e) => {
                tracing::warn!(slot, error = %e, "cannot restore a prefix from the RAM tier; recomputing");
                metrics.prefix_ram_misses.inc();
                if let Err(e) = ctx.kv_cache_seq_rm(slot, None, None) {
                    tracing::warn!(slot, error = %e, "could not clear KV cells");
                }
                self.ram.remove(entry);
                self.ram_gauges();
                (slot, 0, 0)
            }
        }
    }

    /// Empties taken slot `slot`, saving its exact prefix to the RAM tier
    /// first when that is worth it.
    fn evict(&mut self, ctx: &mut LlamaContext<'_>, slot: i32) {
        self.save(ctx, slot);
        self.cache[slot as usize].clear();
        self.exact[slot as usize] = 0;
        if let Err(e) = ctx.kv_cache_seq_rm(slot, None, None) {
            tracing::warn!(slot, error = %e, "could not clear KV cells");
        }
    }

    /// Saves slot `slot`'s exact prefix, whose cells are about to go, to
    /// the RAM tier, unless it is too short, kept there already, or kept by
    /// another free slot. Its cells past the exact prefix are removed first
    /// (they are about to go too): the saved state is that prefix's.
    fn save(&mut self, ctx: &mut LlamaContext<'_>, slot: i32) {
        let exact = self.exact[slot as usize];
        let tokens = &self.cache[slot as usize][..exact];
        let elsewhere = self
            .free
            .iter()
            .any(|&s| s != slot && self.kept(s).starts_with(tokens));
        if elsewhere || !self.ram.wants(tokens) {
            return;
        }
        if let Err(e) = ctx.kv_cache_seq_rm(slot, Some(exact as u32), None) {
            tracing::warn!(slot, error = %e, "could not free KV cells");
            return;
        }
        self.cache[slot as usize].truncate(exact);
        let tokens = self.cache[slot as usize].clone();
        match ctx.state_seq_get(slot, LlamaStateSeqFlags::empty()) {
            Ok(state) => {
                let ids: Vec<i32> = tokens.iter().map(|t| t.0).collect();
                let blocks = nanoinfer_proto::kv::block_hashes(&ids);
                let bytes = state.byte_len();
                let done = self.ram.insert(tokens, blocks, state, bytes);
                if done.kept {
                    self.metrics.prefix_ram_saves.inc();
                }
                self.metrics
                    .prefix_ram_evictions
                    .inc_by(done.evicted as u64);
                self.ram_gauges();
            }
            Err(e) => tracing::warn!(slot, error = %e, "cannot save a prefix to the RAM tier"),
        }
    }

    fn ram_gauges(&self) {
        self.metrics.prefix_ram_bytes.set(self.ram.bytes() as i64);
        self.metrics.prefix_ram_entries.set(self.ram.len() as i64);
    }

    /// Seconds per token a restore from the RAM tier takes, smoothed over
    /// the recent ones (`None` before the first).
    pub fn restore_seconds_per_token(&self) -> Option<f64> {
        self.restore_seconds_per_token
    }

    /// The block hashes of every prefix the RAM tier keeps, and a number
    /// that changes whenever they do.
    pub fn ram_blocks(&self) -> (u64, impl Iterator<Item = &[u64]>) {
        (self.ram.version(), self.ram.blocks())
    }

    /// Makes `placement.slot` hold exactly the reused prefix; returns its
    /// length (0 when nothing could be reused).
    fn prepare(&mut self, ctx: &mut LlamaContext<'_>, placement: Placement) -> usize {
        let slot = placement.slot;
        let kept_in_place = match placement.reuse {
            Some((from, len)) if from == slot => len,
            _ => 0,
        };
        if self.exact[slot as usize].saturating_sub(kept_in_place) >= ram_tier::MIN_TOKENS {
            // The slot's own exact cells go, all or a good part of them
            // (a new tenant sharing a few tokens): keep its prefix in RAM.
            self.save(ctx, slot);
        }
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
            if keep < self.exact[slot as usize] {
                // Saved whole at its first cut (later cuts find it kept).
                self.save(ctx, slot);
            }
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
