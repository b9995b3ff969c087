//! Draft-free speculation (prompt lookup): a decoding sequence proposes the
//! tokens that followed the last time its latest n-gram appeared in its own
//! context (prompt and generated tokens). The step decodes the proposals
//! beside the sequence's next token, with logits at every position; the
//! sampler then picks position by position and keeps the proposals it
//! agrees with ([`crate::sampler::pick_chain`]), so every kept token is the
//! one the sampler would have picked without speculation, from the same
//! random stream. The rejected proposals' KV cells are removed.
//!
//! Pure rules only (no llama.cpp state): [`propose`] and the per-sequence
//! back-off ([`Adapt`]), unit-tested on plain values.

/// Speculation settings (`--speculate`, `--draft-max`, `--spec-ngram-*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecConfig {
    /// Most tokens proposed per sequence and step (0: off).
    pub draft_max: usize,
    /// Longest n-gram looked up.
    pub ngram_max: usize,
    /// Shortest n-gram looked up.
    pub ngram_min: usize,
}

impl SpecConfig {
    /// No speculation.
    pub const OFF: Self = Self {
        draft_max: 0,
        ngram_max: 0,
        ngram_min: 0,
    };

    /// Whether any token is ever proposed.
    pub fn enabled(&self) -> bool {
        self.draft_max > 0 && self.ngram_max >= self.ngram_min && self.ngram_min > 0
    }
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

/// One sequence's adaptation. A proposed position costs a good part of a
/// step (Gemma 3 270M here: a step of 9 positions took about 5 times a
/// one-token step, its 262,144-row output layer computed for each), so a
/// proposal pays only when most of it is kept. The length allowed starts at
/// [`Adapt::START`], doubles (up to the limit) when a whole proposal is
/// kept, and falls to what was kept when part of it is. After a proposal of
/// which nothing was kept, the sequence waits 1, 2, 4 … up to
/// [`Adapt::MAX_WAIT`] steps before proposing again, so a text with nothing
/// to copy pays for few wasted positions; any kept token resets the wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Adapt {
    misses: u32,
    wait: u32,
    len: usize,
}

impl Default for Adapt {
    fn default() -> Self {
        Self {
            misses: 0,
            wait: 0,
            len: Self::START,
        }
    }
}

impl Adapt {
    /// Longest wait, in steps.
    pub const MAX_WAIT: u32 = 32;
    /// The first proposal's length at most.
    pub const START: usize = 4;

    /// How many tokens to propose at most this step (0: none; a step that
    /// proposes none counts down the wait).
    pub fn allowed(&mut self, max: usize) -> usize {
        if self.wait > 0 {
            self.wait -= 1;
            return 0;
        }
        self.len.min(max)
    }

    /// A proposal of `proposed` tokens was verified: `kept` were kept.
    pub fn verified(&mut self, proposed: usize, kept: usize) {
        if kept == 0 {
            self.misses = (self.misses + 1).min(6);
            self.wait = (1u32 << (self.misses - 1)).min(Self::MAX_WAIT);
            self.len = 1;
            return;
        }
        self.misses = 0;
        self.wait = 0;
        self.len = if kept == proposed {
            (proposed * 2).max(self.len)
        } else {
            kept
        };
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
    fn misses_back_off_and_lengths_follow_what_is_kept() {
        let mut a = Adapt::default();
        assert_eq!(a.allowed(8), Adapt::START);
        // All kept: twice as many next time, within the limit.
        a.verified(4, 4);
        assert_eq!(a.allowed(8), 8);
        assert_eq!(a.allowed(5), 5);
        // Part kept: only that many next time.
        a.verified(8, 3);
        assert_eq!(a.allowed(8), 3);
        // None kept: wait 1, then 2 steps, proposing one token.
        a.verified(3, 0);
        assert_eq!(a.allowed(8), 0);
        assert_eq!(a.allowed(8), 1);
        a.verified(1, 0);
        assert_eq!((a.allowed(8), a.allowed(8)), (0, 0));
        assert_eq!(a.allowed(8), 1);
        for _ in 0..10 {
            a.verified(1, 0);
        }
        let waited = (0..100).take_while(|_| a.allowed(8) == 0).count() as u32;
        assert_eq!(waited, Adapt::MAX_WAIT);
        // A kept token resets the wait; a whole proposal kept grows it.
        a.verified(1, 1);
        assert_eq!(a.allowed(8), 2);
    }
}
