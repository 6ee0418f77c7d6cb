//! The streaming plan of one rank in **range mode**: which blocks of which shards it fetches
//! next, which it keeps and which it lets go, from the byte ranges its steps read. Pure, like
//! [`super::Plan`] (whose shard-granular window it refines): the shell
//! ([`super::stream`]) feeds it each step's byte ranges (the sampler knows every future
//! sample) and what happened, and asks it what to do.
//!
//! A dataset larger than its cache budget, read in a global shuffle, touches any shard at any
//! step: held a shard at a time, the cache fetches the dataset many times over per pass. In
//! range mode the unit is a **block** of a shard's `.bin` (the block size of the dataset's
//! block checksums, [`super::BlockSums`]): a step needs only the blocks its samples' bytes
//! fall in.
//!
//! # The window
//!
//! As in [`super::Plan`]: the steps from the reader's on are walked in order, each step's
//! blocks in order, each block counted once, adding up their bytes; the **window** is that
//! walk up to the first block that would take the sum past the limit less the demand
//! reserve. Fetches go through the window in order, a bounded number of GETs in flight, each
//! GET the first block not held and its neighbours in the same shard that are in the window
//! and not held (coalesced up to [`RangeConfig::get_bytes`]); a present block that has left
//! the window is released. A block the current step reads is never released: its blocks
//! come first in the walk, and a step larger than the window is refused when planned.
//!
//! # Reads outside the plan
//!
//! A read of blocks outside the window (validation samples, a read ahead of the plan) makes
//! them the **demand**, fetched first, within a reserve set aside from the limit; a new
//! demand replaces the old, whose blocks are then released. The shell demands at most the
//! reserve at once (a longer read goes in pieces).
//!
//! # Invariants (tested below: exhaustively over small cases, and by property)
//!
//! - The held blocks (fetching or present) cost at most the limit, at every moment.
//! - A block of the reader's current step is never released while the reader is on it.
//! - Each GET holds the first block of the window not held (or of the demand).
//! - A reader that waits for its step's blocks (or its demand) always gets them.

use super::ahead::Ahead;
use super::plan::{Held, PlanError};
use std::collections::{HashMap, HashSet};
use std::ops::Range;

/// What a range plan is made with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RangeConfig {
    /// Each shard's `.bin` bytes, in shard order.
    pub sizes: Vec<u64>,
    /// Bytes per block (the last block of a shard may be shorter).
    pub block_bytes: u64,
    /// Bytes this rank may hold, fetching or present.
    pub limit: u64,
    /// Of which set aside for reads outside the plan (at least one block).
    pub reserve: u64,
    /// GETs in flight at once (at least 1).
    pub in_flight: usize,
    /// Bytes one GET covers at most (at least one block).
    pub get_bytes: u64,
    /// Steps planned ahead of the reader at most (at least 1).
    pub horizon: u64,
    /// The first step not to plan (the end of training), if known.
    pub end: Option<u64>,
}

/// One GET: blocks `blocks` (indices within the shard) of shard `shard`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Get {
    pub shard: usize,
    pub blocks: Range<usize>,
}

/// One rank's range plan (see the module documentation). Blocks are numbered across the
/// dataset: shard `s`'s block `b` is `base[s] + b`.
#[derive(Clone, Debug)]
pub struct RangePlan {
    cfg: RangeConfig,
    base: Vec<usize>,
    window_limit: u64,
    /// The reader's step and the blocks each planned step after it reads.
    ahead: Ahead,
    /// The window (it depends on the planned steps alone, so it is kept rather than walked
    /// for every question): its blocks in order of first need, as a set, their bytes, and
    /// whether the walk stopped short of the planned steps' last block.
    window: Vec<usize>,
    in_window: HashSet<usize>,
    window_bytes: u64,
    truncated: bool,
    /// Blocks held (fetching or present); absent: not held.
    held: HashMap<usize, Held>,
    held_bytes: u64,
    fetching: usize,
    demand: Vec<usize>,
}

impl RangePlan {
    /// A plan whose reader starts at step `start`. Refused when the limit cannot hold the
    /// reserve and one more block beside it.
    pub fn new(cfg: RangeConfig, start: u64) -> Result<RangePlan, PlanError> {
        let bb = cfg.block_bytes.max(1);
        let largest = cfg.sizes.iter().map(|&s| s.min(bb)).max().unwrap_or(0);
        let reserve = cfg.reserve.max(largest);
        if reserve + largest > cfg.limit {
            return Err(PlanError::LimitTooSmall {
                limit: cfg.limit,
                need: reserve + largest,
            });
        }
        let mut base = vec![0];
        for &s in &cfg.sizes {
            base.push(base[base.len() - 1] + s.div_ceil(bb) as usize);
        }
        Ok(RangePlan {
            window_limit: cfg.limit - reserve,
            ahead: Ahead::new(start, cfg.horizon, cfg.end),
            cfg: RangeConfig {
                reserve,
                block_bytes: bb,
                in_flight: cfg.in_flight.max(1),
                get_bytes: cfg.get_bytes.max(bb),
                horizon: cfg.horizon.max(1),
                ..cfg
            },
            base,
            window: Vec::new(),
            in_window: HashSet::new(),
            window_bytes: 0,
            truncated: false,
            held: HashMap::new(),
            held_bytes: 0,
            fetching: 0,
            demand: Vec::new(),
        })
    }

