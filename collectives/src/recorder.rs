//! Flight recorder: the last N operations of each communicator, kept so that when something
//! hangs or fails one can see what every rank was doing. Dumped as JSON on any collective
//! error and, for every live communicator of the process, on SIGUSR1. The dump directory is
//! per host (`$TMPDIR/gantry-flight` by default) and keeps the newest
//! [`FabricConfig::flight_keep`](crate::FabricConfig::flight_keep) dumps: every dump prunes
//! the older ones, so a host that fails often does not fill its disk.
//!
//! Recording sits on the path of every call (a 1 KiB all_reduce over shared memory is about
//! half a microsecond), so the common path takes no lock, allocates nothing and reads no
//! precise clock of its own:
//! - The ring is written by one [`FlightWriter`], owned by the communicator, and read by
//!   dumps on other threads. Each slot is a seqlock: the writer makes its version odd, stores
//!   the fields, makes it even again; a reader keeps a copy only if the version was the same
//!   even number before and after. Every field is an atomic integer, so a read that races a
//!   write is a retry, never undefined behaviour.
//! - What is not a plain number stays out of the slot: the group's member list is given once
//!   (a slot says "the group" or holds up to two send/recv peers), algorithm names are an
//!   enum, and an error message goes to a small locked list (errors are rare and end the
//!   communicator).
//! - The start is the communicator's own [`Instant`] (its deadline is counted from it). A
//!   successful end is read from the kernel's coarse monotonic clock (a few ns; it advances
//!   once per scheduler tick, so an end time may be early by a tick, 1 to 10 ms, and is never
//!   put before its start). Nothing compares end times finer than that: they say when an op
//!   was last seen to finish. A failed op's end is precise (that path is slow anyway).
//!
//! Times become Unix times only when a dump is taken, against a clock reading taken then, so
//! a wall clock stepped since an operation ran moves its times with it.

use crate::dtype::DType;
use crate::header::OpKind;
use serde::Serialize;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::atomic::{AtomicI64, AtomicU64, fence};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum OpState {
    Started = 1,
    Completed = 2,
    Failed = 3,
}

impl OpState {
    fn from_code(code: u8) -> Option<OpState> {
        [OpState::Started, OpState::Completed, OpState::Failed]
            .into_iter()
            .find(|s| *s as u8 == code)
    }
}

/// The schedule an operation ran, as its record names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum AlgoName {
    Dissemination = 1,
    RecursiveDoubling = 2,
    Ring = 3,
    BinomialTree = 4,
    Chain = 5,
    Pairwise = 6,
    P2p = 7,
    SharedSegment = 8,
}

impl AlgoName {
    const ALL: [AlgoName; 8] = [
        AlgoName::Dissemination,
        AlgoName::RecursiveDoubling,
        AlgoName::Ring,
        AlgoName::BinomialTree,
        AlgoName::Chain,
        AlgoName::Pairwise,
        AlgoName::P2p,
        AlgoName::SharedSegment,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            AlgoName::Dissemination => "dissemination",
            AlgoName::RecursiveDoubling => "recursive_doubling",
            AlgoName::Ring => "ring",
            AlgoName::BinomialTree => "binomial_tree",
            AlgoName::Chain => "chain",
            AlgoName::Pairwise => "pairwise",
            AlgoName::P2p => "p2p",
            AlgoName::SharedSegment => "shared_segment",
        }
    }

    fn from_code(code: u8) -> Option<AlgoName> {
        AlgoName::ALL.into_iter().find(|a| *a as u8 == code)
    }
}

/// Every [`OpKind`], to read one back from its code (`OpKind`'s own decoder is private to the
/// header). The exhaustive match below stops the build when a kind is added and not listed.
const OP_KINDS: [OpKind; 9] = [
    OpKind::AllReduce,
    OpKind::Broadcast,
    OpKind::Reduce,
    OpKind::AllGather,
    OpKind::ReduceScatter,
    OpKind::AllToAll,
    OpKind::SendRecv,
    OpKind::Barrier,
    OpKind::Split,
];

