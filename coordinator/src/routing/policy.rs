//! How a request's worker is chosen among those with room (`--routing`).
//!
//! **Cache-aware**: every worker streams what its KV cache holds
//! (`KvEvents`) into the [`KvIndex`](crate::kv_index::KvIndex); a request's prompt is tokenized with
//! the workers' own vocabulary ([`crate::vocab`]) and cut into the same
//! block hashes. Each candidate costs the prefill work the request would
//! wait for there, in blocks: `(blocks − max(cached, in_ram)) + c ·
//! (in_ram − cached)⁺ + pending + w · load`. `blocks` is the prompt's
//! whole blocks; `in_ram` its leading blocks the worker keeps in its
//! host-RAM tier, restored at `c` of a block each (the worker's measured
//! `ram_restore_cost`, else [`DEFAULT_RAM_RESTORE_COST`]); `cached` its
//! leading blocks the worker holds (in the index), or is computing: for a
//! prompt it accepted (the index's computing tier, whichever coordinator sent it), or for a
//! request this coordinator sent it that has not ended ([`SentBlocks`](super::SentBlocks),
//! which covers the moment before the worker's events say so); `pending` the
//! prompt blocks this coordinator's requests there have yet to prefill
//! (until their first token), less those this prompt shares with them;
//! `load` the worker's requests in flight (this coordinator's and, from its
//! load reports, the others'); `w` `--cache-aware-load-weight`, what one
//! request in flight counts as, in blocks. The lowest cost wins; among
//! costs within [`SCORE_TIE`] of it, the lighter of two random workers.
//! Workers without room are costed too: when one of them wins and a
//! request of this coordinator's runs there, the request waits for room
//! rather than prefilling its prompt again elsewhere. A worker whose event
//! stream is down or resyncing counts as holding nothing (never by stale
//! data), and so does every worker while the prompt's model has no
//! vocabulary loaded yet.
//!
//! **Prefix affinity** ([`crate::affinity`]): the worker this coordinator
//! sent the longest shared prompt text to, unless it has more than
//! `--affinity-max-load-gap` requests more in flight than the least loaded;
//! otherwise the lighter of two random workers ([`two_choices`]).
//! **Least-loaded**: the fewest requests in flight, ties in turn
//! ([`choose`]). **Random**: any worker with room.

use std::sync::atomic::Ordering;

use super::{PendingPrefill, Pick, Picked, Router, Sent, WorkerState};
use crate::metrics::{AffinityLabel, DecisionLabel};

/// Cache-aware costs this close to the lowest count as equal.
pub const SCORE_TIE: f64 = 1e-6;

/// What a block in a worker's RAM tier costs, as a fraction of computing
/// it, until the worker reports its measured cost (`ram_restore_cost`):
/// measured here at about 0.01 (a restore is a copy), so this is cautious.
pub const DEFAULT_RAM_RESTORE_COST: f64 = 0.25;

/// A cache-aware candidate's cost in prompt blocks (lower is better):
/// the prompt's blocks it would prefill (those past `cached`; those it
/// keeps in its RAM tier, up to `in_ram`, at `ram_cost` of a block each),
/// the prefill already pending on it, and `weight` blocks per request in
/// flight.
pub fn cache_aware_cost(
    blocks: usize,
    (cached, in_ram, ram_cost): (usize, usize, f64),
    pending: usize,
    load: usize,
    weight: f64,
) -> f64 {
    let restored = in_ram.min(blocks).saturating_sub(cached);
    blocks.saturating_sub(cached.max(in_ram)) as f64
        + restored as f64 * ram_cost
        + pending as f64
        + weight * load as f64
}

/// Index of the candidate with the fewest in flight; among ties, the one at
/// `rotation` modulo the number of ties.
pub fn choose(in_flight: &[usize], rotation: usize) -> Option<usize> {
    let min = *in_flight.iter().min()?;
    let ties: Vec<usize> = (0..in_flight.len())
        .filter(|&i| in_flight[i] == min)
        .collect();
    Some(ties[rotation % ties.len()])
}

