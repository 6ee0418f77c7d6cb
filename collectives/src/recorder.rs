//! Flight recorder: the last N operations of each communicator, kept so that when something
//! hangs or fails one can see what every rank was doing. Dumped as JSON on any collective
//! error and, for every live communicator of the process, on SIGUSR1. The dump directory is
//! per host (`$TMPDIR/gantry-flight` by default) and keeps the newest
//! [`FabricConfig::flight_keep`](crate::FabricConfig::flight_keep) dumps: every dump prunes
//! the older ones, so a host that fails often does not fill its disk.
//!
//! Recording sits on the path of every call, so it costs no clock of its own and no heap
//! allocation: the communicator passes the [`Instant`]s it read anyway (one at the start of an
//! operation, one at its end) and a shared list of peers, and the ring of records stops growing
//! once full. Instants become Unix times only when a dump is taken, against a clock reading
//! taken then, so a wall clock stepped since an operation ran moves its times with it.

use crate::dtype::DType;
use crate::header::OpKind;
use serde::Serialize;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OpState {
    Started,
    Completed,
    Failed,
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

/// One operation as kept in the ring: times as the communicator's own [`Instant`]s.
struct Entry {
    seq: u64,
    op: OpKind,
    dtype: DType,
    bytes: u64,
    peers: Arc<[usize]>,
    algorithm: &'static str,
    state: OpState,
    started: Instant,
    ended: Option<Instant>,
    error: Option<String>,
}

/// A wall-clock reading and a monotonic one taken together, to turn [`Instant`]s into Unix
/// microseconds.
#[derive(Clone, Copy)]
struct Anchor {
    unix_us: u64,
    instant: Instant,
}

impl Anchor {
    fn now() -> Anchor {
        Anchor {
            unix_us: now_us(),
            instant: Instant::now(),
        }
    }

    fn unix_us(&self, t: Instant) -> u64 {
        match self.instant.checked_duration_since(t) {
            Some(ago) => self.unix_us.saturating_sub(ago.as_micros() as u64),
            None => self.unix_us + t.duration_since(self.instant).as_micros() as u64,
        }
    }
}

impl Entry {
    fn record(&self, anchor: &Anchor) -> OpRecord {
        OpRecord {
            seq: self.seq,
            op: self.op,
            dtype: self.dtype,
            bytes: self.bytes,
            peers: self.peers.clone(),
            algorithm: self.algorithm,
            state: self.state,
            start_unix_us: anchor.unix_us(self.started),
            end_unix_us: self.ended.map(|t| anchor.unix_us(t)),
            error: self.error.clone(),
        }
    }
}

/// What an operation is, for [`FlightRecorder::start`].
pub struct OpStart<'a> {
    pub seq: u64,
    pub op: OpKind,
    pub dtype: DType,
    pub bytes: u64,
    /// Cloned only when the record it replaces does not already hold this very list.
    pub peers: &'a Arc<[usize]>,
    pub algorithm: &'static str,
    /// When the operation started (the instant its deadline is counted from).
    pub started: Instant,
}

