//! The save pipeline of one rank. The training loop hands a [`SaveRequest`] (its slices,
//! in host memory or on their way there) to [`Saver::save`] and goes on training; a background
//! thread packs the slices into chunk objects, checksums and uploads them, then writes the
//! rank's index. The committing rank (rank 0) waits for every rank's index of this attempt,
//! checks that the slices tile every tensor, and creates `manifest.json` if absent: the commit.
//! Then it moves `latest`, removes a crashed attempt's leftovers under the step and applies
//! retention. The slices may still be filling when they arrive (a device copy on a side
//! stream, [`crate::snapshot`]): the thread waits for them before it reads a byte. A new save
//! first waits for the previous one to be committed, so at most two snapshots per rank exist:
//! the one being written and the next one. A fenced save ([`SaverConfig::fence`]) is
//! refused its commit once a later attempt of its job claimed the directory, and replaces a
//! commit an older attempt slipped in ([`crate::fence`]). A `Saver` dropped with a save in
//! flight (its rank failed) cancels that save: its waits for the other ranks end at once and
//! it never commits, so a failing rank exits promptly instead of after `commit_timeout`.

use crate::error::CheckpointError;
use crate::fence::{self, Existing, Fence};
use crate::format::{
    ChunkEntry, FORMAT_VERSION, JobState, LATEST, MANIFEST, Manifest, ObjectInfo, RankIndex, SliceSpec, chunk_name,
    parse_step_dir, rank_index_name, step_dir, xxh3_hex,
};
use crate::planner::check_complete;
use crate::retention::{Retention, doomed};
use crate::snapshot::SnapshotBytes;
use crate::store::Store;
use bytes::Bytes;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A slice of a tensor and its bytes (row-major, little-endian), snapshotted off the device:
/// owned (`Vec<u8>`/`Bytes` `.into()`), or a range of a reused buffer that may still be filling
/// ([`crate::snapshot`]).
pub struct TensorData {
    pub slice: SliceSpec,
    pub bytes: SnapshotBytes,
}

pub struct SaveRequest {
    /// Steps completed when the snapshot was taken.
    pub step: u64,
    pub tensors: Vec<TensorData>,
    /// This rank's state to restore (RNG, ...), stored in the manifest's `ranks`.
    pub rank_state: serde_json::Value,
    /// Job-wide state; only the committing rank's is used.
    pub job: JobState,
}

#[derive(Clone, Debug)]
pub struct SaverConfig {
    pub rank: usize,
    pub world_size: usize,
    /// Identifies this run's saves; every rank of a run must use the same one.
    pub attempt: String,
    /// The job's attempt as its launcher numbers them, when it does: commits check it
    /// against the directory's claims ([`crate::fence`]); rank 0 claims with
    /// [`fence::claim`] before choosing a step to resume from.
    pub fence: Option<Fence>,
    /// Chunk objects are cut at about this size.
    pub chunk_bytes: usize,
    /// How long to wait for the other ranks' writes (committer) or for the commit (others).
    pub commit_timeout: Duration,
    pub poll: Duration,
    pub retention: Retention,
}

impl SaverConfig {
    pub fn new(rank: usize, world_size: usize, attempt: &str) -> SaverConfig {
        SaverConfig {
            rank,
            world_size,
            attempt: attempt.to_string(),
            fence: None,
            chunk_bytes: 256 << 20,
            commit_timeout: Duration::from_secs(600),
            poll: Duration::from_millis(50),
            retention: Retention::default(),
        }
    }
    pub fn committer(&self) -> bool {
        self.rank == 0
    }
}

/// What one finished save did.
#[derive(Clone, Debug, PartialEq)]
pub struct SaveReport {
    pub step: u64,
    /// Bytes this rank wrote.
    pub bytes: u64,
    /// Seconds this rank spent packing, checksumming and uploading.
    pub write_s: f64,
    /// Seconds from the hand-off until the commit was written (committer) or seen (others).
    pub commit_s: f64,
}

