//! Prefix-affinity routing (`--routing prefix-affinity`): requests that
//! share a prompt prefix go to the worker likely to hold that prefix in its
//! KV cache, unless it is busier than the least-loaded worker by more than
//! `--affinity-max-load-gap` requests.
//!
//! The coordinator has text, not tokens, so a prompt is cut into
//! [`BLOCK_BYTES`]-byte blocks and each block is named by a hash chained
//! over every block before it (a block's hash stands for the whole prefix up
//! to it, as the nodes of a prefix tree do). Each worker has an LRU set of
//! the block hashes routed to it, bounded in bytes like the worker's own
//! prefix cache is in tokens; a request's match on a worker is the number of
//! its leading blocks in that set.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};

/// Bytes of prompt text per block.
pub const BLOCK_BYTES: usize = 64;
/// Leading blocks looked at (64 KiB of prompt).
pub const MAX_BLOCKS: usize = 1024;

/// The routing policy (`--routing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Routing {
    /// The best mix of cached prompt and load, from the workers' KV events
    /// (see `crate::kv_index` and `Router`'s cache-aware score).
    CacheAware,
    /// The worker with the fewest requests in flight.
    LeastLoaded,
    /// Any routable worker, at random (a baseline for benchmarks).
    Random,
    /// The worker holding the longest prefix of the prompt, within the load
    /// gap; otherwise the lighter of two random workers.
    PrefixAffinity,
}

/// Chained hashes of `text`'s whole leading blocks (a trailing partial
/// block is left out: it is what differs between requests that share a
/// prefix).
pub fn prefix_blocks(text: &str) -> Vec<u64> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity((bytes.len() / BLOCK_BYTES).min(MAX_BLOCKS));
    let mut prev = 0u64;
    for block in bytes.chunks_exact(BLOCK_BYTES).take(MAX_BLOCKS) {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        prev.hash(&mut h);
        block.hash(&mut h);
        prev = h.finish();
        out.push(prev);
    }
    out
}

/// The text the blocks of a conversation are cut from: roles and contents
/// in order (a stand-in for the rendered template: the same conversation
/// prefix gives the same blocks).
pub fn conversation_text<'a>(messages: impl Iterator<Item = (&'a str, &'a str)>) -> String {
    let mut text = String::new();
    for (role, content) in messages {
        text.push_str(role);
        text.push('\n');
        text.push_str(content);
        text.push('\n');
    }
    text
}

/// One worker's routed blocks, least recently used first out.
#[derive(Debug, Default)]
struct Blocks {
    stamp_of: HashMap<u64, u64>,
    by_stamp: BTreeMap<u64, u64>,
}

/// Per-worker approximate prefix caches.
#[derive(Debug)]
pub struct PrefixTable {
    workers: HashMap<String, Blocks>,
    capacity_blocks: usize,
    clock: u64,
}

impl PrefixTable {
    /// A table keeping about `capacity_bytes` of prompt text per worker.
    pub fn new(capacity_bytes: usize) -> Self {
        Self {
            workers: HashMap::new(),
            capacity_blocks: (capacity_bytes / BLOCK_BYTES).max(1),
            clock: 0,
        }
    }

    /// Leading blocks of `blocks` that `worker` holds.
    pub fn matched(&self, worker: &str, blocks: &[u64]) -> usize {
        let Some(w) = self.workers.get(worker) else {
            return 0;
        };
        blocks
            .iter()
            .take_while(|b| w.stamp_of.contains_key(b))
            .count()
    }

    /// `blocks` were routed to `worker`: they become its most recent, and
    /// its oldest blocks beyond the capacity are forgotten.
    pub fn record(&mut self, worker: &str, blocks: &[u64]) {
        if blocks.is_empty() {
            return;
        }
        let w = self.workers.entry(worker.to_string()).or_default();
        for b in blocks {
            self.clock += 1;
            if let Some(old) = w.stamp_of.insert(*b, self.clock) {
                w.by_stamp.remove(&old);
            }
            w.by_stamp.insert(self.clock, *b);
        }
        while w.stamp_of.len() > self.capacity_blocks {
            let Some((_, oldest)) = w.by_stamp.pop_first() else {
                break;
            };
            w.stamp_of.remove(&oldest);
        }
    }

    /// Forgets a worker that left.
    pub fn forget(&mut self, worker: &str) {
        self.workers.remove(worker);
    }

    /// Blocks held for `worker`.
    pub fn len(&self, worker: &str) -> usize {
        self.workers.get(worker).map_or(0, |w| w.stamp_of.len())
    }
}