const _: () = match OpKind::AllReduce {
    OpKind::AllReduce
    | OpKind::Broadcast
    | OpKind::Reduce
    | OpKind::AllGather
    | OpKind::ReduceScatter
    | OpKind::AllToAll
    | OpKind::SendRecv
    | OpKind::Barrier
    | OpKind::Split => (),
};

fn op_kind(code: u8) -> Option<OpKind> {
    OP_KINDS.into_iter().find(|k| *k as u8 == code)
}

/// Whom an operation talks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peers {
    /// The whole group (the member list given to [`FlightWriter::new`]).
    Group,
    /// A send and/or receive, each with the peer's global rank.
    P2p { send: Option<usize>, recv: Option<usize> },
}

#[derive(Clone, Debug, Serialize)]
pub struct OpRecord {
    pub seq: u64,
    pub op: OpKind,
    pub dtype: DType,
    pub bytes: u64,
    /// Global ranks of the peers this operation talks to (the whole group for collectives).
    #[serde(serialize_with = "serialize_peers")]
    pub peers: Arc<[usize]>,
    pub algorithm: &'static str,
    pub state: OpState,
    pub start_unix_us: u64,
    pub end_unix_us: Option<u64>,
    pub error: Option<String>,
}

fn serialize_peers<S: serde::Serializer>(peers: &Arc<[usize]>, s: S) -> Result<S::Ok, S::Error> {
    peers[..].serialize(s)
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Reads `clock` through clock_gettime(2); `None` if the kernel refuses it.
#[cfg(target_os = "linux")]
fn clock_ns(clock: libc::clockid_t) -> Option<i64> {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a live, writable timespec for the whole call, and a timespec is all
    // clock_gettime(2) writes through the pointer; it keeps no reference after returning.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    // Both fields are i64 on the 64-bit Linux targets gantry builds for.
    (rc == 0).then_some(ts.tv_sec * 1_000_000_000 + ts.tv_nsec)
}

/// The recorder's time base: signed nanoseconds since the recorder was made.
struct Clock {
    epoch: Instant,
    /// CLOCK_MONOTONIC at `epoch` (std's `Instant` is CLOCK_MONOTONIC on Linux), to place the
    /// coarse clock's readings on the same base; `None` where there is no coarse clock.
    epoch_mono_ns: Option<i64>,
}

impl Clock {
    fn new() -> Clock {
        let epoch = Instant::now();
        #[cfg(target_os = "linux")]
        let epoch_mono_ns = clock_ns(libc::CLOCK_MONOTONIC);
        #[cfg(not(target_os = "linux"))]
        let epoch_mono_ns = None;
        Clock { epoch, epoch_mono_ns }
    }

    fn at(&self, t: Instant) -> i64 {
        match t.checked_duration_since(self.epoch) {
            Some(after) => after.as_nanos() as i64,
            None => -(self.epoch.duration_since(t).as_nanos() as i64),
        }
    }

    /// Now, up to a scheduler tick early: the coarse clock is the precise one as of the last
    /// tick.
    fn coarse_now(&self) -> i64 {
        #[cfg(target_os = "linux")]
        if let (Some(epoch), Some(now)) = (self.epoch_mono_ns, clock_ns(libc::CLOCK_MONOTONIC_COARSE)) {
            return now - epoch;
        }
        self.at(Instant::now())
    }
}

/// A wall-clock reading and the recorder's clock taken together, to turn the recorder's
/// times into Unix microseconds.
struct Anchor {
    unix_us: u64,
    ns: i64,
}

impl Anchor {
    fn now(clock: &Clock) -> Anchor {
        Anchor {
            unix_us: now_us(),
            ns: clock.at(Instant::now()),
        }
    }

    fn unix_us(&self, t: i64) -> u64 {
        let ago_us = (self.ns - t).div_euclid(1000);
        (self.unix_us as i64).saturating_sub(ago_us).max(0) as u64
    }
}

/// `meta` bits: kind, dtype, algorithm and state codes in the low four bytes, then whom the
/// operation talks to.
const META_P2P: u64 = 1 << 32;
const META_SEND: u64 = 1 << 33;
const META_RECV: u64 = 1 << 34;
/// Copies a reader gives up after, when the writer keeps rewriting the slot; the slot is then
/// left out of that dump (the writer only rewrites it while the communicator makes progress).
const READ_TRIES: usize = 1000;

/// One ring entry, a seqlock: `version` is odd while the writer changes the slot, 0 for a slot
/// never written.
#[derive(Default)]
struct Slot {
    version: AtomicU64,
    /// How many operations the writer started before this one: orders the records and keys
    /// the error list.
    pos: AtomicU64,
    seq: AtomicU64,
    bytes: AtomicU64,
    meta: AtomicU64,
    send: AtomicU64,
    recv: AtomicU64,
    started: AtomicI64,
    /// Meaningful once `meta`'s state is not `Started`.
    ended: AtomicI64,
}

/// A consistent copy of a [`Slot`].
struct Raw {
    pos: u64,
    seq: u64,
    bytes: u64,
    meta: u64,
    send: u64,
    recv: u64,
    started: i64,
    ended: i64,
}

impl Slot {
    /// Change the slot under its seqlock. Only the slot's one writer calls this.
    fn write(&self, f: impl FnOnce(&Slot)) {
        let v = self.version.load(Relaxed);
        self.version.store(v.wrapping_add(1), Relaxed);
        // Orders the odd version before the field stores: a reader that sees any new field
        // value and then fences (Acquire) sees at least the odd version on its re-check.
        fence(Release);
        f(self);
        self.version.store(v.wrapping_add(2), Release);
    }

    /// A consistent copy, or `None` for a slot never written (or one the writer kept busy).
    fn read(&self) -> Option<Raw> {
        for _ in 0..READ_TRIES {
            let before = self.version.load(Acquire);
            if before == 0 {
                return None;
            }
            if before % 2 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let raw = Raw {
                pos: self.pos.load(Relaxed),
                seq: self.seq.load(Relaxed),
                bytes: self.bytes.load(Relaxed),
                meta: self.meta.load(Relaxed),
                send: self.send.load(Relaxed),
                recv: self.recv.load(Relaxed),
                started: self.started.load(Relaxed),
                ended: self.ended.load(Relaxed),
            };
            // Keeps the field loads before the re-check (pairs with `write`'s Release fence).
            fence(Acquire);
            if self.version.load(Relaxed) == before {
                return Some(raw);
            }
        }
        None
    }
}

fn meta_state(meta: u64) -> u8 {
    (meta >> 24) as u8
}

fn with_state(meta: u64, state: OpState) -> u64 {
    (meta & !(0xff << 24)) | (state as u64) << 24
}

impl Raw {
    /// The record this copy describes, given the error listed for its position. `None` for a
    /// failed op whose error is no longer listed: the writer went round the ring while the
    /// dump read it, so the op is not in the ring any more. `None` too if a code does not
    /// decode (not written by [`FlightWriter`], which cannot happen).
    fn record(&self, rec: &FlightRecorder, anchor: &Anchor, error: Option<String>) -> Option<OpRecord> {
        let byte = |shift: u32| (self.meta >> shift) as u8;
        let state = OpState::from_code(meta_state(self.meta))?;
        let error = if state == OpState::Failed { Some(error?) } else { None };
        let peers: Arc<[usize]> = if self.meta & META_P2P == 0 {
            rec.group.clone()
        } else {
            let send = (self.meta & META_SEND != 0).then_some(self.send as usize);
            let recv = (self.meta & META_RECV != 0).then_some(self.recv as usize);
            send.into_iter().chain(recv).collect()
        };
        Some(OpRecord {
            seq: self.seq,
            op: op_kind(byte(0))?,
            dtype: DType::from_code(byte(8))?,
            bytes: self.bytes,
            peers,
            algorithm: AlgoName::from_code(byte(16))?.name(),
            state,
            start_unix_us: anchor.unix_us(self.started),
            end_unix_us: (state != OpState::Started).then(|| anchor.unix_us(self.ended)),
            error,
        })
    }
}

/// What an operation is, for [`FlightWriter::start`].
pub struct OpStart {
    pub seq: u64,
    pub op: OpKind,
    pub dtype: DType,
    pub bytes: u64,
    pub peers: Peers,
    pub algorithm: AlgoName,
    /// When the operation started (the instant its deadline is counted from).
    pub started: Instant,
}

/// One communicator's recent history, as dumps read it. Written through its [`FlightWriter`].
pub struct FlightRecorder {
    comm: String,
    rank: usize,
    /// Global ranks of the communicator's members: the peers of every [`Peers::Group`] op.
    group: Arc<[usize]>,
    clock: Clock,
    slots: Box<[Slot]>,
    /// Messages of failed operations still in the ring, by ring position.
    errors: Mutex<VecDeque<(u64, String)>>,
}

/// The one writer of a [`FlightRecorder`]: `&mut` on every call, which is what makes the
/// seqlock's single-writer rule hold.
pub struct FlightWriter {
    rec: Arc<FlightRecorder>,
    /// Operations started so far.
    next: u64,
    /// The slot the next operation takes: `next % capacity`, kept rather than divided for on
    /// every call.
    slot: usize,
}

impl FlightWriter {
    /// A recorder keeping the last `capacity` operations of communicator `comm`, whose member
    /// of global rank `rank` records them and whose members are `group`.
    pub fn new(comm: String, rank: usize, capacity: usize, group: Arc<[usize]>) -> FlightWriter {
        let slots = (0..capacity.max(1)).map(|_| Slot::default()).collect();
        FlightWriter {
            rec: Arc::new(FlightRecorder {
                comm,
                rank,
                group,
                clock: Clock::new(),
                slots,
                errors: Mutex::new(VecDeque::new()),
            }),
            next: 0,
            slot: 0,
        }
    }

    /// The read side, for dumps.
    pub fn recorder(&self) -> &Arc<FlightRecorder> {
        &self.rec
    }

    /// Record an operation as started; it takes the oldest record's slot once the ring is full.
    pub fn start(&mut self, op: OpStart) {
        let (pos, idx) = (self.next, self.slot);
        self.next += 1;
        self.slot = if idx + 1 == self.rec.slots.len() { 0 } else { idx + 1 };
        let (p2p, send, recv) = match op.peers {
            Peers::Group => (0, None, None),
            Peers::P2p { send, recv } => (META_P2P, send, recv),
        };
        let meta = u64::from(op.op as u8)
            | u64::from(op.dtype as u8) << 8
            | u64::from(op.algorithm as u8) << 16
            | (OpState::Started as u64) << 24
            | p2p
            | if send.is_some() { META_SEND } else { 0 }
            | if recv.is_some() { META_RECV } else { 0 };
        let started = self.rec.clock.at(op.started);
        self.rec.slots[idx].write(|s| {
            s.pos.store(pos, Relaxed);
            s.seq.store(op.seq, Relaxed);
            s.bytes.store(op.bytes, Relaxed);
            s.meta.store(meta, Relaxed);
            s.send.store(send.unwrap_or(0) as u64, Relaxed);
            s.recv.store(recv.unwrap_or(0) as u64, Relaxed);
            s.started.store(started, Relaxed);
        });
    }

    /// Mark the started operation `seq`/`op` as ended now (by the coarse clock), failed when
    /// `error` is set.
    pub fn finish(&mut self, seq: u64, op: OpKind, error: Option<String>) {
        let ended = self.rec.clock.coarse_now();
        self.conclude(seq, op, ended, error);
    }

    /// [`finish`](Self::finish) at the instant `ended`.
    pub fn finish_at(&mut self, seq: u64, op: OpKind, ended: Instant, error: Option<String>) {
        let ended = self.rec.clock.at(ended);
        self.conclude(seq, op, ended, error);
    }

    fn conclude(&mut self, seq: u64, op: OpKind, ended: i64, error: Option<String>) {
        let Some((pos, slot)) = self.in_flight(seq, op) else {
            return;
        };
        let state = if let Some(message) = error {
            let oldest = self.next.saturating_sub(self.rec.slots.len() as u64);
            let mut errors = self.rec.errors.lock().unwrap_or_else(|p| p.into_inner());
            errors.retain(|&(p, _)| p >= oldest);
            errors.push_back((pos, message));
            OpState::Failed
        } else {
            OpState::Completed
        };
        // Only this writer stores to its slots, so its own relaxed loads see its last stores.
        let started = slot.started.load(Relaxed);
        let meta = with_state(slot.meta.load(Relaxed), state);
        slot.write(|s| {
            s.ended.store(ended.max(started), Relaxed);
            s.meta.store(meta, Relaxed);
        });
    }

    /// The ring position and slot of the started, unfinished operation `seq`/`op`, newest
    /// first (the communicator finishes the op it started last).
    fn in_flight(&self, seq: u64, op: OpKind) -> Option<(u64, &Slot)> {
        let cap = self.rec.slots.len();
        let live = self.next.min(cap as u64) as usize;
        (1..=live).find_map(|back| {
            let idx = if self.slot >= back {
                self.slot - back
            } else {
                self.slot + cap - back
            };
            let slot = &self.rec.slots[idx];
            let meta = slot.meta.load(Relaxed);
            let open =
                slot.seq.load(Relaxed) == seq && meta as u8 == op as u8 && meta_state(meta) == OpState::Started as u8;
            open.then_some((self.next - back as u64, slot))
        })
    }
}

#[derive(Serialize)]
pub struct FlightDump {
    pub comm: String,
    pub rank: usize,
    pub pid: u32,
    pub dumped_unix_us: u64,
    /// Sequence number of the newest completed operation.
    pub last_completed: Option<u64>,
    /// Operations started and not finished (the stuck one, if any).
    pub in_flight: Vec<OpRecord>,
    pub failed: Vec<OpRecord>,
    pub records: Vec<OpRecord>,
}

impl FlightRecorder {
    /// Every record in the ring, oldest first. Safe from any thread while the writer runs.
    pub fn snapshot(&self) -> FlightDump {
        let anchor = Anchor::now(&self.clock);
        let mut raws: Vec<Raw> = self.slots.iter().filter_map(Slot::read).collect();
        raws.sort_unstable_by_key(|r| r.pos);
        // After the slots: an error is listed before its slot says `Failed`.
        let errors = self.errors.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let error = |pos: u64| errors.iter().find(|(p, _)| *p == pos).map(|(_, m)| m.clone());
        let records: Vec<OpRecord> = raws
            .iter()
            .filter_map(|r| r.record(self, &anchor, error(r.pos)))
            .collect();
        FlightDump {
            comm: self.comm.clone(),
            rank: self.rank,
            pid: std::process::id(),
            dumped_unix_us: anchor.unix_us,
            last_completed: records
                .iter()
                .filter(|r| r.state == OpState::Completed)
                .map(|r| r.seq)
                .max(),
            in_flight: records
                .iter()
                .filter(|r| r.state == OpState::Started)
                .cloned()
                .collect(),
            failed: records.iter().filter(|r| r.state == OpState::Failed).cloned().collect(),
            records,
        }
    }

    /// Write the snapshot to `dir/flight-rank{R}-{comm}-{pid}.json`; returns the path.
    pub fn dump_to(&self, dir: &Path) -> std::io::Result<PathBuf> {
        std::fs::create_dir_all(dir)?;
        let safe: String = self
            .comm
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let path = dir.join(format!("flight-rank{}-{}-{}.json", self.rank, safe, std::process::id()));
        let json = serde_json::to_vec_pretty(&self.snapshot()).map_err(std::io::Error::other)?;
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, json)?;
        std::fs::rename(&tmp, &path)?;
        Ok(path)
    }
}

