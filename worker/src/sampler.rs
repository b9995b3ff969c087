//! Token sampling on raw logits: greedy, or temperature → top-p → a seeded
//! draw, exact over the whole vocabulary and cheap on a 262k-token one.
//!
//! llama.cpp's top-p sampler sorts the full vocabulary every token (about
//! 5 ms here for Gemma 3's 262,144 tokens). This one makes one pass for the
//! maximum and one for the normaliser, then finds the nucleus by partial
//! selection: it gathers the tokens within a few nats of the maximum, sorts
//! only those, and widens the window only when they do not yet reach the
//! mass. Top-p keeps its meaning: the smallest set of most likely tokens
//! whose probability reaches `top_p` of the whole distribution. With
//! `top_p = 1` nothing is cut and the draw walks the vocabulary in order.

/// Widening windows (in nats below the maximum) for the nucleus search.
const WINDOWS: [f32; 5] = [4.0, 8.0, 16.0, 32.0, f32::INFINITY];

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

/// One request's sampler.
#[derive(Debug, Clone)]
pub struct Sampler {
    temperature: f32,
    top_p: f32,
    rng: Rng,
    candidates: Vec<(f64, u32)>,
}

impl Sampler {
    /// Greedy when `temperature` is 0; `top_p` in (0, 1].
    pub fn new(temperature: f32, top_p: f32, seed: u64) -> Self {
        Self {
            temperature,
            top_p,
            rng: Rng::new(seed),
            candidates: Vec::new(),
        }
    }

    /// Whether it picks the most likely token (no randomness, next to no
    /// work).
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// Advances the random sequence past `n` tokens sampled elsewhere (a
    /// resumed request's): [`Sampler::sample`] takes exactly one draw per
    /// token when not greedy, so the next pick uses the same draw it would
    /// have had on the first worker.
    pub fn skip(&mut self, n: usize) {
        if !self.is_greedy() {
            for _ in 0..n {
                self.rng.next_f64();
            }
        }
    }

    /// Picks the next token from `logits`.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.temperature == 0.0 {
            return argmax(logits);
        }
        let mass = nucleus(logits, self.temperature, self.top_p, &mut self.candidates);
        draw(&self.candidates, mass, self.rng.next_f64())
    }
}

/// Samples every `(sampler, logits, token)` entry, writing the pick into
/// `token`, split over up to `threads` threads (the calling one included).
/// The sequences of one engine step are independent, so with free cores a
/// step with several sequences takes about 1/`threads` of the serial time.
pub fn sample_all(work: &mut [(&mut Sampler, &[f32], u32)], threads: usize) {
    let threads = threads.clamp(1, work.len().max(1));
    if threads == 1 {
        for (sampler, logits, token) in work.iter_mut() {
            *token = sampler.sample(logits);
        }
        return;
    }
    let per_thread = work.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let mut chunks = work.chunks_mut(per_thread);
        let mine = chunks.next();
        for chunk in chunks {
            scope.spawn(move || sample_all(chunk, 1));
        }
        if let Some(chunk) = mine {
            sample_all(chunk, 1);
        }
    });
}

/// Index of the largest logit (the first of equals; NaN never wins).
pub fn argmax(logits: &[f32]) -> u32 {
    // A vectorised pass for the maximum, then a search for its first place.
    let max = max_logit(logits);
    if max == f32::NEG_INFINITY {
        return 0;
    }
    logits.iter().position(|&v| v == max).unwrap_or(0) as u32
}

/// Fills `out` with the nucleus — (unnormalised probability, token), most
/// likely first — and returns its total weight. With `top_p >= 1`, `out`
/// holds the whole vocabulary in index order.
pub fn nucleus(logits: &[f32], temperature: f32, top_p: f32, out: &mut Vec<(f64, u32)>) -> f64 {
    let inv_t = 1.0 / temperature;
    let max = max_logit(logits);
    out.clear();
    if !max.is_finite() {
        out.push((1.0, argmax(logits)));
        return 1.0;
    }
    let weight = |v: f32| f64::from(weight(v, max, inv_t));
    if top_p >= 1.0 {
        let mut total = 0.0;
        for (i, &v) in logits.iter().enumerate() {
            if v > f32::NEG_INFINITY {
                let w = weight(v);
                total += w;
                out.push((w, i as u32));
            }
        }
        return total;
    }
    // The normaliser, over everything (NaN and -inf weigh nothing).
    let total = weight_sum(logits, max, inv_t);
    let target = f64::from(top_p) * total;
    for window in WINDOWS {
        let floor = max - window * temperature;
        gather(logits, floor, out, weight);
        out.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let mut mass = 0.0;
        let mut keep = 0;
        for &(w, _) in out.iter() {
            mass += w;
            keep += 1;
            if mass >= target {
                out.truncate(keep);
                return mass;
            }
        }
        if window.is_infinite() {
            // Rounding kept the sum just short of the target: take it all.
            return mass;
        }
    }
    unreachable!("the last window takes every token")
}