/// How a prefix-affinity pick went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    /// The worker with the longest match, within the load gap.
    Hit(usize),
    /// No worker within the gap holds any of the prefix: the fallback.
    Miss(usize),
    /// A worker holds the prefix but is busier than the gap allows: the
    /// fallback.
    Overloaded(usize),
}

impl Choice {
    /// The chosen candidate's index.
    pub fn index(self) -> usize {
        match self {
            Choice::Hit(i) | Choice::Miss(i) | Choice::Overloaded(i) => i,
        }
    }

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Choice::Hit(_) => "hit",
            Choice::Miss(_) => "miss",
            Choice::Overloaded(_) => "overloaded",
        }
    }
}

/// Among candidates `(in_flight, matched blocks)`, the one with the longest
/// match whose load is within `max_gap` of the least loaded (ties: fewer in
/// flight, then `fallback`); `fallback` (the index the router picks without
/// affinity: the lighter of two random workers) when none matches.
pub fn choose(candidates: &[(usize, usize)], max_gap: usize, fallback: usize) -> Choice {
    let Some(min) = candidates.iter().map(|c| c.0).min() else {
        return Choice::Miss(fallback);
    };
    let best = candidates
        .iter()
        .enumerate()
        .filter(|(_, c)| c.1 > 0 && c.0 <= min + max_gap)
        .max_by_key(|(i, c)| (c.1, std::cmp::Reverse(c.0), *i == fallback));
    match best {
        Some((i, _)) => Choice::Hit(i),
        None if candidates.iter().any(|c| c.1 > 0) => Choice::Overloaded(fallback),
        None => Choice::Miss(fallback),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(tenant: &str, question: &str) -> String {
        format!(
            "{}{question}",
            format!("System prompt of {tenant}. ").repeat(20)
        )
    }

    #[test]
    fn blocks_chain_so_a_shared_prefix_shares_blocks() {
        let a = prefix_blocks(&text("acme", "What is 2+2?"));
        let b = prefix_blocks(&text("acme", "Where is Paris?"));
        let c = prefix_blocks(&text("zeta", "What is 2+2?"));
        assert!(a.len() >= 5);
        let shared = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
        assert!(shared >= a.len() - 1, "{shared} of {}", a.len());
        assert_ne!(a[0], c[0], "another tenant, other blocks");
        // The same block text after a different prefix is another block.
        let x = prefix_blocks(&format!("{}{}", "a".repeat(64), "b".repeat(64)));
        let y = prefix_blocks(&format!("{}{}", "c".repeat(64), "b".repeat(64)));
        assert_ne!(x[1], y[1]);
        assert!(prefix_blocks("short").is_empty());
    }

    #[test]
    fn match_record_and_eviction() {
        let mut t = PrefixTable::new(10 * BLOCK_BYTES);
        let a = prefix_blocks(&text("acme", "q"));
        let b = prefix_blocks(&text("zeta", "q"));
        assert_eq!(t.matched("w1", &a), 0);
        t.record("w1", &a[..6]);
        assert_eq!(t.matched("w1", &a), 6);
        assert_eq!(t.matched("w2", &a), 0);
        assert_eq!(t.matched("w1", &b), 0);
        // 6 + 6 blocks in a 10-block table: acme's oldest 2 go; a match must
        // start at the first block, so acme now matches nothing.
        t.record("w1", &b[..6]);
        assert_eq!(t.len("w1"), 10);
        assert_eq!(t.matched("w1", &b), 6);
        assert_eq!(t.matched("w1", &a), 0);
        // Using a prefix refreshes it.
        t.record("w1", &a[..4]);
        t.record("w1", &b[..6]);
        assert_eq!(t.matched("w1", &a), 4, "refreshed blocks survive");
        t.forget("w1");
        assert_eq!(t.matched("w1", &b), 0);
    }

    #[test]
    fn the_longest_match_wins_within_the_load_gap() {
        // (in flight, matched)
        assert_eq!(choose(&[(0, 0), (0, 0)], 2, 1), Choice::Miss(1));
        assert_eq!(choose(&[(0, 0), (1, 5)], 2, 0), Choice::Hit(1));
        assert_eq!(choose(&[(1, 3), (1, 5)], 2, 0), Choice::Hit(1));
        // Equal matches: the less loaded.
        assert_eq!(choose(&[(2, 5), (1, 5)], 2, 0), Choice::Hit(1));
        // Over the gap: the fallback instead.
        assert_eq!(choose(&[(0, 0), (3, 5)], 2, 0), Choice::Overloaded(0));
        // A shorter match within the gap beats a longer one beyond it.
        assert_eq!(choose(&[(0, 0), (3, 9), (2, 4)], 2, 0), Choice::Hit(2));
        assert_eq!(choose(&[], 2, 0), Choice::Miss(0));
    }
}