    /// Shard and block within it of block `id`.
    pub fn locate(&self, id: usize) -> (usize, usize) {
        let shard = self.base.partition_point(|&b| b <= id) - 1;
        (shard, id - self.base[shard])
    }

    /// The block id of block `block` of shard `shard`.
    pub fn id(&self, shard: usize, block: usize) -> usize {
        self.base[shard] + block
    }

    /// Bytes of block `id`.
    pub fn cost(&self, id: usize) -> u64 {
        let (shard, block) = self.locate(id);
        let start = block as u64 * self.cfg.block_bytes;
        (start + self.cfg.block_bytes).min(self.cfg.sizes[shard]) - start
    }

    /// The blocks (ids) bytes `bytes` of shard `shard` fall in; `None` when the shard or the
    /// bytes are not in the dataset.
    pub fn blocks_of(&self, shard: usize, bytes: &Range<u64>) -> Option<Range<usize>> {
        let size = *self.cfg.sizes.get(shard)?;
        if bytes.end > size || bytes.start > bytes.end {
            return None;
        }
        let bb = self.cfg.block_bytes;
        let first = (bytes.start / bb) as usize;
        let last = bytes.end.div_ceil(bb).max(bytes.start / bb + 1).min(size.div_ceil(bb)) as usize;
        Some(self.id(shard, first)..self.id(shard, first.max(last)))
    }

    pub fn reading_step(&self) -> u64 {
        self.ahead.reading()
    }

    pub fn planned_until(&self) -> u64 {
        self.ahead.planned_until()
    }

    /// The next step to plan, when the plan wants one: before the end, within the horizon,
    /// and while every planned step fits in the window.
    pub fn wants_step(&self) -> Option<u64> {
        self.ahead.next().filter(|_| !self.truncated)
    }

    /// Plan step `step` (the one [`Self::wants_step`] named), which reads `reads`: byte
    /// ranges of shards.
    pub fn add_step(&mut self, step: u64, reads: &[(usize, Range<u64>)]) -> Result<(), PlanError> {
        self.ahead.check_next(step)?;
        let mut blocks = Vec::new();
        for (shard, bytes) in reads {
            let Some(ids) = self.blocks_of(*shard, bytes) else {
                return Err(PlanError::NoSuchShard {
                    step,
                    shard: *shard,
                    shards: self.cfg.sizes.len(),
                });
            };
            blocks.extend(ids);
        }
        blocks.sort_unstable();
        blocks.dedup();
        let bytes: u64 = blocks.iter().map(|&b| self.cost(b)).sum();
        if bytes > self.window_limit {
            let mut shards: Vec<usize> = reads.iter().map(|r| r.0).collect();
            shards.sort_unstable();
            shards.dedup();
            return Err(PlanError::StepTooLarge {
                step,
                shards: shards.len(),
                bytes,
                limit: self.window_limit,
            });
        }
        self.walk(&blocks);
        self.ahead.push(blocks);
        Ok(())
    }

    /// Go on with the window's walk over `blocks` (the next step's), unless it has stopped.
    fn walk(&mut self, blocks: &[usize]) {
        for &b in blocks {
            if self.truncated {
                return;
            }
            if self.in_window.contains(&b) {
                continue;
            }
            let cost = self.cost(b);
            if self.window_bytes + cost > self.window_limit {
                self.truncated = true;
                return;
            }
            self.window_bytes += cost;
            self.in_window.insert(b);
            self.window.push(b);
        }
    }

    /// The reader moved on to step `step` (an earlier one is ignored).
    pub fn reading(&mut self, step: u64) {
        if self.ahead.advance(step) {
            self.window.clear();
            self.in_window.clear();
            (self.window_bytes, self.truncated) = (0, false);
            let ahead = std::mem::take(&mut self.ahead);
            for (_, blocks) in ahead.iter() {
                self.walk(blocks);
            }
            self.ahead = ahead;
        }
    }

    /// A reader wants blocks `ids` now, whether or not a planned step reads them; replaces
    /// the previous demand. The shell keeps a demand within [`RangeConfig::reserve`].
    pub fn demand(&mut self, ids: Range<usize>) {
        self.demand = ids.filter(|&b| b < self.base[self.base.len() - 1]).collect();
    }

    /// The window, in order of first need, and the set of its blocks.
    fn window(&self) -> (&[usize], &HashSet<usize>) {
        (&self.window, &self.in_window)
    }

    /// Bytes held outside `window`.
    fn held_outside(&self, window: &HashSet<usize>) -> u64 {
        self.held
            .keys()
            .filter(|b| !window.contains(b))
            .map(|&b| self.cost(b))
            .sum()
    }

