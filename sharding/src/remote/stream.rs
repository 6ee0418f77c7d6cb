//! Streaming a dataset from object storage while it is read: the thin shell around the pure
//! [`super::Plan`].
//!
//! [`prepare_stream`] puts the manifest and the `.idx` files into the host's data cache
//! (`CACHE/<fingerprint>/`; the `.idx` files in a few GETs of the upload's index pack, see
//! [`super::upload`], kept there as that one file, [`index_pack`]); the dataset opens from
//! there with the [`Streamer`] as its [`ShardSource`], which also hands it each shard's
//! `.idx` from the one mapping of that file, so no `.bin` is needed to open it. Once the
//! reader's position is known ([`Streamer::follow`]: its start step and which shards each
//! step reads), `fetchers` threads bring shards into the cache in the order the steps need them, a bounded number in
//! flight, each as [`super::fetch`] does (ranged GETs, hashed in order, written under a
//! temporary name, checked against the manifest, renamed; no fsync, see [`super::cache`]),
//! under the `.bin`'s build lock so the ranks of a host fetch it once (a shard already stamped
//! as checked is taken under its lease alone; locks and stamps take no file per shard). A read waits only for the shard it reads (up to
//! [`StreamConfig::wait`], then an error naming the shard and its object); a shard not there
//! is never mapped. Training therefore starts once the first step's shards are in. A shard
//! this rank holds is read from its own slot ([`Inner::ready`]) without the stream's lock: a
//! warm pass reads as a local dataset does once each shard's lease is taken; the slot is
//! emptied, under the lock, when the plan lets the shard go (its lease with it).
//!
//! With a budget ([`StreamConfig::budget`], bytes for this dataset's cache directory on this
//! host) a rank keeps at most its share, `(budget − manifest and .idx files) / sharers`, and
//! the cache evicts behind the readers ([`super::cache`]: leases, reservations). A shard
//! costs the plan exactly what a reservation makes room for ([`StreamDir::cost`]), so a rank
//! within its share always finds room once what no rank holds is evicted; a budget that
//! cannot hold a step's shards is refused when that step is planned, naming the smallest
//! budget that holds it, rather than waiting for room that cannot come. Without one
//! the whole dataset is fetched while training runs, nothing is evicted, and later runs find
//! it there.
//!
//! A budget smaller than the dataset's shards, with a global shuffle, makes whole shards a
//! poor unit: any step reads any shard, so a quarter budget fetches the dataset about 15
//! times a pass. Such a dataset streams in range mode ([`ranged`], chosen by
//! [`Streamer::start`]) when its upload left block checksums: blocks of the bytes the steps
//! read, held in memory, nothing of a shard written to disk.
//!
//! Faults: a request that fails transiently is retried with backoff up to the retry deadline
//! ([`super::Retry`]); what still fails becomes the error of every read that waits, naming the
//! object. A fetch interrupted by a kill leaves only a temporary file, never a `.bin`; the
//! next fetch of that shard (or a reservation that needs the room) removes it.

mod blocks;
mod bring;
mod dir;
mod index_pack;
mod ranged;

pub(super) use dir::unpacked_index_files;
pub use dir::{StreamDir, fetch_block_sums, prepare_stream};

use super::cache::{self, Evictable};
use super::plan::{Held, Plan, PlanConfig, PlanError};
use super::{RemoteError, RemoteOptions, open_store};
use crate::gpt::{DatasetError, ShardBytes, ShardSource, Shards, shards_of};
use crate::indexed::{IndexedDataset, IndexedIndex};
use blocks::Layout;
use gantry_checkpoint::Store;
use index_pack::IndexPack;
use serde::Serialize;
use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How a dataset is streamed.
#[derive(Clone, Debug, PartialEq)]
pub struct StreamConfig {
    /// Bytes this dataset may take in the host's data cache; `None`: no limit.
    pub budget: Option<u64>,
    /// Ranks of this host that stream the dataset (each keeps at most its share).
    pub sharers: usize,
    /// Shards fetched at once. A fetcher's GET slot is idle while it writes, checks and
    /// renames the shard it got, so small shards need more fetchers than GETs the server
    /// could serve: 16 (measured: 8 left the cold pass of 50 KB shards at 0.85–1.15× a raw GET
    /// of 8 in flight; 16 gave 1.3–1.6× that).
    pub fetchers: usize,
    /// Steps planned ahead of the reader at most.
    pub horizon: u64,
    /// The first step not to plan (the end of training), if known.
    pub end: Option<u64>,
    /// Fetch byte ranges rather than whole shards ([`ranged`]) when the dataset's shards do
    /// not fit the budget and its upload left block checksums.
    pub ranges: bool,
    /// How long a read waits for its shard before failing.
    pub wait: Duration,
    /// How long a fetch waits for room in the budget (the other ranks of the host letting
    /// go of shards) before failing. Short: when every rank keeps to its share there is
    /// always room once what no rank holds is evicted.
    pub room_wait: Duration,
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            budget: None,
            sharers: 1,
            fetchers: 16,
            horizon: 256,
            end: None,
            ranges: true,
            wait: Duration::from_secs(600),
            room_wait: Duration::from_secs(60),
        }
    }
}

