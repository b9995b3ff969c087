//! The passes over the vocabulary: the maximum, the normaliser, and the
//! gathering of the tokens above a floor, written so that the compiler
//! vectorises them, over the model's logits or a penalised [`View`] of them.

use std::cmp::Ordering;

/// Logits per copied block of a penalised view.
pub const PATCH_BLOCK: usize = 64;

/// Logits as the sampler sees them: the model's slice, with the copied
/// blocks of the sampler's patch in place of its own.
#[derive(Clone, Copy)]
pub(super) struct View<'a> {
    pub raw: &'a [f32],
    pub blocks: &'a [u32],
    pub scratch: &'a [f32],
}

impl<'a> View<'a> {
    pub fn plain(raw: &'a [f32]) -> Self {
        Self {
            raw,
            blocks: &[],
            scratch: &[],
        }
    }

    /// Calls `f(first index, logits)` over the vocabulary in order, in as
    /// few runs as the patch allows (one when there is none).
    #[inline]
    pub fn runs(&self, mut f: impl FnMut(usize, &[f32])) {
        let mut at = 0;
        for (j, &b) in self.blocks.iter().enumerate() {
            let start = b as usize * PATCH_BLOCK;
            let end = (start + PATCH_BLOCK).min(self.raw.len());
            if at < start {
                f(at, &self.raw[at..start]);
            }
            f(start, &self.scratch[j * PATCH_BLOCK..][..end - start]);
            at = end;
        }
        if at < self.raw.len() {
            f(at, &self.raw[at..]);
        }
    }

    pub fn max(&self) -> f32 {
        let mut max = f32::NEG_INFINITY;
        self.runs(|_, run| max = max.max(max_logit(run)));
        max
    }

    /// The first token whose logit is `max` (0 when `max` is -inf).
    pub fn first_at(&self, max: f32) -> u32 {
        if max == f32::NEG_INFINITY {
            return 0;
        }
        let mut found = None;
        self.runs(|base, run| {
            if found.is_none() {
                found = run.iter().position(|&v| v == max).map(|p| base + p);
            }
        });
        found.unwrap_or(0) as u32
    }

    /// The weights of every logit at or above `floor` (≥ `f32::MIN`).
    pub fn weight_sum(&self, max: f32, inv_t: f32, floor: f32) -> f64 {
        let mut total = 0.0;
        self.runs(|_, run| total += weight_sum_above(run, max, inv_t, floor));
        total
    }

    /// Fills `out` with (logit, token) for the `k` (≥ 1) largest logits at
    /// or above `floor`, most likely first (ties: the lower id), in one
    /// pass: a token is taken only above the k-th largest logit of those
    /// taken so far, which after the first blocks is almost none. (Windows
    /// below the maximum would gather half the vocabulary when the k-th
    /// token lies in its flat bulk.)
    pub fn top_k(&self, k: usize, floor: f32, out: &mut Vec<(f64, u32)>) {
        out.clear();
        // Taken: logits strictly above `bar`; at first, all at or above
        // `floor` (and never -inf or NaN).
        let mut bar = next_down(floor.max(f32::MIN));
        let cap = (2 * k).max(64);
        self.runs(|base, run| {
            for (c, chunk) in run.chunks(LANES).enumerate() {
                if !chunk.iter().fold(false, |any, &v| any | (v > bar)) {
                    continue;
                }
                for (j, &v) in chunk.iter().enumerate() {
                    if v > bar {
                        out.push((f64::from(v), (base + c * LANES + j) as u32));
                    }
                }
                if out.len() >= cap {
                    out.select_nth_unstable_by(k - 1, by_weight);
                    out.truncate(k);
                    // A later token equal to the k-th has a larger id, so
                    // it ranks below: strictly above is right.
                    bar = out[k - 1].0 as f32;
                }
            }
        });
        keep_first(out, k);
    }

    /// Fills `out` with (weight, token) for every logit at or above `floor`.
    pub fn gather(&self, floor: f32, out: &mut Vec<(f64, u32)>, weight: impl Fn(f32) -> f64) {
        out.clear();
        self.runs(|base, run| gather_run(run, base, floor, out, &weight));
    }
}

/// The next f32 below finite `x` (`f32::next_down`, newer than the MSRV).
pub(super) fn next_down(x: f32) -> f32 {
    let bits = x.to_bits();
    if x == 0.0 {
        -f32::from_bits(1)
    } else if x > 0.0 {
        f32::from_bits(bits - 1)
    } else {
        f32::from_bits(bits + 1)
    }
}

/// The next f32 above finite `x` (`f32::next_up`).
pub(super) fn next_up(x: f32) -> f32 {
    -next_down(-x)
}

/// Most likely first, ties by token id.
pub(super) fn by_weight(a: &(f64, u32), b: &(f64, u32)) -> Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

