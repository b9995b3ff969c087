//! Token sampling on raw logits, exact over the whole vocabulary and cheap
//! on a 262k-token one.
//!
//! # Order
//! 0. A structured-output constraint ([`crate::grammar`]), when the
//!    request has one, sets every token the schema cannot take next to
//!    -inf: every pass below sees only what the grammar allows.
//! 0. `logit_bias` adds each listed token's bias to its logit (OpenAI's
//!    meaning: -100 all but bans a token, 100 all but forces it).
//! 1. Penalties change the logits of tokens already seen: the repetition
//!    penalty (CTRL / llama.cpp: for every distinct token of the prompt and
//!    the output, a positive logit is divided by it, a negative one
//!    multiplied), then presence (subtracted once from every token
//!    generated so far) and frequency (subtracted once per occurrence)
//!    penalties, OpenAI's meaning.
//! 2. Greedy (temperature 0) picks the largest penalised logit; nothing
//!    below applies to it.
//! 3. Temperature scales the penalised logits.
//! 4. Top-k keeps the k most likely tokens, min-p those at least `min_p`
//!    times as likely as the most likely one (the two commute: both are
//!    cuts of the same ranking).
//! 5. Top-p keeps the smallest set of most likely survivors whose
//!    probability, renormalised over the survivors, reaches `top_p`.
//! 6. One seeded draw picks among them (one draw per token, whatever the
//!    controls, so [`Sampler::resume`] stays exact).
//!
//! Log-probabilities, when asked for, are those of the model's own
//! distribution: the log-softmax of the raw logits, before penalties and
//! temperature.
//!
//! # Cost
//! llama.cpp's samplers sort the full vocabulary every token (about 5 ms
//! here for Gemma 3's 262,144 tokens). This one makes one pass for the
//! maximum and one for the normaliser, then finds the nucleus by partial
//! selection: it gathers the tokens within a few nats of the maximum, sorts
//! only those, and widens the window only when they do not yet reach the
//! mass. Top-k is one pass that takes a token only above the k-th largest
//! logit taken so far, then needs no normaliser (top-p renormalises over the
//! k). Min-p is a floor `T · ln min_p` below the maximum, so it only narrows
//! the window; when the window already holds everything min-p keeps, the
//! normaliser pass is skipped. With `top_p = 1` and no other cut, the draw
//! walks the vocabulary in index order. Log-probabilities cost a normaliser
//! pass on the raw logits and, for alternatives, a top-k pass.
//!
//! Biases and penalties never copy the vocabulary: the model's logits
//! buffer is borrowed from llama.cpp's context and left alone; the few
//! blocks of [`PATCH_BLOCK`] logits that hold a biased or penalised token
//! are copied and changed,
//! and every pass reads the model's slice between them. The sampler keeps
//! the sequence's history as a token → (in prompt, times generated) map,
//! and only while a penalty is on.
//!
//! # Layout
//! - this module: [`Sampler`] (controls, history, penalties), [`sample_all`],
//!   speculative [`Chain`]s ([`sample_chains`]);
//! - `select`: the cuts, the draw, the log-probabilities;
//! - `passes`: the vectorised passes over the vocabulary or a penalised view
//!   of it.

mod passes;
mod select;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use nanoinfer_proto::limits::SamplingControls;

use crate::grammar::Grammar;

pub use passes::{exp_neg, max_logit, weight_sum, PATCH_BLOCK};
pub use select::{argmax, draw, logprobs, nucleus, select_in};

use passes::View;
use select::select;

/// A small, fast, seedable generator (SplitMix64).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next number in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// One sampling decision.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Pick {
    /// The chosen token.
    pub token: u32,
    /// Its log-probability and the alternatives, when asked for.
    pub logprobs: Option<Logprobs>,
}

/// Log-probabilities at one position, under the model's distribution.
#[derive(Debug, Clone, PartialEq)]
pub struct Logprobs {
    /// The chosen token's (natural log).
    pub logprob: f32,
    /// The most likely tokens and theirs, most likely first (ties by id).
    pub top: Vec<(u32, f32)>,
}