/// What a rank needs to stream its dataset: the prepared cache directory, the S3 settings
/// and how many ranks of its host share the cache (the binary fills it in; the trainer
/// starts the [`Streamer`] once it knows where its reader starts).
#[derive(Clone, Debug, PartialEq)]
pub struct StreamSetup {
    pub dir: StreamDir,
    pub options: RemoteOptions,
    /// Ranks on this host (each keeps at most its share of a budget).
    pub sharers: usize,
}

/// What a [`Streamer`] did so far.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct StreamStats {
    /// Whether the stream fetched byte ranges ([`ranged`]) rather than whole shards.
    pub ranged: bool,
    /// Shards fetched from the object store (range mode: ranged GETs), and their bytes.
    pub fetched: u64,
    pub bytes_fetched: u64,
    /// Shards found in the cache (checked) rather than fetched.
    pub reused: u64,
    /// Shards this rank evicted to make room.
    pub evicted: u64,
    /// The largest usage of the cache directory a reservation of this rank saw (with a
    /// budget), the reservation included; range mode: the directory's files and the most
    /// bytes of blocks this rank held at once.
    pub peak_usage: u64,
    /// Range mode: the most bytes of blocks this rank held in memory at once.
    pub peak_held: u64,
    /// Reads that had to wait for their shard, and the seconds they waited in all.
    pub waits: u64,
    pub wait_s: f64,
}

/// Which bytes of which shards a step reads (the reader's sampler, through
/// [`crate::gpt::GptDataset::step_shards`]), for the plan.
pub type StepShards = Box<dyn FnMut(u64) -> Result<Vec<ShardBytes>, String> + Send>;

/// Range mode's GETs in flight per [`StreamConfig::fetchers`].
const RANGE_GETS_PER_FETCHER: usize = 2;

/// Streams a dataset into the host's data cache ahead of its reader (see the module
/// documentation). Dropping it stops the fetches (a fetch in flight is abandoned, its
/// temporary file removed).
pub struct Streamer {
    engine: Engine,
    workers: Vec<JoinHandle<()>>,
    /// What [`Self::shards`] hands out (one, so that its copies compare equal): the engine,
    /// with every shard's `.idx` from one mapping of the cached index pack.
    source: Shards,
}

/// Whole shards into the cache directory, or byte ranges into memory.
enum Engine {
    Shards(Arc<Inner>),
    Ranges(Arc<ranged::Ranged>),
}

struct Inner {
    dir: StreamDir,
    pack: Arc<IndexPack>,
    /// The directory's shard stamps ([`cache::Stamps`]).
    stamps: cache::Stamps,
    /// Bytes of the directory's files the budget never evicts, and the largest shard's cost
    /// (what a budget too small for a step is told it needs).
    fixed: u64,
    largest: u64,
    store: Store,
    opts: RemoteOptions,
    cfg: StreamConfig,
    state: Mutex<State>,
    /// Per shard: its mapped `.bin` while this rank holds it (leased, present). Set and
    /// emptied under [`Self::state`]'s lock, read without it: a read of a held shard takes
    /// only this slot's (uncontended) read lock.
    ready: Vec<RwLock<Option<Arc<IndexedDataset>>>>,
    /// The fetchers' wake-up (work to take, a stop; the last fetcher's exit for `Drop`) and the
    /// readers' (a shard in, an error, the fetchers gone): apart, so that a step's progress
    /// does not wake every fetcher and a shard's arrival wakes no idle fetcher.
    changed: Condvar,
    arrived: Condvar,
    stop: AtomicBool,
    counters: Counters,
}

