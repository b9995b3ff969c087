//! Draft-free speculation (prompt lookup): a decoding sequence proposes the
//! tokens that followed the last time its latest n-gram appeared in its own
//! context (prompt and generated tokens). The step decodes the proposals
//! beside the sequence's next token, with logits at every position; the
//! sampler then picks position by position and keeps the proposals it
//! agrees with (`crate::sampler::sample_chains`), so every kept token is the
//! one the sampler would have picked without speculation, from the same
//! random stream. The rejected proposals' KV cells are removed.
//!
//! How many to propose is a trade of the step's measured cost against the
//! tokens a proposal is expected to keep: a step's cost grows with its rows
//! in steps (ggml multiplies rows in groups, and Gemma 3 270M computes its
//! 262,144-row output layer for every proposed position), so a proposal
//! only pays when it is long and likely kept. [`StepCost`] holds the cost
//! by rows (measured when the engine starts, `engine::calibrate`), [`Adapt`]
//! each sequence's chance of a keep and its back-off.
//!
//! Pure rules only (no llama.cpp state), unit-tested on plain values.

/// Speculation settings (`--draft-max`, `--spec-ngram-*`,
/// `--spec-step-ratio`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SpecConfig {
    /// Most tokens proposed per sequence and step (0: off).
    pub draft_max: usize,
    /// Longest n-gram looked up.
    pub ngram_max: usize,
    /// Shortest n-gram looked up: a shorter match proposes nothing (on
    /// text with little to copy, short matches are rarely followed as
    /// before).
    pub ngram_min: usize,
    /// A fixed model of a step's cost instead of a measured one: a step of
    /// `rows` positions costs `ratio + rows` position-times
    /// ([`StepCost::linear`]). `None`: measured when the engine starts.
    pub step_ratio: Option<f64>,
}

impl SpecConfig {
    /// No speculation.
    pub const OFF: Self = Self {
        draft_max: 0,
        ngram_max: 0,
        ngram_min: 0,
        step_ratio: None,
    };

    /// Whether any token is ever proposed.
    pub fn enabled(&self) -> bool {
        self.draft_max > 0 && self.ngram_max >= self.ngram_min && self.ngram_min > 0
    }
}

/// What a decode step costs by its rows (positions with logits), in any
/// unit (seconds when measured): points at [`StepCost::sample_rows`],
/// linear between them and past the last one.
#[derive(Debug, Clone, PartialEq)]
pub struct StepCost {
    /// `(rows, cost)`, rows ascending from 1, cost never falling.
    points: Vec<(usize, f64)>,
}

impl StepCost {
    /// The rows a step's cost is known at, up to `max_rows`: 1, 4, 8, then
    /// every 16, and `max_rows` itself. ggml multiplies rows in groups
    /// (of 4 in the repacked kernels, of 16 in wider tiles), so a step
    /// that fills its last group costs little more than one that does not:
    /// proposals are sized so the step ends on one of these.
    pub fn sample_rows(max_rows: usize) -> Vec<usize> {
        let mut rows: Vec<usize> = [1, 4, 8]
            .into_iter()
            .chain((1..).map(|k| 16 * k).take_while(|r| *r <= max_rows))
            .filter(|r| *r <= max_rows.max(1))
            .collect();
        if rows.last() != Some(&max_rows.max(1)) {
            rows.push(max_rows.max(1));
        }
        rows
    }

    /// A measured table (`(rows, cost)` at [`StepCost::sample_rows`]);
    /// noise that makes more rows cost less is flattened.
    pub fn measured(mut points: Vec<(usize, f64)>) -> Self {
        points.sort_by_key(|p| p.0);
        points.dedup_by_key(|p| p.0);
        let mut top = 0.0f64;
        for p in &mut points {
            top = top.max(p.1);
            p.1 = top;
        }
        assert!(
            points.first().is_some_and(|p| p.0 == 1),
            "a step cost table starts at 1 row"
        );
        Self { points }
    }

    /// The fixed model `ratio + rows` (`--spec-step-ratio`).
    pub fn linear(ratio: f64, max_rows: usize) -> Self {
        Self::measured(
            Self::sample_rows(max_rows.max(2))
                .into_iter()
                .map(|r| (r, ratio + r as f64))
                .collect(),
        )
    }

