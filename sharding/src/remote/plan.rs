//! The streaming plan of one rank: which shards it fetches next, which it keeps and which it
//! lets go, from the steps its sampler will read. Pure: no files, threads or clocks; the
//! shell ([`super::stream`]) feeds it the shards each step reads (the sampler knows every
//! future sample) and what happened (a fetch started, finished, the reader moved on), and
//! asks it what to do.
//!
//! # The window
//!
//! The steps from the reader's step on are walked in order, each step's shards in order,
//! every shard counted once, adding up their costs (bytes in the cache). The **window** is
//! that walk up to the first shard that would take the sum past the limit: the shards the
//! next steps read, earliest need first. Fetches go through the window in order, a bounded
//! number in flight; a held shard that has left the window (the reader is past every step
//! that reads it within the window) is released, so the cache can evict it. So the cache
//! fills ahead of the cursor and empties behind it, least soon needed first, and a shard the
//! current step reads is never released (its step's shards are the first of the walk, and a
//! step larger than the limit is refused when it is planned).
//!
//! Without a limit the whole dataset fits: after the planned steps the window goes on with
//! every other shard, in shard order, and nothing is released (the copy is completed while
//! training runs).
//!
//! # Reads outside the plan
//!
//! A reader may want a shard no planned step reads (the validation split, end-of-run samples):
//! it becomes the **demand**, fetched before anything else. With a limit, its cost comes out
//! of a reserve of one largest shard set aside from the limit, so a demand never has to wait
//! for the window to shrink (the reader that waits for it may be the one that would move the
//! window on); the demand shard is released as soon as another one is demanded.
//!
//! # Invariants (tested exhaustively below)
//!
//! - The held shards (fetching or present) cost at most the limit, once releases are applied.
//! - A shard of the reader's current step is never released while the reader is on it.
//! - Shards are started in the order of their first need; a demand goes first.
//! - A reader that waits for its step's shards always gets them (no step is starved).

use super::ahead::Ahead;
use std::sync::OnceLock;

/// Why a plan cannot be made.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error(
        "shard {shard} is {bytes} bytes, more than the {limit} bytes this rank may keep in the data cache: raise the cache budget (data.cache_gb) or write smaller shards"
    )]
    ShardTooLarge { shard: usize, bytes: u64, limit: u64 },
    #[error(
        "step {step} reads {shards} shard(s) of {bytes} bytes in all, more than the {limit} bytes this rank may keep ahead in the data cache: raise the cache budget (data.cache_gb), write smaller shards or lower the global batch"
    )]
    StepTooLarge {
        step: u64,
        shards: usize,
        bytes: u64,
        limit: u64,
    },
    #[error(
        "the {limit} bytes this rank may keep cannot hold {need} bytes: one block and the reserve for reads outside the plan beside it: raise the cache budget (data.cache_gb)"
    )]
    LimitTooSmall { limit: u64, need: u64 },
    #[error("step {got} was planned, but the next step to plan is {expected}")]
    OutOfOrder { expected: u64, got: u64 },
    #[error("step {step} reads shard {shard}, but the dataset has {shards} shards")]
    NoSuchShard { step: u64, shard: usize, shards: usize },
}

/// Where a shard stands for this rank.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Held {
    /// Not held: absent, or in the cache for whoever wants it (evictable).
    No,
    /// Being fetched (or checked) for this rank.
    Fetching,
    /// In the cache and held for this rank: not evictable.
    Present,
}

/// What a plan is made with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanConfig {
    /// Bytes each shard takes in the cache, in shard order.
    pub costs: Vec<u64>,
    /// Bytes this rank may hold; `None`: no limit (the whole dataset is fetched).
    pub limit: Option<u64>,
    /// Fetches in flight at once (at least 1).
    pub in_flight: usize,
    /// Steps planned ahead of the reader at most (at least 1).
    pub horizon: u64,
    /// The first step not to plan (the end of training), if known.
    pub end: Option<u64>,
}

/// One rank's streaming plan (see the module documentation).
#[derive(Clone, Debug)]
pub struct Plan {
    cfg: PlanConfig,
    /// The limit of the window: the limit less the demand reserve.
    window_limit: Option<u64>,
    /// The demand reserve: one largest shard.
    reserve: u64,
    /// The reader's step and the shards each planned step after it reads.
    ahead: Ahead,
    held: Vec<Held>,
    /// Shards not held ([`Held::No`]): without a limit, none left means there is nothing to
    /// fetch, order or release, so steps are no longer planned (a warm cache's pass asked the
    /// reader's sampler for every step and walked the window on every step for nothing).
    unheld: usize,
    fetching: usize,
    demand: Option<usize>,
    /// [`Self::window_and_set`], kept until the steps or the demand change: every fetcher
    /// and every step asks for it, and the walk over the planned steps (a horizon of them,
    /// a dozen shards each) was a sixth of a streaming pass's CPU time.
    window: OnceLock<(Vec<usize>, Vec<bool>)>,
}