/// Whether `name` is a dump [`FlightRecorder::dump_to`] writes (not its temporary file).
fn is_dump(name: &str) -> bool {
    name.starts_with("flight-") && name.ends_with(".json")
}

/// Keep the newest `keep` flight dumps (`flight-*.json`) in `dir` and delete the others;
/// `keep = 0` keeps everything. Other files are left alone. Ranks of one host pruning at the
/// same time may race to delete a file: one that is already gone is not an error. Returns the
/// files deleted.
pub fn prune_dumps(dir: &Path, keep: usize) -> std::io::Result<Vec<PathBuf>> {
    if keep == 0 {
        return Ok(Vec::new());
    }
    let mut dumps: Vec<(SystemTime, PathBuf)> = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if !entry.file_name().to_str().is_some_and(is_dump) {
            continue;
        }
        // A file deleted by another rank since the listing is simply not counted.
        if let Ok(modified) = entry.metadata().and_then(|m| m.modified()) {
            dumps.push((modified, entry.path()));
        }
    }
    // Newest first (ties by name, so every rank agrees on the order).
    dumps.sort_unstable_by(|a, b| b.cmp(a));
    let mut deleted = Vec::new();
    for (_, path) in dumps.into_iter().skip(keep) {
        match std::fs::remove_file(&path) {
            Ok(()) => deleted.push(path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(deleted)
}

/// All recorders of a process, for the SIGUSR1 dump, and where dumps go.
#[derive(Clone)]
pub struct RecorderSet {
    dir: PathBuf,
    keep: usize,
    live: Arc<Mutex<Vec<Weak<FlightRecorder>>>>,
}

impl RecorderSet {
    /// Dumps go to `dir`, which keeps the newest `keep` of them (0 = all).
    pub fn new(dir: PathBuf, keep: usize) -> RecorderSet {
        RecorderSet {
            dir,
            keep,
            live: Arc::default(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Write `rec`'s dump into the directory, then prune the directory to the newest `keep`
    /// dumps (a failed prune is logged: the dump itself was written).
    pub fn dump(&self, rec: &FlightRecorder) -> std::io::Result<PathBuf> {
        let path = rec.dump_to(&self.dir)?;
        if let Err(e) = prune_dumps(&self.dir, self.keep) {
            tracing::warn!(dir = %self.dir.display(), "pruning old flight recorder dumps failed: {e}");
        }
        Ok(path)
    }

    pub fn register(&self, rec: &Arc<FlightRecorder>) {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        live.retain(|w| w.strong_count() > 0);
        live.push(Arc::downgrade(rec));
    }

    /// Dump every live recorder; returns the files written.
    pub fn dump_all(&self) -> Vec<PathBuf> {
        let live: Vec<_> = self
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        live.iter()
            .filter_map(|r| match self.dump(r) {
                Ok(p) => Some(p),
                Err(e) => {
                    tracing::error!("flight recorder dump failed: {e}");
                    None
                }
            })
            .collect()
    }

    /// Spawn a thread that dumps all recorders whenever the process receives SIGUSR1.
    pub fn install_sigusr1(&self) -> std::io::Result<()> {
        let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGUSR1])?;
        let set = self.clone();
        std::thread::Builder::new()
            .name("gantry-sigusr1".into())
            .spawn(move || {
                for _ in signals.forever() {
                    for path in set.dump_all() {
                        eprintln!("gantry: flight recorder dumped to {}", path.display());
                    }
                }
            })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
