//! Range mode: the thin shell around the pure [`RangePlan`], for a dataset larger than its
//! cache budget whose upload left block checksums ([`super::super::BlockSums`]), or whose
//! shards are compressed-only in frames of one size ([`Layout`]: what a block is, where its
//! bytes are, how it is checked).
//!
//! Nothing of a shard is written to disk: `fetchers` threads GET the blocks the coming steps
//! read, neighbouring ones in one ranged GET, a bounded number in flight, and hold them in
//! memory (a rank's share of the budget bounds them: the budget is what the dataset may take
//! on this host, and besides the held blocks it takes only the manifest and the `.idx`
//! files). Each block is checked (hashed against its checksum, or decompressed and checked as
//! a zstd frame) before anything can read it; a GET whose blocks are not right is made once
//! more, then the error names the shard, the block and the object. A read ([`ShardSource::read`]) waits only for the blocks its own bytes
//! fall in, with the deadline and errors of a whole-shard read. The ranks of a host read
//! disjoint samples, so they share nothing here: each holds its own share.

use super::super::plan::{Held, PlanError};
use super::super::ranges::{Get, RangeConfig, RangePlan};
use super::super::retry::with_retry_unless;
use super::super::{RemoteError, RemoteOptions};
use super::blocks::Layout;
use super::{Counters, StepShards, StreamConfig, StreamDir, plan_refusal, plan_step, wait_left};
use crate::gpt::{DatasetError, ShardSource};
use crate::indexed::IndexedDataset;
use gantry_checkpoint::Store;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

/// Blocks set aside for reads outside the plan (validation samples) at most: an eighth of a
/// rank's share, between one block and this many. A read outside the plan of more goes in
/// pieces the reserve holds.
const RESERVE_BLOCKS: u64 = 16;

/// The reserve of a rank that may hold `limit` bytes, in blocks of `block` bytes.
fn reserve_for(limit: u64, block: u64) -> u64 {
    (limit / 8).clamp(block, RESERVE_BLOCKS * block)
}

/// The smallest share of the budget whose window (less the reserve) holds `bytes`.
fn least_limit(bytes: u64, block: u64) -> u64 {
    let fits = |limit: u64| limit - reserve_for(limit, block) >= bytes;
    let (mut lo, mut hi) = (
        bytes.saturating_add(block),
        bytes.saturating_add(RESERVE_BLOCKS * block),
    );
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        match fits(mid) {
            true => hi = mid,
            false => lo = mid + 1,
        }
    }
    lo
}

/// One checked block, in a buffer aligned for any token type.
struct Block {
    words: Vec<u64>,
    len: usize,
}

impl Block {
    fn new(bytes: &[u8]) -> Block {
        let mut words = vec![0u64; bytes.len().div_ceil(8)];
        bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..bytes.len()].copy_from_slice(bytes);
        Block {
            words,
            len: bytes.len(),
        }
    }

    fn bytes(&self) -> &[u8] {
        &bytemuck::cast_slice::<u64, u8>(&self.words)[..self.len]
    }
}

pub(super) struct Ranged {
    pub(super) dir: StreamDir,
    layout: Layout,
    /// Bytes of the directory's files (the manifest, the `.idx` files).
    fixed: u64,
    store: Store,
    opts: RemoteOptions,
    pub(super) cfg: StreamConfig,
    state: Mutex<State>,
    /// Readers (and `Drop`) wait on `changed`; idle fetchers on `fetchable`, woken one at a
    /// time as GETs end (each woken fetcher that starts a GET wakes the next while more may
    /// start), so an ending GET does not wake every fetcher to find nothing to do.
    changed: Condvar,
    fetchable: Condvar,
    pub(super) stop: AtomicBool,
    pub(super) counters: Counters,
}

struct State {
    plan: RangePlan,
    following: bool,
    step_shards: Option<StepShards>,
    blocks: HashMap<usize, Arc<Block>>,
    fatal: Option<Arc<RemoteError>>,
    workers_left: usize,
}

