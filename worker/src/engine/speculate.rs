//! Draft-free speculation (prompt lookup): a decoding sequence proposes the
//! tokens that followed the last time its latest n-gram appeared in its own
//! context (prompt and generated tokens). The step decodes the proposals
//! beside the sequence's next token, with logits at every position; the
//! sampler then picks position by position and keeps the proposals it
//! agrees with ([`crate::sampler::pick_chain`]), so every kept token is the
//! one the sampler would have picked without speculation, from the same
//! random stream. The rejected proposals' KV cells are removed.
//!
//! Pure rules only (no llama.cpp state): [`propose`], when a proposed
//! position pays ([`SpecConfig::threshold`]) and each sequence's proposal
//! length and back-off ([`Adapt`]), unit-tested on plain values.

/// Speculation settings (`--draft-max`, `--spec-ngram-*`,
/// `--spec-step-ratio`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SpecConfig {
    /// Most tokens proposed per sequence and step (0: off).
    pub draft_max: usize,
    /// Longest n-gram looked up.
    pub ngram_max: usize,
    /// Shortest n-gram looked up.
    pub ngram_min: usize,
    /// What a decode step costs before its first position, in positions:
    /// a step of `rows` positions takes about `(ratio + rows) * r`. On a
    /// CPU with a small model a position is dear (Gemma 3 270M computes its
    /// 262,144-row output layer per position): measured here, a
    /// 1-position step 15 ms and a 9-position step 74 ms, so about 1. A
    /// fixed setting rather than a measurement taken while serving, so a
    /// request's proposals (and so its batch shapes) never depend on
    /// timing.
    pub step_ratio: f64,
}

impl SpecConfig {
    /// No speculation.
    pub const OFF: Self = Self {
        draft_max: 0,
        ngram_max: 0,
        ngram_min: 0,
        step_ratio: 1.0,
    };

    /// The chance of being kept that a proposed position needs to pay for
    /// itself in a step that decodes for `decoding` sequences: the tokens
    /// per second it adds (`p / r`) must beat the step's own
    /// (`decoding / ((ratio + decoding) * r)`).
    pub fn threshold(&self, decoding: usize) -> f64 {
        let n = decoding.max(1) as f64;
        n / (self.step_ratio + n)
    }

    /// Whether any token is ever proposed.
    pub fn enabled(&self) -> bool {
        self.draft_max > 0 && self.ngram_max >= self.ngram_min && self.ngram_min > 0
    }
}

/// What a sequence needs to decide its proposal in one step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SpecStep {
    /// The settings.
    pub config: SpecConfig,
    /// The chance of a keep a proposed position needs in this step
    /// ([`SpecConfig::threshold`]).
    pub threshold: f64,
}

/// The proposal for the context `history` followed by `last`: the tokens
/// after the most recent earlier occurrence of the context's final n-gram,
/// trying n from `ngram_max` down to `ngram_min`, at most `max` of them.
/// Empty when no n-gram recurs.
pub fn propose<T: Copy + PartialEq>(
    history: &[T],
    last: T,
    ngram_min: usize,
    ngram_max: usize,
    max: usize,
) -> Vec<T> {
    let len = history.len() + 1;
    let at = |i: usize| if i < history.len() { history[i] } else { last };
    if max == 0 || ngram_min == 0 {
        return Vec::new();
    }
    for n in (ngram_min..=ngram_max.min(len - 1)).rev() {
        let tail = len - n;
        // The most recent start before the tail itself.
        for start in (0..tail).rev() {
            if (0..n).all(|k| at(start + k) == at(tail + k)) {
                let from = start + n;
                let to = (from + max).min(len);
                if from < to {
                    return (from..to).map(at).collect();
                }
            }
        }
    }
    Vec::new()
}

/// One sequence's adaptation: an estimate of the chance that its next
/// proposed token is kept (a fading count of kept tokens over tries, each
/// proposal trying its kept tokens and the first rejected one), and from it
/// the proposal's length: position `i` is kept with chance `p^i`, so
/// propose while `p^i` beats the step's [`SpecConfig::threshold`]. Below
/// the threshold it only probes with one token, and after a proposal that
/// keeps nothing, or leaves the chance below the threshold, it waits 1, 2,
/// 4 … up to [`Adapt::MAX_WAIT`] steps before the next probe, so a text
/// with little to copy pays for few positions.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Adapt {
    kept: f64,
    tries: f64,
    misses: u32,
    wait: u32,
    /// The threshold of the step that proposed last.
    threshold: f64,
}

impl Default for Adapt {
    fn default() -> Self {
        Self {
            kept: 0.0,
            tries: 0.0,
            misses: 0,
            wait: 0,
            threshold: 0.0,
        }
    }
}

impl Adapt {
    /// Longest wait, in steps.
    pub const MAX_WAIT: u32 = 32;
    /// The estimate before any proposal: 3 kept of 4 tried.
    const PRIOR: (f64, f64) = (3.0, 4.0);
    const FADE: f64 = 0.9;

    /// The chance that the next proposed token is kept.
    pub fn chance(&self) -> f64 {
        (self.kept + Self::PRIOR.0) / (self.tries + Self::PRIOR.1)
    }

