//! The host-RAM prefix tier: prefixes evicted from the KV cache, kept in
//! host memory as llama.cpp's serialized sequence state, and restored into a
//! slot when a later prompt starts with one of them, instead of computing
//! those tokens again.
//!
//! [`super::slots::Slots`] saves a free slot's exact prefix here when the
//! slot is taken for another prompt or the prefix-cache budget cuts it, and
//! asks [`RamTier::best`] at every admission. Entries are whole exact
//! prefixes (a cold prompt would compute the same cells, see
//! `sequence::Cells`), so a restored prefix gives the same logits as a
//! recomputed one. At most `budget` bytes of state are kept, least recently
//! used dropped first; a prefix shorter than [`MIN_TOKENS`] is not worth a
//! copy. The tier is generic over the state type so its rules are tested
//! without a model.

use super::policy::{common_prefix, ROW_GROUP};

/// Shortest prefix worth keeping in RAM: below one KV block of the routing
/// index (16 tokens) times two, recomputing costs about what a copy does.
pub const MIN_TOKENS: usize = 32;

struct Entry<T, S> {
    tokens: Vec<T>,
    /// The block hashes of `tokens`' whole blocks, as the KV events name
    /// them (the `ram` tier).
    blocks: Vec<u64>,
    state: S,
    bytes: usize,
    /// When it was last saved or restored (a tick of `RamTier::clock`).
    used: u64,
}

/// Prefixes kept in host memory, bounded in bytes, least recently used
/// evicted first.
pub struct RamTier<T, S> {
    entries: Vec<Entry<T, S>>,
    budget: usize,
    bytes: usize,
    clock: u64,
    /// Bumped whenever the set of entries changes.
    version: u64,
}

/// What [`RamTier::insert`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inserted {
    /// Whether the prefix is now kept.
    pub kept: bool,
    /// Entries dropped for room (least recently used).
    pub evicted: usize,
}

impl<T: PartialEq + Clone, S> RamTier<T, S> {
    /// An empty tier holding at most `budget` bytes (0: off).
    pub fn new(budget: usize) -> Self {
        Self {
            entries: Vec::new(),
            budget,
            bytes: 0,
            clock: 0,
            version: 0,
        }
    }

    /// Whether the tier keeps anything at all.
    pub fn enabled(&self) -> bool {
        self.budget > 0
    }

    /// Bytes of state kept now.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Prefixes kept now.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether `tokens` are worth saving: long enough, and not already
    /// kept (an entry that starts with all of them holds their cells).
    pub fn wants(&self, tokens: &[T]) -> bool {
        self.enabled()
            && tokens.len() >= MIN_TOKENS
            && !self
                .entries
                .iter()
                .any(|e| e.tokens.len() >= tokens.len() && e.tokens[..tokens.len()] == *tokens)
    }