/// What the sampler knows of a token it has seen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Seen {
    in_prompt: bool,
    generated: u32,
}

/// The penalties of a request (all on: the sampler keeps no history
/// otherwise).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Penalties {
    repetition: f32,
    presence: f32,
    frequency: f32,
}

impl Penalties {
    fn of(c: &SamplingControls) -> Option<Self> {
        let p = Self {
            repetition: c.repetition_penalty,
            presence: c.presence_penalty,
            frequency: c.frequency_penalty,
        };
        (p.repetition != 1.0 || p.presence != 0.0 || p.frequency != 0.0).then_some(p)
    }

    /// Logit `v` of a token seen as `seen`.
    #[inline]
    fn apply(&self, mut v: f32, seen: Seen) -> f32 {
        if self.repetition != 1.0 && (seen.in_prompt || seen.generated > 0) {
            v = if v > 0.0 {
                v / self.repetition
            } else {
                v * self.repetition
            };
        }
        if seen.generated > 0 {
            v -= self.presence + self.frequency * seen.generated as f32;
        }
        v
    }

    /// Whether a token seen as `seen` is changed at all.
    fn touches(&self, seen: Seen) -> bool {
        seen.generated > 0 || (seen.in_prompt && self.repetition != 1.0)
    }
}

/// Copies of the logits blocks that hold a penalised token, changed.
#[derive(Debug, Clone, Default)]
struct Patch {
    /// Block indices (of [`PATCH_BLOCK`] logits), ascending.
    blocks: Vec<u32>,
    /// Block `blocks[j]` at `j * PATCH_BLOCK`.
    scratch: Vec<f32>,
}

/// One request's sampler.
#[derive(Debug, Clone)]
pub struct Sampler {
    temperature: f32,
    top_p: f32,
    controls: SamplingControls,
    rng: Rng,
    candidates: Vec<(f64, u32)>,
    /// Set while a penalty is on: the tokens seen so far.
    penalties: Option<Penalties>,
    /// Token id → bias added to its logit first, sorted by id.
    bias: Vec<(u32, f32)>,
    /// Scratch: (token, changed logit) of one pick, sorted by token.
    touched: Vec<(u32, f32)>,
    history: BTreeMap<u32, Seen>,
    patch: Patch,
    /// The structured-output constraint, when there is one.
    grammar: Option<Grammar>,
    /// Scratch: the logits with the constraint's mask applied.
    masked: Vec<f32>,
}

impl Sampler {
    /// Greedy when `temperature` is 0; `top_p` in (0, 1]; no other control.
    pub fn new(temperature: f32, top_p: f32, seed: u64) -> Self {
        Self {
            temperature,
            top_p,
            controls: SamplingControls::default(),
            rng: Rng::new(seed),
            candidates: Vec::new(),
            penalties: None,
            bias: Vec::new(),
            touched: Vec::new(),
            history: BTreeMap::new(),
            patch: Patch::default(),
            grammar: None,
            masked: Vec::new(),
        }
    }

    /// The same with `controls` (already checked with
    /// [`SamplingControls::check`]). Feed the prompt with
    /// [`Sampler::prompt`] before sampling when a penalty is on.
    pub fn with_controls(mut self, controls: SamplingControls) -> Self {
        self.controls = controls;
        self.penalties = Penalties::of(&controls);
        self
    }

    /// The same with `bias` (token id → bias, sorted by id, ids in the
    /// vocabulary) added to those tokens' logits before the penalties and
    /// every cut; log-probabilities stay the model's own.
    pub fn with_bias(mut self, bias: Vec<(u32, f32)>) -> Self {
        self.bias = bias;
        self
    }

    /// The same constrained by `grammar`: only tokens it allows are picked
    /// (each pick advances it); log-probabilities stay the model's own.
    pub fn with_grammar(mut self, grammar: Option<Grammar>) -> Self {
        self.grammar = grammar;
        self
    }

