//! Choosing among the logits: the cuts (top-k by a threshold pass, min-p
//! and top-p by windowed partial selection), the draw, and the
//! log-probabilities.

use super::passes::{by_weight, max_logit, next_up, weight, weight_sum, View};
use super::Logprobs;

/// Widening windows (in nats below the maximum) for the nucleus search.
const WINDOWS: [f32; 5] = [4.0, 8.0, 16.0, 32.0, f32::INFINITY];

/// Index of the largest logit (the first of equals; NaN never wins).
pub fn argmax(logits: &[f32]) -> u32 {
    // A vectorised pass for the maximum, then a search for its first place.
    View::plain(logits).first_at(max_logit(logits))
}

/// Fills `out` with the nucleus — (unnormalised probability, token), most
/// likely first — and returns its total weight. With `top_p >= 1`, `out`
/// holds the whole vocabulary in index order.
pub fn nucleus(logits: &[f32], temperature: f32, top_p: f32, out: &mut Vec<(f64, u32)>) -> f64 {
    select_in(logits, temperature, 0, 0.0, top_p, out)
}

/// Fills `out` with the tokens temperature, top-k (0 = off), min-p (0 =
/// off) and top-p leave, in that order — (unnormalised probability, token),
/// most likely first — and returns their total weight. With no cut at all
/// (`top_p >= 1`), `out` holds the whole vocabulary in index order.
pub fn select_in(
    logits: &[f32],
    temperature: f32,
    top_k: u32,
    min_p: f32,
    top_p: f32,
    out: &mut Vec<(f64, u32)>,
) -> f64 {
    let view = View::plain(logits);
    select(&view, view.max(), temperature, top_k, min_p, top_p, out)
}

/// Cuts sorted `out` to its shortest prefix reaching `target`; returns the
/// prefix's weight, or `None` (and leaves `out`) when all of it falls
/// short.
fn cut(out: &mut Vec<(f64, u32)>, target: f64) -> Option<f64> {
    let mut mass = 0.0;
    for (keep, &(w, _)) in out.iter().enumerate() {
        mass += w;
        if mass >= target {
            out.truncate(keep + 1);
            return Some(mass);
        }
    }
    None
}

/// The lowest f32 logit `v` with `(v - max) / t >= ln(min_p)`: tokens below
/// it are less likely than `min_p` times the top one.
fn min_p_floor(max: f32, temperature: f32, min_p: f32) -> f32 {
    if min_p <= 0.0 {
        return f32::MIN;
    }
    let exact = f64::from(max) + f64::from(temperature) * f64::from(min_p).ln();
    let mut floor = exact as f32;
    if f64::from(floor) < exact {
        floor = next_up(floor);
    }
    floor.max(f32::MIN)
}

/// [`select_in`] over a view whose largest logit is `max`.
pub(super) fn select(
    view: &View<'_>,
    max: f32,
    temperature: f32,
    top_k: u32,
    min_p: f32,
    top_p: f32,
    out: &mut Vec<(f64, u32)>,
) -> f64 {
    let inv_t = 1.0 / temperature;
    out.clear();
    if !max.is_finite() {
        out.push((1.0, view.first_at(max)));
        return 1.0;
    }
    let weight = |v: f32| f64::from(weight(v, max, inv_t));
    let floor = min_p_floor(max, temperature, min_p);
    let k = if top_k == 0 {
        usize::MAX
    } else {
        top_k as usize
    };
    if k != usize::MAX {
        // The k most likely above the min-p floor, in one pass.
        view.top_k(k, floor, out);
        let mut total = 0.0;
        for c in out.iter_mut() {
            c.0 = weight(c.0 as f32);
            total += c.0;
        }
        if top_p >= 1.0 {
            return total;
        }
        return cut(out, f64::from(top_p) * total).unwrap_or(total);
    }
    // The weight of everything min-p keeps, when it is needed and not the
    // sum of a complete window.
    let mut kept: Option<f64> = None;
    if floor == f32::MIN {
        if top_p >= 1.0 {
            let mut total = 0.0;
            view.runs(|base, run| {
                for (i, &v) in run.iter().enumerate() {
                    if v > f32::NEG_INFINITY {
                        let w = weight(v);
                        total += w;
                        out.push((w, (base + i) as u32));
                    }
                }
            });
            return total;
        }
        // The normaliser, over everything (NaN and -inf weigh nothing).
        kept = Some(view.weight_sum(max, inv_t, f32::MIN));
    } else if top_p >= 1.0 {
        // Min-p alone: everything above its floor.
        view.gather(floor, out, weight);
        out.sort_unstable_by(by_weight);
        return out.iter().map(|c| c.0).sum();
    }
    for window in WINDOWS {
        let window_floor = (max - window * temperature).max(floor);
        // Everything min-p keeps is in the window.
        let complete = window_floor <= floor;
        view.gather(window_floor, out, weight);
        out.sort_unstable_by(by_weight);
        let total = match kept {
            Some(total) => total,
            None if complete => out.iter().map(|c| c.0).sum(),
            None => *kept.insert(view.weight_sum(max, inv_t, floor)),
        };
        if top_p >= 1.0 && complete {
            return total;
        }
        if let Some(mass) = cut(out, f64::from(top_p) * total) {
            return mass;
        }
        if complete {
            // Rounding kept the sum just short of the target: take it all.
            return out.iter().map(|c| c.0).sum();
        }
    }
    unreachable!("the last window takes every token")
}

/// The log-probabilities of `token` and of the `top` most likely tokens
/// under the softmax of `logits` (whose maximum is `max`): a pass for the
/// normaliser, then a top-k pass when `top > 0`.
pub fn logprobs(
    logits: &[f32],
    max: f32,
    token: u32,
    top: usize,
    buf: &mut Vec<(f64, u32)>,
) -> Logprobs {
    if !max.is_finite() {
        // No finite logit: the token was a forced pick.
        return Logprobs {
            logprob: 0.0,
            top: std::iter::once((token, 0.0)).take(top).collect(),
        };
    }
    let log_norm = f64::from(max) + weight_sum(logits, max, 1.0).ln();
    let log_p = |v: f64| (v - log_norm) as f32;
    let logprob = log_p(f64::from(logits[token as usize]));
    let mut alternatives = Vec::new();
    if top > 0 {
        View::plain(logits).top_k(top, f32::MIN, buf);
        alternatives = buf.iter().map(|&(v, id)| (id, log_p(v))).collect();
    }
    Logprobs {
        logprob,
        top: alternatives,
    }
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