    fn is_held(&self, id: usize) -> bool {
        self.held.contains_key(&id)
    }

    /// The next GET to start (then call [`Self::started`]), if one may: the demand's first
    /// block not held, else the window's, with its neighbours (see the module documentation);
    /// none while `in_flight` GETs run or when it would take the held bytes past the limit.
    pub fn next_fetch(&self) -> Option<Get> {
        if self.fetching >= self.cfg.in_flight {
            return None;
        }
        let (window, set) = self.window();
        let in_demand = |b: usize| self.demand.contains(&b) && !set.contains(&b);
        if let Some(&d) = self.demand.iter().find(|&&b| !self.is_held(b)) {
            if set.contains(&d) {
                return self.coalesce(d, |b| set.contains(&b), self.cfg.limit);
            }
            // Outside the window: paid for from the reserve.
            let room = self.cfg.reserve.saturating_sub(self.held_outside(set));
            let room = room.min(self.cfg.limit.saturating_sub(self.held_bytes));
            return self.coalesce(d, in_demand, self.held_bytes + room);
        }
        let first = *window.iter().find(|&&b| !self.is_held(b))?;
        self.coalesce(first, |b| set.contains(&b), self.cfg.limit)
    }

    /// A GET of block `first` and its neighbours in the same shard that `take` accepts and
    /// are not held, up to [`RangeConfig::get_bytes`], while the held bytes stay within
    /// `cap`; none when `first` alone does not fit.
    fn coalesce(&self, first: usize, take: impl Fn(usize) -> bool, cap: u64) -> Option<Get> {
        let (shard, _) = self.locate(first);
        let (lo, hi) = (self.base[shard], self.base[shard + 1]);
        let mut bytes = self.cost(first);
        if self.held_bytes + bytes > cap.min(self.cfg.limit) {
            return None;
        }
        let ok = |b: usize, bytes: u64| {
            let c = self.cost(b);
            (take(b) && !self.is_held(b) && bytes + c <= self.cfg.get_bytes && self.held_bytes + bytes + c <= cap)
                .then_some(c)
        };
        let (mut start, mut end) = (first, first + 1);
        while end < hi
            && let Some(c) = ok(end, bytes)
        {
            bytes += c;
            end += 1;
        }
        while start > lo
            && let Some(c) = ok(start - 1, bytes)
        {
            bytes += c;
            start -= 1;
        }
        Some(Get {
            shard,
            blocks: start - lo..end - lo,
        })
    }

    /// The ids of the blocks of `get`.
    pub fn ids(&self, get: &Get) -> Range<usize> {
        self.id(get.shard, get.blocks.start)..self.id(get.shard, get.blocks.end)
    }

    /// GET `get` started.
    pub fn started(&mut self, get: &Get) {
        for b in self.ids(get) {
            if self.held.insert(b, Held::Fetching).is_none() {
                self.held_bytes += self.cost(b);
            }
        }
        self.fetching += 1;
    }

    /// GET `get` ended: `ok`, its blocks are present and held; else they are not held.
    pub fn finished(&mut self, get: &Get, ok: bool) {
        for b in self.ids(get) {
            if self.held.get(&b) != Some(&Held::Fetching) {
                continue;
            }
            if ok {
                self.held.insert(b, Held::Present);
            } else {
                self.held.remove(&b);
                self.held_bytes -= self.cost(b);
            }
        }
        self.fetching = self.fetching.saturating_sub(1);
    }

    /// The present blocks to release (then call [`Self::released`]): out of the window and
    /// not demanded.
    pub fn to_release(&self) -> Vec<usize> {
        let (_, set) = self.window();
        let mut out: Vec<usize> = self
            .held
            .iter()
            .filter(|&(b, h)| *h == Held::Present && !set.contains(b) && !self.demand.contains(b))
            .map(|(&b, _)| b)
            .collect();
        out.sort_unstable();
        out
    }

    /// Block `id` was released.
    pub fn released(&mut self, id: usize) {
        if self.held.get(&id) == Some(&Held::Present) {
            self.held.remove(&id);
            self.held_bytes -= self.cost(id);
        }
    }

    pub fn held(&self, id: usize) -> Held {
        self.held.get(&id).copied().unwrap_or(Held::No)
    }

    /// Bytes held (fetching or present).
    pub fn held_bytes(&self) -> u64 {
        self.held_bytes
    }

    /// Whether every block of `ids` is in the window or the demand: what a read of them can
    /// wait for without demanding them.
    pub fn wanted(&self, ids: Range<usize>) -> bool {
        let (_, set) = self.window();
        ids.into_iter().all(|b| set.contains(&b) || self.demand.contains(&b))
    }

    /// Bytes of the reserve: the most one demand may take.
    pub fn reserve(&self) -> u64 {
        self.cfg.reserve
    }

    /// The limit on the bytes of one step.
    pub fn window_limit(&self) -> u64 {
        self.window_limit
    }
}

#[cfg(test)]
mod tests;