    /// The entry sharing the longest prefix with `prompt`, and that length:
    /// at most `prompt.len() - 1` (one token must be computed for logits),
    /// rounded down to whole row groups when `whole_groups` (a new prompt,
    /// see `policy::place`). `None` when no entry shares a token.
    pub fn best(&self, prompt: &[T], whole_groups: bool) -> Option<(usize, usize)> {
        let limit = prompt.len().saturating_sub(1);
        let group = if whole_groups { ROW_GROUP } else { 1 };
        self.entries
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let len = common_prefix(prompt, &e.tokens).min(limit);
                (i, len - len % group)
            })
            .filter(|&(_, len)| len > 0)
            .max_by_key(|&(i, len)| (len, self.entries[i].used))
    }

    /// Entry `index`'s state, marked as just used.
    pub fn get(&mut self, index: usize) -> &S {
        self.clock += 1;
        let entry = &mut self.entries[index];
        entry.used = self.clock;
        &entry.state
    }

    /// Drops entry `index` (its state could not be restored).
    pub fn remove(&mut self, index: usize) {
        let entry = self.entries.swap_remove(index);
        self.bytes -= entry.bytes;
        self.version += 1;
    }

    /// Changes whenever an entry is added or dropped (so the KV events'
    /// `ram` tier is recomputed only then).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Keeps `tokens`' state (`bytes` long; `blocks` their block hashes).
    /// Entries the new one holds all but fewer than [`MIN_TOKENS`] of go
    /// (a tenant's prefix saved again with another question after it is
    /// one entry, not two), then the least recently used until it fits. A
    /// state larger than the whole budget is not kept. Entry indices from
    /// [`RamTier::best`] are stale afterwards.
    pub fn insert(&mut self, tokens: Vec<T>, blocks: Vec<u64>, state: S, bytes: usize) -> Inserted {
        if bytes > self.budget {
            return Inserted {
                kept: false,
                evicted: 0,
            };
        }
        let mut freed = 0;
        self.entries.retain(|e| {
            let covered = e.tokens.len() - common_prefix(&e.tokens, &tokens) < MIN_TOKENS;
            if covered {
                freed += e.bytes;
            }
            !covered
        });
        self.bytes -= freed;
        let mut evicted = 0;
        while self.bytes + bytes > self.budget {
            let oldest = self
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.used)
                .map(|(i, _)| i)
                .expect("entries hold the bytes counted");
            self.remove(oldest);
            evicted += 1;
        }
        self.clock += 1;
        self.entries.push(Entry {
            tokens,
            blocks,
            state,
            bytes,
            used: self.clock,
        });
        self.bytes += bytes;
        self.version += 1;
        Inserted {
            kept: true,
            evicted,
        }
    }

    /// Every entry's block hashes (what the `ram` tier of the KV events
    /// holds).
    pub fn blocks(&self) -> impl Iterator<Item = &[u64]> {
        self.entries.iter().map(|e| e.blocks.as_slice())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(first: i32, n: usize) -> Vec<i32> {
        (first..first + n as i32).collect()
    }

    #[test]
    fn a_prompt_finds_the_longest_kept_prefix_in_whole_row_groups() {
        let mut tier: RamTier<i32, &str> = RamTier::new(1000);
        tier.insert(tokens(0, 40), vec![], "a", 10);
        tier.insert(tokens(100, 64), vec![], "b", 10);
        // 50 tokens shared with b, then a different one: 48 in row groups,
        // 50 for a resumed stream.
        let mut prompt = tokens(100, 50);
        prompt.extend([7, 8, 9]);
        assert_eq!(tier.best(&prompt, true), Some((1, 48)));
        assert_eq!(tier.best(&prompt, false), Some((1, 50)));
        assert_eq!(*tier.get(1), "b");
        // The whole entry, but one token must be computed.
        assert_eq!(tier.best(&tokens(0, 40), false), Some((0, 39)));
        assert_eq!(tier.best(&tokens(500, 40), true), None);
    }

    #[test]
    fn the_least_recently_used_prefix_goes_first() {
        let mut tier: RamTier<i32, u8> = RamTier::new(30);
        tier.insert(tokens(0, 40), vec![], 0, 10);
        tier.insert(tokens(100, 40), vec![], 1, 10);
        tier.insert(tokens(200, 40), vec![], 2, 10);
        // Restoring the first makes the second the oldest.
        let (i, _) = tier.best(&tokens(0, 41), true).unwrap();
        tier.get(i);
        let done = tier.insert(tokens(300, 40), vec![], 3, 10);
        assert_eq!(
            done,
            Inserted {
                kept: true,
                evicted: 1
            }
        );
        assert_eq!(tier.bytes(), 30);
        assert!(tier.best(&tokens(100, 41), true).is_none());
        assert!(tier.best(&tokens(0, 41), true).is_some());
        // Too big for the whole budget: not kept, nothing evicted.
        let done = tier.insert(tokens(400, 40), vec![], 4, 31);
        assert_eq!(
            done,
            Inserted {
                kept: false,
                evicted: 0
            }
        );
        assert_eq!(tier.len(), 3);
    }

    #[test]
    fn a_longer_prefix_replaces_the_ones_it_covers() {
        let mut tier: RamTier<i32, u8> = RamTier::new(100);
        tier.insert(tokens(0, 40), vec![], 0, 10);
        // Covered by the kept one: not wanted.
        assert!(!tier.wants(&tokens(0, 36)));
        // Too short to be worth a copy.
        assert!(!tier.wants(&tokens(500, MIN_TOKENS - 1)));
        assert!(tier.wants(&tokens(0, 60)));
        tier.insert(tokens(0, 60), vec![], 1, 15);
        assert_eq!((tier.len(), tier.bytes()), (1, 15));
        // The same 50-token prefix with another tail: one entry, the newer.
        let mut again = tokens(0, 50);
        again.extend([-1, -2, -3]);
        tier.insert(again.clone(), vec![], 2, 15);
        assert_eq!(tier.len(), 1);
        assert_eq!(tier.best(&again, false), Some((0, 52)));
        // A tail of 32 tokens or more is worth its own entry.
        let mut other = tokens(0, 20);
        other.extend(tokens(1000, 40));
        tier.insert(other, vec![], 3, 15);
        assert_eq!(tier.len(), 2);
        // Off: wants nothing.
        let off: RamTier<i32, u8> = RamTier::new(0);
        assert!(!off.wants(&tokens(0, 100)));
    }
}
