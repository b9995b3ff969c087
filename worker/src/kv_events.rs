//! What the KV cache holds, published as events (`KvEvents` on the worker
//! API) for the coordinators' cache-aware routing.
//!
//! The engine thread owns a [`KvPublisher`]: after each turn it hands over,
//! for every slot, the tokens whose cells that slot could lend to a new
//! request (a running sequence's decoded cells, a free slot's kept prefix:
//! exactly what [`crate::engine`] places new prompts against). The
//! publisher cuts them into whole blocks ([`nanoinfer_proto::kv`]), counts
//! each block hash over all slots, and reports the hashes whose count
//! leaves or reaches zero, in the order that happened, to the [`KvHub`].
//! With them it reports the *computing* tier: the whole blocks of every
//! prompt accepted and not prefilled yet (queued, or in prefill), which a
//! request sharing them would wait for rather than compute again. A
//! coordinator counts those as held too, so a second coordinator sends a
//! tenant's next request to the worker already computing its prefix
//! instead of warming a second copy elsewhere. And the *ram* tier: the
//! whole blocks of every prefix the host-RAM tier keeps (evicted from the KV
//! cache, restored on a hit at a cost the load report gives), so a
//! coordinator weighs them below blocks held in the KV cache and above
//! blocks held nowhere.
//!
//! The hub numbers the events (1, 2, 3, … per process, no gaps), keeps the
//! set of held hashes, and fans batches out over a bounded broadcast
//! channel. A subscriber gets a snapshot of the set first, then the live
//! batches after it; one that falls more than [`BACKLOG`] batches behind
//! (it stopped reading) gets a fresh snapshot instead of what it missed, so
//! no subscriber ever makes the engine wait or the worker buffer without
//! bound.

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use futures::Stream;
use nanoinfer_proto::kv::{next_hash, BLOCK_TOKENS};
use nanoinfer_proto::worker::{kv_event, KvBlocks, KvEvent, KvEventBatch, KvTier};
use tokio::sync::broadcast;

/// Batches a subscriber may fall behind before it is resynced with a
/// snapshot (the engine publishes at most one batch per step).
pub const BACKLOG: usize = 256;

/// A token id, from llama.cpp's type or a plain one (tests).
pub trait TokenId: Copy {
    fn id(self) -> i32;
}

impl TokenId for i32 {
    fn id(self) -> i32 {
        self
    }
}

impl TokenId for llama_cpp_2::token::LlamaToken {
    fn id(self) -> i32 {
        self.0
    }
}

/// One change to a tier's set of blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Stored(KvTier, u64),
    Removed(KvTier, u64),
}

/// The blocks one slot publishes: its tokens in whole blocks, and their
/// hashes.
#[derive(Default)]
struct SlotBlocks {
    tokens: Vec<i32>,
    hashes: Vec<u64>,
}

/// Per-slot block tracking on the engine thread.
pub struct KvPublisher {
    slots: Vec<SlotBlocks>,
    /// How many slots hold each block.
    counts: HashMap<u64, u32>,
    /// The computing tier as last published.
    computing: HashSet<u64>,
    /// The ram tier as last published.
    ram: HashSet<u64>,
    hub: Arc<KvHub>,
}

impl KvPublisher {
    /// A publisher for `slots` slots, all empty, reporting to `hub`.
    pub fn new(slots: usize, hub: Arc<KvHub>) -> Self {
        Self {
            slots: (0..slots).map(|_| SlotBlocks::default()).collect(),
            counts: HashMap::new(),
            computing: HashSet::new(),
            ram: HashSet::new(),
            hub,
        }
    }

    /// Brings the published blocks up to date: `held(slot)` gives each
    /// slot's reusable tokens now, and nothing is computing. Publishes one
    /// batch if anything changed.
    pub fn sync<'a, T: TokenId + 'a>(&mut self, held: impl Fn(usize) -> &'a [T]) {
        self.sync_with(held, std::iter::empty());
    }

