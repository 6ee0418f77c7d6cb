//! Real committed checkpoints for the registry tests, written by the checkpoint crate's own
//! `Saver` (two ranks on threads, as separate processes would), with the checkpoint tests'
//! deterministic tensor contents.

#![allow(dead_code)]

pub mod http_client;
#[path = "../../../checkpoint/tests/common/pattern.rs"]
pub mod pattern;
#[path = "../../../checkpoint/tests/common/s3_server.rs"]
pub mod s3_server;
pub mod server;

use gantry_checkpoint::{
    DType, JobState, Lineage, ParamLayout, S3Options, SaveRequest, Saver, SaverConfig, SliceSpec, Store, TensorData,
};
use pattern::{slice_bytes, split_dim};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const WORLD: usize = 2;

#[path = "../../../checkpoint/tests/common/tempdir.rs"]
mod tempdir;
pub use tempdir::TempDir;

pub fn tensors() -> Vec<SliceSpec> {
    vec![
        SliceSpec::full("embed", DType::Bf16, &[64, 16]),
        SliceSpec::full("layers.0.w", DType::F32, &[32, 24]),
        SliceSpec::full("ln", DType::F32, &[16]),
    ]
}

/// What the job state of `step` says, so tests can check the registry copied it.
pub fn job(step: u64) -> JobState {
    JobState {
        tokens_seen: step * 4096,
        model: serde_json::json!({ "d_model": 16, "n_layers": 1, "vocab": 64 }),
        layout: serde_json::json!({ "dp": 1, "tp": 2, "pp": 1, "zero1": false }),
        optimizer: serde_json::json!({ "kind": "adamw" }),
        data_cursor: serde_json::json!({ "seed": 7, "samples_consumed": step * 32 }),
        lineage: Lineage {
            job_id: "job-17".to_string(),
            spec_hash: "00112233aabbccdd".to_string(),
            gantry_version: "0.1.0-test".to_string(),
        },
        params: ["embed:0", "layers.0.w:1", "ln:-"]
            .iter()
            .map(|p| {
                let (name, split) = p.split_once(':').unwrap();
                ParamLayout {
                    name: name.to_string(),
                    tp_split: split.parse().ok(),
                }
            })
            .collect(),
        data: serde_json::json!({ "valid_fraction": 0.1, "seed": 3 }),
    }
}

fn request(rank: usize, step: u64) -> SaveRequest {
    let mut slices: Vec<SliceSpec> = tensors()
        .iter()
        .filter(|t| t.name != "ln")
        .map(|t| split_dim(t, 0, WORLD as u64, rank as u64))
        .collect();
    if rank == 0 {
        slices.push(tensors()[2].clone());
    }
    SaveRequest {
        step,
        tensors: slices
            .into_iter()
            .map(|s| TensorData {
                bytes: slice_bytes(step, &s).into(),
                slice: s,
            })
            .collect(),
        rank_state: serde_json::json!({ "rank": rank }),
        job: job(step),
    }
}

/// Save and commit `steps` under the checkpoint root `root` with two ranks.
pub fn save_steps(root: &Path, steps: &[u64]) {
    save_steps_to(&root.display().to_string(), &S3Options::default(), steps);
}

/// Save and commit `steps` under checkpoint root `url` (a path or `s3://…`) with two ranks.
pub fn save_steps_to(url: &str, s3: &S3Options, steps: &[u64]) {
    let handles: Vec<_> = (0..WORLD)
        .map(|rank| {
            let store = Store::open(url, s3).expect("open checkpoint store");
            let steps = steps.to_vec();
            std::thread::spawn(move || {
                let mut config = SaverConfig::new(rank, WORLD, "00000000000a1");
                config.chunk_bytes = 1024;
                config.poll = Duration::from_millis(5);
                config.commit_timeout = Duration::from_secs(60);
                let mut saver = Saver::new(store, config);
                for &step in &steps {
                    saver.save(request(rank, step)).expect("save");
                }
                saver.wait().expect("commit");
            })
        })
        .collect();
    for h in handles {
        h.join().expect("rank thread");
    }
}

/// The chunk files of rank 0 at `step` (there are several: chunks are cut at 1 KiB).
pub fn chunk_files(root: &Path, step: u64) -> Vec<PathBuf> {
    let dir = root.join(format!("step-{step:08}")).join("rank-00000");
    let mut out: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "bin"))
        .collect();
    out.sort();
    out
}
