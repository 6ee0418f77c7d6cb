//! `metrics.jsonl`: one JSON object per step (and per evaluation), appended and flushed line
//! by line so the launcher can follow it while the job runs. Written by one rank: the last
//! pipeline stage's first data- and tensor-parallel rank, where the loss is known.

use crate::error::TrainError;
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    /// Tokens trained on so far (all ranks).
    pub tokens: u64,
    pub tokens_per_s: f64,
    pub step_ms: f64,
    /// Time this rank spent blocked in communication during the step.
    pub comm_ms: f64,
    /// The part of the step after forward and backward: waiting for the gradient buckets,
    /// the global norm, clipping, the optimizer update (and ZeRO-1's gather). On CUDA the
    /// backward has finished on the device when this starts (the step's loss is read first).
    #[serde(default)]
    pub update_ms: f64,
    /// Model FLOPs utilization against the H200's 989 TFLOP/s bf16 (GPU runs only).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub mfu: Option<f64>,
    /// Validation loss, on the steps where it was measured.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub val_loss: Option<f64>,
    /// On a step that took a checkpoint: how long training paused for it (snapshotting into
    /// host memory, plus any wait for the previous save to commit).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub ckpt_stall_ms: Option<f64>,
    /// On the step where a save was found committed: what it wrote and how long it took.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub ckpt_committed: Option<CommittedSave>,
}

/// A committed checkpoint as seen by the reporting rank.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CommittedSave {
    pub step: u64,
    /// Bytes this rank wrote.
    pub bytes: u64,
    pub write_s: f64,
    /// From hand-off to commit.
    pub save_s: f64,
}

/// Dense bf16 peak of one H200 (the MFU denominator).
pub const H200_PEAK_FLOPS: f64 = 989e12;

pub struct MetricsWriter {
    path: PathBuf,
    file: File,
}

impl MetricsWriter {
    pub fn create(path: &Path) -> Result<MetricsWriter, TrainError> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| TrainError::io(path, e))?;
        Ok(MetricsWriter {
            path: path.to_path_buf(),
            file,
        })
    }

    pub fn write(&mut self, m: &StepMetrics) -> Result<(), TrainError> {
        let mut line = serde_json::to_string(m).expect("metrics serialize");
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .map_err(|e| TrainError::io(&self.path, e))
    }

    /// A line of its own for a save that committed after the last step: `{"ckpt_committed": …}`.
    pub fn write_committed(&mut self, c: &CommittedSave) -> Result<(), TrainError> {
        let mut line = serde_json::json!({ "ckpt_committed": c }).to_string();
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .map_err(|e| TrainError::io(&self.path, e))
    }
}

/// Read every complete line of a metrics file (a partially written last line is skipped).
pub fn read_metrics(path: &Path) -> Result<Vec<StepMetrics>, TrainError> {
    let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<StepMetrics>(l).ok())
        .collect())
}

/// The end-of-run record (`summary.json`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    pub steps: u64,
    /// The last step's training loss; `None` when no step ran (a run resumed at its end).
    pub final_loss: Option<f64>,
    pub val_loss: Option<f64>,
    /// The data's entropy rate (synthetic data): the best achievable loss.
    pub entropy_floor: Option<f64>,
    pub tokens: u64,
    pub mean_tokens_per_s: f64,
    pub mean_step_ms: f64,
    /// Mean of [`StepMetrics::update_ms`] over the same steps.
    #[serde(default)]
    pub mean_update_ms: f64,
    pub comm_share: f64,
    /// Mean MFU over the steps after the first (GPU runs only).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub mean_mfu: Option<f64>,
    pub params: u64,
    pub samples: Vec<String>,
}
