//! The trainer's side of checkpoints: which slices this rank saves and loads, snapshotting
//! them off the device, and restoring model, optimizer and data position.
//!
//! Everything is named in global terms, so any layout can load what any other wrote:
//! - a parameter is its hyper-rectangle of the global tensor (`layers.3.mlp.up.weight`);
//! - AdamW moments are `optim.exp_avg/<param>` and `optim.exp_avg_sq/<param>` with the
//!   parameter's shape. Without ZeRO-1 a rank holds them for its whole slice; with ZeRO-1 it
//!   holds a flat range of a bucket, cut into rectangles (`boxes::flat_range_to_regions`).
//!
//! Replicas write once: a DP- (and, for TP-replicated tensors, TP-) replicated slice is
//! written by the replica its name hashes to, so the write load spreads over replicas; a
//! ZeRO-1 moment of a TP-replicated parameter is written by TP rank 0 (other TP ranks may cut
//! their buckets differently); the last stage's copy of a tied embedding is never written.
//! Every rank loads everything it holds.
//!
//! A save copies this rank's slices into one host buffer reused from save to save
//! ([`snapshot`]); on a GPU the copies run on a side stream and the save returns once they
//! are queued.

mod snapshot;

use crate::comm::TensorComm;
use crate::data_parallel::DataParallel;
use crate::error::TrainError;
use crate::model::Model;
use crate::optim::AdamState;
use crate::place::RankPlace;
use crate::spec::JobSpec;
use gantry_checkpoint::boxes::flat_range_to_regions;
use gantry_checkpoint::{
    Checkpoint, CheckpointError, DType, Fence, JobState, Lineage, ParamLayout, Retention, S3Options, SaveReport,
    SaveRequest, Saver, SaverConfig, SliceSpec, SnapshotBytes, Store, TensorData, Which,
};
use gantry_collectives::ReduceOp;
use gantry_sharding::manifest::TokenizerInfo;
use gantry_sharding::sampler::Cursor;
use snapshot::Snapshotter;
use std::ops::Range;
use std::time::{Duration, Instant};
use tch::{Kind, Tensor};

/// A contiguous flat range of a local tensor that is one saved rectangle.
struct Piece {
    slice: SliceSpec,
    tensor: Tensor,
    flat: Range<i64>,
    write: bool,
}

fn writer_index(name: &str, replicas: usize) -> usize {
    (xxhash_rust::xxh3::xxh3_64(name.as_bytes()) % replicas.max(1) as u64) as usize
}

fn u64s(v: &[i64]) -> Vec<u64> {
    v.iter().map(|&x| x as u64).collect()
}

/// Every rectangle this rank holds, and whether it is the one to write it.
fn pieces(model: &Model, data_parallel: &DataParallel, states: &[AdamState], place: &RankPlace) -> Vec<Piece> {
    let (dp, tp) = (place.layout.dp(), place.layout.tp());
    // Which of a slice's replicas this rank is, and how many there are.
    let replica = |tp_replicated: bool, over_dp: bool| -> (usize, usize) {
        let (tp_n, tp_i) = if tp_replicated { (tp, place.tp_rank) } else { (1, 0) };
        let (dp_n, dp_i) = if over_dp { (dp, place.dp_rank) } else { (1, 0) };
        (dp_i * tp_n + tp_i, dp_n * tp_n)
    };
    let mut out = Vec::new();
    for (_, p) in model.params.iter() {
        let (me, n) = replica(p.tp_replicated, true);
        out.push(Piece {
            slice: SliceSpec {
                name: p.name.clone(),
                dtype: DType::F32,
                global_shape: u64s(&p.global_shape),
                offsets: u64s(&p.offsets),
                lengths: u64s(&p.local_shape()),
            },
            tensor: p.tensor.shallow_clone(),
            flat: 0..p.numel() as i64,
            write: !p.tied_copy && me == writer_index(&p.name, n),
        });
    }
    for (bucket, state) in data_parallel.optimizer_slices().zip(states) {
        let shard = bucket.shard;
        for (i, &id) in bucket.params.iter().enumerate() {
            let p = model.params.param(id);
            let (start, n) = (bucket.offsets[i], p.numel());
            let (lo, hi) = (shard.start.max(start), shard.end.min(start + n));
            if lo >= hi {
                continue;
            }
            let write = !p.tied_copy
                && if data_parallel.sharded() {
                    !p.tp_replicated || place.tp_rank == 0
                } else {
                    let (me, n) = replica(p.tp_replicated, true);
                    me == writer_index(&p.name, n)
                };
            let local = u64s(&p.local_shape());
            let mut at = (lo - shard.start) as i64;
            for region in flat_range_to_regions(&local, (lo - start) as u64, (hi - start) as u64) {
                let len = region.numel() as i64;
                let global = region.shifted(&u64s(&p.offsets));
                for (kind, t) in [("exp_avg", &state.exp_avg), ("exp_avg_sq", &state.exp_avg_sq)] {
                    out.push(Piece {
                        slice: SliceSpec {
                            name: format!("optim.{kind}/{}", p.name),
                            dtype: DType::F32,
                            global_shape: u64s(&p.global_shape),
                            offsets: global.offsets.clone(),
                            lengths: global.lengths.clone(),
                        },
                        tensor: t.shallow_clone(),
                        flat: at..at + len,
                        write,
                    });
                }
                at += len;
            }
        }
    }
    out
}

