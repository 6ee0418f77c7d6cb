//! Deterministic tensor contents for the checkpoint tests: every element of every tensor is a
//! function of (seed, tensor name, global element index), so any slice of any tensor can be
//! produced on its own — by a saving rank, by a test checking a load in another layout, by a
//! rank process resuming — and compared byte for byte.
//!
//! Shared by the integration tests (`mod common`) and by `src/bin/ckpt_test_rank.rs`
//! (through `#[path]`), so it uses only std, serde_json and gantry-checkpoint.

#![allow(dead_code)]

use gantry_checkpoint::boxes::Region;
use gantry_checkpoint::{DType, JobState, Lineage, SliceSpec};

pub fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// FNV-1a of a tensor name.
pub fn name_id(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A slice of tensor `name`.
pub fn slice(name: &str, dtype: DType, shape: &[u64], offsets: &[u64], lengths: &[u64]) -> SliceSpec {
    SliceSpec {
        name: name.to_string(),
        dtype,
        global_shape: shape.to_vec(),
        offsets: offsets.to_vec(),
        lengths: lengths.to_vec(),
    }
}

/// `s` restricted to `region` (global coordinates).
pub fn with_region(s: &SliceSpec, region: &Region) -> SliceSpec {
    SliceSpec {
        offsets: region.offsets.clone(),
        lengths: region.lengths.clone(),
        ..s.clone()
    }
}

/// Cut `[0, n)` into `parts` near-equal ranges; part `i` as (offset, length).
pub fn split_range(n: u64, parts: u64, i: u64) -> (u64, u64) {
    let base = n / parts;
    let extra = n % parts;
    let off = i * base + i.min(extra);
    (off, base + u64::from(i < extra))
}

/// Part `i` of `parts` of the whole tensor `full`, cut along dimension `dim`.
pub fn split_dim(full: &SliceSpec, dim: usize, parts: u64, i: u64) -> SliceSpec {
    let (off, len) = split_range(full.global_shape[dim], parts, i);
    let mut s = full.clone();
    s.offsets = vec![0; full.global_shape.len()];
    s.lengths = full.global_shape.clone();
    s.offsets[dim] = off;
    s.lengths[dim] = len;
    s
}

/// The row-major bytes of slice `s` for contents `seed`.
pub fn slice_bytes(seed: u64, s: &SliceSpec) -> Vec<u8> {
    let elem = s.dtype.size();
    let n = s.global_shape.len();
    let tensor = splitmix64(seed ^ name_id(&s.name).rotate_left(17));
    let mut out = Vec::with_capacity(s.nbytes() as usize);
    let mut push = |global: u64| {
        let v = splitmix64(tensor ^ global.wrapping_mul(0x2545_f491_4f6c_dd1d));
        out.extend_from_slice(&v.to_le_bytes()[..elem]);
    };
    if n == 0 {
        push(0);
        return out;
    }
    if s.lengths.contains(&0) {
        return out;
    }
    let strides: Vec<u64> = (0..n).map(|d| s.global_shape[d + 1..].iter().product()).collect();
    // Odometer over every dimension but the last; the last is a contiguous run.
    let mut idx = vec![0u64; n - 1];
    loop {
        let base: u64 = (0..n - 1).map(|d| (s.offsets[d] + idx[d]) * strides[d]).sum::<u64>() + s.offsets[n - 1];
        for j in 0..s.lengths[n - 1] {
            push(base + j);
        }
        let mut d = n - 1;
        loop {
            if d == 0 {
                return out;
            }
            d -= 1;
            idx[d] += 1;
            if idx[d] < s.lengths[d] {
                break;
            }
            idx[d] = 0;
        }
    }
}

/// The first index where two byte strings differ, for readable assertion messages.
pub fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

// ---- The model of the crash test: what every rank process saves. ----

pub const CRASH_WORLD: usize = 3;
/// Per rank: three 1 MiB row slices and a column slice, about 3 MiB, cut into 2 MiB chunks.
pub const CRASH_CHUNK_BYTES: usize = 2 << 20;

fn crash_full() -> Vec<(SliceSpec, usize)> {
    // (whole tensor, dimension it is split along across ranks; usize::MAX: replicated)
    vec![
        (SliceSpec::full("layer0.w", DType::F32, &[768, 1024]), 0),
        (SliceSpec::full("layer1.w", DType::F32, &[768, 1024]), 0),
        (SliceSpec::full("layer2.w", DType::Bf16, &[1536, 1024]), 0),
        (SliceSpec::full("head", DType::F32, &[1024, 48]), 1),
        (SliceSpec::full("ln.g", DType::F32, &[1024]), usize::MAX),
    ]
}

/// The whole tensors of the crash model.
pub fn crash_tensors() -> Vec<SliceSpec> {
    crash_full().into_iter().map(|(s, _)| s).collect()
}

/// What rank `rank` of the crash model saves.
pub fn crash_rank_slices(rank: usize) -> Vec<SliceSpec> {
    crash_full()
        .into_iter()
        .map(|(s, dim)| {
            if dim == usize::MAX {
                s
            } else {
                split_dim(&s, dim, CRASH_WORLD as u64, rank as u64)
            }
        })
        .collect()
}

/// Contents of step `step` of the crash test.
pub fn crash_seed(step: u64) -> u64 {
    splitmix64(0xc0ff_ee00 ^ step)
}

pub fn crash_rank_state(step: u64, rank: usize) -> serde_json::Value {
    serde_json::json!({ "rank": rank, "step": step, "rng": splitmix64(step * 31 + rank as u64) })
}

pub fn crash_job(step: u64) -> JobState {
    JobState {
        tokens_seen: step * 4096,
        model: serde_json::json!({ "layers": 3, "d_model": 1024 }),
        layout: serde_json::json!({ "dp": CRASH_WORLD }),
        optimizer: serde_json::json!({ "kind": "none" }),
        data_cursor: serde_json::json!({ "batch": step }),
        lineage: Lineage {
            job_id: "crash-test".to_string(),
            spec_hash: "0123456789abcdef".to_string(),
            gantry_version: "test".to_string(),
        },
        ..JobState::default()
    }
}