/// Fills `out` with (weight, token) for every logit at or above `floor`
/// (never -inf), skipping blocks of `LANES` that hold none, which is almost
/// all of them.
fn gather(logits: &[f32], floor: f32, out: &mut Vec<(f64, u32)>, weight: impl Fn(f32) -> f64) {
    out.clear();
    let floor = floor.max(f32::MIN);
    for (c, chunk) in logits.chunks(LANES).enumerate() {
        if !chunk.iter().fold(false, |any, &v| any | (v >= floor)) {
            continue;
        }
        for (k, &v) in chunk.iter().enumerate() {
            if v >= floor {
                out.push((weight(v), (c * LANES + k) as u32));
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

/// The unnormalised probability of logit `v`: e^((v - max) / t), 0 for
/// -inf and NaN.
#[inline(always)]
fn weight(v: f32, max: f32, inv_t: f32) -> f32 {
    // Computed for every token and masked, not branched on, so that the
    // loops vectorise.
    let w = exp_neg((v - max) * inv_t);
    let keep = u32::from(v > f32::NEG_INFINITY).wrapping_neg();
    f32::from_bits(w.to_bits() & keep)
}

/// The sum of every token's weight. Blocks of `LANES` × 32 are summed in
/// f32 lanes (a relative error of a few 1e-7 at most), blocks in f64.
pub fn weight_sum(logits: &[f32], max: f32, inv_t: f32) -> f64 {
    let mut total = 0.0f64;
    for block in logits.chunks(LANES * 32) {
        let mut lanes = [0.0f32; LANES];
        let chunks = block.chunks_exact(LANES);
        let rest = chunks.remainder();
        for chunk in chunks {
            for (lane, &v) in lanes.iter_mut().zip(chunk) {
                *lane += weight(v, max, inv_t);
            }
        }
        let rest: f32 = rest.iter().map(|&v| weight(v, max, inv_t)).sum();
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

/// The token at cumulative weight `u * mass` in `candidates`.
pub fn draw(candidates: &[(f64, u32)], mass: f64, u: f64) -> u32 {
    let target = u * mass;
    let mut acc = 0.0;
    for &(w, token) in candidates {
        acc += w;
        if target < acc {
            return token;
        }
    }
    candidates.last().map_or(0, |c| c.1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The textbook definition: softmax over everything, full sort, top-p,
    /// inverse-CDF draw.
    fn reference(logits: &[f32], t: f32, p: f32, u: f64) -> u32 {
        let z: Vec<f64> = logits
            .iter()
            .map(|&l| f64::from(l) / f64::from(t))
            .collect();
        let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = z.iter().map(|&x| (x - m).exp()).collect();
        let s: f64 = e.iter().sum();
        let mut probs: Vec<(f64, u32)> = e
            .iter()
            .enumerate()
            .map(|(i, &x)| (x / s, i as u32))
            .collect();
        probs.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let mut kept = Vec::new();
        let mut mass = 0.0;
        for (q, i) in probs {
            kept.push((q, i));
            mass += q;
            if mass >= f64::from(p) {
                break;
            }
        }
        let target = u * mass;
        let mut acc = 0.0;
        for &(q, i) in &kept {
            acc += q;
            if target < acc {
                return i;
            }
        }
        kept.last().unwrap().1
    }

    fn random_logits(rng: &mut Rng, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| (rng.next_f64() as f32 - 0.5) * scale)
            .collect()
    }

    #[test]
    fn matches_the_reference_on_random_logits() {
        let mut rng = Rng::new(7);
        let mut buf = Vec::new();
        for case in 0..200 {
            let logits = random_logits(&mut rng, 2000, 4.0 + (case % 5) as f32 * 6.0);
            let t = [0.3f32, 0.7, 1.0, 1.5][case % 4];
            let p = [0.5f32, 0.9, 0.95, 0.99][case / 4 % 4];
            let u = rng.next_f64();
            let mass = nucleus(&logits, t, p, &mut buf);
            assert_eq!(
                draw(&buf, mass, u),
                reference(&logits, t, p, u),
                "case {case}"
            );
        }
    }

    #[test]
    fn fast_exp_is_within_a_few_ulp() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x <= 0.0 {
            let got = f64::from(exp_neg(x));
            let want = f64::from(x).exp();
            worst = worst.max((got - want).abs() / want);
            x += 0.000_37;
        }
        assert!(
            worst < 3.0 * f64::from(f32::EPSILON),
            "relative error {worst}"
        );
        assert_eq!(exp_neg(0.0), 1.0);
        assert!(exp_neg(-1000.0) < 1e-37);
        assert!(exp_neg(f32::NEG_INFINITY) < 1e-37);
    }

    #[test]
    fn max_and_normaliser_match_plain_loops() {
        let mut rng = Rng::new(5);
        for n in [1usize, 7, 8, 9, 255, 256, 257, 10_001] {
            let mut logits = random_logits(&mut rng, n, 30.0);
            if n > 2 {
                logits[n / 2] = f32::NAN;
                logits[1] = f32::NEG_INFINITY;
            }
            let plain_max = logits
                .iter()
                .copied()
                .filter(|v| !v.is_nan())
                .fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max_logit(&logits), plain_max, "n={n}");
            let plain: f64 = logits
                .iter()
                .filter(|v| **v > f32::NEG_INFINITY)
                .map(|&v| (f64::from(v - plain_max) / 0.7).exp())
                .sum();
            let fast = weight_sum(&logits, plain_max, 1.0 / 0.7);
            assert!(
                (fast - plain).abs() / plain < 1e-6,
                "n={n}: {fast} vs {plain}"
            );
        }
        assert_eq!(max_logit(&[f32::NAN]), f32::NEG_INFINITY);
    }

    #[test]
    fn greedy_is_argmax_and_ignores_nan() {
        assert_eq!(argmax(&[0.1, 3.0, f32::NAN, 2.0]), 1);
        assert_eq!(argmax(&[0.1, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[f32::NAN, f32::NEG_INFINITY]), 0);
        let mut s = Sampler::new(0.0, 0.5, 1);
        assert_eq!(s.sample(&[1.0, 5.0, 2.0]), 1);
    }

    #[test]
    fn skipping_continues_the_same_random_sequence() {
        let mut rng = Rng::new(11);
        let logits = random_logits(&mut rng, 500, 6.0);
        let mut whole = Sampler::new(0.9, 0.95, 42);
        let picks: Vec<u32> = (0..8).map(|_| whole.sample(&logits)).collect();
        // Three tokens came from another worker: the rest match.
        let mut resumed = Sampler::new(0.9, 0.95, 42);
        resumed.skip(3);
        let rest: Vec<u32> = (0..5).map(|_| resumed.sample(&logits)).collect();
        assert_eq!(rest, picks[3..]);
        // Greedy sampling has no random sequence to advance.
        let mut greedy = Sampler::new(0.0, 1.0, 42);
        greedy.skip(3);
        assert_eq!(greedy.sample(&logits), argmax(&logits));
    }

    #[test]
    fn same_seed_same_tokens() {
        let mut rng = Rng::new(3);
        let logits = random_logits(&mut rng, 1000, 8.0);
        let run = |seed| {
            let mut s = Sampler::new(0.8, 0.95, seed);
            (0..50).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(run(11), run(11));
        assert_ne!(run(11), run(12));
    }

    #[test]
    fn draws_follow_the_distribution() {
        // Three tokens with probabilities 0.5, 0.3, 0.2 and a long tail cut
        // by top-p = 0.9 of the whole distribution.
        let mut logits = vec![f32::NEG_INFINITY; 100];
        let probs = [0.5f64, 0.3, 0.15, 0.05];
        for (i, p) in probs.iter().enumerate() {
            logits[i] = p.ln() as f32;
        }
        let mut s = Sampler::new(1.0, 0.9, 5);
        let n = 200_000;
        let mut counts = [0u32; 4];
        for _ in 0..n {
            counts[s.sample(&logits) as usize] += 1;
        }
        // Nucleus = {0, 1, 2} (0.5 + 0.3 + 0.15 = 0.95 ≥ 0.9), renormalised.
        assert_eq!(counts[3], 0, "outside the nucleus");
        for (i, expected) in [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95].iter().enumerate() {
            let got = f64::from(counts[i]) / f64::from(n);
            assert!(
                (got - expected).abs() < 0.01,
                "token {i}: {got} vs {expected}"
            );
        }
    }

    #[test]
    fn a_realistic_vocabulary_matches_the_reference() {
        // 262,144 logits like a language model's: a few high, most far below.
        let mut rng = Rng::new(9);
        let mut logits = random_logits(&mut rng, 262_144, 20.0);
        logits[1234] = 25.0;
        logits[99] = 23.5;
        let mut buf = Vec::new();
        for i in 0..20 {
            let u = i as f64 / 20.0;
            let mass = nucleus(&logits, 0.8, 0.95, &mut buf);
            assert_eq!(draw(&buf, mass, u), reference(&logits, 0.8, 0.95, u));
        }
        assert!(buf.len() < 262_144, "the nucleus is a small part");
    }

    #[test]
    fn top_p_one_samples_the_whole_distribution() {
        let logits = [0.0f32, (3.0f64).ln() as f32, f32::NEG_INFINITY, f32::NAN];
        let mut s = Sampler::new(1.0, 1.0, 21);
        let n = 100_000;
        let ones = (0..n).filter(|_| s.sample(&logits) == 1).count();
        let got = ones as f64 / f64::from(n);
        assert!((got - 0.75).abs() < 0.01, "{got}");
    }
}