    /// Whether it picks the most likely token (no randomness).
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// Whether a pick costs next to nothing (greedy with no penalty and no
    /// log-probabilities: one pass for the maximum), so not worth a thread.
    pub fn is_cheap(&self) -> bool {
        self.is_greedy()
            && self.penalties.is_none()
            && self.bias.is_empty()
            && self.grammar.is_none()
            && !self.controls.logprobs
    }

    /// Records the prompt's tokens (the repetition penalty counts them).
    pub fn prompt(&mut self, tokens: impl IntoIterator<Item = u32>) {
        if self.penalties.is_some_and(|p| p.repetition != 1.0) {
            for t in tokens {
                self.history.entry(t).or_default().in_prompt = true;
            }
        }
    }

    /// Takes up a request after `tokens` were generated elsewhere (a
    /// resumed request's): they count as generated for the penalties, and
    /// the random sequence advances one draw per token, so the next pick is
    /// the one the first worker would have made.
    pub fn resume(&mut self, tokens: &[u32]) {
        self.skip(tokens.len());
        for &t in tokens {
            self.record(t);
            if let Some(g) = &mut self.grammar {
                g.accept(t);
            }
        }
    }

    /// Advances the random sequence past `n` tokens sampled elsewhere:
    /// [`Sampler::pick`] takes exactly one draw per token when not greedy.
    pub fn skip(&mut self, n: usize) {
        if !self.is_greedy() {
            for _ in 0..n {
                self.rng.next_f64();
            }
        }
    }

    fn record(&mut self, token: u32) {
        if self.penalties.is_some() {
            self.history.entry(token).or_default().generated += 1;
        }
    }

    /// Picks the next token from `logits` (and records it as generated).
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        self.pick(logits).token
    }

    /// Picks the next token from `logits`, with its log-probabilities when
    /// the controls ask for them, and records it as generated.
    pub fn pick(&mut self, logits: &[f32]) -> Pick {
        let model = logits;
        // The constraint's copy (at most one vocabulary-sized buffer, kept
        // across picks) stands in for the model's logits below.
        let mut masked = std::mem::take(&mut self.masked);
        let logits = match &mut self.grammar {
            Some(g) => {
                g.mask(model, &mut masked);
                &masked[..]
            }
            None => model,
        };
        let patched = self.penalise(logits);
        let view = if patched {
            View {
                raw: logits,
                blocks: &self.patch.blocks,
                scratch: &self.patch.scratch,
            }
        } else {
            View::plain(logits)
        };
        let max = view.max();
        let token = if self.is_greedy() {
            view.first_at(max)
        } else {
            let c = &self.controls;
            let mass = select(
                &view,
                max,
                self.temperature,
                c.top_k,
                c.min_p,
                self.top_p,
                &mut self.candidates,
            );
            draw(&self.candidates, mass, self.rng.next_f64())
        };
        let logprobs = self.controls.logprobs.then(|| {
            let raw_max = if patched || self.grammar.is_some() {
                max_logit(model)
            } else {
                max
            };
            let top = self.controls.top_logprobs as usize;
            logprobs(model, raw_max, token, top, &mut self.candidates)
        });
        self.masked = masked;
        self.record(token);
        if let Some(g) = &mut self.grammar {
            g.accept(token);
        }
        Pick { token, logprobs }
    }

    /// Copies the blocks of the biased tokens and of the tokens seen so far
    /// and changes those logits (bias, then penalties); false when none
    /// changes.
    fn penalise(&mut self, logits: &[f32]) -> bool {
        if self.penalties.is_none() && self.bias.is_empty() {
            return false;
        }
        // Every changed token with its new logit, in token order: the
        // bias list and the history are both sorted, so one merge.
        let touched = &mut self.touched;
        touched.clear();
        let mut history = self
            .penalties
            .map(|_| self.history.iter().map(|(&t, &s)| (t, s)))
            .into_iter()
            .flatten()
            .peekable();
        let mut bias = self.bias.iter().copied().peekable();
        loop {
            let (token, b, seen) = match (bias.peek().copied(), history.peek().copied()) {
                (None, None) => break,
                (Some((bt, b)), Some((ht, seen))) if bt == ht => {
                    bias.next();
                    history.next();
                    (bt, b, seen)
                }
                (Some((bt, b)), h) if h.is_none_or(|(ht, _)| bt < ht) => {
                    bias.next();
                    (bt, b, Seen::default())
                }
                (_, Some((ht, seen))) => {
                    history.next();
                    (ht, 0.0, seen)
                }
                (Some(_), None) => unreachable!("taken by the arm above"),
            };
            let i = token as usize;
            if i >= logits.len() {
                continue;
            }
            let touches = self.penalties.is_some_and(|p| p.touches(seen));
            if b == 0.0 && !touches {
                continue;
            }
            let mut v = logits[i] + b;
            if let Some(p) = self.penalties {
                v = p.apply(v, seen);
            }
            touched.push((token, v));
        }
        let Patch { blocks, scratch } = &mut self.patch;
        blocks.clear();
        scratch.clear();
        for &(token, v) in touched.iter() {
            let i = token as usize;
            let b = (i / PATCH_BLOCK) as u32;
            if blocks.last() != Some(&b) {
                blocks.push(b);
                let start = i / PATCH_BLOCK * PATCH_BLOCK;
                let end = (start + PATCH_BLOCK).min(logits.len());
                scratch.extend_from_slice(&logits[start..end]);
                // The vocabulary's last block may be short: pad it.
                scratch.resize(blocks.len() * PATCH_BLOCK, f32::NEG_INFINITY);
            }
            let at = (blocks.len() - 1) * PATCH_BLOCK + i % PATCH_BLOCK;
            scratch[at] = v;
        }
        !blocks.is_empty()
    }
}

