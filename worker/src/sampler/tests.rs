//! The sampler against straightforward references: softmax over the
//! whole vocabulary, a full sort, the textbook cuts and penalties.

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

/// The textbook pipeline on already-penalised logits: softmax over
/// everything, full sort, top-k, min-p, top-p over the survivors,
/// inverse-CDF draw.
fn reference_controls(logits: &[f32], t: f32, k: u32, min_p: f32, p: f32, u: f64) -> u32 {
    let z: Vec<f64> = logits
        .iter()
        .map(|&l| f64::from(l) / f64::from(t))
        .collect();
    let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let mut probs: Vec<(f64, u32)> = z
        .iter()
        .enumerate()
        .map(|(i, &x)| ((x - m).exp(), i as u32))
        .collect();
    if k > 0 || min_p > 0.0 || p < 1.0 {
        // With no cut at all, the draw walks the vocabulary in order.
        probs.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    }
    if k > 0 {
        probs.truncate(k as usize);
    }
    let top = probs.iter().map(|c| c.0).fold(0.0, f64::max);
    probs.retain(|&(q, _)| q >= f64::from(min_p) * top);
    let kept: f64 = probs.iter().map(|c| c.0).sum();
    let mut nucleus = Vec::new();
    let mut mass = 0.0;
    for (q, i) in probs {
        nucleus.push((q, i));
        mass += q;
        if p < 1.0 && mass >= f64::from(p) * kept {
            break;
        }
    }
    let target = u * mass;
    let mut acc = 0.0;
    for &(q, i) in &nucleus {
        acc += q;
        if target < acc {
            return i;
        }
    }
    nucleus.last().unwrap().1
}

/// The penalties by their definitions, on a copy of the vocabulary.
fn reference_penalties(
    logits: &[f32],
    prompt: &[u32],
    generated: &[u32],
    c: &SamplingControls,
) -> Vec<f32> {
    let mut out = logits.to_vec();
    let mut seen: Vec<u32> = prompt.iter().chain(generated).copied().collect();
    seen.sort_unstable();
    seen.dedup();
    for t in seen {
        let mut v = logits[t as usize];
        if c.repetition_penalty != 1.0 {
            v = if v > 0.0 {
                v / c.repetition_penalty
            } else {
                v * c.repetition_penalty
            };
        }
        let count = generated.iter().filter(|&&g| g == t).count() as f32;
        if count > 0.0 {
            v -= c.presence_penalty + c.frequency_penalty * count;
        }
        out[t as usize] = v;
    }
    out
}

fn controls(k: u32, min_p: f32, rep: f32, pres: f32, freq: f32) -> SamplingControls {
    SamplingControls {
        top_k: k,
        min_p,
        repetition_penalty: rep,
        presence_penalty: pres,
        frequency_penalty: freq,
        ..SamplingControls::default()
    }
}

#[test]
fn top_k_and_min_p_match_the_reference() {
    let mut rng = Rng::new(17);
    let mut buf = Vec::new();
    for case in 0..600 {
        // 2000 is not a multiple of the lanes or the patch blocks.
        let logits = random_logits(&mut rng, 2000, 4.0 + (case % 5) as f32 * 6.0);
        let t = [0.3f32, 0.7, 1.0, 1.5][case % 4];
        let k = [0u32, 1, 5, 40, 3000][case / 4 % 5];
        let min_p = [0.0f32, 0.01, 0.05, 0.3, 1.0][case / 20 % 5];
        let p = [0.5f32, 0.9, 1.0][case / 100 % 3];
        let u = rng.next_f64();
        let mass = select_in(&logits, t, k, min_p, p, &mut buf);
        assert!(k == 0 || buf.len() <= k as usize, "case {case}");
        assert_eq!(
            draw(&buf, mass, u),
            reference_controls(&logits, t, k, min_p, p, u),
            "case {case}: t={t} k={k} min_p={min_p} p={p}"
        );
    }
}

