//! The component measured: in-process ranks, each with its own [`Store`] and [`Saver`] (as a
//! rank process would have), saving, loading and verifying real checkpoints.

use super::peers::span;
use super::plan::{TensorPlan, check_slice, check_tensor};
use crate::error::{BenchError, Result};
use gantry_checkpoint::{
    Checkpoint, DType, JobState, S3Options, SaveReport, SaveRequest, Saver, SaverConfig, SliceSpec, Store, StoreConfig,
    TensorData, Which,
};
use serde::Serialize;
use std::sync::Barrier;
use std::time::Instant;

/// One rank's part of one save.
#[derive(Serialize, Clone, Debug)]
pub struct RankSave {
    pub rank: usize,
    pub step: u64,
    pub bytes: u64,
    /// memcpy of the rank's slices into a fresh snapshot (what the trainer copies off the device).
    pub snapshot_s: f64,
    /// The `save()` call: the hand-off to the writer thread.
    pub handoff_s: f64,
    /// Packing, checksumming and uploading (SaveReport::write_s).
    pub write_s: f64,
    /// Hand-off until committed (SaveReport::commit_s).
    pub commit_s: f64,
}

/// One Saver (with its own Store) per rank, as rank processes would have.
pub(crate) fn open_savers(
    url: &str,
    s3: &S3Options,
    store_cfg: &StoreConfig,
    chunk_bytes: usize,
    ranks: usize,
) -> Result<Vec<Saver>> {
    let attempt = format!("bench{:x}", std::process::id());
    (0..ranks)
        .map(|r| {
            let store = Store::open_with(url, s3, store_cfg.clone())?;
            let mut cfg = SaverConfig::new(r, ranks, &attempt);
            cfg.chunk_bytes = chunk_bytes;
            Ok(Saver::new(store, cfg))
        })
        .collect()
}

/// Rank `r` snapshots its slices (a memcpy, untimed by the save), waits for every rank, then
/// saves `step` and waits until it is committed.
fn save_rank(
    saver: &mut Saver,
    r: usize,
    step: u64,
    tensors: &[TensorPlan],
    slices: &[Vec<u8>],
    ranks: usize,
    barriers: (&Barrier, &Barrier),
) -> Result<(RankSave, Instant, Instant)> {
    barriers.0.wait();
    let t = Instant::now();
    let snapshot: Vec<TensorData> = tensors
        .iter()
        .zip(slices)
        .map(|(p, b)| TensorData {
            slice: p.slice(r, ranks),
            bytes: b.clone().into(),
        })
        .collect();
    let snapshot_s = t.elapsed().as_secs_f64();
    barriers.1.wait();
    let t0 = Instant::now();
    saver.save(SaveRequest {
        step,
        tensors: snapshot,
        rank_state: serde_json::json!({ "rank": r }),
        job: JobState {
            layout: serde_json::json!({ "bench_ranks": ranks }),
            ..JobState::default()
        },
    })?;
    let handoff_s = t0.elapsed().as_secs_f64();
    let report: SaveReport = saver
        .wait()?
        .ok_or_else(|| BenchError::Mismatch(format!("rank {r}: the save reported nothing")))?;
    let t1 = Instant::now();
    let save = RankSave {
        rank: r,
        step,
        bytes: report.bytes,
        snapshot_s,
        handoff_s,
        write_s: report.write_s,
        commit_s: report.commit_s,
    };
    Ok((save, t0, t1))
}

/// Every rank saves `step` at once; returns per-rank timings and the save's wall time (first
/// `save()` call to last `wait()` return).
pub(crate) fn save_all(
    savers: &mut [Saver],
    step: u64,
    tensors: &[TensorPlan],
    data: &[Vec<Vec<u8>>],
) -> Result<(Vec<RankSave>, f64)> {
    let ranks = data.len();
    let (start, go) = (Barrier::new(ranks), Barrier::new(ranks));
    let results = std::thread::scope(|s| {
        let handles: Vec<_> = savers
            .iter_mut()
            .zip(data)
            .enumerate()
            .map(|(r, (saver, slices))| {
                let barriers = (&start, &go);
                s.spawn(move || save_rank(saver, r, step, tensors, slices, ranks, barriers))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank thread panicked"))
            .collect::<Result<Vec<_>>>()
    })?;
    let times: Vec<_> = results.iter().map(|(_, a, b)| (*a, *b)).collect();
    Ok((results.into_iter().map(|(r, _, _)| r).collect(), span(&times)))
}

/// Open the latest checkpoint with a fresh store, load every whole tensor and check it.
pub(crate) fn load_all(
    url: &str,
    s3: &S3Options,
    store_cfg: &StoreConfig,
    tensors: &[TensorPlan],
    ranks: usize,
) -> Result<f64> {
    let store = Store::open_with(url, s3, store_cfg.clone())?;
    let requests: Vec<SliceSpec> = tensors
        .iter()
        .map(|t| SliceSpec::full(&t.name, DType::F32, &t.global_shape(ranks)))
        .collect();
    let t0 = Instant::now();
    let c = Checkpoint::open(&store, Which::Latest)?;
    let loaded = c.load(&requests)?;
    let s = t0.elapsed().as_secs_f64();
    for (t, b) in tensors.iter().zip(&loaded) {
        check_tensor(t, ranks, b)?;
    }
    Ok(s)
}

/// The same layout back: R rank threads, each with a fresh store, open the latest checkpoint
/// and load their own row block of every tensor (what a resumed job of the same shape does);
/// wall time from the first open to the last rank done.
pub(crate) fn load_same_layout(
    url: &str,
    s3: &S3Options,
    store_cfg: &StoreConfig,
    tensors: &[TensorPlan],
    ranks: usize,
) -> Result<f64> {
    let stores = (0..ranks)
        .map(|_| Store::open_with(url, s3, store_cfg.clone()))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let start = Barrier::new(ranks);
    let results = std::thread::scope(|s| {
        let handles: Vec<_> = stores
            .iter()
            .enumerate()
            .map(|(r, store)| {
                let start = &start;
                s.spawn(move || -> Result<(Instant, Instant, Vec<Vec<u8>>)> {
                    let requests: Vec<SliceSpec> = tensors.iter().map(|t| t.slice(r, ranks)).collect();
                    start.wait();
                    let t0 = Instant::now();
                    let loaded = Checkpoint::open(store, Which::Latest)?.load(&requests)?;
                    Ok((t0, Instant::now(), loaded))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank thread panicked"))
            .collect::<Result<Vec<_>>>()
    })?;
    let times: Vec<_> = results.iter().map(|(a, b, _)| (*a, *b)).collect();
    for (r, (_, _, loaded)) in results.iter().enumerate() {
        for (t, b) in tensors.iter().zip(loaded) {
            check_slice(t, r, b)?;
        }
    }
    Ok(span(&times))
}

/// Open the latest checkpoint with a fresh store and re-read every checksum.
pub(crate) fn verify_all(url: &str, s3: &S3Options, store_cfg: &StoreConfig, total: u64) -> Result<f64> {
    let store = Store::open_with(url, s3, store_cfg.clone())?;
    let t0 = Instant::now();
    let c = Checkpoint::open(&store, Which::Latest)?;
    let report = c.verify(&mut |_| {})?;
    let s = t0.elapsed().as_secs_f64();
    if report.bytes != total {
        return Err(BenchError::Mismatch(format!(
            "verify checked {} bytes, {total} were saved",
            report.bytes
        )));
    }
    Ok(s)
}
