//! A small "model" for the save/load and integrity tests: a few tensors of different dtypes and
//! ranks, saved by three ranks cut one way and loaded back cut other ways.

#![allow(dead_code)]

use super::backend::RankSave;
use super::pattern::{slice, slice_bytes, split_dim, split_range, with_region};
use gantry_checkpoint::boxes::flat_range_to_regions;
use gantry_checkpoint::{DType, JobState, Lineage, SaveRequest, SaverConfig, SliceSpec, TensorData};
use std::time::Duration;

pub const WORLD: usize = 3;
/// Small, so every rank writes several chunk objects.
pub const CHUNK_BYTES: usize = 4096;

/// The whole tensors. With `big`, `big` is 18 MiB (a 6 MiB row slice per rank: a multipart
/// upload of a 5 MiB and a 1 MiB part); without, a few KiB.
pub fn tensors(big: bool) -> Vec<SliceSpec> {
    let big_shape: &[u64] = if big { &[1536, 3072] } else { &[48, 64] };
    vec![
        SliceSpec::full("big", DType::F32, big_shape),
        SliceSpec::full("w", DType::F32, &[96, 40]),
        SliceSpec::full("b3", DType::I64, &[7, 5, 6]),
        SliceSpec::full("emb", DType::Bf16, &[50, 24]),
        SliceSpec::full("ln", DType::Bf16, &[33]),
        SliceSpec::full("pos", DType::F16, &[4, 9]),
        SliceSpec::full("count", DType::I64, &[]),
        SliceSpec::full("mask", DType::U8, &[10, 3]),
    ]
}

fn full(big: bool, name: &str) -> SliceSpec {
    tensors(big)
        .into_iter()
        .find(|t| t.name == name)
        .expect("a tensor of the model")
}

/// What rank `rank` saves: rows of `big`, `w`; the middle dimension of `b3` (uneven: 2, 2, 1);
/// columns of `emb`; `ln` on rank 0 only; `pos` replicated on every rank; the scalar `count`
/// on rank 1 only; `mask` as two row slices on rank 2.
pub fn save_slices(big: bool, rank: usize) -> Vec<SliceSpec> {
    let (w, r) = (WORLD as u64, rank as u64);
    let mut out = vec![
        split_dim(&full(big, "big"), 0, w, r),
        split_dim(&full(big, "w"), 0, w, r),
        split_dim(&full(big, "b3"), 1, w, r),
        split_dim(&full(big, "emb"), 1, w, r),
        full(big, "pos"),
    ];
    match rank {
        0 => out.push(full(big, "ln")),
        1 => out.push(full(big, "count")),
        2 => {
            out.push(slice("mask", DType::U8, &[10, 3], &[0, 0], &[4, 3]));
            out.push(slice("mask", DType::U8, &[10, 3], &[4, 0], &[6, 3]));
        }
        _ => {}
    }
    out
}

pub fn rank_state(step: u64, rank: usize) -> serde_json::Value {
    serde_json::json!({ "rank": rank, "step": step, "rng": [rank, step * 7] })
}

pub fn job(step: u64) -> JobState {
    JobState {
        tokens_seen: step * 1000 + 7,
        model: serde_json::json!({ "d_model": 64, "layers": [1, 2, 3], "name": "test-model" }),
        layout: serde_json::json!({ "dp": 1, "tp": 3, "pp": 1 }),
        optimizer: serde_json::json!({ "kind": "adamw", "zero": 1 }),
        data_cursor: serde_json::json!({ "epoch": 0, "offset": step * 64 }),
        lineage: Lineage {
            job_id: "job-42".to_string(),
            spec_hash: "deadbeefdeadbeef".to_string(),
            gantry_version: "0.1.0-test".to_string(),
        },
        ..JobState::default()
    }
}

/// Rank `rank`'s save of `step` with contents `seed`.
pub fn request(big: bool, rank: usize, step: u64, seed: u64) -> SaveRequest {
    SaveRequest {
        step,
        tensors: save_slices(big, rank)
            .into_iter()
            .map(|s| TensorData {
                bytes: slice_bytes(seed, &s).into(),
                slice: s,
            })
            .collect(),
        rank_state: rank_state(step, rank),
        job: job(step),
    }
}

pub fn config(rank: usize, attempt: &str) -> SaverConfig {
    let mut c = SaverConfig::new(rank, WORLD, attempt);
    c.chunk_bytes = CHUNK_BYTES;
    c.poll = Duration::from_millis(10);
    c.commit_timeout = Duration::from_secs(60);
    c
}

/// Every rank of `attempt` saving `steps` in turn, contents `seed_of(step)`.
pub fn world_saves(big: bool, attempt: &str, steps: &[u64], seed_of: impl Fn(u64) -> u64) -> Vec<RankSave> {
    (0..WORLD)
        .map(|rank| RankSave {
            config: config(rank, attempt),
            requests: steps.iter().map(|&s| request(big, rank, s, seed_of(s))).collect(),
        })
        .collect()
}

/// Requests that cut every tensor differently from how it was saved: whole; each dimension in
/// four parts; the flattened tensor in five ZeRO-style shards, each shard as the rectangles of
/// [`flat_range_to_regions`].
pub fn other_cuts(big: bool) -> Vec<SliceSpec> {
    let mut out = Vec::new();
    for t in tensors(big) {
        out.push(t.clone());
        for d in 0..t.global_shape.len() {
            for i in 0..4 {
                let s = split_dim(&t, d, 4, i);
                if s.numel() > 0 {
                    out.push(s);
                }
            }
        }
        let numel: u64 = t.global_shape.iter().product();
        for i in 0..5 {
            let (start, len) = split_range(numel, 5, i);
            for r in flat_range_to_regions(&t.global_shape, start, start + len) {
                out.push(with_region(&t, &r));
            }
        }
    }
    out
}