#[test]
fn top_k_and_alternatives_reach_into_a_flat_bulk() {
    // Three outliers far above a flat bulk: the 40th token is in the bulk.
    let mut rng = Rng::new(19);
    let mut logits = random_logits(&mut rng, 100_003, 20.0);
    logits[1234] = 25.0;
    logits[99] = 23.5;
    logits[100_002] = 24.0;
    // Equal logits atop the bulk (below 10): ties go to the lower id.
    logits[50] = 10.5;
    logits[7] = 10.5;
    let mut buf = Vec::new();
    for (k, min_p, p) in [
        (40u32, 0.0f32, 1.0f32),
        (40, 0.0, 0.99),
        (5, 1e-9, 0.9),
        (1000, 0.0, 0.5),
    ] {
        for i in 0..5 {
            let u = f64::from(i) / 5.0;
            let mass = select_in(&logits, 1.3, k, min_p, p, &mut buf);
            assert_eq!(
                draw(&buf, mass, u),
                reference_controls(&logits, 1.3, k, min_p, p, u),
                "k={k} min_p={min_p} p={p} u={u}"
            );
        }
    }
    select_in(&logits, 1.0, 5, 0.0, 1.0, &mut buf);
    assert_eq!(
        buf.iter().map(|c| c.1).collect::<Vec<_>>(),
        [1234, 100_002, 99, 7, 50]
    );
    let lp = logprobs(&logits, max_logit(&logits), 0, 5, &mut buf);
    assert_eq!(
        lp.top.iter().map(|a| a.0).collect::<Vec<_>>(),
        [1234, 100_002, 99, 7, 50]
    );
}

#[test]
fn next_float_steps_match_std() {
    for x in [
        0.0f32,
        -0.0,
        1.0,
        -1.0,
        3.7e-30,
        -2.5e12,
        f32::MIN,
        f32::MAX,
        1e-45,
    ] {
        assert_eq!(
            passes::next_down(x).to_bits(),
            x.next_down().to_bits(),
            "{x}"
        );
        assert_eq!(passes::next_up(x).to_bits(), x.next_up().to_bits(), "{x}");
    }
}

#[test]
fn top_k_and_min_p_cut_what_they_should() {
    let logits = [3.0f32, 1.0, 2.0, f32::NEG_INFINITY, 0.0, 2.0];
    let mut buf = Vec::new();
    // The two most likely, ties by id.
    select_in(&logits, 1.0, 2, 0.0, 1.0, &mut buf);
    assert_eq!(buf.iter().map(|c| c.1).collect::<Vec<_>>(), [0, 2]);
    select_in(&logits, 1.0, 3, 0.0, 1.0, &mut buf);
    assert_eq!(buf.iter().map(|c| c.1).collect::<Vec<_>>(), [0, 2, 5]);
    // e^-1 ≈ 0.37 of the top: min_p 0.3 keeps tokens 2 and 5, 0.4 not;
    // at t = 2 the window doubles, so 0.4 keeps them.
    select_in(&logits, 1.0, 0, 0.3, 1.0, &mut buf);
    assert_eq!(buf.iter().map(|c| c.1).collect::<Vec<_>>(), [0, 2, 5]);
    select_in(&logits, 1.0, 0, 0.4, 1.0, &mut buf);
    assert_eq!(buf.iter().map(|c| c.1).collect::<Vec<_>>(), [0]);
    select_in(&logits, 2.0, 0, 0.4, 1.0, &mut buf);
    assert_eq!(buf.iter().map(|c| c.1).collect::<Vec<_>>(), [0, 2, 5]);
    // min_p 1: only the most likely; top_k larger than the vocabulary.
    select_in(&logits, 0.7, 0, 1.0, 0.9, &mut buf);
    assert_eq!(buf.iter().map(|c| c.1).collect::<Vec<_>>(), [0]);
    let mass = select_in(&logits, 1.0, 100, 0.0, 1.0, &mut buf);
    assert_eq!(buf.len(), 5, "every finite logit");
    assert!((mass - buf.iter().map(|c| c.0).sum::<f64>()).abs() < 1e-12);
}

/// Samples `steps` tokens with `c` from a sampler fed `prompt`, resumed
/// after `resumed`, checking each pick against the reference on the
/// penalised logits with the same random number; returns the picks.
fn check_steps(
    logits: &[f32],
    t: f32,
    p: f32,
    c: SamplingControls,
    prompt: &[u32],
    resumed: &[u32],
    steps: usize,
) -> Vec<u32> {
    check_biased_steps(logits, &[], t, p, c, prompt, resumed, steps)
}

