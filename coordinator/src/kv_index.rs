//! The exact index of what each worker's KV cache holds, built from the
//! workers' own `KvEvents` streams (see `nanoinfer_proto::kv` and the
//! worker's `kv_events`).
//!
//! Per worker: the set of block hashes it holds, the set it is computing
//! (prompts it accepted and has not prefilled yet: the `KV_TIER_COMPUTING`
//! events), the set it keeps in host memory (`KV_TIER_RAM`: restored at a
//! cost, not free), the worker process's instance id and the last event's sequence
//! number. A stream starts with a
//! snapshot, which replaces the set; each later event must be the next
//! number of the same instance, else the set is **unsynced** (a gap, a
//! restart) and the subscription starts again from a snapshot. While a
//! worker is unsynced, or its stream is down, it has no entry in
//! [`KvIndex::matched`]: it is routed by load alone, never by stale data.
//! Two coordinators reading the same streams hold the same sets.
//!
//! Memory: a worker's sets are bounded by [`KvIndex::new`]'s `max_blocks`
//! (8 bytes a hash plus the set's overhead, about 16–32 bytes a block); a
//! worker reporting more is unsynced and logged rather than grown without
//! bound. A real worker holds at most its KV cells / 16 blocks (512 with
//! the defaults).

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use nanoinfer_proto::worker::{kv_event, KvEventBatch, KvTier};

/// Why a batch could not be applied: the subscription must resync.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Resync {
    #[error("event {got} after {last}: events were missed")]
    Gap { last: u64, got: u64 },
    #[error("events of worker instance {got} on a stream of instance {expected}")]
    Instance { expected: String, got: String },
    #[error("an event before the first snapshot")]
    NoSnapshot,
    #[error("the worker holds more than {0} blocks")]
    TooLarge(usize),
}

#[derive(Default)]
struct Held {
    instance: String,
    seq: u64,
    blocks: HashSet<u64>,
    computing: HashSet<u64>,
    ram: HashSet<u64>,
    synced: bool,
}

impl Held {
    fn clear(&mut self) {
        self.blocks.clear();
        self.computing.clear();
        self.ram.clear();
    }
}

/// Every worker's held blocks.
pub struct KvIndex {
    workers: Mutex<HashMap<String, Held>>,
    max_blocks: usize,
}

impl KvIndex {
    /// An empty index; `max_blocks` bounds each worker's set.
    pub fn new(max_blocks: usize) -> Self {
        Self {
            workers: Mutex::new(HashMap::new()),
            max_blocks,
        }
    }

    /// Applies one batch of `worker`'s stream. On `Err` the worker is
    /// unsynced until its next snapshot.
    pub fn apply(&self, worker: &str, batch: &KvEventBatch) -> Result<(), Resync> {
        let mut workers = self.workers.lock().expect("kv index lock");
        let held = workers.entry(worker.to_string()).or_default();
        let result = Self::apply_to(held, batch, self.max_blocks);
        if result.is_err() {
            held.synced = false;
            held.clear();
        }
        result
    }

    fn apply_to(held: &mut Held, batch: &KvEventBatch, max: usize) -> Result<(), Resync> {
        if batch.snapshot {
            held.instance = batch.instance.clone();
            held.seq = batch.seq;
            held.clear();
            held.synced = true;
        } else if !held.synced {
            return Err(Resync::NoSnapshot);
        } else if batch.instance != held.instance {
            return Err(Resync::Instance {
                expected: held.instance.clone(),
                got: batch.instance.clone(),
            });
        }
        for event in &batch.events {
            if !batch.snapshot {
                if event.seq != held.seq + 1 {
                    return Err(Resync::Gap {
                        last: held.seq,
                        got: event.seq,
                    });
                }
                held.seq = event.seq;
            }
            // A tier this coordinator does not know (a newer worker's) is
            // skipped, never read as reusable.
            let set = match KvTier::try_from(event.tier) {
                Ok(KvTier::Kv | KvTier::Unspecified) => &mut held.blocks,
                Ok(KvTier::Computing) => &mut held.computing,
                Ok(KvTier::Ram) => &mut held.ram,
                _ => {
                    if let Some(kv_event::Kind::Cleared(_)) = event.kind {
                        held.clear();
                    }
                    continue;
                }
            };
            match &event.kind {
                Some(kv_event::Kind::Stored(b)) => set.extend(&b.block_hashes),
                Some(kv_event::Kind::Removed(b)) => {
                    for h in &b.block_hashes {
                        set.remove(h);
                    }
                }
                Some(kv_event::Kind::Cleared(_)) => held.clear(),
                None => {}
            }
        }
        if held.blocks.len() > max || held.computing.len() > max || held.ram.len() > max {
            return Err(Resync::TooLarge(max));
        }
        Ok(())
    }