fn flat_view(t: &Tensor, r: &Range<i64>) -> Tensor {
    t.view([-1]).narrow(0, r.start, r.end - r.start)
}

fn restore(piece: &Piece, bytes: &[u8]) {
    let n = (piece.flat.end - piece.flat.start) as usize;
    let src = Tensor::from_data_size(bytes, &[n as i64], Kind::Float).to_device(piece.tensor.device());
    tch::no_grad(|| {
        flat_view(&piece.tensor, &piece.flat).copy_(&src);
    });
}

/// Where a resumed run starts.
pub struct Resumed {
    /// Steps already done.
    pub step: u64,
    pub tokens_seen: u64,
    /// The data position saved with it (`None` if the checkpoint has none).
    pub cursor: Option<Cursor>,
}

/// A run's checkpoint store, saver and schedule.
pub struct Checkpointing {
    store: Store,
    saver: Saver,
    every: u64,
    at_end: bool,
    /// Files saved beside the tensors by this rank (rank 0: the dataset's tokenizer).
    assets: Vec<(String, SnapshotBytes)>,
    /// The host memory (and, on a GPU, the copy stream) of the saves' snapshots.
    snapshots: Snapshotter,
    /// The manifest's `params` and `data`, the same for every save of the run.
    params: Vec<ParamLayout>,
    data: serde_json::Value,
}

/// Under this asset name the dataset's tokenizer (a Hugging Face `tokenizer.json`) is saved
/// with every checkpoint, so evaluation and serving decode with what the model was trained on.
pub const TOKENIZER_ASSET: &str = "asset/tokenizer.json";

/// The dataset's `tokenizer_config.json` (chat template, special tokens), when it has one.
pub const TOKENIZER_CONFIG_ASSET: &str = "asset/tokenizer_config.json";

/// What every manifest of the run says about the model's parameters (each with its TP split)
/// and its data (dataset, validation split, tokenizer kind), and the dataset's tokenizer file
/// if it has one (synthetic and byte-level data do not).
fn describe(spec: &JobSpec) -> Result<(Vec<ParamLayout>, serde_json::Value, Option<std::path::PathBuf>), TrainError> {
    let dir = spec.data.dir()?;
    let manifest = gantry_sharding::manifest::Manifest::read(dir).map_err(gantry_sharding::gpt::DatasetError::from)?;
    let params = Model::parameter_layout(&spec.model)
        .into_iter()
        .map(|(name, tp_split)| ParamLayout { name, tp_split })
        .collect();
    let data = serde_json::json!({
        "path": spec.data.path.to_string(),
        "valid_fraction": spec.data.valid_fraction,
        "seed": spec.data.seed,
        "tokenizer": manifest.tokenizer,
    });
    let tokenizer = match manifest.tokenizer {
        TokenizerInfo::File { path } => Some(dir.join(path)),
        _ => None,
    };
    Ok((params, data, tokenizer))
}

/// Differences between the model a checkpoint holds and the one being built.
fn model_mismatch(saved: &serde_json::Value, current: &serde_json::Value) -> Vec<String> {
    let (Some(a), Some(b)) = (saved.as_object(), current.as_object()) else {
        return vec![format!("model section {saved} vs {current}")];
    };
    let mut out = Vec::new();
    for (k, v) in b {
        match a.get(k) {
            Some(s) if s == v => {}
            Some(s) => out.push(format!("model.{k}: checkpoint {s}, job {v}")),
            None => out.push(format!("model.{k}: not in the checkpoint, job {v}")),
        }
    }
    out
}