/// Power of two choices: of two distinct candidates drawn from `random`, the
/// one with the lower load (the first drawn on a tie). With two candidates
/// or fewer that is simply [`choose`] with `rotation`.
pub fn two_choices(loads: &[usize], random: u64, rotation: usize) -> Option<usize> {
    let n = loads.len() as u64;
    if n <= 2 {
        return choose(loads, rotation);
    }
    let i = (random % n) as usize;
    let j = (i + 1 + ((random >> 32) % (n - 1)) as usize) % n as usize;
    Some(if loads[j] < loads[i] { j } else { i })
}

impl Router {
    /// Picks a routable worker whatever its load (one-shot calls such as
    /// tokenize), skipping ids in `exclude`; with `model`, only among
    /// workers serving it.
    pub fn pick(&self, exclude: &[String], model: Option<&str>, prefix: &[u64]) -> Option<Picked> {
        match self.choose_worker(exclude, model, prefix, false) {
            Pick::Worker(p) => Some(p),
            Pick::Busy | Pick::None => None,
        }
    }

    /// Picks a routable worker with room, skipping ids in `exclude`; with
    /// `model`, only among workers serving it. With prefix affinity and
    /// `prefix` (the prompt's [`crate::affinity::prefix_blocks`]), the
    /// worker that holds the longest part of it, within the load gap.
    pub fn pick_with_room(&self, exclude: &[String], model: Option<&str>, prefix: &[u64]) -> Pick {
        self.choose_worker(exclude, model, prefix, true)
    }

    fn choose_worker(
        &self,
        exclude: &[String],
        model: Option<&str>,
        prefix: &[u64],
        need_room: bool,
    ) -> Pick {
        let workers = self.workers.lock().expect("router lock");
        let mut candidates: Vec<(&String, &WorkerState)> = workers
            .iter()
            .filter(|(id, w)| {
                !w.ejected && !exclude.contains(id) && model.is_none_or(|m| w.model_name == m)
            })
            .collect();
        if candidates.is_empty() {
            return Pick::None;
        }
        let now = tokio::time::Instant::now();
        // A stable order, so rotation among ties is fair.
        candidates.sort_by(|a, b| a.0.cmp(b.0));
        let rotation = self.rotation.fetch_add(1, Ordering::Relaxed);
        if self.upstream.routing == crate::affinity::Routing::CacheAware {
            // Costed with or without room: a full worker holding the
            // prompt may be worth waiting for.
            let counts: Vec<usize> = candidates.iter().map(|(_, w)| w.load(now)).collect();
            return self.cache_aware(&candidates, &counts, prefix, rotation, need_room);
        }
        if need_room {
            candidates.retain(|(_, w)| w.load(now) < w.limit);
            if candidates.is_empty() {
                return Pick::Busy;
            }
        }
        let counts: Vec<usize> = candidates.iter().map(|(_, w)| w.load(now)).collect();
        if self.upstream.routing == crate::affinity::Routing::Random {
            let i = (uuid::Uuid::new_v4().as_u128() % candidates.len() as u128) as usize;
            let (id, w) = candidates[i];
            return Pick::Worker(w.picked(id, &self.admission));
        }
        let mut index = if self.wants_prefix() {
            // Where affinity has no preference: the lighter of two random
            // workers, so that coordinators routing by the same slightly
            // old reports do not all pile onto the one least loaded.
            two_choices(&counts, uuid::Uuid::new_v4().as_u128() as u64, rotation)
        } else {
            choose(&counts, rotation)
        }
        .expect("candidates is not empty");
        if self.wants_prefix() && !prefix.is_empty() {
            let mut table = self.prefixes.lock().expect("prefix lock");
            let scored: Vec<(usize, usize)> = candidates
                .iter()
                .zip(&counts)
                .map(|((id, _), n)| (*n, table.matched(id, prefix)))
                .collect();
            let choice =
                crate::affinity::choose(&scored, self.upstream.affinity_max_load_gap, index);
            index = choice.index();
            table.record(candidates[index].0, prefix);
            self.metrics
                .affinity
                .get_or_create(&AffinityLabel {
                    outcome: choice.label(),
                })
                .inc();
        }
        let (id, w) = candidates[index];
        Pick::Worker(w.picked(id, &self.admission))
    }