/// [`check_steps`] with `bias` (sorted by token) added to the logits
/// before the penalties.
#[allow(clippy::too_many_arguments)]
fn check_biased_steps(
    raw: &[f32],
    bias: &[(u32, f32)],
    t: f32,
    p: f32,
    c: SamplingControls,
    prompt: &[u32],
    resumed: &[u32],
    steps: usize,
) -> Vec<u32> {
    let seed = 99;
    let mut s = Sampler::new(t, p, seed)
        .with_controls(c)
        .with_bias(bias.to_vec());
    let mut logits = raw.to_vec();
    for &(token, b) in bias {
        logits[token as usize] += b;
    }
    let logits = &logits[..];
    s.prompt(prompt.iter().copied());
    s.resume(resumed);
    let mut rng = Rng::new(seed);
    let mut generated = resumed.to_vec();
    if t > 0.0 {
        for _ in 0..resumed.len() {
            rng.next_f64();
        }
    }
    let mut picks = Vec::new();
    for step in 0..steps {
        let penalised = reference_penalties(logits, prompt, &generated, &c);
        let want = if t == 0.0 {
            argmax(&penalised)
        } else {
            reference_controls(&penalised, t, c.top_k, c.min_p, p, rng.next_f64())
        };
        let got = s.sample(raw);
        assert_eq!(
            got, want,
            "step {step} with {c:?} t={t} p={p} bias={bias:?}"
        );
        generated.push(got);
        picks.push(got);
    }
    picks
}

#[test]
fn penalties_match_the_reference() {
    let mut rng = Rng::new(23);
    for case in 0..40 {
        let n = 2000;
        let mut logits = random_logits(&mut rng, n, 10.0);
        // A peaked distribution, so penalties change the picks.
        logits[7] = 9.0;
        logits[1990] = 8.5;
        logits[0] = 8.0;
        logits[64] = -9.0;
        let prompt = [0u32, 7, 7, 64, 1999, 500];
        let resumed = [1990u32, 3, 1990];
        let c = match case % 5 {
            0 => controls(0, 0.0, 1.3, 0.0, 0.0),
            1 => controls(0, 0.0, 0.8, 0.0, 0.0),
            2 => controls(0, 0.0, 1.0, 1.5, 0.0),
            3 => controls(0, 0.0, 1.0, 0.0, -0.7),
            _ => controls(0, 0.0, 2.0, 0.5, 0.5),
        };
        let t = [0.5f32, 1.0, 1.7][case % 3];
        let p = [0.9f32, 1.0][case / 3 % 2];
        check_steps(&logits, t, p, c, &prompt, &resumed, 12);
    }
}

#[test]
fn logit_bias_matches_the_reference_before_the_penalties() {
    let mut rng = Rng::new(31);
    for case in 0..30 {
        let n = 2000;
        let mut logits = random_logits(&mut rng, n, 10.0);
        logits[7] = 9.0;
        logits[1990] = 8.5;
        // The favourite banned, a low token raised, one biased token also
        // penalised (7, in the prompt), one in the short last block.
        let bias = [(7u32, -100.0f32), (64, 15.0), (1999, 3.0)];
        let prompt = [0u32, 7, 64, 500];
        let c = match case % 3 {
            0 => SamplingControls::default(),
            1 => controls(0, 0.0, 1.3, 0.5, 0.0),
            _ => controls(40, 0.05, 1.1, 0.0, 0.5),
        };
        let t = [0.0f32, 0.7, 1.5][case % 3];
        let picks = check_biased_steps(&logits, &bias, t, 0.95, c, &prompt, &[], 8);
        assert!(
            !picks.contains(&7),
            "a -100 bias bans the favourite: {picks:?}"
        );
    }
    // Greedy with only a bias is no longer the cheap path, and a bias of 0
    // changes nothing.
    let s = Sampler::new(0.0, 1.0, 1).with_bias(vec![(2, -100.0)]);
    assert!(!s.is_cheap());
    let mut s = Sampler::new(0.0, 1.0, 1).with_bias(vec![(0, 0.0)]);
    assert_eq!(s.sample(&[3.0, 1.0]), 0);
}