impl Checkpointing {
    /// Open the store and start the writer, or `None` when the spec has no `checkpoint.dir`.
    /// `attempt` must be the same on every rank of this run. With a `fence` (a cluster job's
    /// attempt), rank 0 claims the directory before anything is resumed, and no older attempt
    /// of the job can commit there any more.
    pub fn start(
        spec: &JobSpec,
        place: &RankPlace,
        s3: &S3Options,
        attempt: &str,
        fence: Option<Fence>,
    ) -> Result<Option<Checkpointing>, TrainError> {
        let c = &spec.checkpoint;
        if !c.enabled() {
            return Ok(None);
        }
        let store = Store::open(&c.dir, s3)?;
        if let Some(f) = &fence
            && place.rank == 0
        {
            gantry_checkpoint::fence::claim(&store, f)?;
        }
        let mut config = SaverConfig::new(place.rank, place.layout.world(), attempt);
        config.fence = fence;
        config.chunk_bytes = (c.chunk_mb * 1024.0 * 1024.0) as usize;
        config.commit_timeout = Duration::from_secs_f64(c.commit_timeout_s);
        config.retention = Retention {
            keep_last: (c.keep_last > 0).then_some(c.keep_last),
            keep_every: (c.keep_every > 0).then_some(c.keep_every),
        };
        let (params, data, tokenizer) = describe(spec)?;
        let mut assets = Vec::new();
        if place.rank == 0
            && let Some(path) = tokenizer
        {
            let bytes = std::fs::read(&path).map_err(|e| TrainError::io(&path, e))?;
            assets.push((TOKENIZER_ASSET.to_string(), bytes.into()));
            let config = path.with_file_name(gantry_sharding::prepare::TOKENIZER_CONFIG_FILE);
            if config.is_file() {
                let bytes = std::fs::read(&config).map_err(|e| TrainError::io(&config, e))?;
                assets.push((TOKENIZER_CONFIG_ASSET.to_string(), bytes.into()));
            }
        }
        Ok(Some(Checkpointing {
            saver: Saver::new(store.clone(), config),
            store,
            every: c.every,
            at_end: c.at_end,
            assets,
            snapshots: Snapshotter::new(),
            params,
            data,
        }))
    }