/// Picks for every `(sampler, logits, pick)` entry, writing into `pick`,
/// split over up to `threads` threads (the calling one included). The
/// sequences of one engine step are independent, so with free cores a step
/// with several sequences takes about 1/`threads` of the serial time.
pub fn sample_all(work: &mut [(&mut Sampler, &[f32], Pick)], threads: usize) {
    in_parallel(work, threads, &|(sampler, logits, pick)| {
        *pick = sampler.pick(logits)
    });
}

/// One sequence's picks over a speculative step: `logits[j]` are the
/// logits after the sequence's next token and `drafts[..j]`.
pub struct Chain<'a> {
    /// The sequence's sampler.
    pub sampler: &'a mut Sampler,
    /// One row per decoded position (`drafts.len() + 1` of them).
    pub logits: Vec<&'a [f32]>,
    /// The proposed tokens.
    pub drafts: Vec<u32>,
    /// Filled by [`sample_chains`].
    pub picks: Vec<Pick>,
}

impl Chain<'_> {
    /// Picks position by position while the pick is the proposed token:
    /// `picks[j]` for `j < picks.len() - 1` equal `drafts[j]`, and the last
    /// pick is the first that differs, or the one after every proposal.
    /// Each pick is what [`Sampler::pick`] gives without speculation (same
    /// state, same random draw), so the kept tokens are too.
    pub fn run(&mut self) {
        self.picks.clear();
        for (j, logits) in self.logits.iter().enumerate() {
            let pick = self.sampler.pick(logits);
            let agreed = self.drafts.get(j) == Some(&pick.token);
            self.picks.push(pick);
            if !agreed {
                break;
            }
        }
    }
}

/// [`Chain::run`] for every chain, split over up to `threads` threads as
/// [`sample_all`] does.
pub fn sample_chains(work: &mut [Chain<'_>], threads: usize) {
    in_parallel(work, threads, &|chain| chain.run());
}

fn in_parallel<T: Send>(work: &mut [T], threads: usize, f: &(dyn Fn(&mut T) + Sync)) {
    let threads = threads.clamp(1, work.len().max(1));
    if threads == 1 {
        work.iter_mut().for_each(f);
        return;
    }
    let per_thread = work.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let mut chunks = work.chunks_mut(per_thread);
        let mine = chunks.next();
        for chunk in chunks {
            scope.spawn(move || chunk.iter_mut().for_each(f));
        }
        if let Some(chunk) = mine {
            chunk.iter_mut().for_each(f);
        }
    });
}