#[test]
fn all_controls_together_match_the_reference() {
    let mut rng = Rng::new(29);
    for case in 0..40 {
        let logits = random_logits(&mut rng, 3001, 12.0);
        let prompt: Vec<u32> = (0..64).map(|_| (rng.next_f64() * 3001.0) as u32).collect();
        let c = SamplingControls {
            logprobs: case % 2 == 0,
            top_logprobs: 5,
            ..controls(
                [0u32, 3, 40][case % 3],
                [0.0f32, 0.05, 0.2][case % 3],
                1.1,
                0.5,
                0.5,
            )
        };
        check_steps(&logits, 0.8, 0.95, c, &prompt, &prompt[..10], 10);
    }
}

#[test]
fn greedy_applies_the_penalties_only() {
    let logits = [5.0f32, 4.5, -1.0, 4.0];
    // Token 0 seen in the prompt: 5 / 1.2 ≈ 4.17 < 4.5.
    let mut s = Sampler::new(0.0, 0.5, 1).with_controls(controls(1, 1.0, 1.2, 0.0, 0.0));
    s.prompt([0]);
    assert_eq!(s.sample(&logits), 1);
    // Token 1 now generated once: 4.5 / 1.2 = 3.75; 0 wins again.
    assert_eq!(s.sample(&logits), 0);
    // Presence penalty alone ignores the prompt.
    let mut s = Sampler::new(0.0, 1.0, 1).with_controls(controls(0, 0.0, 1.0, 1.0, 0.0));
    s.prompt([0]);
    let picks: Vec<u32> = (0..4).map(|_| s.sample(&logits)).collect();
    // 5 → 4 after one, and no lower however often: it ties with
    // token 3, and the first of equals wins.
    assert_eq!(picks, [0, 1, 0, 0]);
    // Greedy draws nothing, penalties or not: resuming only records.
    for c in [
        controls(0, 0.0, 1.5, 0.0, 1.0),
        controls(5, 0.1, 1.0, 0.0, 0.0),
    ] {
        let mut rng = Rng::new(31);
        let logits = random_logits(&mut rng, 700, 8.0);
        check_steps(&logits, 0.0, 0.9, c, &[1, 2, 3], &[4, 5], 20);
    }
}

#[test]
fn resuming_with_penalties_continues_the_same_picks() {
    let mut rng = Rng::new(37);
    let logits = random_logits(&mut rng, 1000, 6.0);
    let c = controls(20, 0.02, 1.3, 0.4, 0.3);
    let prompt = [5u32, 9, 9, 700];
    let mut whole = Sampler::new(0.9, 0.95, 42).with_controls(c);
    whole.prompt(prompt);
    let picks: Vec<u32> = (0..12).map(|_| whole.sample(&logits)).collect();
    let mut resumed = Sampler::new(0.9, 0.95, 42).with_controls(c);
    resumed.prompt(prompt);
    resumed.resume(&picks[..5]);
    let rest: Vec<u32> = (0..7).map(|_| resumed.sample(&logits)).collect();
    assert_eq!(rest, picks[5..]);
}

/// log-softmax in f64, the textbook way.
fn reference_logprobs(logits: &[f32]) -> Vec<f64> {
    let m = logits
        .iter()
        .map(|&v| f64::from(v))
        .fold(f64::NEG_INFINITY, f64::max);
    let s: f64 = logits.iter().map(|&v| (f64::from(v) - m).exp()).sum();
    logits.iter().map(|&v| f64::from(v) - m - s.ln()).collect()
}