impl Plan {
    /// A plan whose reader starts at step `start`.
    pub fn new(cfg: PlanConfig, start: u64) -> Result<Plan, PlanError> {
        let reserve = cfg.costs.iter().copied().max().unwrap_or(0);
        let window_limit = match cfg.limit {
            None => None,
            Some(limit) => {
                if let Some((shard, &bytes)) = cfg.costs.iter().enumerate().find(|&(_, &c)| c > limit) {
                    return Err(PlanError::ShardTooLarge { shard, bytes, limit });
                }
                Some(limit - reserve)
            }
        };
        let held = vec![Held::No; cfg.costs.len()];
        let unheld = held.len();
        Ok(Plan {
            ahead: Ahead::new(start, cfg.horizon, cfg.end),
            cfg,
            window_limit,
            reserve,
            held,
            unheld,
            fetching: 0,
            demand: None,
            window: OnceLock::new(),
        })
    }

    /// The step the reader is on.
    pub fn reading_step(&self) -> u64 {
        self.ahead.reading()
    }

    /// The first step not planned yet.
    pub fn planned_until(&self) -> u64 {
        self.ahead.planned_until()
    }

    /// The next step to plan, when the plan wants one: before the end, within the horizon,
    /// and (with a limit) while every planned step fits in the window; without a limit, only
    /// while some shard is not held yet.
    pub fn wants_step(&self) -> Option<u64> {
        let next = self.ahead.next().filter(|_| !self.all_held_unlimited())?;
        match self.window_limit {
            Some(limit) if self.walk_cost() > limit => None,
            _ => Some(next),
        }
    }

    /// No limit and every shard held: nothing left to fetch or release.
    fn all_held_unlimited(&self) -> bool {
        self.window_limit.is_none() && self.unheld == 0
    }

    /// The bytes of the distinct shards of the planned steps.
    fn walk_cost(&self) -> u64 {
        let mut seen = vec![false; self.held.len()];
        let mut sum = 0;
        for s in self.ahead.iter().flat_map(|(_, shards)| shards) {
            if !std::mem::replace(&mut seen[*s], true) {
                sum += self.cfg.costs[*s];
            }
        }
        sum
    }

    /// Plan step `step` (the one [`Self::wants_step`] named), which reads `shards`.
    pub fn add_step(&mut self, step: u64, mut shards: Vec<usize>) -> Result<(), PlanError> {
        self.ahead.check_next(step)?;
        shards.sort_unstable();
        shards.dedup();
        if let Some(&shard) = shards.iter().find(|&&s| s >= self.held.len()) {
            return Err(PlanError::NoSuchShard {
                step,
                shard,
                shards: self.held.len(),
            });
        }
        if let Some(limit) = self.window_limit {
            let bytes: u64 = shards.iter().map(|&s| self.cfg.costs[s]).sum();
            if bytes > limit {
                return Err(PlanError::StepTooLarge {
                    step,
                    shards: shards.len(),
                    bytes,
                    limit,
                });
            }
        }
        self.ahead.push(shards);
        self.window.take();
        Ok(())
    }

    /// The reader moved on to step `step`: the steps before it are done. (A step before the
    /// current one is ignored: readers only move forward.)
    pub fn reading(&mut self, step: u64) {
        if self.ahead.advance(step) {
            self.window.take();
        }
    }

    /// A reader wants `shard` now, whether or not a planned step reads it.
    pub fn demand(&mut self, shard: usize) {
        if shard < self.held.len() && self.demand != Some(shard) {
            self.demand = Some(shard);
            self.window.take();
        }
    }

    /// The window (see the module documentation), in fetch order; the demand first when
    /// the window holds it.
    pub fn window(&self) -> Vec<usize> {
        self.window_and_set().0.clone()
    }

    /// The window, and whether each shard is in it.
    fn window_and_set(&self) -> &(Vec<usize>, Vec<bool>) {
        self.window.get_or_init(|| self.walk_window())
    }