    /// The cost of a step of `rows` rows.
    pub fn cost(&self, rows: usize) -> f64 {
        let rows = rows.max(1);
        let x = rows as f64;
        let at = self.points.partition_point(|p| p.0 < rows);
        if at < self.points.len() && self.points[at].0 == rows {
            return self.points[at].1;
        }
        // Between two points, or past the last one (its segment's slope).
        let (lo, hi) = if at == self.points.len() {
            if self.points.len() == 1 {
                return self.points[0].1 * x;
            }
            (self.points[at - 2], self.points[at - 1])
        } else {
            (self.points[at - 1], self.points[at])
        };
        let slope = (hi.1 - lo.1) / (hi.0 - lo.0) as f64;
        lo.1 + slope * (x - lo.0 as f64)
    }

    /// The rows the table knows.
    pub fn rows(&self) -> impl Iterator<Item = usize> + '_ {
        self.points.iter().map(|p| p.0)
    }

    /// The table's points, for logs.
    pub fn points(&self) -> &[(usize, f64)] {
        &self.points
    }
}

/// One step's proposals being decided, sequence by sequence: what the step
/// holds so far.
#[derive(Debug)]
pub struct SpecStep<'a> {
    /// The settings.
    pub config: SpecConfig,
    /// The cost of a step by rows.
    pub cost: &'a StepCost,
    /// Rows the step holds so far: every decoding sequence's next token,
    /// prompt rows, and the proposals decided before.
    pub rows: usize,
    /// Tokens the step is expected to yield so far: one per decoding
    /// sequence and what the proposals decided before are expected to
    /// keep.
    pub tokens: f64,
    /// A draft model proposes where a sequence's context has nothing to
    /// copy.
    pub drafter: bool,
}

/// The proposal for the context `history` followed by `last`: the tokens
/// after the most recent earlier occurrence of the context's longest final
/// n-gram (`ngram_min..=ngram_max` tokens long), at most `max` of them.
/// Empty when no n-gram of at least `ngram_min` tokens recurs.
pub fn propose<T: Copy + PartialEq>(
    history: &[T],
    last: T,
    ngram_min: usize,
    ngram_max: usize,
    max: usize,
) -> Vec<T> {
    let len = history.len() + 1;
    let at = |i: usize| if i < history.len() { history[i] } else { last };
    if max == 0 || ngram_min == 0 || ngram_max < ngram_min {
        return Vec::new();
    }
    // One pass over the earlier ends `end` (the proposal starts there),
    // most recent first: how many tokens before `end` equal the context's
    // last ones. The longest run wins; among equals, the most recent.
    let (mut best, mut best_end) = (0, 0);
    for end in (1..len).rev() {
        let mut n = 0;
        while n < ngram_max && n < end && at(end - 1 - n) == at(len - 1 - n) {
            n += 1;
        }
        if n > best {
            (best, best_end) = (n, end);
            if n == ngram_max {
                break;
            }
        }
    }
    if best < ngram_min {
        return Vec::new();
    }
    (best_end..(best_end + max).min(len)).map(at).collect()
}

/// The tokens a step yields for a sequence that proposes `k` tokens each
/// kept with chance `p` given the ones before: its own token and the kept
/// run, `1 + p + … + p^k`.
fn expected(p: f64, k: usize) -> f64 {
    if p >= 1.0 {
        return (k + 1) as f64;
    }
    (1.0 - p.powi(k as i32 + 1)) / (1.0 - p)
}

/// One sequence's adaptation: an estimate of the chance that its next
/// proposed token is kept (a fading count of kept tokens over tries, each
/// proposal trying its kept tokens and the first rejected one), and from it
/// the proposal's length ([`Adapt::choose`]): the one that most raises the
/// step's expected tokens per cost, if any raises it. When none would pay
/// even alone in its step, it probes with the shortest length, and after a
/// probe or a proposal that keeps nothing it waits 1, 2, 4 … up to
/// [`Adapt::MAX_WAIT`] steps before the next, so a text with little to
/// copy pays for few positions.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Adapt {
    kept: f64,
    tries: f64,
    misses: u32,
    wait: u32,
    /// The last proposal was a probe.
    probe: bool,
}