#[test]
fn logprobs_match_the_reference() {
    let mut rng = Rng::new(41);
    let mut buf = Vec::new();
    for case in 0..30 {
        let n = [100usize, 2000, 50_001][case % 3];
        let mut logits = random_logits(&mut rng, n, [1.0f32, 10.0, 40.0][case / 3 % 3]);
        if case % 2 == 0 {
            // One dominant token: the alternatives need wider windows.
            logits[n / 3] = 60.0;
        }
        let want = reference_logprobs(&logits);
        let total: f64 = want.iter().map(|l| l.exp()).sum();
        assert!((total - 1.0).abs() < 1e-9);
        let max = max_logit(&logits);
        for top in [0usize, 1, 5, 20] {
            let token = (rng.next_f64() * n as f64) as u32;
            let got = logprobs(&logits, max, token, top, &mut buf);
            assert!(
                (f64::from(got.logprob) - want[token as usize]).abs() < 1e-5,
                "case {case}: {} vs {}",
                got.logprob,
                want[token as usize]
            );
            let mut order: Vec<u32> = (0..n as u32).collect();
            order.sort_by(|&a, &b| {
                want[b as usize]
                    .total_cmp(&want[a as usize])
                    .then(a.cmp(&b))
            });
            let ids: Vec<u32> = got.top.iter().map(|a| a.0).collect();
            assert_eq!(ids, order[..top], "case {case} top {top}");
            for &(id, lp) in &got.top {
                assert!((f64::from(lp) - want[id as usize]).abs() < 1e-5);
            }
        }
        // Every token's, from the fast normaliser, sums to 1.
        let log_norm = f64::from(max) + weight_sum(&logits, max, 1.0).ln();
        let sum: f64 = logits
            .iter()
            .map(|&v| (f64::from(v) - log_norm).exp())
            .sum();
        assert!((sum - 1.0).abs() < 1e-5, "case {case}: {sum}");
    }
}

#[test]
fn picks_carry_the_raw_logprobs_when_asked() {
    let logits = [2.0f32, 1.0, 0.5, f32::NEG_INFINITY];
    let want = reference_logprobs(&logits[..3]);
    let c = SamplingControls {
        logprobs: true,
        top_logprobs: 20,
        ..controls(0, 0.0, 3.0, 1.0, 0.0)
    };
    // Greedy with penalties: token 0 is penalised (2 / 3 - 1 < 0.5) the
    // second time, yet logprobs are the model's, unpenalised.
    let mut s = Sampler::new(0.0, 1.0, 3).with_controls(c);
    let first = s.pick(&logits);
    assert_eq!(first.token, 0);
    let second = s.pick(&logits);
    assert_eq!(second.token, 1);
    let lp = second.logprobs.unwrap();
    assert!((f64::from(lp.logprob) - want[1]).abs() < 1e-6);
    assert_eq!(
        lp.top.iter().map(|a| a.0).collect::<Vec<_>>(),
        [0, 1, 2],
        "-inf is no alternative; fewer than asked"
    );
    assert!(lp.top.windows(2).all(|w| w[0].1 >= w[1].1));
    // Not asked: none.
    let mut s = Sampler::new(0.8, 0.9, 3);
    assert_eq!(s.pick(&logits).logprobs, None);
    let mut s = Sampler::new(0.8, 0.9, 3).with_controls(SamplingControls {
        logprobs: true,
        ..SamplingControls::default()
    });
    let pick = s.pick(&logits);
    assert!(pick.logprobs.unwrap().top.is_empty());
}

#[test]
fn sample_all_matches_one_by_one() {
    let mut rng = Rng::new(43);
    let logits = random_logits(&mut rng, 5000, 10.0);
    let c = SamplingControls {
        logprobs: true,
        top_logprobs: 3,
        ..controls(40, 0.05, 1.1, 0.5, 0.5)
    };
    let make = || -> Vec<Sampler> {
        (0..5)
            .map(|k| Sampler::new(0.8 * (k % 2) as f32, 0.95, k).with_controls(c))
            .collect()
    };
    let mut one = make();
    let want: Vec<Pick> = one.iter_mut().map(|s| s.pick(&logits)).collect();
    let mut all = make();
    let mut work: Vec<(&mut Sampler, &[f32], Pick)> = all
        .iter_mut()
        .map(|s| (s, logits.as_slice(), Pick::default()))
        .collect();
    sample_all(&mut work, 3);
    let got: Vec<Pick> = work.into_iter().map(|w| w.2).collect();
    assert_eq!(got, want);
}