    /// Counts one finished request's prediction outcome (`agree`, `more`,
    /// `fewer`).
    pub fn kv_prediction(&self, reason: &'static str) {
        self.metrics
            .kv
            .predictions
            .get_or_create(&DecisionLabel { reason })
            .inc();
    }

    /// Cache-aware choice among `candidates` (loads `counts`) for a prompt
    /// whose whole blocks hash to `blocks` (empty: not known).
    fn cache_aware(
        &self,
        candidates: &[(&String, &WorkerState)],
        counts: &[usize],
        blocks: &[u64],
        rotation: usize,
        need_room: bool,
    ) -> Pick {
        // Per candidate: the leading blocks it holds (in the index), and
        // with them those it is computing: for any coordinator's request
        // (its computing tier), or for one this coordinator sent that it
        // has not reported yet.
        let found: Vec<Option<(usize, usize, usize)>> = candidates
            .iter()
            .map(|(id, w)| {
                if blocks.is_empty() {
                    return None;
                }
                let sent = w.sent.lock().expect("sent blocks lock");
                self.kv.matched_with(id, blocks, |h| sent.contains_key(h))
            })
            .collect();
        let matched: Vec<Option<usize>> =
            found.iter().map(|f| f.map(|(_, total, _)| total)).collect();
        let weight = self.upstream.cache_aware_load_weight;
        let costs: Vec<f64> = candidates
            .iter()
            .zip(counts)
            .zip(&found)
            .map(|(((_, w), &load), f)| {
                let (held, total, in_ram) = f.unwrap_or((0, 0, 0));
                // Pending prefill of the blocks this prompt shares is work
                // it needs done anyway, not work ahead of it.
                let pending = w
                    .pending
                    .load(Ordering::Relaxed)
                    .saturating_sub(total - held);
                let ram_cost = if w.ram_restore_cost > 0.0 {
                    f64::from(w.ram_restore_cost)
                } else {
                    DEFAULT_RAM_RESTORE_COST
                };
                cache_aware_cost(
                    blocks.len(),
                    (total, in_ram, ram_cost),
                    pending,
                    load,
                    weight,
                )
            })
            .collect();
        let best = costs.iter().copied().fold(f64::INFINITY, f64::min);
        let tied: Vec<usize> = (0..candidates.len())
            .filter(|&i| costs[i] <= best + SCORE_TIE)
            .collect();
        let tied_loads: Vec<usize> = tied.iter().map(|&i| counts[i]).collect();
        let mut index =
            tied[two_choices(&tied_loads, uuid::Uuid::new_v4().as_u128() as u64, rotation)
                .expect("a best score")];
        let full = |i: usize| counts[i] >= candidates[i].1.limit;
        if need_room && full(index) {
            // The cheapest worker is full. Wait for its room when a request
            // of this coordinator's runs there (its end wakes the wait);
            // otherwise (full by other coordinators' requests) nothing here
            // would wake it: take the cheapest worker with room.
            if candidates[index].1.in_flight.get() > 0 {
                return Pick::Busy;
            }
            match (0..candidates.len())
                .filter(|&i| !full(i))
                .min_by(|&a, &b| costs[a].total_cmp(&costs[b]))
            {
                Some(i) => index = i,
                None => return Pick::Busy,
            }
        }
        let reason = if matched[index].is_some_and(|m| m > 0) {
            "cache"
        } else if matched.iter().any(Option::is_some) {
            "load"
        } else {
            "no_index"
        };
        if need_room {
            // A generation's pick (a one-shot call such as Tokenize has no
            // prompt blocks and is not a routing decision worth counting).
            self.metrics
                .kv
                .decisions
                .get_or_create(&DecisionLabel { reason })
                .inc();
        }
        let (id, w) = candidates[index];
        tracing::debug!(worker = %id, reason, blocks = blocks.len(), ?matched, ?counts, ?costs,
            "cache-aware pick");
        let mut picked = w.picked(id, &self.admission);
        picked.predicted_blocks = matched[index];
        let prefill = blocks.len() - matched[index].unwrap_or(0).min(blocks.len());
        w.pending.fetch_add(prefill, Ordering::Relaxed);
        picked.prefill = Some(PendingPrefill(w.pending.clone(), prefill));
        picked.sent = Some(Sent::new(&w.sent, blocks));
        Pick::Worker(picked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choose_prefers_least_loaded_and_rotates_ties() {
        assert_eq!(choose(&[], 0), None);
        assert_eq!(choose(&[3, 1, 2], 5), Some(1));
        assert_eq!(choose(&[0, 0], 0), Some(0));
        assert_eq!(choose(&[0, 0], 1), Some(1));
        assert_eq!(choose(&[2, 0, 0], 1), Some(2));
    }

    #[test]
    fn two_choices_takes_the_lighter_of_two_distinct_draws() {
        assert_eq!(two_choices(&[], 7, 0), None);
        assert_eq!(two_choices(&[5], 7, 0), Some(0));
        // Two candidates: the least loaded whatever the draw, ties in turn.
        assert_eq!(two_choices(&[3, 1], 0, 0), Some(1));
        assert_eq!(two_choices(&[1, 1], 0, 1), Some(1));
        // Draws 0 and 0+1+(1 % 3) = 2: the lighter of those two, never the
        // lightest overall (index 1) it did not draw.
        let loads = [4, 0, 2, 9];
        assert_eq!(two_choices(&loads, 1 << 32, 0), Some(2));
        // Every draw is two distinct candidates: over all draws each one
        // is chosen sometimes except the heaviest, which loses every pair.
        let mut chosen = [0; 4];
        for r in 0..64u64 {
            chosen[two_choices(&loads, r | (r << 32), 0).unwrap()] += 1;
        }
        assert_eq!(chosen[3], 0, "{chosen:?}");
        assert!(chosen[1] > chosen[2] && chosen[2] > chosen[0], "{chosen:?}");
    }

    #[test]
    fn the_cache_aware_cost_weighs_prefill_against_load() {
        // A 30-block prompt: all cached and idle costs nothing; not cached,
        // 30; each request in flight adds the weight; pending prefill adds
        // itself.
        let cached = |n| (n, n, 0.25);
        assert_eq!(cache_aware_cost(30, cached(30), 0, 0, 4.0), 0.0);
        assert_eq!(cache_aware_cost(30, cached(0), 0, 0, 4.0), 30.0);
        assert_eq!(cache_aware_cost(30, cached(30), 0, 7, 4.0), 28.0);
        assert_eq!(cache_aware_cost(30, cached(30), 27, 0, 4.0), 27.0);
        // 20 blocks in RAM past 10 in the KV cache, at a tenth of a block
        // each: 2 blocks of work and the 0 left to compute; a RAM entry
        // that does not reach past the KV cache's blocks changes nothing.
        assert_eq!(cache_aware_cost(30, (10, 30, 0.1), 0, 0, 4.0), 2.0);
        assert_eq!(cache_aware_cost(30, (10, 20, 0.5), 0, 0, 4.0), 15.0);
        assert_eq!(cache_aware_cost(30, (10, 5, 0.5), 0, 0, 4.0), 20.0);
        // More cached than the prompt's blocks cannot go negative.
        assert_eq!(cache_aware_cost(3, (5, 5, 0.25), 0, 0, 1.0), 0.0);
    }
}