    /// [`KvPublisher::sync`], with `computing` listing the block hashes of
    /// each prompt accepted and not prefilled yet. The held tier's changes
    /// come first in the batch, so a block being written moves from
    /// computing to held without a moment in neither.
    pub fn sync_with<'a, 'b, T: TokenId + 'a>(
        &mut self,
        held: impl Fn(usize) -> &'a [T],
        computing: impl Iterator<Item = &'b [u64]>,
    ) {
        self.sync_tiers(held, computing, None::<std::iter::Empty<&[u64]>>);
    }

    /// [`KvPublisher::sync_with`], with `ram` listing the block hashes of
    /// each prefix the host-RAM tier keeps (`None`: unchanged since the
    /// last call). Its changes come after the held tier's, so a restored
    /// prefix is never in neither.
    pub fn sync_tiers<'a, 'b, 'c, T: TokenId + 'a>(
        &mut self,
        held: impl Fn(usize) -> &'a [T],
        computing: impl Iterator<Item = &'b [u64]>,
        ram: Option<impl Iterator<Item = &'c [u64]>>,
    ) {
        let mut changes = Vec::new();
        for slot in 0..self.slots.len() {
            let tokens = held(slot);
            self.sync_slot(slot, tokens, &mut changes);
        }
        let now: HashSet<u64> = computing.flatten().copied().collect();
        diff(&self.computing, &now, KvTier::Computing, &mut changes);
        self.computing = now;
        if let Some(ram) = ram {
            let now: HashSet<u64> = ram.flatten().copied().collect();
            diff(&self.ram, &now, KvTier::Ram, &mut changes);
            self.ram = now;
        }
        self.hub.publish(&changes);
    }

    fn sync_slot<T: TokenId>(&mut self, slot: usize, tokens: &[T], changes: &mut Vec<Change>) {
        let whole = tokens.len() / BLOCK_TOKENS * BLOCK_TOKENS;
        let tokens = &tokens[..whole];
        let blocks = &mut self.slots[slot];
        let same = blocks
            .tokens
            .iter()
            .zip(tokens)
            .take_while(|(a, b)| **a == b.id())
            .count();
        let keep = same / BLOCK_TOKENS;
        if keep == blocks.hashes.len() && blocks.tokens.len() == tokens.len() {
            return;
        }
        // Blocks past the shared prefix go, newest first.
        for h in blocks.hashes.drain(keep..).rev() {
            let count = self
                .counts
                .get_mut(&h)
                .expect("a published block is counted");
            *count -= 1;
            if *count == 0 {
                self.counts.remove(&h);
                changes.push(Change::Removed(KvTier::Kv, h));
            }
        }
        blocks.tokens.truncate(keep * BLOCK_TOKENS);
        let mut parent = blocks.hashes.last().copied();
        let new: Vec<i32> = tokens[keep * BLOCK_TOKENS..]
            .iter()
            .map(|t| t.id())
            .collect();
        for block in new.chunks_exact(BLOCK_TOKENS) {
            let h = next_hash(parent, block);
            blocks.hashes.push(h);
            let count = self.counts.entry(h).or_insert(0);
            *count += 1;
            if *count == 1 {
                changes.push(Change::Stored(KvTier::Kv, h));
            }
            parent = Some(h);
        }
        blocks.tokens.extend_from_slice(&new);
    }

    /// Forgets every block (the engine stopped, or its cache was reset).
    pub fn clear(&mut self) {
        for blocks in &mut self.slots {
            *blocks = SlotBlocks::default();
        }
        self.counts.clear();
        self.computing.clear();
        self.ram.clear();
        self.hub.clear();
    }
}

/// Appends the changes that turn tier `tier`'s set `was` into `now`:
/// removals first.
fn diff(was: &HashSet<u64>, now: &HashSet<u64>, tier: KvTier, changes: &mut Vec<Change>) {
    changes.extend(was.difference(now).map(|&h| Change::Removed(tier, h)));
    changes.extend(now.difference(was).map(|&h| Change::Stored(tier, h)));
}

/// The held set, numbered events and their subscribers.
pub struct KvHub {
    instance: String,
    state: Mutex<HubState>,
    tx: broadcast::Sender<Arc<KvEventBatch>>,
}

struct HubState {
    /// The last event's number.
    seq: u64,
    held: HashSet<u64>,
    computing: HashSet<u64>,
    ram: HashSet<u64>,
}

/// The stream a subscriber reads.
pub type KvEventStream = Pin<Box<dyn Stream<Item = Result<KvEventBatch, tonic::Status>> + Send>>;

impl KvHub {
    /// A hub holding nothing. Its first event is `cleared` (seq 1): a new
    /// engine holds no blocks.
    pub fn new() -> Arc<Self> {
        let hub = Arc::new(Self {
            instance: uuid::Uuid::new_v4().simple().to_string(),
            state: Mutex::new(HubState {
                seq: 0,
                held: HashSet::new(),
                computing: HashSet::new(),
                ram: HashSet::new(),
            }),
            tx: broadcast::channel(BACKLOG).0,
        });
        hub.clear();
        hub
    }