pub struct Saver {
    tx: Option<Sender<SaveRequest>>,
    rx: Receiver<Result<SaveReport, CheckpointError>>,
    in_flight: bool,
    /// Set when the save in flight is abandoned; the writer's waits check it.
    cancel: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Saver {
    pub fn new(store: Store, config: SaverConfig) -> Saver {
        let (tx, jobs) = channel::<SaveRequest>();
        let (done, rx) = channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let cancelled = Arc::clone(&cancel);
        let thread = std::thread::Builder::new()
            .name(format!("ckpt-writer-{}", config.rank))
            .spawn(move || {
                for req in jobs {
                    let r = write_and_commit(&store, &config, &cancelled, req);
                    if done.send(r).is_err() {
                        return;
                    }
                }
            })
            .expect("spawn checkpoint writer");
        Saver {
            tx: Some(tx),
            rx,
            in_flight: false,
            cancel,
            thread: Some(thread),
        }
    }

    /// Hand a snapshot to the writer. Waits first for the previous save to be committed and
    /// returns its report.
    pub fn save(&mut self, req: SaveRequest) -> Result<Option<SaveReport>, CheckpointError> {
        let previous = self.wait()?;
        self.tx
            .as_ref()
            .ok_or(CheckpointError::WriterGone)?
            .send(req)
            .map_err(|_| CheckpointError::WriterGone)?;
        self.in_flight = true;
        Ok(previous)
    }

    /// Wait for the save in flight, if any, to be committed.
    pub fn wait(&mut self) -> Result<Option<SaveReport>, CheckpointError> {
        if !self.in_flight {
            return Ok(None);
        }
        self.in_flight = false;
        self.rx.recv().map_err(|_| CheckpointError::WriterGone)?.map(Some)
    }

    /// Abandon the save in flight, if any: it stops waiting for the other ranks and does not
    /// commit (unless it already had). Returns its outcome, [`CheckpointError::Cancelled`]
    /// when the cancel stopped it. Later saves are cancelled too.
    pub fn cancel(&mut self) -> Result<Option<SaveReport>, CheckpointError> {
        self.cancel.store(true, Ordering::Relaxed);
        self.wait()
    }

    /// The finished save's report, without blocking.
    pub fn poll(&mut self) -> Result<Option<SaveReport>, CheckpointError> {
        if !self.in_flight {
            return Ok(None);
        }
        match self.rx.try_recv() {
            Ok(r) => {
                self.in_flight = false;
                r.map(Some)
            }
            Err(std::sync::mpsc::TryRecvError::Empty) => Ok(None),
            Err(_) => Err(CheckpointError::WriterGone),
        }
    }
}

impl Drop for Saver {
    /// A save still in flight here was not waited for with [`Saver::wait`]: its rank is
    /// failing, and waiting out the other ranks (which may be gone too) would only delay its
    /// exit by up to `commit_timeout`. Cancel it rather than leave a half-finished commit.
    fn drop(&mut self) {
        if self.in_flight {
            self.cancel.store(true, Ordering::Relaxed);
        }
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Group tensors into chunk objects of about `chunk_bytes`, recording each slice's place. A
/// chunk is the list of its slices' own buffers: nothing is copied to pack it. Every tensor
/// must be ready ([`SnapshotBytes::wait_ready`]).
fn pack(
    rank: usize,
    attempt: &str,
    tensors: Vec<TensorData>,
    chunk_bytes: usize,
) -> (Vec<(String, Vec<Bytes>)>, Vec<ChunkEntry>) {
    let mut objects: Vec<(String, Vec<Bytes>)> = Vec::new();
    let mut entries = Vec::new();
    let mut open: Vec<Bytes> = Vec::new();
    let mut filled = 0usize;
    for t in tensors {
        if filled > 0 && filled + t.bytes.len() > chunk_bytes {
            objects.push((chunk_name(rank, attempt, objects.len()), std::mem::take(&mut open)));
            filled = 0;
        }
        entries.push(ChunkEntry {
            object: chunk_name(rank, attempt, objects.len()),
            offset: filled as u64,
            len: t.bytes.len() as u64,
            xxh3: xxh3_hex(t.bytes.ready_slice()),
            slice: t.slice,
        });
        filled += t.bytes.len();
        open.push(t.bytes.into_bytes());
    }
    if filled > 0 {
        objects.push((chunk_name(rank, attempt, objects.len()), open));
    }
    (objects, entries)
}

fn json_bytes<T: serde::Serialize>(v: &T) -> Bytes {
    Bytes::from(serde_json::to_vec_pretty(v).expect("checkpoint metadata serializes"))
}

/// `Err(Cancelled)` once the save of `step` was abandoned.
fn check_cancel(cancel: &AtomicBool, step: u64) -> Result<(), CheckpointError> {
    match cancel.load(Ordering::Relaxed) {
        true => Err(CheckpointError::Cancelled { step }),
        false => Ok(()),
    }
}

fn write_and_commit(
    store: &Store,
    config: &SaverConfig,
    cancel: &AtomicBool,
    req: SaveRequest,
) -> Result<SaveReport, CheckpointError> {
    let started = Instant::now();
    let step = req.step;
    check_cancel(cancel, step)?;
    let dir = step_dir(step);
    for t in &req.tensors {
        t.slice
            .check()
            .map_err(|m| CheckpointError::Io(format!("rank {}: {m}", config.rank)))?;
        if t.bytes.len() as u64 != t.slice.nbytes() {
            return Err(CheckpointError::Io(format!(
                "rank {}: tensor {} has {} bytes for a slice of {}",
                config.rank,
                t.slice.name,
                t.bytes.len(),
                t.slice.nbytes()
            )));
        }
    }
    // The snapshot's copies may still be running (a device→host copy on a side stream):
    // nothing is read before they are done.
    for t in &req.tensors {
        t.bytes
            .wait_ready()
            .map_err(|message| CheckpointError::SnapshotFailed {
                step,
                tensor: t.slice.name.clone(),
                message,
            })?;
    }
    let (objects, entries) = pack(config.rank, &config.attempt, req.tensors, config.chunk_bytes);
    let size = |parts: &[Bytes]| parts.iter().map(|b| b.len() as u64).sum::<u64>();
    let bytes: u64 = objects.iter().map(|(_, b)| size(b)).sum();
    let infos: Vec<ObjectInfo> = objects
        .iter()
        .map(|(k, b)| ObjectInfo {
            object: k.clone(),
            size: size(b),
        })
        .collect();
    store.put_many(objects.into_iter().map(|(k, b)| (format!("{dir}/{k}"), b)).collect())?;
    let index = RankIndex {
        format_version: FORMAT_VERSION,
        step,
        rank: config.rank,
        attempt: config.attempt.clone(),
        entries,
        objects: infos,
        state: req.rank_state,
    };
    // The index goes up only after every chunk it lists is durable.
    store.put(&format!("{dir}/{}", rank_index_name(config.rank)), json_bytes(&index))?;
    let write_s = started.elapsed().as_secs_f64();
    tracing::debug!(rank = config.rank, step, bytes, write_s, "checkpoint chunks written");
    if config.committer() {
        commit(store, config, cancel, step, index, req.job)?;
    } else {
        wait_for_commit(store, config, cancel, step)?;
    }
    Ok(SaveReport {
        step,
        bytes,
        write_s,
        commit_s: started.elapsed().as_secs_f64(),
    })
}

fn wait_for_commit(store: &Store, config: &SaverConfig, cancel: &AtomicBool, step: u64) -> Result<(), CheckpointError> {
    let key = format!("{}/{MANIFEST}", step_dir(step));
    let started = Instant::now();
    loop {
        if let Some(bytes) = store.get(&key)? {
            match judge(config, &bytes) {
                Existing::Ours => return Ok(()),
                // An older attempt's stale commit: our committer replaces it.
                Existing::Stale => {}
                // Another attempt's: this step was committed before (a run resumed from an
                // older step); this rank's writes are not part of it.
                Existing::Taken => {
                    return Err(CheckpointError::AlreadyCommitted {
                        step,
                        url: store.url().to_string(),
                    });
                }
            }
        }
        check_cancel(cancel, step)?;
        if started.elapsed() > config.commit_timeout {
            return Err(CheckpointError::CommitNotSeen {
                step,
                waited_s: started.elapsed().as_secs_f64(),
            });
        }
        std::thread::sleep(config.poll);
    }
}

/// What the manifest `bytes` found for a step means to this save.
fn judge(config: &SaverConfig, bytes: &[u8]) -> Existing {
    #[derive(serde::Deserialize)]
    struct Committed {
        #[serde(default)]
        attempt: String,
        #[serde(default)]
        fence: Option<Fence>,
    }
    match serde_json::from_slice::<Committed>(bytes) {
        Ok(m) => fence::judge_existing(&config.attempt, config.fence.as_ref(), &m.attempt, m.fence.as_ref()),
        // Unreadable: not ours to replace.
        Err(_) => Existing::Taken,
    }
}

/// Collect every rank's index of this attempt, then create the manifest.
fn commit(
    store: &Store,
    config: &SaverConfig,
    cancel: &AtomicBool,
    step: u64,
    own: RankIndex,
    job: JobState,
) -> Result<(), CheckpointError> {
    let dir = step_dir(step);
    let mut indexes: Vec<Option<RankIndex>> = (0..config.world_size).map(|_| None).collect();
    indexes[config.rank] = Some(own);
    let started = Instant::now();
    loop {
        let missing: Vec<usize> = (0..config.world_size).filter(|&r| indexes[r].is_none()).collect();
        if missing.is_empty() {
            break;
        }
        for &r in &missing {
            let key = format!("{dir}/{}", rank_index_name(r));
            if let Some(bytes) = store.get(&key)? {
                let index: RankIndex = serde_json::from_slice(&bytes).map_err(|e| CheckpointError::Manifest {
                    object: format!("{}/{key}", store.url()),
                    message: format!("unreadable rank index: {e}"),
                })?;
                // An index of another attempt is a crashed run's leftover: wait for ours.
                if index.attempt == config.attempt && index.step == step {
                    indexes[r] = Some(index);
                }
            }
        }
        if indexes.iter().any(Option::is_none) {
            check_cancel(cancel, step)?;
            if started.elapsed() > config.commit_timeout {
                return Err(CheckpointError::CommitTimeout {
                    step,
                    missing: (0..config.world_size).filter(|&r| indexes[r].is_none()).collect(),
                    waited_s: started.elapsed().as_secs_f64(),
                });
            }
            std::thread::sleep(config.poll);
        }
    }
    let mut manifest = Manifest {
        format_version: FORMAT_VERSION,
        step,
        committed_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0),
        world_size: config.world_size,
        attempt: config.attempt.clone(),
        fence: config.fence.clone(),
        job,
        ranks: Vec::with_capacity(config.world_size),
        entries: Vec::new(),
        objects: Vec::new(),
    };
    for index in indexes.into_iter().flatten() {
        manifest.ranks.push(index.state);
        manifest.entries.extend(index.entries);
        manifest.objects.extend(index.objects);
    }
    // Refuse to commit something that could not be loaded back whole.
    check_complete(&manifest.entries).map_err(|e| CheckpointError::Plan {
        url: format!("{}/{dir}", store.url()),
        source: e,
    })?;
    // The last moment a cancel can still keep this save from committing.
    check_cancel(cancel, step)?;
    create_manifest(store, config, step, &manifest)?;
    tracing::info!(
        step,
        bytes = manifest.total_bytes(),
        url = store.url(),
        "checkpoint committed"
    );
    store.put(LATEST, Bytes::from(dir.clone()))?;
    clean_up(store, config, step, &manifest)
}

/// The commit itself: `manifest.json` created if absent, unless a later attempt of the job
/// claimed the directory; a stale commit of an older attempt of the job is replaced.
fn create_manifest(store: &Store, config: &SaverConfig, step: u64, manifest: &Manifest) -> Result<(), CheckpointError> {
    let key = format!("{}/{MANIFEST}", step_dir(step));
    if let Some(f) = &config.fence {
        fence::check(store, f, &format!("step {step} not committed"))?;
    }
    if store.put_if_absent(&key, json_bytes(manifest))? {
        return Ok(());
    }
    let existing = store.get(&key)?.unwrap_or_default();
    match judge(config, &existing) {
        Existing::Ours => Ok(()),
        Existing::Stale => {
            tracing::warn!(
                step,
                url = store.url(),
                "replacing the commit of an older attempt of this job (it committed after this attempt started)"
            );
            store.put(&key, json_bytes(manifest))
        }
        Existing::Taken => Err(CheckpointError::AlreadyCommitted {
            step,
            url: store.url().to_string(),
        }),
    }
}

/// After a commit: drop a crashed attempt's objects under this step, then apply retention.
fn clean_up(store: &Store, config: &SaverConfig, step: u64, manifest: &Manifest) -> Result<(), CheckpointError> {
    let dir = step_dir(step);
    let keep: std::collections::HashSet<&str> = manifest.objects.iter().map(|o| o.object.as_str()).collect();
    for (key, _) in store.list(&format!("{dir}/"))? {
        let rel = key.strip_prefix(&format!("{dir}/")).unwrap_or(&key);
        let is_chunk = rel.starts_with("rank-") && rel.ends_with(".bin");
        if is_chunk && !keep.contains(rel) {
            store.delete(&key)?;
        }
    }
    let (mut committed, mut uncommitted) = (Vec::new(), Vec::new());
    for d in store.list_dirs("")? {
        if let Some(s) = parse_step_dir(&d) {
            if store.size(&format!("{d}/{MANIFEST}"))?.is_some() {
                committed.push(s);
            } else {
                uncommitted.push(s);
            }
        }
    }
    let gone = doomed(&committed, &uncommitted, config.retention);
    for s in gone.committed.iter().chain(&gone.uncommitted) {
        // The manifest goes first: a half-deleted checkpoint must never look committed.
        store.delete(&format!("{}/{MANIFEST}", step_dir(*s)))?;
        store.delete_prefix(&format!("{}/", step_dir(*s)))?;
        tracing::info!(step = s, "checkpoint removed by retention");
    }
    Ok(())
}