impl Ranged {
    /// The range-mode stream of `dir` within `budget`, of which `fixed` bytes are the
    /// directory's files; `workers` threads will run [`Self::work`].
    pub(super) fn new(
        dir: StreamDir,
        layout: Layout,
        store: Store,
        opts: RemoteOptions,
        cfg: StreamConfig,
        (budget, fixed): (u64, u64),
        workers: usize,
    ) -> Result<Ranged, RemoteError> {
        let sharers = cfg.sharers.max(1) as u64;
        let block = layout.block_bytes();
        let least = fixed.saturating_add(sharers.saturating_mul(least_limit(block, block)));
        if budget < least {
            return Err(RemoteError::BudgetTooSmall {
                dir: dir.dir.clone(),
                budget,
                fixed,
                sharers: cfg.sharers,
                min_budget: least,
            });
        }
        let limit = (budget - fixed) / sharers;
        let plan_cfg = RangeConfig {
            sizes: layout.sizes().to_vec(),
            block_bytes: block,
            limit,
            reserve: reserve_for(limit, block),
            in_flight: workers,
            get_bytes: opts.range_bytes,
            horizon: cfg.horizon,
            end: cfg.end,
        };
        let location = dir.location.to_string();
        let plan = RangePlan::new(plan_cfg, 0).map_err(|cause| RemoteError::Plan { location, cause })?;
        Ok(Ranged {
            dir,
            layout,
            fixed,
            store,
            opts,
            cfg,
            state: Mutex::new(State {
                plan,
                following: false,
                step_shards: None,
                blocks: HashMap::new(),
                fatal: None,
                workers_left: workers,
            }),
            changed: Condvar::new(),
            fetchable: Condvar::new(),
            stop: AtomicBool::new(false),
            counters: Counters::default(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    pub(super) fn follow(&self, start: u64, step_shards: StepShards) {
        let mut st = self.lock();
        st.plan.reading(start);
        st.step_shards = Some(step_shards);
        st.following = true;
        self.notify();
    }

    /// Wait (up to `deadline` from now) until every worker has ended; whether they have.
    pub(super) fn wait_workers(&self, deadline: Instant) -> bool {
        let mut st = self.lock();
        while st.workers_left > 0 {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return false;
            };
            st = self
                .changed
                .wait_timeout(st, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }

    pub(super) fn notify(&self) {
        self.changed.notify_all();
        self.fetchable.notify_all();
    }

    /// Plan the steps the plan wants, and let go of the blocks it no longer holds.
    fn settle(&self, st: &mut State) {
        if st.following && st.fatal.is_none() {
            while let Some(step) = st.plan.wants_step() {
                let Some(step_shards) = st.step_shards.as_mut() else {
                    break;
                };
                let added = plan_step(&self.dir, step, step_shards, |reads| {
                    let reads: Vec<(usize, Range<u64>)> = reads.into_iter().map(|r| (r.shard, r.bytes)).collect();
                    st.plan.add_step(step, &reads).map_err(|cause| self.plan_error(cause))
                });
                if let Err(e) = added {
                    tracing::error!(error = %e, "cannot plan the data stream");
                    st.fatal = Some(Arc::new(e));
                    self.notify();
                    break;
                }
            }
        }
        for b in st.plan.to_release() {
            st.blocks.remove(&b);
            st.plan.released(b);
        }
    }

    /// A step larger than this rank's share of the budget names the smallest budget that
    /// holds it.
    fn plan_error(&self, cause: PlanError) -> RemoteError {
        plan_refusal(&self.dir, &self.cfg, cause, |bytes| {
            self.fixed.saturating_add(
                (self.cfg.sharers.max(1) as u64).saturating_mul(least_limit(bytes, self.layout.block_bytes())),
            )
        })
    }

    /// A fetcher thread: take the next GET from the plan, make it, record its blocks.
    pub(super) fn work(self: Arc<Self>) {
        loop {
            let get = {
                let mut st = self.lock();
                loop {
                    if self.stopped() || st.fatal.is_some() {
                        st.workers_left -= 1;
                        self.changed.notify_all();
                        return;
                    }
                    self.settle(&mut st);
                    if let Some(get) = st.plan.next_fetch() {
                        st.plan.started(&get);
                        if st.plan.next_fetch().is_some() {
                            self.fetchable.notify_one();
                        }
                        break get;
                    }
                    st = self.fetchable.wait(st).unwrap_or_else(PoisonError::into_inner);
                }
            };
            let result = self.fetch(&get);
            let mut st = self.lock();
            match result {
                Ok(blocks) => {
                    let first = st.plan.id(get.shard, get.blocks.start);
                    for (i, block) in blocks.into_iter().enumerate() {
                        st.blocks.insert(first + i, Arc::new(block));
                    }
                    st.plan.finished(&get, true);
                    let held = st.plan.held_bytes();
                    self.counters.peak_held.fetch_max(held, Ordering::Relaxed);
                    self.counters.peak_usage.fetch_max(self.fixed + held, Ordering::Relaxed);
                }
                Err(RemoteError::Stopped { .. }) => st.plan.finished(&get, false),
                Err(e) => {
                    tracing::error!(shard = get.shard, object = %self.dir.object(get.shard), error = %e, "cannot fetch blocks of a shard");
                    st.plan.finished(&get, false);
                    st.fatal.get_or_insert_with(|| Arc::new(e));
                    self.fetchable.notify_all();
                }
            }
            self.changed.notify_all();
            self.fetchable.notify_one();
        }
    }

    /// GET the blocks of `get` as one ranged GET and check each; a block that is not right
    /// is fetched once more, then named.
    fn fetch(&self, get: &Get) -> Result<Vec<Block>, RemoteError> {
        let object = self.dir.object(get.shard);
        let (key, range) = self.layout.request(&self.dir, get.shard, &get.blocks);
        let mut tries = 0;
        loop {
            tries += 1;
            let request = [(key.clone(), range.clone())];
            let body = with_retry_unless(&self.opts.retry, &object, Some(&self.stop), || {
                self.store.get_ranges(&request)
            })?
            .pop()
            .unwrap_or_default();
            let c = &self.counters;
            c.fetched.fetch_add(1, Ordering::Relaxed);
            c.bytes_fetched.fetch_add(body.len() as u64, Ordering::Relaxed);
            let mut blocks = Vec::with_capacity(get.blocks.len());
            let made = (self.layout).blocks(get.shard, &get.blocks, &range, &body, |b| blocks.push(Block::new(b)));
            match made {
                Ok(()) => return Ok(blocks),
                Err(bad) if tries < 2 => {
                    tracing::warn!(
                        object,
                        shard = get.shard,
                        block = bad.block,
                        why = bad.why,
                        "a fetched block is not right; fetching it again"
                    );
                }
                Err(bad) => return Err(self.layout.error(&self.dir, get.shard, bad)),
            }
        }
    }

    /// Blocks `ids` (of shard `shard`) once present: waits for them, demanding those no
    /// planned step reads.
    fn wait_blocks(&self, shard: usize, ids: Range<usize>) -> Result<Vec<Arc<Block>>, DatasetError> {
        let started = Instant::now();
        let mut st = self.lock();
        let mut waited = false;
        loop {
            if ids.clone().all(|b| st.plan.held(b) == Held::Present) {
                if waited {
                    let c = &self.counters;
                    c.waits.fetch_add(1, Ordering::Relaxed);
                    c.wait_ns
                        .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
                }
                return ids
                    .map(|b| st.blocks.get(&b).cloned())
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| self.stopped_error(shard));
            }
            if let Some(e) = &st.fatal {
                return Err(DatasetError::Remote(e.clone()));
            }
            if st.workers_left == 0 || self.stopped() {
                return Err(self.stopped_error(shard));
            }
            if !st.plan.wanted(ids.clone()) {
                st.plan.demand(ids.clone());
                self.fetchable.notify_one();
            }
            let left = wait_left(self.cfg.wait, started, shard, || self.dir.object(shard))?;
            st = self
                .changed
                .wait_timeout(st, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            waited = true;
        }
    }

    fn stopped_error(&self, shard: usize) -> DatasetError {
        DatasetError::Remote(Arc::new(RemoteError::Stopped {
            object: self.dir.object(shard),
        }))
    }
}

impl ShardSource for Ranged {
    fn shard(&self, shard: usize) -> Result<Arc<IndexedDataset>, DatasetError> {
        Err(DatasetError::Remote(Arc::new(RemoteError::Shard {
            object: self.dir.object(shard),
            message:
                "streamed by byte ranges (the dataset is larger than its cache budget): its whole .bin is never fetched"
                    .into(),
        })))
    }

    fn reading(&self, step: u64) {
        let mut st = self.lock();
        if st.following {
            st.plan.reading(step);
            self.settle(&mut st);
            self.fetchable.notify_one();
        }
    }

    fn ranged(&self) -> bool {
        true
    }

    fn read(&self, shard: usize, bytes: Range<u64>, each: &mut dyn FnMut(&[u8])) -> Result<(), DatasetError> {
        if bytes.is_empty() {
            return Ok(());
        }
        let ids = self.lock().plan.blocks_of(shard, &bytes).ok_or_else(|| {
            DatasetError::Remote(Arc::new(RemoteError::Shard {
                object: self.dir.object(shard),
                message: format!("bytes {}..{} are not in the shard", bytes.start, bytes.end),
            }))
        })?;
        let (first, piece) = {
            let st = self.lock();
            let piece = st.plan.reserve() / self.layout.block_bytes();
            (ids.start - st.plan.id(shard, 0), piece.max(1) as usize)
        };
        // A read outside the plan is demanded in pieces the reserve holds.
        let mut at = ids.start;
        while at < ids.end {
            let end = (at + piece).min(ids.end);
            let blocks = self.wait_blocks(shard, at..end)?;
            for (i, block) in blocks.iter().enumerate() {
                let r = self.layout.range(shard, first + (at - ids.start) + i);
                let from = bytes.start.max(r.start) - r.start;
                let to = bytes.end.min(r.end) - r.start;
                each(&block.bytes()[from as usize..to as usize]);
            }
            at = end;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_least_limit_is_the_smallest_that_holds_the_bytes_beside_its_reserve() {
        for block in [8, 64, 4096] {
            for bytes in (0..40 * block).step_by(block as usize / 8) {
                let least = least_limit(bytes, block);
                assert!(least - reserve_for(least, block) >= bytes, "{bytes} {block}");
                let below = least - 1;
                assert!(
                    below.checked_sub(reserve_for(below, block)).is_none_or(|w| w < bytes),
                    "{bytes} {block}: {least} is not the least"
                );
            }
        }
    }
}