    /// How many tokens to propose at most this step, in a step whose
    /// proposed positions pay off when kept with chance above `threshold`
    /// (0: none; a step that proposes none counts down the wait).
    pub fn allowed(&mut self, max: usize, threshold: f64) -> usize {
        if self.wait > 0 {
            self.wait -= 1;
            return 0;
        }
        if max == 0 {
            return 0;
        }
        self.threshold = threshold;
        let p = self.chance();
        if p <= threshold {
            return 1;
        }
        if p >= 1.0 {
            return max;
        }
        ((threshold.ln() / p.ln()).floor() as usize).clamp(1, max)
    }

    /// A proposal of `proposed` tokens was verified: `kept` were kept.
    pub fn verified(&mut self, proposed: usize, kept: usize) {
        let tries = kept + usize::from(kept < proposed);
        self.kept = self.kept * Self::FADE + kept as f64;
        self.tries = self.tries * Self::FADE + tries as f64;
        // Nothing kept, or a probe that leaves the chance below what pays:
        // wait longer each time. A proposal that pays: go on.
        if kept == 0 || self.chance() <= self.threshold {
            self.misses = (self.misses + 1).min(6);
            self.wait = (1u32 << (self.misses - 1)).min(Self::MAX_WAIT);
        } else {
            self.misses = 0;
            self.wait = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_latest_ngram_proposes_what_followed_it() {
        // a b c d | a b -> c d (the bigram "a b" recurred).
        let h = [1, 2, 3, 4, 1];
        assert_eq!(propose(&h, 2, 1, 3, 8), vec![3, 4, 1, 2]);
        assert_eq!(propose(&h, 2, 1, 3, 2), vec![3, 4]);
        // The longest n-gram wins over a more recent shorter one: x y z
        // recurs at the start; "z" alone recurs later too.
        let h = [7, 8, 9, 5, 9, 6, 7, 8];
        assert_eq!(propose(&h, 9, 1, 3, 2), vec![5, 9]);
        // With only 1-grams allowed, the most recent earlier 9.
        assert_eq!(propose(&h, 9, 1, 1, 2), vec![6, 7]);
        // Nothing recurs: nothing proposed.
        assert!(propose(&[1, 2, 3], 4, 1, 3, 8).is_empty());
        assert!(propose(&[1, 2, 3], 4, 2, 3, 8).is_empty());
        // A run of one token proposes more of it.
        assert_eq!(propose(&[5, 5, 5], 5, 2, 3, 4), vec![5]);
        // Empty history, or off.
        assert!(propose(&[] as &[i32], 1, 1, 3, 8).is_empty());
        assert!(propose(&[1, 2, 1], 2, 1, 3, 0).is_empty());
    }

    #[test]
    fn lengths_follow_the_chance_of_a_keep_against_the_steps_cost() {
        let mut a = Adapt::default();
        // Prior 0.75: at one stream (threshold 0.5) two tokens; at four
        // (0.8) a one-token probe.
        assert_eq!(a.allowed(8, 0.5), 2);
        assert_eq!(a.allowed(8, 0.8), 1);
        // Everything kept: the chance nears 1 and the length the limit.
        for _ in 0..6 {
            let n = a.allowed(8, 0.5);
            a.verified(n, n);
        }
        assert!(a.chance() > 0.95, "{}", a.chance());
        assert_eq!(a.allowed(8, 0.5), 8);
        assert_eq!(a.allowed(5, 0.5), 5);
        // Half kept for a while: short proposals, none worth more than one
        // where the threshold is high.
        for _ in 0..20 {
            a.verified(2, 1);
        }
        // (The prior and what came before still weigh a little.)
        assert!((0.5..0.65).contains(&a.chance()), "{}", a.chance());
        assert_eq!(a.allowed(8, 0.8), 1);
        // A kept probe that leaves the chance below the threshold waits
        // too.
        a.verified(1, 1);
        assert_eq!(a.allowed(8, 0.8), 0);
        assert_eq!(a.allowed(8, 0.8), 1);
        // None kept: wait 2, then 4 steps.
        a.verified(1, 0);
        assert_eq!((a.allowed(8, 0.5), a.allowed(8, 0.5)), (0, 0));
        assert!(a.allowed(8, 0.5) >= 1);
        a.verified(1, 0);
        assert_eq!(
            (0..4).map(|_| a.allowed(8, 0.5)).collect::<Vec<_>>(),
            [0, 0, 0, 0]
        );
        for _ in 0..10 {
            a.verified(1, 0);
        }
        let waited = (0..100).take_while(|_| a.allowed(8, 0.5) == 0).count() as u32;
        assert_eq!(waited, Adapt::MAX_WAIT);
        // Kept tokens that bring the chance above the threshold end it.
        for _ in 0..8 {
            a.verified(4, 4);
        }
        assert!(a.allowed(8, 0.5) > 1);
    }

    #[test]
    fn a_position_must_pay_more_the_more_sequences_share_the_step() {
        let mut c = SpecConfig::OFF;
        assert!((c.threshold(1) - 0.5).abs() < 1e-9);
        assert!((c.threshold(4) - 0.8).abs() < 1e-9);
        // A big model: the weights dominate, positions are cheap.
        c.step_ratio = 16.0;
        assert!((c.threshold(1) - 1.0 / 17.0).abs() < 1e-9);
        assert!(c.threshold(8) < c.threshold(16));
    }
}
