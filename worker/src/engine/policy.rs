//! Pure scheduling policy: what each sequence contributes to a step
//! ([`plan_step`]), where a new request runs and which cached prefix it
//! reuses ([`place`]), and which kept caches to cut ([`trim_warm`]). No
//! llama.cpp state here, so every rule is unit-tested on plain values.

use llama_cpp_2::token::LlamaToken;

/// Rows of a step that ggml multiplies in its grouped kernel: with
/// repacked weights (llama.cpp's default on x86 and ARM) a batch's rows go
/// through the matrix kernel in groups of `ROW_GROUP` and its last
/// `rows % ROW_GROUP` through the one-row kernel, which rounds
/// differently, so a KV cell's values depend on which kernel computed its
/// row. Prompt chunks and reused prefixes keep to multiples of it, so a
/// prompt's rows take the same kernels whatever its cache held (the seed
/// promise, docs/operations.md).
pub const ROW_GROUP: usize = 4;

/// What one sequence contributes to a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    /// Decode its last sampled token (one token, logits on).
    Decode,
    /// Decode prompt tokens `from..from + len` (logits on the prompt's last).
    Prefill {
        /// First prompt index.
        from: usize,
        /// How many tokens.
        len: usize,
    },
}

/// What the planner needs to know of a sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqView {
    /// Prompt tokens not yet in the KV cache.
    pub prompt_left: usize,
    /// Prompt tokens already in the KV cache.
    pub prefilled: usize,
    /// It has a sampled token waiting to be decoded.
    pub has_next: bool,
    /// Its client's channel is full, or it is over: skip it this step.
    pub blocked: bool,
}

/// Plans one step: every unblocked sequence with a token to decode gets one
/// decode slot (running streams never wait on prompts), then sequences still
/// in prefill get prompt chunks, oldest first, within `budget` tokens — or
/// within `decoding_budget` when the step decodes for some sequence, so that
/// a new prompt delays running streams' next token by a bounded amount
/// while an idle engine still prefills in large, fast chunks.
pub fn plan_step(seqs: &[SeqView], budget: usize, decoding_budget: usize) -> Vec<(usize, Work)> {
    let mut plan: Vec<(usize, Work)> = seqs
        .iter()
        .enumerate()
        .filter(|(_, s)| !s.blocked && s.has_next)
        .map(|(i, _)| (i, Work::Decode))
        .collect();
    let mut left = if plan.is_empty() {
        budget
    } else {
        decoding_budget.min(budget)
    };
    for (i, s) in seqs.iter().enumerate() {
        if left == 0 {
            break;
        }
        if s.blocked || s.prompt_left == 0 {
            continue;
        }
        let mut len = s.prompt_left.min(left);
        if len < s.prompt_left {
            // A chunk that does not end the prompt is whole row groups.
            len -= len % ROW_GROUP;
            if len == 0 {
                continue;
            }
        }
        left -= len;
        plan.push((
            i,
            Work::Prefill {
                from: s.prefilled,
                len,
            },
        ));
    }
    plan
}

/// Length of the common prefix of two token lists.
pub fn common_prefix<T: PartialEq>(a: &[T], b: &[T]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Which kept ("warm") caches to cut so that at most `budget` distinct
/// cells stay warm. `warm` lists (slot, kept tokens), least recently
/// finished first; the most recent keep theirs first. A prefix that several
/// slots keep is one set of cells (a slot that reused another's prefix
/// shares its cells, see [`super::slots`]), so it counts once: keeping the
/// same system prompt in four slots costs what one copy costs, and does not
/// push out another tenant's. Returns (slot, tokens to keep) for each cache
/// to cut (0: drop it).
pub fn trim_warm<T: PartialEq>(warm: &[(i32, &[T])], budget: usize) -> Vec<(i32, usize)> {
    let mut left = budget;
    let mut cuts = Vec::new();
    let mut kept: Vec<&[T]> = Vec::new();
    for &(slot, tokens) in warm.iter().rev() {
        let shared = kept
            .iter()
            .map(|k| common_prefix(tokens, k))
            .max()
            .unwrap_or(0);
        let own = (tokens.len() - shared).min(left);
        left -= own;
        let keep = shared + own;
        if keep < tokens.len() {
            cuts.push((slot, keep));
        }
        kept.push(&tokens[..keep]);
    }
    cuts
}

/// Distinct cells that `caches` hold: each one's tokens past the longest
/// prefix it shares with an earlier one (what [`trim_warm`] budgets).
pub fn distinct_tokens<T: PartialEq>(caches: &[&[T]]) -> usize {
    caches
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let shared = caches[..i]
                .iter()
                .map(|k| common_prefix(c, k))
                .max()
                .unwrap_or(0);
            c.len() - shared
        })
        .sum()
}

