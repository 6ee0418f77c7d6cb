//! Flight recorder: the last N operations of each communicator, kept so that when something
//! hangs or fails one can see what every rank was doing. Dumped as JSON on any collective
//! error and, for every live communicator of the process, on SIGUSR1.

use crate::dtype::DType;
use crate::header::OpKind;
use serde::Serialize;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{SystemTime, UNIX_EPOCH};

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
    pub peers: Vec<usize>,
    pub algorithm: &'static str,
    pub state: OpState,
    pub start_unix_us: u64,
    pub end_unix_us: Option<u64>,
    pub error: Option<String>,
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// One communicator's recent history.
pub struct FlightRecorder {
    comm: String,
    rank: usize,
    capacity: usize,
    records: Mutex<VecDeque<OpRecord>>,
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

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<OpRecord>> {
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn start(&self, seq: u64, op: OpKind, dtype: DType, bytes: u64, peers: Vec<usize>, algorithm: &'static str) {
        let mut r = self.lock();
        if r.len() == self.capacity {
            r.pop_front();
        }
        r.push_back(OpRecord {
            seq,
            op,
            dtype,
            bytes,
            peers,
            algorithm,
            state: OpState::Started,
            start_unix_us: now_us(),
            end_unix_us: None,
            error: None,
        });
    }

    pub fn finish(&self, seq: u64, op: OpKind, error: Option<String>) {
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
            rec.end_unix_us = Some(now_us());
            rec.error = error;
        }
    }

    pub fn snapshot(&self) -> FlightDump {
        let records: Vec<OpRecord> = self.lock().iter().cloned().collect();
        FlightDump {
            comm: self.comm.clone(),
            rank: self.rank,
            pid: std::process::id(),
            dumped_unix_us: now_us(),
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

/// All recorders of a process, for the SIGUSR1 dump.
#[derive(Clone)]
pub struct RecorderSet {
    dir: PathBuf,
    live: Arc<Mutex<Vec<Weak<FlightRecorder>>>>,
}

impl RecorderSet {
    pub fn new(dir: PathBuf) -> RecorderSet {
        RecorderSet {
            dir,
            live: Arc::default(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
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
            .filter_map(|r| match r.dump_to(&self.dir) {
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