    /// The newest committed step in the store whose manifest reads, if any; newer steps that
    /// do not read are logged with the reason and skipped.
    pub fn latest_committed(&self) -> Result<Option<u64>, TrainError> {
        match Checkpoint::open_latest(&self.store) {
            Ok((ckpt, skipped)) => {
                for s in skipped {
                    tracing::warn!(dir = self.store.url(), step = s.step, reason = %s.reason, "skipping an unreadable checkpoint");
                }
                Ok(Some(ckpt.step()))
            }
            Err(CheckpointError::NoCheckpoint { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    pub fn url(&self) -> &str {
        self.store.url()
    }

    /// Load checkpoint `which` (if any) into the model, the optimizer states and their master
    /// weights.
    pub fn resume(
        &self,
        spec: &JobSpec,
        which: Option<Which>,
        model: &Model,
        dp: &DataParallel,
        states: &mut [AdamState],
        place: &RankPlace,
    ) -> Result<Option<Resumed>, TrainError> {
        let Some(which) = which else { return Ok(None) };
        let ckpt = Checkpoint::open(&self.store, which)?;
        let current = serde_json::to_value(&spec.model).expect("model spec serializes");
        let diff = model_mismatch(&ckpt.manifest.job.model, &current);
        if !diff.is_empty() {
            return Err(CheckpointError::ModelMismatch(format!(
                "{}/step {} holds a different model: {}",
                self.store.url(),
                ckpt.step(),
                diff.join("; ")
            ))
            .into());
        }
        let all = pieces(model, dp, states, place);
        let requests: Vec<SliceSpec> = all.iter().map(|p| p.slice.clone()).collect();
        let started = Instant::now();
        let loaded = ckpt.load(&requests)?;
        for (piece, bytes) in all.iter().zip(&loaded) {
            restore(piece, bytes);
        }
        // The fp32 master weights are views of the parameters' flat buffers
        // (`crate::data_parallel`): restoring the parameters restored them.
        tracing::info!(
            rank = place.rank,
            step = ckpt.step(),
            bytes = loaded.iter().map(Vec::len).sum::<usize>(),
            seconds = started.elapsed().as_secs_f64(),
            "resumed from checkpoint"
        );
        let cursor = match &ckpt.manifest.job.data_cursor {
            serde_json::Value::Null => None,
            v => Some(serde_json::from_value(v.clone()).map_err(|e| {
                TrainError::Internal(format!("checkpoint step {}: unreadable data cursor: {e}", ckpt.step()))
            })?),
        };
        Ok(Some(Resumed {
            step: ckpt.step(),
            tokens_seen: ckpt.manifest.job.tokens_seen,
            cursor,
        }))
    }

    /// Whether to save after `done` steps; `last` is the run's final step.
    pub fn due(&self, done: u64, last: bool) -> bool {
        (self.every > 0 && done.is_multiple_of(self.every)) || (last && self.at_end)
    }

    /// Snapshot this rank's share and hand it to the writer. Returns how long the loop was
    /// paused (on a GPU: queueing the copies, not running them) and the previous save's
    /// report, if it finished meanwhile.
    #[allow(clippy::too_many_arguments)]
    pub fn save(
        &mut self,
        done: u64,
        model: &Model,
        dp: &DataParallel,
        states: &[AdamState],
        place: &RankPlace,
        job: JobState,
        rank_state: serde_json::Value,
    ) -> Result<(f64, Option<SaveReport>), TrainError> {
        let started = Instant::now();
        let all = pieces(model, dp, states, place);
        let mine: Vec<&Piece> = all.iter().filter(|p| p.write).collect();
        let bytes = self.snapshots.take(&mine)?;
        let mut tensors: Vec<TensorData> = mine
            .iter()
            .zip(bytes)
            .map(|(p, bytes)| TensorData {
                slice: p.slice.clone(),
                bytes,
            })
            .collect();
        tensors.extend(self.assets.iter().map(|(name, bytes)| TensorData {
            slice: SliceSpec::full(name, DType::U8, &[bytes.len() as u64]),
            bytes: bytes.clone(),
        }));
        let job = JobState {
            params: self.params.clone(),
            data: self.data.clone(),
            ..job
        };
        let previous = self.saver.save(SaveRequest {
            step: done,
            tensors,
            rank_state,
            job,
        })?;
        Ok((started.elapsed().as_secs_f64(), previous))
    }

    /// Make the next optimizer updates wait for a save's device copies only where
    /// [`Checkpointing::before_update`] is called, instead of stopping the compute stream at
    /// once until they are done. Only for a loop that calls `before_update` before every
    /// update of the weights or moments.
    pub fn defer_update_fence(&mut self) {
        self.snapshots.defer_update_fence();
    }

    /// Order the compute stream after the last save's device copies, so the update about to
    /// be queued cannot overwrite weights they have not read yet. Free when nothing is pending
    /// (CPU, no save since the last call).
    pub fn before_update(&mut self) -> Result<(), TrainError> {
        self.snapshots.before_update()
    }

    /// A finished save's report, without waiting.
    pub fn poll(&mut self) -> Result<Option<SaveReport>, TrainError> {
        Ok(self.saver.poll()?)
    }

    /// Wait for the save in flight to commit.
    pub fn finish(&mut self) -> Result<Option<SaveReport>, TrainError> {
        Ok(self.saver.wait()?)
    }
}

impl Checkpointing {
    /// [`Checkpointing::start`] with an attempt id every rank agrees on (rank 0's), so the
    /// committer never mixes this run's writes with a crashed run's leftovers under the same
    /// step. Every rank calls it (the id travels over `world`) when checkpoints are enabled.
    pub fn start_agreed(
        spec: &JobSpec,
        place: &RankPlace,
        s3: &S3Options,
        fence: Option<Fence>,
        world: &mut TensorComm,
    ) -> Result<Option<Checkpointing>, TrainError> {
        if !spec.checkpoint.enabled() {
            return Ok(None);
        }
        let mut id = [if place.rank == 0 { attempt_nonce() } else { 0.0 }];
        world.all_reduce_f64(&mut id, ReduceOp::Sum)?;
        Checkpointing::start(spec, place, s3, &format!("{:013x}", id[0] as u64), fence)
    }

    /// Load what `checkpoint.resume` asks for (nothing, a named checkpoint, or under `auto`
    /// the newest committed one, which rank 0 picks for every rank over `world`).
    pub fn resume_requested(
        &self,
        spec: &JobSpec,
        model: &Model,
        dp: &DataParallel,
        states: &mut [AdamState],
        place: &RankPlace,
        world: &mut TensorComm,
    ) -> Result<Option<Resumed>, TrainError> {
        let which = match ResumeRequest::of(spec)? {
            ResumeRequest::Fresh => None,
            ResumeRequest::Open(w) => Some(w),
            ResumeRequest::Auto => self.auto_resume_step(place, world)?.map(Which::Step),
        };
        self.resume(spec, which, model, dp, states, place)
    }

    /// `checkpoint.resume = "auto"`: the newest committed step, or `None` to start from step
    /// 0. Rank 0 lists the store and the others take its answer, so every rank opens the same
    /// step even if the listing changes while they start.
    fn auto_resume_step(&self, place: &RankPlace, world: &mut TensorComm) -> Result<Option<u64>, TrainError> {
        // Steps travel as step + 1 (0 = none) in an f64: exact up to 2^53.
        let mut found = [if place.rank == 0 {
            self.latest_committed()?.map_or(0.0, |s| s as f64 + 1.0)
        } else {
            0.0
        }];
        world.all_reduce_f64(&mut found, ReduceOp::Sum)?;
        let step = (found[0] > 0.0).then(|| found[0] as u64 - 1);
        if place.rank == 0 {
            match step {
                Some(s) => tracing::info!(
                    dir = self.url(),
                    step = s,
                    "checkpoint.resume = auto: resuming from the latest committed checkpoint"
                ),
                None => tracing::info!(
                    dir = self.url(),
                    "checkpoint.resume = auto: no committed checkpoint; starting from step 0"
                ),
            }
        }
        Ok(step)
    }
}

/// 52 random bits (they survive an f64 all-reduce exactly) from the clock and the pid.
fn attempt_nonce() -> f64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mixed = xxhash_rust::xxh3::xxh3_64(&[t.to_le_bytes(), u64::from(std::process::id()).to_le_bytes()].concat());
    (mixed & ((1 << 52) - 1)) as f64
}

/// This rank's part of a manifest: where it sits and its random state.
pub fn rank_state(spec: &JobSpec, place: &RankPlace) -> serde_json::Value {
    serde_json::json!({
        "rank": place.rank, "dp": place.dp_rank, "tp": place.tp_rank, "pp": place.stage,
        // Training draws no random numbers after initialization (no dropout): the seeds are
        // the whole RNG state.
        "rng": { "init_seed": spec.train.seed, "data_seed": spec.data.seed },
    })
}

/// What `checkpoint.resume` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResumeRequest {
    /// Start from step 0.
    Fresh,
    /// This checkpoint; it must exist.
    Open(Which),
    /// The newest committed checkpoint if there is one, else step 0. Every rank must open
    /// the same step, so one rank decides (see the trainer).
    Auto,
}

impl ResumeRequest {
    pub fn of(spec: &JobSpec) -> Result<ResumeRequest, TrainError> {
        match spec.checkpoint.resume.as_str() {
            "" => Ok(ResumeRequest::Fresh),
            "auto" => Ok(ResumeRequest::Auto),
            w => w
                .parse::<Which>()
                .map(ResumeRequest::Open)
                .map_err(|m| TrainError::Internal(format!("checkpoint.resume: {m}"))),
        }
    }
}

/// The job-wide part of a manifest that changes from save to save (the run's `params` and
/// `data` are added by [`Checkpointing::save`]).
pub fn job_state(spec: &JobSpec, tokens_seen: u64, cursor: Option<&Cursor>, job_id: &str) -> JobState {
    let p = &spec.parallel;
    JobState {
        tokens_seen,
        model: serde_json::to_value(&spec.model).expect("model spec serializes"),
        layout: serde_json::json!({
            "dp": p.dp, "tp": p.tp, "pp": p.pp, "zero1": p.zero1,
            "schedule": p.schedule, "stage_layers": p.stage_layers,
        }),
        optimizer: serde_json::json!({
            "kind": "adamw",
            "tensors": ["optim.exp_avg/<param>", "optim.exp_avg_sq/<param>"],
            "master_weights": "the parameters (fp32)",
            "step": "the checkpoint's step",
        }),
        data_cursor: cursor.map_or(serde_json::Value::Null, |c| {
            serde_json::to_value(c).expect("cursor serializes")
        }),
        lineage: Lineage {
            job_id: job_id.to_string(),
            spec_hash: format!("{:016x}", xxhash_rust::xxh3::xxh3_64(spec.to_toml().as_bytes())),
            gantry_version: env!("CARGO_PKG_VERSION").to_string(),
        },
        ..JobState::default()
    }
}