#[derive(Default)]
struct Counters {
    fetched: AtomicU64,
    bytes_fetched: AtomicU64,
    reused: AtomicU64,
    evicted: AtomicU64,
    peak_usage: AtomicU64,
    peak_held: AtomicU64,
    waits: AtomicU64,
    wait_ns: AtomicU64,
}

struct State {
    plan: Plan,
    /// The reader's steps are known: fetch by the plan (before: only what reads demand).
    following: bool,
    step_shards: Option<StepShards>,
    /// Per shard: this rank's lease, while held and present (its map is in [`Inner::ready`]).
    leases: Vec<Option<File>>,
    /// What ended the streaming: every waiting read returns it.
    fatal: Option<Arc<RemoteError>>,
    workers_left: usize,
}

impl Streamer {
    /// Start streaming the dataset of `dir` (from [`prepare_stream`]); nothing is fetched
    /// until a read wants a shard or [`Self::follow`] gives the plan its steps. Range mode
    /// ([`ranged`]) when the budget cannot hold every shard, the upload left block
    /// checksums ([`fetch_block_sums`]; damaged ones are refused with a warning, and the
    /// shards streamed whole), every shard has its `.bin` in the object store, and the
    /// manifest records each shard's largest token id (so no whole shard is ever scanned).
    pub fn start(dir: StreamDir, opts: RemoteOptions, cfg: StreamConfig) -> Result<Streamer, RemoteError> {
        let pack = Arc::new(IndexPack::open(&dir.dir, &dir.manifest)?);
        let ranged = cfg.ranges
            && cfg.budget.is_some_and(|b| b < dir.footprint())
            && dir.manifest.shards.iter().all(|s| s.max_token_id.is_some());
        if ranged {
            // Blocks of the `.bin` objects with their checksums; or, for a compressed-only
            // dataset, its frames.
            let layout = match dir.origins.iter().all(|o| *o == dir::Origin::Bin) {
                true => fetch_block_sums(&dir, &opts).map(|s| s.map(Layout::Sums)),
                false => blocks::fetch_frames(&dir, &opts).map(|f| f.map(Layout::Frames)),
            };
            match layout {
                Ok(Some(layout)) => return Self::start_ranged(dir, layout, opts, cfg, pack),
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "streaming whole shards instead"),
            }
        }
        Self::start_shards(dir, opts, cfg, pack)
    }

    fn start_shards(
        dir: StreamDir,
        opts: RemoteOptions,
        cfg: StreamConfig,
        pack: Arc<IndexPack>,
    ) -> Result<Streamer, RemoteError> {
        let costs: Vec<u64> = (0..dir.shards()).map(|s| dir.cost(s)).collect();
        // Besides the manifest and the .idx files, the directory may hold other files the
        // budget cannot evict (a host check's verdict): they count as fixed too. Only a
        // budget needs the figure (a listing and a stat per file: a warm start's largest
        // cost but one).
        let fixed = match cfg.budget {
            Some(_) => dir.fixed_bytes.max(cache::kept_files(&dir.dir)?),
            None => dir.fixed_bytes,
        };
        let sharers = cfg.sharers.max(1) as u64;
        let largest = costs.iter().copied().max().unwrap_or(0);
        let limit = match cfg.budget {
            None => None,
            Some(budget) => {
                // The least any step needs: one shard read, and the demand reserve (one
                // largest shard) beside it, per rank.
                let min_budget = min_budget(fixed, cfg.sharers, largest, largest);
                if budget < min_budget {
                    return Err(RemoteError::BudgetTooSmall {
                        dir: dir.dir.clone(),
                        budget,
                        fixed,
                        sharers: cfg.sharers,
                        min_budget,
                    });
                }
                Some((budget - fixed) / sharers)
            }
        };
        let plan_cfg = PlanConfig {
            costs,
            limit,
            in_flight: cfg.fetchers.max(1),
            horizon: cfg.horizon.max(1),
            end: cfg.end,
        };
        let location = dir.location.to_string();
        let plan = Plan::new(plan_cfg, 0).map_err(|cause| RemoteError::Plan { location, cause })?;
        let store = open_store(&dir.location, &opts)?;
        let n = dir.shards();
        let dir_path = dir.dir.clone();
        let workers = cfg.fetchers.max(1);
        let stamps = cache::Stamps::open(&dir.dir, n)?;
        let inner = Arc::new(Inner {
            dir,
            pack: pack.clone(),
            stamps,
            fixed,
            largest,
            store,
            opts,
            cfg,
            state: Mutex::new(State {
                plan,
                following: false,
                step_shards: None,
                leases: (0..n).map(|_| None).collect(),
                fatal: None,
                workers_left: workers,
            }),
            ready: (0..n).map(|_| RwLock::new(None)).collect(),
            changed: Condvar::new(),
            arrived: Condvar::new(),
            stop: AtomicBool::new(false),
            counters: Counters::default(),
        });
        let workers = spawn(&dir_path, workers, &inner, |i| i.work())?;
        Ok(Streamer::assemble(Engine::Shards(inner), workers, pack))
    }

    /// Range mode: shard data an earlier run left in the directory is evicted first (what no
    /// rank of the host holds), so the directory and the blocks held stay within the budget.
    fn start_ranged(
        dir: StreamDir,
        layout: Layout,
        opts: RemoteOptions,
        cfg: StreamConfig,
        pack: Arc<IndexPack>,
    ) -> Result<Streamer, RemoteError> {
        let stamps = cache::Stamps::open(&dir.dir, dir.shards())?;
        for shard in 0..dir.shards() {
            let bin = dir.bin(shard);
            let mut files = vec![bin.clone()];
            if let Some(z) = &dir.manifest.shards[shard].zstd {
                files.extend([dir.dir.join(&z.file), dir.dir.join(&z.index)]);
            }
            if files.iter().any(|f| f.exists()) {
                cache::evict(&Evictable { shard, bin, files }, &stamps)?;
            }
        }
        cache::sweep_partials(&dir.dir)?;
        let fixed = dir.fixed_bytes.max(cache::usage(&dir.dir)?);
        let budget = cfg.budget.unwrap_or(u64::MAX);
        let store = open_store(&dir.location, &opts)?;
        let dir_path = dir.dir.clone();
        // GETs of a few blocks wait on the round trip, not the bandwidth: more in flight.
        let workers = cfg.fetchers.max(1) * RANGE_GETS_PER_FETCHER;
        let ranged = ranged::Ranged::new(dir, layout, store, opts, cfg, (budget, fixed), workers)?;
        let ranged = Arc::new(ranged);
        let workers = spawn(&dir_path, workers, &ranged, |r| r.work())?;
        Ok(Streamer::assemble(Engine::Ranges(ranged), workers, pack))
    }

    /// The source to open the dataset with ([`crate::gpt::OpenOptions::shards`]).
    pub fn shards(&self) -> Shards {
        self.source.clone()
    }

    fn assemble(engine: Engine, workers: Vec<JoinHandle<()>>, pack: Arc<IndexPack>) -> Streamer {
        let inner: Arc<dyn ShardSource> = match &engine {
            Engine::Shards(inner) => inner.clone(),
            Engine::Ranges(ranged) => ranged.clone(),
        };
        let source = Shards(Arc::new(WithIndex { engine: inner, pack }));
        Streamer {
            engine,
            workers,
            source,
        }
    }

    /// The reader starts at step `start`; `step_shards(k)` says which bytes of which shards
    /// step `k` reads. From now on shards (or their blocks) are fetched in the order of the
    /// steps.
    pub fn follow(&self, start: u64, step_shards: StepShards) {
        match &self.engine {
            Engine::Shards(inner) => {
                let mut st = inner.lock();
                st.plan.reading(start);
                st.step_shards = Some(step_shards);
                st.following = true;
                inner.changed.notify_all();
            }
            Engine::Ranges(ranged) => ranged.follow(start, step_shards),
        }
    }

    pub fn dir(&self) -> &StreamDir {
        match &self.engine {
            Engine::Shards(inner) => &inner.dir,
            Engine::Ranges(ranged) => &ranged.dir,
        }
    }

    fn engine_cfg(&self) -> &StreamConfig {
        match &self.engine {
            Engine::Shards(inner) => &inner.cfg,
            Engine::Ranges(ranged) => &ranged.cfg,
        }
    }

    /// Whether the stream fetches byte ranges into memory rather than whole shards.
    pub fn is_ranged(&self) -> bool {
        matches!(self.engine, Engine::Ranges(_))
    }

    pub fn stats(&self) -> StreamStats {
        let c = match &self.engine {
            Engine::Shards(inner) => &inner.counters,
            Engine::Ranges(ranged) => &ranged.counters,
        };
        StreamStats {
            ranged: self.is_ranged(),
            fetched: c.fetched.load(Ordering::Relaxed),
            bytes_fetched: c.bytes_fetched.load(Ordering::Relaxed),
            reused: c.reused.load(Ordering::Relaxed),
            evicted: c.evicted.load(Ordering::Relaxed),
            peak_usage: c.peak_usage.load(Ordering::Relaxed),
            peak_held: c.peak_held.load(Ordering::Relaxed),
            waits: c.waits.load(Ordering::Relaxed),
            wait_s: c.wait_ns.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }

    /// Whether shard `shard` is present and held for this reader now (never, in range mode).
    pub fn is_held(&self, shard: usize) -> bool {
        match &self.engine {
            Engine::Shards(inner) => inner.lock().plan.held(shard) == Held::Present,
            Engine::Ranges(_) => false,
        }
    }
}