    /// This process's instance id.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Blocks held now.
    pub fn held(&self) -> usize {
        self.state.lock().expect("kv hub lock").held.len()
    }

    /// Blocks in the computing tier now.
    pub fn computing(&self) -> usize {
        self.state.lock().expect("kv hub lock").computing.len()
    }

    /// Blocks in the ram tier now.
    pub fn ram(&self) -> usize {
        self.state.lock().expect("kv hub lock").ram.len()
    }

    /// Numbers `changes` (consecutive changes of one kind and tier share an
    /// event), applies them and sends them as one batch.
    pub fn publish(&self, changes: &[Change]) {
        if changes.is_empty() {
            return;
        }
        let mut state = self.state.lock().expect("kv hub lock");
        let mut events: Vec<KvEvent> = Vec::new();
        let mut last: Option<(bool, KvTier)> = None;
        for change in changes {
            let (stored, tier, h) = match *change {
                Change::Stored(tier, h) => (true, tier, h),
                Change::Removed(tier, h) => (false, tier, h),
            };
            let set = match tier {
                KvTier::Computing => &mut state.computing,
                KvTier::Ram => &mut state.ram,
                _ => &mut state.held,
            };
            if stored {
                set.insert(h);
            } else {
                set.remove(&h);
            }
            if last != Some((stored, tier)) {
                state.seq += 1;
                let blocks = KvBlocks::default();
                events.push(KvEvent {
                    seq: state.seq,
                    tier: tier as i32,
                    kind: Some(if stored {
                        kv_event::Kind::Stored(blocks)
                    } else {
                        kv_event::Kind::Removed(blocks)
                    }),
                });
                last = Some((stored, tier));
            }
            match &mut events.last_mut().expect("an event").kind {
                Some(kv_event::Kind::Stored(b) | kv_event::Kind::Removed(b)) => {
                    b.block_hashes.push(h)
                }
                _ => unreachable!("stored or removed"),
            }
        }
        let batch = self.batch(false, state.seq, events);
        // Sent under the lock, so batches go out in sequence order and a
        // snapshot taken under it is exactly current.
        let _ = self.tx.send(Arc::new(batch));
    }

    /// Everything is gone: one `cleared` event.
    pub fn clear(&self) {
        let mut state = self.state.lock().expect("kv hub lock");
        state.held.clear();
        state.computing.clear();
        state.ram.clear();
        state.seq += 1;
        let event = KvEvent {
            seq: state.seq,
            tier: KvTier::Kv as i32,
            kind: Some(kv_event::Kind::Cleared(true)),
        };
        let batch = self.batch(false, state.seq, vec![event]);
        let _ = self.tx.send(Arc::new(batch));
    }

    fn batch(&self, snapshot: bool, seq: u64, events: Vec<KvEvent>) -> KvEventBatch {
        KvEventBatch {
            instance: self.instance.clone(),
            block_tokens: BLOCK_TOKENS as u32,
            snapshot,
            seq,
            events,
        }
    }

    /// A snapshot of every tier and a receiver positioned right after it.
    fn snapshot(&self) -> (KvEventBatch, broadcast::Receiver<Arc<KvEventBatch>>) {
        let state = self.state.lock().expect("kv hub lock");
        let rx = self.tx.subscribe();
        let event = |tier: KvTier, set: &HashSet<u64>| {
            let mut hashes: Vec<u64> = set.iter().copied().collect();
            hashes.sort_unstable();
            KvEvent {
                seq: state.seq,
                tier: tier as i32,
                kind: Some(kv_event::Kind::Stored(KvBlocks {
                    block_hashes: hashes,
                })),
            }
        };
        let events = vec![
            event(KvTier::Kv, &state.held),
            event(KvTier::Computing, &state.computing),
            event(KvTier::Ram, &state.ram),
        ];
        (self.batch(true, state.seq, events), rx)
    }

    /// A subscriber's stream: a snapshot, then every batch after it; a
    /// fresh snapshot whenever it fell [`BACKLOG`] batches behind. Ends when
    /// the hub is dropped.
    pub fn subscribe(self: &Arc<Self>) -> KvEventStream {
        let hub = self.clone();
        let (first, rx) = hub.snapshot();
        let stream = futures::stream::unfold(
            (hub, Some(first), rx),
            |(hub, pending, mut rx)| async move {
                if let Some(batch) = pending {
                    return Some((Ok(batch), (hub, None, rx)));
                }
                match rx.recv().await {
                    Ok(batch) => Some((Ok((*batch).clone()), (hub, None, rx))),
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        tracing::info!(missed, "a KV event subscriber fell behind; resyncing it");
                        let (snapshot, rx) = hub.snapshot();
                        Some((Ok(snapshot), (hub, None, rx)))
                    }
                    Err(broadcast::error::RecvError::Closed) => None,
                }
            },
        );
        Box::pin(stream)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use nanoinfer_proto::kv::block_hashes;
    use std::collections::HashSet;