impl Default for Adapt {
    fn default() -> Self {
        Self {
            kept: 0.0,
            tries: 0.0,
            misses: 0,
            wait: 0,
            probe: false,
        }
    }
}

impl Adapt {
    /// Longest wait, in steps.
    pub const MAX_WAIT: u32 = 32;
    /// The estimate before any proposal: 9 kept of 10 tried (a match of
    /// `--spec-ngram-min` tokens or more is usually followed as before).
    const PRIOR: (f64, f64) = (9.0, 10.0);
    const FADE: f64 = 0.9;

    /// The chance that the next proposed token is kept.
    pub fn chance(&self) -> f64 {
        (self.kept + Self::PRIOR.0) / (self.tries + Self::PRIOR.1)
    }

    /// Whether the sequence sits this step out (counting its wait down).
    pub fn waiting(&mut self) -> bool {
        if self.wait > 0 {
            self.wait -= 1;
            return true;
        }
        false
    }

    /// How many of `available` proposed tokens to verify in `step` (0:
    /// none), added to the step's rows and expected tokens.
    pub fn choose(&mut self, available: usize, step: &mut SpecStep<'_>) -> usize {
        if available == 0 {
            return 0;
        }
        let p = self.chance();
        let best = |rows: usize, tokens: f64| {
            let base = tokens / step.cost.cost(rows);
            // Lengths that end the step on a known row count, and all.
            let mut best: Option<(usize, f64)> = None;
            for k in step
                .cost
                .rows()
                .filter(|&r| r > rows)
                .map(|r| r - rows)
                .filter(|&k| k < available)
                .chain([available])
            {
                let rate = (tokens + expected(p, k) - 1.0) / step.cost.cost(rows + k);
                if rate > base && best.is_none_or(|b| rate > b.1) {
                    best = Some((k, rate));
                }
            }
            best.map(|b| b.0)
        };
        let k = match best(step.rows, step.tokens) {
            Some(k) => {
                self.probe = false;
                k
            }
            // Nothing pays beside this step's other rows, but would alone:
            // leave it to the others.
            None if best(1, 1.0).is_some() => return 0,
            // Nothing pays even alone: probe with the shortest length.
            None => {
                self.probe = true;
                step.cost
                    .rows()
                    .find(|&r| r > 1)
                    .map_or(available, |r| r - 1)
                    .min(available)
            }
        };
        step.rows += k;
        step.tokens += expected(p, k) - 1.0;
        k
    }