    /// `worker`'s stream broke or ended: unsynced until a new snapshot.
    pub fn unsync(&self, worker: &str) {
        if let Some(held) = self.workers.lock().expect("kv index lock").get_mut(worker) {
            held.synced = false;
            held.blocks = HashSet::new();
            held.computing = HashSet::new();
            held.ram = HashSet::new();
        }
    }

    /// Forgets `worker` (it left the cluster).
    pub fn remove(&self, worker: &str) {
        self.workers.lock().expect("kv index lock").remove(worker);
    }

    /// How many of `hashes`' leading blocks `worker` holds; `None` when its
    /// set is not known (no stream, unsynced).
    pub fn matched(&self, worker: &str, hashes: &[u64]) -> Option<usize> {
        let workers = self.workers.lock().expect("kv index lock");
        let held = workers.get(worker).filter(|h| h.synced)?;
        Some(
            hashes
                .iter()
                .take_while(|h| held.blocks.contains(h))
                .count(),
        )
    }

    /// `matched`, and with it how many leading blocks `worker` holds or
    /// will hold once the prefills it accepted pass them (the computing
    /// tier), or that `also` counts (this coordinator's own requests not
    /// reported yet), and how many it could have by restoring from its RAM
    /// tier too: `(held, held or coming, held or coming or in RAM)`.
    pub fn matched_with(
        &self,
        worker: &str,
        hashes: &[u64],
        also: impl Fn(&u64) -> bool,
    ) -> Option<(usize, usize, usize)> {
        let workers = self.workers.lock().expect("kv index lock");
        let held = workers.get(worker).filter(|h| h.synced)?;
        let now = hashes
            .iter()
            .take_while(|h| held.blocks.contains(h))
            .count();
        let coming = hashes
            .iter()
            .take_while(|h| held.blocks.contains(h) || held.computing.contains(h) || also(h))
            .count();
        // A RAM entry is a whole prefix: its blocks run from the first.
        let in_ram = hashes.iter().take_while(|h| held.ram.contains(h)).count();
        Some((now, coming, coming.max(in_ram)))
    }

    /// Blocks `worker` holds, or `None` while unsynced.
    pub fn held(&self, worker: &str) -> Option<usize> {
        let workers = self.workers.lock().expect("kv index lock");
        workers
            .get(worker)
            .filter(|h| h.synced)
            .map(|h| h.blocks.len())
    }

    /// Blocks `worker` is computing (prompts accepted, not prefilled yet),
    /// or `None` while unsynced.
    pub fn computing(&self, worker: &str) -> Option<usize> {
        let workers = self.workers.lock().expect("kv index lock");
        workers
            .get(worker)
            .filter(|h| h.synced)
            .map(|h| h.computing.len())
    }

    /// Per worker: blocks held, or `None` while unsynced.
    pub fn sizes(&self) -> Vec<(String, Option<usize>)> {
        let workers = self.workers.lock().expect("kv index lock");
        let mut out: Vec<_> = workers
            .iter()
            .map(|(id, h)| (id.clone(), h.synced.then_some(h.blocks.len())))
            .collect();
        out.sort();
        out
    }