    /// The set a subscriber builds from a stream's batches.
    #[derive(Default)]
    struct Index {
        seq: u64,
        held: HashSet<u64>,
        computing: HashSet<u64>,
        ram: HashSet<u64>,
    }

    impl Index {
        fn apply(&mut self, b: &KvEventBatch) {
            if b.snapshot {
                self.held.clear();
                self.computing.clear();
                self.ram.clear();
                self.seq = b.seq;
            }
            for e in &b.events {
                if !b.snapshot {
                    assert_eq!(e.seq, self.seq + 1, "events come without gaps");
                    self.seq = e.seq;
                }
                let set = if e.tier == KvTier::Computing as i32 {
                    &mut self.computing
                } else if e.tier == KvTier::Ram as i32 {
                    &mut self.ram
                } else {
                    &mut self.held
                };
                match e.kind.as_ref().unwrap() {
                    kv_event::Kind::Stored(x) => set.extend(&x.block_hashes),
                    kv_event::Kind::Removed(x) => {
                        for h in &x.block_hashes {
                            assert!(set.remove(h), "removed a block never stored");
                        }
                    }
                    kv_event::Kind::Cleared(_) => {
                        self.held.clear();
                        self.computing.clear();
                        self.ram.clear();
                    }
                }
            }
        }
    }

    fn tokens(seed: i32, n: usize) -> Vec<i32> {
        (0..n as i32).map(|i| seed * 1000 + i).collect()
    }

    #[tokio::test]
    async fn events_follow_the_slots_and_snapshots_start_every_stream() {
        let hub = KvHub::new();
        let mut stream = hub.subscribe();
        let mut index = Index::default();
        let mut publisher = KvPublisher::new(2, hub.clone());
        let a = tokens(1, 40); // two whole blocks and 8 tokens
        let mut b = tokens(1, 16);
        b.extend(tokens(2, 20)); // shares a's first block
        publisher.sync(|s| if s == 0 { &a[..] } else { &b[..] });
        // Slot 0 drops to one block (still held by slot 1 too), slot 1 empties.
        publisher.sync(|s| if s == 0 { &a[..20] } else { &[] });
        publisher.sync(|s| if s == 0 { &a[..] } else { &b[..] });
        for _ in 0..4 {
            let batch = stream.next().await.unwrap().unwrap();
            index.apply(&batch);
        }
        let expected: HashSet<u64> = block_hashes(&a)
            .into_iter()
            .chain(block_hashes(&b))
            .collect();
        assert_eq!(expected.len(), 3, "one shared block");
        assert_eq!(index.held, expected);
        assert_eq!(hub.held(), 3);

        // A late subscriber starts from a snapshot equal to the same set.
        let mut late = hub.subscribe();
        let mut other = Index::default();
        other.apply(&late.next().await.unwrap().unwrap());
        assert_eq!(other.held, expected);
        assert_eq!(other.seq, index.seq);

        // Then both see the same events: a cleared cache empties both.
        publisher.clear();
        index.apply(&stream.next().await.unwrap().unwrap());
        other.apply(&late.next().await.unwrap().unwrap());
        assert!(index.held.is_empty() && other.held.is_empty());
    }