/// Where a new prompt should run and what it can reuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// The free slot it takes.
    pub slot: i32,
    /// Reuse `len` cached tokens from slot `from` (itself, or another slot
    /// whose cells are copied).
    pub reuse: Option<(i32, usize)>,
}

/// Places `prompt` in one of the `free` slots (slot, cached tokens), reusing
/// the longest prefix found there or in `running` (slot, known tokens). At
/// least one prompt token is always left to compute (its logits start
/// generation). With `whole_groups` (a new prompt, whose reference is the
/// same prompt computed cold), a reused prefix is whole row groups
/// ([`ROW_GROUP`]); a resumed stream reuses what it can (its reference is
/// the uninterrupted stream, whose cells the cache may hold as they were).
/// Without any reuse, the free slot with the least cached is taken, to
/// keep the rest warm. A free slot whose cache would lose more
/// than the coldest slot holds (a short shared prefix, say a common first
/// sentence, in front of another prompt's long one) is not overwritten: its
/// shared prefix is copied into the coldest slot instead, so both stay
/// reusable.
pub fn place(
    prompt: &[LlamaToken],
    free: &[(i32, &[LlamaToken])],
    running: &[(i32, &[LlamaToken])],
    whole_groups: bool,
) -> Option<Placement> {
    let limit = prompt.len().saturating_sub(1);
    let group = if whole_groups { ROW_GROUP } else { 1 };
    let best = |slots: &[(i32, &[LlamaToken])]| {
        slots
            .iter()
            .map(|(slot, tokens)| {
                let len = common_prefix(prompt, tokens).min(limit);
                (*slot, len - len % group)
            })
            .filter(|(_, len)| *len > 0)
            .max_by_key(|(slot, len)| (*len, -slot))
    };
    let in_free = best(free);
    let in_running = best(running);
    let (coldest, coldest_len) = free
        .iter()
        .map(|(slot, t)| (*slot, t.len()))
        .min_by_key(|&(slot, n)| (n, slot))?;
    let cached = |slot: i32| {
        free.iter()
            .find(|(s, _)| *s == slot)
            .map_or(0, |(_, t)| t.len())
    };
    Some(match (in_free, in_running) {
        (Some((slot, len)), r) if r.is_none_or(|(_, rl)| rl <= len) => {
            if cached(slot) - len > coldest_len {
                Placement {
                    slot: coldest,
                    reuse: Some((slot, len)),
                }
            } else {
                Placement {
                    slot,
                    reuse: Some((slot, len)),
                }
            }
        }
        (_, Some((from, len))) => Placement {
            slot: coldest,
            reuse: Some((from, len)),
        },
        _ => Placement {
            slot: coldest,
            reuse: None,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(prompt_left: usize, prefilled: usize, has_next: bool, blocked: bool) -> SeqView {
        SeqView {
            prompt_left,
            prefilled,
            has_next,
            blocked,
        }
    }

    #[test]
    fn running_streams_decode_before_any_prefill() {
        let seqs = [
            view(0, 10, true, false),
            view(500, 0, false, false),
            view(0, 8, true, false),
        ];
        let plan = plan_step(&seqs, 64, 64);
        assert_eq!(
            plan,
            vec![
                (0, Work::Decode),
                (2, Work::Decode),
                (1, Work::Prefill { from: 0, len: 64 })
            ]
        );
    }

    #[test]
    fn prompts_get_the_smaller_budget_while_streams_decode() {
        let decoding = [view(0, 10, true, false), view(500, 0, false, false)];
        assert_eq!(
            plan_step(&decoding, 128, 32),
            vec![(0, Work::Decode), (1, Work::Prefill { from: 0, len: 32 })]
        );
        // Nothing decodes (the stream waits on its client): the full budget.
        let idle = [view(0, 10, true, true), view(500, 0, false, false)];
        assert_eq!(
            plan_step(&idle, 128, 32),
            vec![(1, Work::Prefill { from: 0, len: 128 })]
        );
        // The decoding budget never exceeds the other.
        assert_eq!(
            plan_step(&decoding, 16, 32),
            vec![(0, Work::Decode), (1, Work::Prefill { from: 0, len: 16 })]
        );
    }

    #[test]
    fn prefill_is_chunked_within_the_budget_oldest_first() {
        let seqs = [
            view(30, 100, false, false),
            view(50, 0, false, false),
            view(10, 0, false, false),
        ];
        // A chunk that leaves some of its prompt is whole row groups.
        assert_eq!(
            plan_step(&seqs, 64, 8),
            vec![
                (0, Work::Prefill { from: 100, len: 30 }),
                (1, Work::Prefill { from: 0, len: 32 })
            ]
        );
        // Less room than a row group: only a prompt that ends gets it.
        let seqs = [view(10, 0, false, false), view(2, 0, false, false)];
        assert_eq!(
            plan_step(&seqs, 3, 3),
            vec![(1, Work::Prefill { from: 0, len: 2 })]
        );
    }

    fn toks(v: &[i32]) -> Vec<LlamaToken> {
        v.iter().map(|&t| LlamaToken(t)).collect()
    }

    #[test]
    fn placement_reuses_the_longest_prefix() {
        let prompt = toks(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
        let (a, b, c) = (
            toks(&[1, 2, 99]),
            toks(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 77]),
            toks(&[1, 2, 3]),
        );
        // Best in a free slot: take that very slot. The 9 shared tokens
        // are cut to whole row groups (8).
        let p = place(&prompt, &[(0, &a), (1, &b)], &[], true).unwrap();
        assert_eq!(
            p,
            Placement {
                slot: 1,
                reuse: Some((1, 8))
            }
        );
        // Best in a running sequence: copy into the coldest free slot.
        let p = place(&prompt, &[(0, &a), (2, &[])], &[(1, &b)], true).unwrap();
        assert_eq!(
            p,
            Placement {
                slot: 2,
                reuse: Some((1, 8))
            }
        );
        // A free slot ties with a running one: no copy needed.
        let p = place(&prompt, &[(0, &b)], &[(1, &b)], true).unwrap();
        assert_eq!(p.reuse, Some((0, 8)));
        // Nothing shared (or less than a row group): the coldest slot, no
        // reuse.
        let short = toks(&[9]);
        let p = place(&toks(&[8, 8]), &[(0, &c), (3, &short)], &[], true).unwrap();
        assert_eq!(
            p,
            Placement {
                slot: 3,
                reuse: None
            }
        );
        let p = place(&prompt, &[(0, &c), (3, &short)], &[], true).unwrap();
        assert_eq!(p.reuse, None);
        assert!(place(&prompt, &[], &[(1, &b)], true).is_none());

        // A short shared prefix in front of another prompt's long cache:
        // copied into the empty slot, the long cache kept.
        let long: Vec<LlamaToken> = toks(&[1, 2, 3, 4])
            .into_iter()
            .chain(toks(&[7; 50]))
            .collect();
        let p = place(&prompt, &[(0, &long), (1, &[])], &[], true).unwrap();
        assert_eq!(
            p,
            Placement {
                slot: 1,
                reuse: Some((0, 4))
            }
        );
    }

    #[test]
    fn at_least_one_prompt_token_is_computed() {
        let prompt = toks(&[1, 2, 3, 4, 5]);
        let p = place(&prompt, &[(0, &toks(&[1, 2, 3, 4, 5, 6]))], &[], true).unwrap();
        assert_eq!(p.reuse, Some((0, 4)));
        // A resumed stream is not cut to whole groups.
        let p = place(&prompt, &[(0, &toks(&[1, 2, 3, 4, 5, 6]))], &[], false).unwrap();
        assert_eq!(p.reuse, Some((0, 4)));
        let p = place(&toks(&[1, 2, 3]), &[(0, &toks(&[1, 2, 3, 4]))], &[], false).unwrap();
        assert_eq!(p.reuse, Some((0, 2)));
        // All 4 cached, but the last must be computed: 3, less than a group.
        assert_eq!(
            place(
                &toks(&[1, 2, 3, 4]),
                &[(0, &toks(&[1, 2, 3, 4]))],
                &[],
                true
            )
            .unwrap()
            .reuse,
            None
        );
    }

    #[test]
    fn kept_caches_fit_the_budget_most_recent_first() {
        // Oldest first: slot 2 (100 tokens), slot 0 (300), slot 1 (200),
        // nothing shared.
        let (a, b, c): (Vec<i32>, Vec<i32>, Vec<i32>) = (
            (0..100).collect(),
            (1000..1300).collect(),
            (2000..2200).collect(),
        );
        let warm = [(2, &a[..]), (0, &b[..]), (1, &c[..])];
        assert_eq!(trim_warm(&warm, 1000), vec![]);
        assert_eq!(trim_warm(&warm, 512), vec![(2, 12)]);
        assert_eq!(trim_warm(&warm, 450), vec![(0, 250), (2, 0)]);
        assert_eq!(trim_warm(&warm, 150), vec![(1, 150), (0, 0), (2, 0)]);
        assert_eq!(trim_warm(&warm, 0), vec![(1, 0), (0, 0), (2, 0)]);
        assert_eq!(trim_warm::<i32>(&[], 0), vec![]);
    }

    #[test]
    fn a_prefix_kept_by_several_slots_counts_once() {
        // Three slots keep one 600-token system prompt with their own
        // 20-token tails; the oldest keeps another tenant's 600 tokens.
        let tenant = |base: i32, tail: i32| -> Vec<i32> {
            (base..base + 600).chain(tail..tail + 20).collect()
        };
        let (other, x, y, z) = (
            tenant(0, 9000),
            tenant(5000, 9100),
            tenant(5000, 9200),
            tenant(5000, 9300),
        );
        let warm = [(3, &other[..]), (0, &x[..]), (1, &y[..]), (2, &z[..])];
        // 620 + 20 + 20 + 620 = 1280 distinct cells (the sum is 2480).
        assert_eq!(distinct_tokens(&[&other[..], &x, &y, &z]), 1280);
        assert_eq!(trim_warm(&warm, 2048), vec![]);
        assert_eq!(trim_warm(&warm, 1280), vec![]);
        // Short of room, the oldest loses its own cells first, and a
        // slot's shared prefix is never cut for want of room.
        assert_eq!(trim_warm(&warm, 1000), vec![(3, 340)]);
        assert_eq!(
            trim_warm(&warm, 610),
            vec![(2, 610), (1, 600), (0, 600), (3, 0)]
        );
    }

    #[test]
    fn blocked_sequences_wait() {
        let seqs = [
            view(0, 5, true, true),
            view(20, 0, false, true),
            view(0, 5, true, false),
        ];
        assert_eq!(plan_step(&seqs, 64, 64), vec![(2, Work::Decode)]);
        assert!(plan_step(&[], 64, 64).is_empty());
    }
}