    fn walk_window(&self) -> (Vec<usize>, Vec<bool>) {
        let n = self.held.len();
        let mut seen = vec![false; n];
        let mut out = Vec::new();
        let mut sum = 0u64;
        'walk: for (_, shards) in self.ahead.iter() {
            for &s in shards {
                if seen[s] {
                    continue;
                }
                if let Some(limit) = self.window_limit {
                    if sum + self.cfg.costs[s] > limit {
                        break 'walk;
                    }
                    sum += self.cfg.costs[s];
                }
                seen[s] = true;
                out.push(s);
            }
        }
        if self.window_limit.is_none() {
            out.extend((0..n).filter(|&s| !seen[s]));
            seen.fill(true);
        }
        if let Some(d) = self.demand
            && let Some(at) = out.iter().position(|&s| s == d)
        {
            out[..=at].rotate_right(1);
        }
        (out, seen)
    }

    /// Bytes held outside the window (`in_window`): the demand reserve's use.
    fn held_outside(&self, in_window: &[bool]) -> u64 {
        (0..self.held.len())
            .filter(|&s| self.held[s] != Held::No && !in_window[s])
            .map(|s| self.cfg.costs[s])
            .sum()
    }

    /// The next shard to start fetching (then call [`Self::started`]), if one may start: the
    /// demand when it is not held and fits the reserve, else the first shard of the window
    /// not held; none while `in_flight` fetches are running.
    pub fn next_fetch(&self) -> Option<usize> {
        if self.fetching >= self.cfg.in_flight.max(1) || self.all_held_unlimited() {
            return None;
        }
        let (window, in_window) = self.window_and_set();
        if let Some(d) = self.demand
            && self.held[d] == Held::No
            && !in_window[d]
            && (self.window_limit.is_none() || self.held_outside(in_window) + self.cfg.costs[d] <= self.reserve)
        {
            return Some(d);
        }
        window.iter().copied().find(|&s| self.held[s] == Held::No)
    }

    /// The demand, when it may start now (then call [`Self::started`]): what a plan whose
    /// reader has not begun (no step planned yet) fetches, and nothing else.
    pub fn next_demand(&self) -> Option<usize> {
        let d = self.demand?;
        if self.fetching >= self.cfg.in_flight.max(1) || self.held[d] != Held::No {
            return None;
        }
        if self.window_limit.is_none() {
            return Some(d);
        }
        let (_, in_window) = self.window_and_set();
        (in_window[d] || self.held_outside(in_window) + self.cfg.costs[d] <= self.reserve).then_some(d)
    }

    /// The shard a reader waits for outside the order of the plan, if any.
    pub fn demanded(&self) -> Option<usize> {
        self.demand
    }

    /// Per shard, the first planned step (from the reader's on) that reads it.
    pub fn next_needs(&self) -> Vec<Option<u64>> {
        let mut out = vec![None; self.held.len()];
        for (step, shards) in self.ahead.iter().rev() {
            for &s in shards {
                out[s] = Some(step);
            }
        }
        out
    }

    /// A fetch of `shard` started.
    pub fn started(&mut self, shard: usize) {
        if self.held[shard] == Held::No {
            self.held[shard] = Held::Fetching;
            self.fetching += 1;
            self.unheld -= 1;
        }
    }

    /// The fetch of `shard` ended: `ok`, it is present and held; else it is not held.
    pub fn finished(&mut self, shard: usize, ok: bool) {
        if self.held[shard] == Held::Fetching {
            self.fetching -= 1;
            self.held[shard] = if ok { Held::Present } else { Held::No };
            self.unheld += usize::from(!ok);
        }
    }

    /// The present shards to release (then call [`Self::released`]): out of the window and
    /// not the demand.
    pub fn to_release(&self) -> Vec<usize> {
        if self.window_limit.is_none() {
            // Without a limit the window holds every shard: nothing leaves it.
            return Vec::new();
        }
        let (_, in_window) = self.window_and_set();
        (0..self.held.len())
            .filter(|&s| self.held[s] == Held::Present && self.demand != Some(s) && !in_window[s])
            .collect()
    }

    /// `shard` was released: no longer held for this rank.
    pub fn released(&mut self, shard: usize) {
        if self.held[shard] == Held::Present {
            self.held[shard] = Held::No;
            self.unheld += 1;
        }
    }

    pub fn held(&self, shard: usize) -> Held {
        self.held[shard]
    }

    /// Bytes held (fetching or present).
    pub fn held_bytes(&self) -> u64 {
        (0..self.held.len())
            .filter(|&s| self.held[s] != Held::No)
            .map(|s| self.cfg.costs[s])
            .sum()
    }

    /// The first planned step, from the reader's on, that reads `shard`: what eviction ranks
    /// cached shards by (the latest need, or none planned, goes first).
    pub fn next_need(&self, shard: usize) -> Option<u64> {
        self.ahead
            .iter()
            .find(|(_, shards)| shards.binary_search(&shard).is_ok())
            .map(|(step, _)| step)
    }

    /// Whether every shard step `step` reads is present (a planned step only).
    pub fn step_ready(&self, step: u64) -> bool {
        self.ahead
            .get(step)
            .is_some_and(|shards| shards.iter().all(|&s| self.held[s] == Held::Present))
    }

    /// Whether `shard` is wanted at all: in the window or the demand.
    pub fn wanted(&self, shard: usize) -> bool {
        self.demand == Some(shard) || self.window_and_set().1.get(shard).copied().unwrap_or(false)
    }
}

#[cfg(test)]
mod tests;