    #[tokio::test]
    async fn accepted_prompts_are_computing_until_their_blocks_are_held() {
        let hub = KvHub::new();
        let mut stream = hub.subscribe();
        let mut index = Index::default();
        index.apply(&stream.next().await.unwrap().unwrap());
        let mut publisher = KvPublisher::new(1, hub.clone());
        let prompt = tokens(3, 50); // three whole blocks
        let blocks = block_hashes(&prompt);
        // Queued: nothing held, all three computing.
        publisher.sync_with(|_| &[] as &[i32], [&blocks[..]].into_iter());
        index.apply(&stream.next().await.unwrap().unwrap());
        assert!(index.held.is_empty());
        assert_eq!(index.computing, blocks.iter().copied().collect());
        // Half prefilled: one block held, all still computing.
        publisher.sync_with(|_| &prompt[..20], [&blocks[..]].into_iter());
        index.apply(&stream.next().await.unwrap().unwrap());
        assert_eq!(index.held, HashSet::from([blocks[0]]));
        assert_eq!(index.computing.len(), 3);
        // A late subscriber's snapshot names both tiers apart.
        let mut late = hub.subscribe();
        let mut other = Index::default();
        other.apply(&late.next().await.unwrap().unwrap());
        assert_eq!(
            (&other.held, &other.computing),
            (&index.held, &index.computing)
        );
        // Prefilled: held, and computing no more, in one batch whose held
        // events come first.
        publisher.sync_with(|_| &prompt[..], std::iter::empty());
        let batch = stream.next().await.unwrap().unwrap();
        assert_eq!(batch.events.len(), 2);
        assert_eq!(batch.events[0].tier, KvTier::Kv as i32);
        assert_eq!(batch.events[1].tier, KvTier::Computing as i32);
        index.apply(&batch);
        assert_eq!(index.held, blocks.iter().copied().collect());
        assert!(index.computing.is_empty());
        assert_eq!((hub.held(), hub.computing()), (3, 0));
        // Cleared: nothing in either tier.
        publisher.sync_with(|_| &prompt[..], [&blocks[..]].into_iter());
        publisher.clear();
        index.apply(&stream.next().await.unwrap().unwrap());
        index.apply(&stream.next().await.unwrap().unwrap());
        assert!(index.held.is_empty() && index.computing.is_empty());
        assert_eq!((hub.held(), hub.computing()), (0, 0));
    }

    #[tokio::test]
    async fn an_evicted_prefix_moves_to_the_ram_tier_and_back() {
        let hub = KvHub::new();
        let mut stream = hub.subscribe();
        let mut index = Index::default();
        index.apply(&stream.next().await.unwrap().unwrap());
        let mut publisher = KvPublisher::new(1, hub.clone());
        let prompt = tokens(4, 40); // two whole blocks
        let blocks = block_hashes(&prompt);
        publisher.sync_with(|_| &prompt[..], std::iter::empty());
        index.apply(&stream.next().await.unwrap().unwrap());
        // Evicted to RAM: out of the KV tier and into the ram tier in one
        // batch.
        publisher.sync_tiers(
            |_| &[] as &[i32],
            std::iter::empty(),
            Some([&blocks[..]].into_iter()),
        );
        let batch = stream.next().await.unwrap().unwrap();
        assert_eq!(batch.events.len(), 2);
        index.apply(&batch);
        assert!(index.held.is_empty());
        assert_eq!(index.ram, blocks.iter().copied().collect());
        assert_eq!((hub.held(), hub.ram()), (0, 2));
        // A late subscriber's snapshot names the ram tier apart.
        let mut late = hub.subscribe();
        let mut other = Index::default();
        other.apply(&late.next().await.unwrap().unwrap());
        assert_eq!((&other.held, &other.ram), (&index.held, &index.ram));
        // Restored (and still kept in RAM): in both tiers.
        publisher.sync_tiers(
            |_| &prompt[..],
            std::iter::empty(),
            None::<std::iter::Empty<&[u64]>>,
        );
        index.apply(&stream.next().await.unwrap().unwrap());
        assert_eq!(index.held, index.ram);
        // Cleared empties every tier.
        publisher.clear();
        index.apply(&stream.next().await.unwrap().unwrap());
        assert!(index.held.is_empty() && index.ram.is_empty());
        assert_eq!(hub.ram(), 0);
    }

    #[tokio::test]
    async fn a_subscriber_that_stops_reading_is_resynced_not_waited_for() {
        let hub = KvHub::new();
        let mut slow = hub.subscribe();
        let mut publisher = KvPublisher::new(1, hub.clone());
        let mut all = Vec::new();
        // Far more batches than the backlog, none read: publishing never
        // blocks.
        for i in 0..(BACKLOG as i32 * 3) {
            all = tokens(i, 32);
            publisher.sync(|_| &all[..]);
        }
        let mut index = Index::default();
        index.apply(&slow.next().await.unwrap().unwrap()); // the first snapshot
        let mut resynced = false;
        // What it reads next: a fresh snapshot, then it is current.
        while index.held != block_hashes(&all).into_iter().collect::<HashSet<_>>() || !resynced {
            let batch = slow.next().await.unwrap().unwrap();
            resynced |= batch.snapshot;
            index.apply(&batch);
        }
        assert!(resynced);
        assert_eq!(index.seq, hub.state.lock().unwrap().seq);
    }
}