/// A stream's engine as the dataset's [`ShardSource`], with the `.idx` files from the cached
/// index pack (one mapping for every shard, no `.idx` file per shard).
struct WithIndex {
    engine: Arc<dyn ShardSource>,
    pack: Arc<IndexPack>,
}

impl ShardSource for WithIndex {
    fn shard(&self, shard: usize) -> Result<Arc<IndexedDataset>, DatasetError> {
        self.engine.shard(shard)
    }

    fn reading(&self, step: u64) {
        self.engine.reading(step)
    }

    fn index(&self, shard: usize, bin: &Path, bin_len: u64) -> Option<Result<IndexedIndex, DatasetError>> {
        Some(self.pack.index(shard, bin, bin_len).map_err(DatasetError::from))
    }

    fn ranged(&self) -> bool {
        self.engine.ranged()
    }

    fn read(&self, shard: usize, bytes: std::ops::Range<u64>, each: &mut dyn FnMut(&[u8])) -> Result<(), DatasetError> {
        self.engine.read(shard, bytes, each)
    }
}

/// Start `n` fetcher threads running `work` on `shared`.
fn spawn<T: Send + Sync + 'static>(
    dir: &std::path::Path,
    n: usize,
    shared: &Arc<T>,
    work: fn(Arc<T>),
) -> Result<Vec<JoinHandle<()>>, RemoteError> {
    (0..n)
        .map(|i| {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("gantry-stream-{i}"))
                .spawn(move || work(shared))
                .map_err(|source| RemoteError::Io {
                    path: dir.to_path_buf(),
                    source,
                })
        })
        .collect()
}