/// Keeps the `k` first of `out` by [`by_weight`], sorted, without sorting
/// the rest.
pub(super) fn keep_first(out: &mut Vec<(f64, u32)>, k: usize) {
    if out.len() > k {
        if k == 0 {
            out.clear();
            return;
        }
        out.select_nth_unstable_by(k - 1, by_weight);
        out.truncate(k);
    }
    out.sort_unstable_by(by_weight);
}

/// Appends (weight, token) for every logit of `run` (starting at token
/// `base`) at or above `floor` (never -inf), skipping blocks of `LANES` that
/// hold none, which is almost all of them.
#[inline]
pub(super) fn gather_run(
    run: &[f32],
    base: usize,
    floor: f32,
    out: &mut Vec<(f64, u32)>,
    weight: impl Fn(f32) -> f64,
) {
    let floor = floor.max(f32::MIN);
    for (c, chunk) in run.chunks(LANES).enumerate() {
        if !chunk.iter().fold(false, |any, &v| any | (v >= floor)) {
            continue;
        }
        for (k, &v) in chunk.iter().enumerate() {
            if v >= floor {
                out.push((weight(v), (base + c * LANES + k) as u32));
            }
        }
    }
}

/// Lanes of the vocabulary passes: independent accumulators that the
/// compiler turns into SIMD registers.
const LANES: usize = 8;

/// The largest logit, ignoring NaN (-inf when there is none).
pub fn max_logit(logits: &[f32]) -> f32 {
    let pick = |m: f32, v: f32| if v > m { v } else { m };
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = logits.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane = pick(*lane, v);
        }
    }
    rest.iter()
        .chain(lanes.iter())
        .fold(f32::NEG_INFINITY, |m, &v| pick(m, v))
}

/// The unnormalised probability of logit `v`: e^((v - max) / t), 0 below
/// `floor` (≥ `f32::MIN`, so also for -inf and NaN).
#[inline(always)]
fn weight_above(v: f32, max: f32, inv_t: f32, floor: f32) -> f32 {
    // Computed for every token and masked, not branched on, so that the
    // loops vectorise.
    let w = exp_neg((v - max) * inv_t);
    let keep = u32::from(v >= floor).wrapping_neg();
    f32::from_bits(w.to_bits() & keep)
}

/// [`weight_above`] with no floor.
#[inline(always)]
pub(super) fn weight(v: f32, max: f32, inv_t: f32) -> f32 {
    weight_above(v, max, inv_t, f32::MIN)
}

/// The sum of every token's weight. Blocks of `LANES` × 32 are summed in
/// f32 lanes (a relative error of a few 1e-7 at most), blocks in f64.
pub fn weight_sum(logits: &[f32], max: f32, inv_t: f32) -> f64 {
    weight_sum_above(logits, max, inv_t, f32::MIN)
}

/// The same over the tokens at or above `floor` (≥ `f32::MIN`).
pub(super) fn weight_sum_above(logits: &[f32], max: f32, inv_t: f32, floor: f32) -> f64 {
    let mut total = 0.0f64;
    for block in logits.chunks(LANES * 32) {
        let mut lanes = [0.0f32; LANES];
        let chunks = block.chunks_exact(LANES);
        let rest = chunks.remainder();
        for chunk in chunks {
            for (lane, &v) in lanes.iter_mut().zip(chunk) {
                *lane += weight_above(v, max, inv_t, floor);
            }
        }
        let rest: f32 = rest
            .iter()
            .map(|&v| weight_above(v, max, inv_t, floor))
            .sum();
        total += lanes.iter().map(|&l| f64::from(l)).sum::<f64>() + f64::from(rest);
    }
    total
}

/// e^x for x <= 0, to within 2 ulp of f32, without a libm call so that
/// loops over it vectorise. Below -87 it returns e^-87 (≈ 1.6e-38), which
/// weighs nothing next to the maximum's 1.
#[inline(always)]
pub fn exp_neg(x: f32) -> f32 {
    // x = n ln2 + r with |r| <= ln2 / 2; e^x = 2^n e^r.
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n * LN2_HI is exact for |n| < 2^12.
    const LN2_HI: f32 = f32::from_bits(0x3f31_7000); // 0.693115234375
    const LN2_LO: f32 = 3.194_618_5e-5;
    // Adding 1.5 * 2^23 rounds to an integer, held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 0.0);
    let shifted = x * LOG2_E + ROUND;
    let n = shifted - ROUND;
    let n_bits = shifted.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    // Taylor series of e^r to r^7 (error below r^8 / 8! ≈ 6e-9 on the range).
    let p = 1.0
        + r * (1.0
            + r * (1.0 / 2.0
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    let scale = f32::from_bits(((n_bits + 127) as u32) << 23);
    p * scale
}