    /// `worker`'s whole set, sorted (tests, and comparing with a snapshot).
    pub fn blocks(&self, worker: &str) -> Option<Vec<u64>> {
        let workers = self.workers.lock().expect("kv index lock");
        let held = workers.get(worker).filter(|h| h.synced)?;
        let mut out: Vec<u64> = held.blocks.iter().copied().collect();
        out.sort_unstable();
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nanoinfer_proto::worker::{KvBlocks, KvEvent};

    fn event(seq: u64, kind: kv_event::Kind) -> KvEvent {
        KvEvent {
            seq,
            tier: 1,
            kind: Some(kind),
        }
    }

    fn stored(seq: u64, h: &[u64]) -> KvEvent {
        event(
            seq,
            kv_event::Kind::Stored(KvBlocks {
                block_hashes: h.to_vec(),
            }),
        )
    }

    fn removed(seq: u64, h: &[u64]) -> KvEvent {
        event(
            seq,
            kv_event::Kind::Removed(KvBlocks {
                block_hashes: h.to_vec(),
            }),
        )
    }

    fn batch(instance: &str, snapshot: bool, seq: u64, events: Vec<KvEvent>) -> KvEventBatch {
        KvEventBatch {
            instance: instance.into(),
            block_tokens: 16,
            snapshot,
            seq,
            events,
        }
    }

    #[test]
    fn events_in_order_build_the_set_and_a_gap_unsyncs_it() {
        let index = KvIndex::new(100);
        assert_eq!(index.matched("w1", &[1]), None, "unknown before a snapshot");
        assert_eq!(
            index.apply("w1", &batch("a", false, 1, vec![stored(1, &[1])])),
            Err(Resync::NoSnapshot)
        );
        index
            .apply("w1", &batch("a", true, 4, vec![stored(4, &[1, 2])]))
            .unwrap();
        index
            .apply(
                "w1",
                &batch("a", false, 6, vec![stored(5, &[3]), removed(6, &[2])]),
            )
            .unwrap();
        assert_eq!(index.blocks("w1"), Some(vec![1, 3]));
        // Leading blocks only: 1 is held, 2 is not, so 3 does not count.
        assert_eq!(index.matched("w1", &[1, 2, 3]), Some(1));
        assert_eq!(index.matched("w1", &[9]), Some(0));

        // Event 8 after 6: a gap. Routed by load (None) until a snapshot.
        assert_eq!(
            index.apply("w1", &batch("a", false, 8, vec![stored(8, &[4])])),
            Err(Resync::Gap { last: 6, got: 8 })
        );
        assert_eq!(index.matched("w1", &[1]), None);
        index
            .apply("w1", &batch("a", true, 8, vec![stored(8, &[1, 4])]))
            .unwrap();
        assert_eq!(index.matched("w1", &[1, 4]), Some(2));

        // Another instance (the worker restarted) on the same stream is a
        // resync too; its snapshot replaces the old set.
        assert!(matches!(
            index.apply("w1", &batch("b", false, 9, vec![stored(9, &[5])])),
            Err(Resync::Instance { .. })
        ));
        index.apply("w1", &batch("b", true, 1, vec![])).unwrap();
        assert_eq!(
            index.matched("w1", &[1]),
            Some(0),
            "a restarted worker holds nothing"
        );

        // A cleared event empties the set; a broken stream unsyncs it.
        index
            .apply("w1", &batch("b", false, 2, vec![stored(2, &[7])]))
            .unwrap();
        index
            .apply(
                "w1",
                &batch("b", false, 3, vec![event(3, kv_event::Kind::Cleared(true))]),
            )
            .unwrap();
        assert_eq!(index.matched("w1", &[7]), Some(0));
        index.unsync("w1");
        assert_eq!(index.matched("w1", &[7]), None);
        index.remove("w1");
        assert!(index.sizes().is_empty());
    }

    #[test]
    fn the_computing_tier_counts_as_coming_not_as_held() {
        let index = KvIndex::new(100);
        let tier = |mut e: KvEvent, tier: KvTier| {
            e.tier = tier as i32;
            e
        };
        let computing = |seq, h: &[u64]| tier(stored(seq, h), KvTier::Computing);
        // Snapshot: block 1 held, 1–3 computing (a prompt in prefill).
        index
            .apply(
                "w1",
                &batch(
                    "a",
                    true,
                    2,
                    vec![stored(2, &[1]), computing(2, &[1, 2, 3])],
                ),
            )
            .unwrap();
        assert_eq!(index.matched("w1", &[1, 2, 3, 4]), Some(1));
        assert_eq!(
            index.matched_with("w1", &[1, 2, 3, 4], |_| false),
            Some((1, 3, 3))
        );
        // What `also` counts extends the run (this coordinator's own sent
        // blocks), and a snapshot of the blocks themselves says nothing of
        // the computing tier.
        assert_eq!(
            index.matched_with("w1", &[1, 2, 3, 4], |h| *h == 4),
            Some((1, 4, 4))
        );
        assert_eq!(index.blocks("w1"), Some(vec![1]));
        // Prefilled: held, no longer computing. A tier this coordinator does
        // not know is skipped, never read as held.
        index
            .apply(
                "w1",
                &batch(
                    "a",
                    false,
                    5,
                    vec![
                        stored(3, &[2, 3]),
                        tier(removed(4, &[1, 2, 3]), KvTier::Computing),
                        KvEvent {
                            tier: 99,
                            ..stored(5, &[9])
                        },
                    ],
                ),
            )
            .unwrap();
        assert_eq!(
            index.matched_with("w1", &[1, 2, 3, 9], |_| false),
            Some((3, 3, 3))
        );
        assert_eq!(index.computing("w1"), Some(0));
        // Cleared empties both tiers.
        index
            .apply(
                "w1",
                &batch(
                    "a",
                    false,
                    7,
                    vec![computing(6, &[5]), event(7, kv_event::Kind::Cleared(true))],
                ),
            )
            .unwrap();
        assert_eq!(index.matched_with("w1", &[1], |_| false), Some((0, 0, 0)));
        assert_eq!(index.matched_with("w1", &[5], |_| false), Some((0, 0, 0)));
    }

    #[test]
    fn the_ram_tier_counts_as_restorable_from_the_first_block() {
        let index = KvIndex::new(100);
        let ram = |seq, h: &[u64]| KvEvent {
            tier: KvTier::Ram as i32,
            ..stored(seq, h)
        };
        // Blocks 1–2 in the KV cache, a longer prefix 1–4 in RAM, and a
        // prefix 7–8 in RAM only.
        index
            .apply(
                "w1",
                &batch(
                    "a",
                    true,
                    2,
                    vec![stored(2, &[1, 2]), ram(2, &[1, 2, 3, 4, 7, 8])],
                ),
            )
            .unwrap();
        assert_eq!(
            index.matched_with("w1", &[1, 2, 3, 4, 5], |_| false),
            Some((2, 2, 4))
        );
        assert_eq!(
            index.matched_with("w1", &[7, 8, 9], |_| false),
            Some((0, 0, 2))
        );
        // Evicted from RAM: gone; cleared: every tier empties.
        index
            .apply(
                "w1",
                &batch(
                    "a",
                    false,
                    4,
                    vec![
                        KvEvent {
                            tier: KvTier::Ram as i32,
                            ..removed(3, &[7, 8])
                        },
                        event(4, kv_event::Kind::Cleared(true)),
                    ],
                ),
            )
            .unwrap();
        assert_eq!(
            index.matched_with("w1", &[1, 2], |_| false),
            Some((0, 0, 0))
        );
    }

    #[test]
    fn a_set_past_the_bound_is_dropped_not_grown() {
        let index = KvIndex::new(2);
        assert_eq!(
            index.apply("w1", &batch("a", true, 1, vec![stored(1, &[1, 2, 3])])),
            Err(Resync::TooLarge(2))
        );
        assert_eq!(index.matched("w1", &[1]), None);
        assert_eq!(index.sizes(), vec![("w1".to_string(), None)]);
    }
}