impl Drop for Streamer {
    fn drop(&mut self) {
        // A fetcher blocked on another process's lock may take a while: wait a little, then
        // leave it (the process ends soon; its temporary file is swept by the next fetch).
        let deadline = Instant::now() + Duration::from_secs(10);
        let finished = match &self.engine {
            Engine::Shards(inner) => {
                inner.stop.store(true, Ordering::Relaxed);
                inner.changed.notify_all();
                inner.arrived.notify_all();
                let mut st = inner.lock();
                while st.workers_left > 0 {
                    let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                        break;
                    };
                    st = inner
                        .changed
                        .wait_timeout(st, left)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
                st.workers_left == 0
            }
            Engine::Ranges(ranged) => {
                ranged.stop.store(true, Ordering::Relaxed);
                ranged.notify();
                ranged.wait_workers(deadline)
            }
        };
        if finished {
            for w in self.workers.drain(..) {
                let _ = w.join();
            }
        }
        let s = self.stats();
        tracing::info!(
            dataset = %self.dir().location,
            ranged = s.ranged,
            fetched = s.fetched,
            bytes_fetched = s.bytes_fetched,
            reused = s.reused,
            evicted = s.evicted,
            peak_usage = s.peak_usage,
            peak_held = s.peak_held,
            budget = self.engine_cfg().budget.unwrap_or(0),
            waits = s.waits,
            wait_s = s.wait_s,
            "data stream done"
        );
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Plan the steps the plan wants, and let go of what it no longer holds.
    fn settle(&self, st: &mut State) {
        if st.following && st.fatal.is_none() {
            while let Some(step) = st.plan.wants_step() {
                let Some(step_shards) = st.step_shards.as_mut() else {
                    break;
                };
                let added = plan_step(&self.dir, step, step_shards, |reads| {
                    st.plan
                        .add_step(step, shards_of(&reads))
                        .map_err(|cause| self.plan_error(cause))
                });
                if let Err(e) = added {
                    tracing::error!(error = %e, "cannot plan the data stream");
                    st.fatal = Some(Arc::new(e));
                    self.changed.notify_all();
                    self.arrived.notify_all();
                    break;
                }
            }
        }
        for s in st.plan.to_release() {
            self.set_ready(s, None);
            st.leases[s] = None;
            st.plan.released(s);
        }
    }

    /// What a plan's refusal means to the user: a step larger than this rank's share of the
    /// budget names the smallest budget that holds it.
    fn plan_error(&self, cause: PlanError) -> RemoteError {
        plan_refusal(&self.dir, &self.cfg, cause, |bytes| {
            min_budget(self.fixed, self.cfg.sharers, bytes, self.largest)
        })
    }

    /// Shards this rank does not hold, the ones it needs latest (or not at all) first: the
    /// order the cache evicts in to make room for this rank.
    fn evictable(&self, st: &State) -> Vec<Evictable> {
        if self.cfg.budget.is_none() {
            return Vec::new();
        }
        let needs = st.plan.next_needs();
        let mut order: Vec<usize> = (0..self.dir.shards())
            .filter(|&s| st.plan.held(s) == Held::No)
            .collect();
        order.sort_by_key(|&s| std::cmp::Reverse(needs[s].unwrap_or(u64::MAX)));
        order
            .into_iter()
            .map(|s| {
                let bin = self.dir.bin(s);
                let mut files = vec![bin.clone()];
                if let Some(z) = &self.dir.manifest.shards[s].zstd {
                    files.push(self.dir.dir.join(&z.file));
                    files.push(self.dir.dir.join(&z.index));
                }
                Evictable { shard: s, bin, files }
            })
            .collect()
    }

    /// A fetcher thread: take the next shard from the plan, bring it in, record it.
    fn work(self: Arc<Self>) {
        loop {
            let shard = {
                let mut st = self.lock();
                loop {
                    if self.stopped() || st.fatal.is_some() {
                        st.workers_left -= 1;
                        self.changed.notify_all();
                        self.arrived.notify_all();
                        return;
                    }
                    self.settle(&mut st);
                    let next = match st.following {
                        true => st.plan.next_fetch(),
                        false => st.plan.next_demand(),
                    };
                    if let Some(s) = next {
                        st.plan.started(s);
                        // Only this fetcher was woken (or none): hand on what is left to take.
                        if st.following && st.plan.next_fetch().is_some() {
                            self.changed.notify_one();
                        }
                        break s;
                    }
                    st = self.changed.wait(st).unwrap_or_else(PoisonError::into_inner);
                }
            };
            let result = self.bring(shard);
            let mut st = self.lock();
            match result {
                Ok((lease, map)) => {
                    st.leases[shard] = Some(lease);
                    self.set_ready(shard, Some(map));
                    st.plan.finished(shard, true);
                }
                Err(RemoteError::Stopped { .. }) => st.plan.finished(shard, false),
                Err(e) => {
                    tracing::error!(shard, object = %self.dir.object(shard), error = %e, "cannot fetch a shard");
                    st.plan.finished(shard, false);
                    st.fatal.get_or_insert_with(|| Arc::new(e));
                    self.changed.notify_all();
                }
            }
            // The fetcher takes its next shard itself (and wakes another if there is more).
            self.arrived.notify_all();
        }
    }

    /// Shard `shard`'s slot, set or emptied (the state's lock held, so a read that finds it
    /// empty under that lock waits for the fetcher's notice).
    fn set_ready(&self, shard: usize, map: Option<Arc<IndexedDataset>>) {
        *self.ready[shard].write().unwrap_or_else(PoisonError::into_inner) = map;
    }

    /// Shard `shard`'s map if this rank holds it now.
    fn ready_map(&self, shard: usize) -> Option<Arc<IndexedDataset>> {
        let slot = self.ready.get(shard)?;
        slot.read().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

/// What the reader reads in step `step` (`step_shards`), handed to `add` (the plan of either
/// shell); a reader that cannot say is an error naming the dataset and the step.
pub(super) fn plan_step(
    dir: &StreamDir,
    step: u64,
    step_shards: &mut StepShards,
    add: impl FnOnce(Vec<ShardBytes>) -> Result<(), RemoteError>,
) -> Result<(), RemoteError> {
    let reads = step_shards(step).map_err(|message| RemoteError::Needs {
        location: dir.location.to_string(),
        step,
        message,
    })?;
    add(reads)
}

/// What a plan's refusal means to the user, for either shell: a step larger than this rank's
/// share of the budget names the smallest budget that holds it (`min_budget` of the step's
/// bytes, which depends on how the shell's plan sets its limit).
pub(super) fn plan_refusal(
    dir: &StreamDir,
    cfg: &StreamConfig,
    cause: PlanError,
    min_budget: impl FnOnce(u64) -> u64,
) -> RemoteError {
    match (cause, cfg.budget) {
        (
            PlanError::StepTooLarge {
                step, shards, bytes, ..
            },
            Some(budget),
        ) => RemoteError::BudgetBelowStep {
            dir: dir.dir.clone(),
            budget,
            step,
            shards,
            bytes,
            sharers: cfg.sharers,
            min_budget: min_budget(bytes),
        },
        (cause, _) => RemoteError::Plan {
            location: dir.location.to_string(),
            cause,
        },
    }
}

/// How much longer a read of shard `shard` (its object named by `object`) that began at
/// `started` may wait within `wait`; past it, the error naming the shard, for either shell.
pub(super) fn wait_left(
    wait: Duration,
    started: Instant,
    shard: usize,
    object: impl FnOnce() -> String,
) -> Result<Duration, DatasetError> {
    let waited = started.elapsed();
    wait.checked_sub(waited).filter(|d| !d.is_zero()).ok_or_else(|| {
        DatasetError::Remote(Arc::new(RemoteError::WaitTimeout {
            shard,
            object: object(),
            waited_s: waited.as_secs_f64(),
        }))
    })
}

/// The smallest budget under which each of `sharers` ranks can hold a step whose shards cost
/// `step_bytes`, beside the fixed files (`fixed`) and its demand reserve (one largest shard,
/// `largest`): the inverse of the plan's limit, `(budget − fixed) / sharers − largest`.
fn min_budget(fixed: u64, sharers: usize, step_bytes: u64, largest: u64) -> u64 {
    fixed.saturating_add((sharers.max(1) as u64).saturating_mul(step_bytes.saturating_add(largest)))
}

impl ShardSource for Inner {
    fn shard(&self, shard: usize) -> Result<Arc<IndexedDataset>, DatasetError> {
        if let Some(map) = self.ready_map(shard) {
            return Ok(map);
        }
        let started = Instant::now();
        let object = || self.dir.object(shard);
        let mut st = self.lock();
        let mut waited = false;
        loop {
            if let Some(map) = self.ready_map(shard) {
                if waited {
                    let c = &self.counters;
                    c.waits.fetch_add(1, Ordering::Relaxed);
                    c.wait_ns
                        .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
                }
                return Ok(map);
            }
            if let Some(e) = &st.fatal {
                return Err(DatasetError::Remote(e.clone()));
            }
            if shard >= self.ready.len() || st.workers_left == 0 || self.stopped() {
                return Err(DatasetError::Remote(Arc::new(RemoteError::Stopped {
                    object: object(),
                })));
            }
            if st.plan.held(shard) == Held::No && st.plan.demanded() != Some(shard) {
                st.plan.demand(shard);
                self.changed.notify_all();
            }
            let left = wait_left(self.cfg.wait, started, shard, object)?;
            st = self
                .arrived
                .wait_timeout(st, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            waited = true;
        }
    }

    fn reading(&self, step: u64) {
        let mut st = self.lock();
        if st.following {
            st.plan.reading(step);
            self.settle(&mut st);
            // Most steps give the fetchers nothing new to take: wake one only when there is
            // (it wakes the next, see `work`).
            if st.plan.next_fetch().is_some() {
                self.changed.notify_one();
            }
        }
    }
}