    /// A proposal of `proposed` tokens was verified: `kept` were kept.
    pub fn verified(&mut self, proposed: usize, kept: usize) {
        let tries = kept + usize::from(kept < proposed);
        self.kept = self.kept * Self::FADE + kept as f64;
        self.tries = self.tries * Self::FADE + tries as f64;
        // Nothing kept, or a probe: wait longer each time. A proposal that
        // pays: go on.
        if kept == 0 || self.probe {
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
    fn the_longest_match_is_needed_to_propose() {
        // "1 2 3" recurs: with n-grams of 3 needed, proposed; of 4, not.
        let h = [1, 2, 3, 9, 8, 1, 2];
        assert_eq!(propose(&h, 3, 3, 8, 4), vec![9, 8, 1, 2]);
        assert!(propose(&h, 3, 4, 8, 4).is_empty());
        // The longest wins even when a shorter one is more recent, and a
        // run longer than ngram_max counts as ngram_max.
        let h = [4, 5, 6, 7, 0, 6, 1, 4, 5, 6];
        assert_eq!(propose(&h, 7, 1, 2, 1), vec![0]);
        assert_eq!(propose(&h, 7, 1, 8, 3), vec![0, 6, 1]);
    }

    /// The cost table measured here (Gemma 3 270M, 2 threads, ms).
    fn measured() -> StepCost {
        StepCost::measured(vec![
            (1, 11.4),
            (4, 41.0),
            (8, 65.0),
            (16, 78.0),
            (32, 142.0),
            (48, 233.0),
        ])
    }

    #[test]
    fn the_cost_table_is_linear_between_and_past_its_points() {
        assert_eq!(StepCost::sample_rows(48), [1, 4, 8, 16, 32, 48]);
        assert_eq!(StepCost::sample_rows(20), [1, 4, 8, 16, 20]);
        assert_eq!(StepCost::sample_rows(2), [1, 2]);
        assert_eq!(StepCost::sample_rows(0), [1]);
        let c = measured();
        assert_eq!(c.cost(16), 78.0);
        assert!((c.cost(12) - 71.5).abs() < 1e-9);
        // Past the last point: the last segment's slope.
        assert!((c.cost(64) - (233.0 + 91.0)).abs() < 1e-9);
        // Noise that makes more rows cheaper is flattened.
        let c = StepCost::measured(vec![(4, 30.0), (1, 10.0), (8, 25.0)]);
        assert_eq!(c.cost(8), 30.0);
        let l = StepCost::linear(1.0, 16);
        assert_eq!((l.cost(1), l.cost(16), l.cost(32)), (2.0, 17.0, 33.0));
    }

    fn step(cost: &StepCost, rows: usize, tokens: f64) -> SpecStep<'_> {
        SpecStep {
            config: SpecConfig::OFF,
            cost,
            rows,
            tokens,
            drafter: false,
        }
    }

    #[test]
    fn a_proposal_fills_the_length_that_pays_best() {
        let c = measured();
        let mut a = Adapt::default();
        // Prior 0.9 alone in its step: 15 tokens (16 rows: 8.1 expected
        // for 78 against 1 for 11.4), so the step ends on a known row
        // count; fewer when fewer are available.
        let mut s = step(&c, 1, 1.0);
        assert_eq!(a.choose(40, &mut s), 15);
        assert_eq!((s.rows, (s.tokens * 10.0).round()), (16, 81.0));
        assert_eq!(a.choose(9, &mut step(&c, 1, 1.0)), 9);
        // Everything kept for a while: 31 (32 rows: 4.4 per token here),
        // not 47 (48 rows cost 4.9 per token).
        for _ in 0..20 {
            a.verified(47, 47);
        }
        assert!(a.chance() > 0.99, "{}", a.chance());
        assert_eq!(a.choose(100, &mut step(&c, 1, 1.0)), 31);
        // Beside three other decoding sequences (4 rows): the proposal
        // ends the step on a known count; a second sequence may then find
        // nothing that pays and leave the step to the first without a
        // wait.
        let mut s = step(&c, 4, 4.0);
        let k = a.choose(100, &mut s);
        assert!([4, 12, 28, 44].contains(&k), "{k}");
        let mut b = Adapt::default();
        b.verified(15, 12);
        b.verified(15, 11);
        assert_eq!(b.choose(40, &mut s), 0);
        assert!(!b.waiting());
    }

    #[test]
    fn a_sequence_whose_proposals_fail_probes_rarely() {
        let c = measured();
        let mut a = Adapt::default();
        // Half kept: nothing pays, so a probe of 3 (4 rows), then waits
        // of 1, 2, 4 … up to the longest.
        for _ in 0..10 {
            a.verified(8, 1);
        }
        assert!(a.chance() < 0.7, "{}", a.chance());
        assert_eq!(a.choose(40, &mut step(&c, 1, 1.0)), 3);
        a.verified(3, 1);
        assert!(a.waiting());
        assert!(!a.waiting());
        assert_eq!(a.choose(40, &mut step(&c, 1, 1.0)), 3);
        a.verified(3, 0);
        assert_eq!((0..3).filter(|_| a.waiting()).count(), 2);
        for _ in 0..10 {
            a.choose(40, &mut step(&c, 1, 1.0));
            a.verified(3, 0);
        }
        let waited = (0..100).take_while(|_| a.waiting()).count() as u32;
        assert_eq!(waited, Adapt::MAX_WAIT);
        // Proposals kept in full bring the chance back: they pay again.
        for _ in 0..20 {
            a.verified(15, 15);
        }
        assert!(a.choose(40, &mut step(&c, 1, 1.0)) >= 15);
    }

    #[test]
    fn a_proposal_in_a_prompt_step_is_nearly_free() {
        // Beside a 256-row prompt chunk the proposal's rows cost little
        // against the step: even a modest chance proposes all it has.
        let c = measured();
        let mut a = Adapt::default();
        for _ in 0..10 {
            a.verified(8, 4);
        }
        assert_eq!(a.choose(30, &mut step(&c, 257, 1.0)), 30);
    }
}