/// One communicator's recent history.
pub struct FlightRecorder {
    comm: String,
    rank: usize,
    capacity: usize,
    records: Mutex<VecDeque<Entry>>,
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
    pub fn new(comm: String, rank: usize, capacity: usize) -> FlightRecorder {
        FlightRecorder {
            comm,
            rank,
            capacity: capacity.max(1),
            records: Mutex::new(VecDeque::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Entry>> {
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Record an operation as started; the oldest record makes room once the ring is full.
    pub fn start(&self, op: OpStart<'_>) {
        let mut r = self.lock();
        let evicted = if r.len() == self.capacity { r.pop_front() } else { None };
        // A communicator's collectives all name the same members: hand the evicted record's
        // reference on, rather than one more count up and one down per call.
        let peers = match evicted {
            Some(old) if Arc::ptr_eq(&old.peers, op.peers) => old.peers,
            _ => op.peers.clone(),
        };
        r.push_back(Entry {
            seq: op.seq,
            op: op.op,
            dtype: op.dtype,
            bytes: op.bytes,
            peers,
            algorithm: op.algorithm,
            state: OpState::Started,
            started: op.started,
            ended: None,
            error: None,
        });
    }

    /// Mark the started operation `seq`/`op` as ended at `ended`, failed when `error` is set.
    pub fn finish(&self, seq: u64, op: OpKind, ended: Instant, error: Option<String>) {
        let mut r = self.lock();
        if let Some(rec) = r
            .iter_mut()
            .rev()
            .find(|x| x.seq == seq && x.op == op && x.state == OpState::Started)
        {
            rec.state = if error.is_some() {
                OpState::Failed
            } else {
                OpState::Completed
            };
            rec.ended = Some(ended);
            rec.error = error;
        }
    }

    pub fn snapshot(&self) -> FlightDump {
        let anchor = Anchor::now();
        let records: Vec<OpRecord> = self.lock().iter().map(|e| e.record(&anchor)).collect();
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
mod tests {
    use super::*;
    use std::time::Duration;

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("gantry-recorder-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Dumps named `flight-{i}.json`, the higher `i` the newer.
    fn dumps(dir: &Path, n: u64) {
        let base = SystemTime::now() - Duration::from_secs(3600);
        for i in 0..n {
            let path = dir.join(format!("flight-{i}.json"));
            std::fs::write(&path, "{}").unwrap();
            let f = std::fs::File::options().write(true).open(&path).unwrap();
            f.set_modified(base + Duration::from_secs(i)).unwrap();
        }
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    fn op(seq: u64, peers: &Arc<[usize]>, started: Instant) -> OpStart<'_> {
        OpStart {
            seq,
            op: OpKind::AllReduce,
            dtype: DType::F32,
            bytes: 1024,
            peers,
            algorithm: "recursive_doubling",
            started,
        }
    }

    #[test]
    fn records_keep_the_callers_instants_as_unix_times_and_the_newest_ops() {
        let rec = FlightRecorder::new("world".into(), 3, 2);
        let peers: Arc<[usize]> = Arc::from([2, 3]);
        let t0 = Instant::now().checked_sub(Duration::from_secs(1)).unwrap();
        rec.start(op(1, &peers, t0));
        rec.finish(1, OpKind::AllReduce, t0 + Duration::from_millis(5), None);
        rec.start(op(2, &peers, t0 + Duration::from_millis(7)));
        rec.finish(
            2,
            OpKind::AllReduce,
            t0 + Duration::from_millis(9),
            Some("rank 2 vanished".into()),
        );
        // Only `capacity` records stay: seq 1 makes room for seq 3, which never finishes.
        rec.start(op(3, &peers, t0 + Duration::from_millis(10)));
        // A finish for an op that is not in flight changes nothing.
        rec.finish(7, OpKind::AllReduce, t0, None);

        let before_us = now_us();
        let dump = rec.snapshot();
        let seqs: Vec<u64> = dump.records.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [2, 3]);
        let (failed, stuck) = (&dump.records[0], &dump.records[1]);
        assert_eq!(failed.state, OpState::Failed);
        assert_eq!(failed.error.as_deref(), Some("rank 2 vanished"));
        assert_eq!(failed.end_unix_us.unwrap() - failed.start_unix_us, 2000);
        assert_eq!(stuck.start_unix_us - failed.start_unix_us, 3000);
        assert_eq!((stuck.state, stuck.end_unix_us), (OpState::Started, None));
        assert_eq!(dump.in_flight.len(), 1);
        assert_eq!(dump.last_completed, None);
        // The instants were taken before the dump: their Unix times are too (±1 µs rounding).
        assert!(failed.start_unix_us <= dump.dumped_unix_us && dump.dumped_unix_us + 1 >= before_us);
        assert!(
            stuck.start_unix_us <= before_us + 1,
            "{} vs {before_us}",
            stuck.start_unix_us
        );
        let json = serde_json::to_value(failed).unwrap();
        assert_eq!(json["peers"], serde_json::json!([2, 3]));
        assert_eq!(json["algorithm"], "recursive_doubling");
    }

    #[test]
    fn pruning_keeps_the_newest_dumps_and_nothing_else_is_touched() {
        let dir = scratch("prune");
        dumps(&dir, 6);
        std::fs::write(dir.join("notes.txt"), "mine").unwrap();
        std::fs::write(dir.join("flight-9.json.tmp"), "half").unwrap();
        let deleted = prune_dumps(&dir, 2).unwrap();
        assert_eq!(deleted.len(), 4);
        assert_eq!(
            names(&dir),
            ["flight-4.json", "flight-5.json", "flight-9.json.tmp", "notes.txt"]
        );
        // keep = 0 keeps everything; keeping more than there are deletes nothing.
        assert!(prune_dumps(&dir, 0).unwrap().is_empty());
        assert!(prune_dumps(&dir, 10).unwrap().is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn every_dump_prunes_the_directory_to_keep() {
        let dir = scratch("dump");
        dumps(&dir, 5);
        let set = RecorderSet::new(dir.clone(), 3);
        let rec = Arc::new(FlightRecorder::new("world".into(), 1, 4));
        set.register(&rec);
        let path = set.dump(&rec).unwrap();
        let left = names(&dir);
        assert_eq!(left.len(), 3, "{left:?}");
        assert!(path.exists(), "the new dump is the newest: never pruned");
        assert!(left.contains(&"flight-4.json".to_string()) && left.contains(&"flight-3.json".to_string()));
        assert_eq!(set.dump_all(), vec![path.clone()]);
        assert_eq!(names(&dir).len(), 3);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
