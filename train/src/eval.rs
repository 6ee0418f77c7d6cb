//! Evaluation of a trained model: mean next-token loss and perplexity over a dataset's
//! validation split, deterministically (samples `0, 1, 2, …` of the split in order, no
//! shuffle, the last batch possibly shorter), on one process or over tensor-parallel ranks.
//! Every TP rank reads the same samples; the vocabulary-parallel loss is the same on all.

use crate::comm::TensorComm;
use crate::error::TrainError;
use crate::model::{MicroBatch, Model};
use crate::pipeline::forward_stage;
use gantry_sharding::gpt::{GptDataset, OpenOptions, Split};
use std::path::PathBuf;
use tch::{Device, Tensor};

/// What to evaluate on.
#[derive(Clone, Debug, PartialEq)]
pub struct EvalConfig {
    pub data: PathBuf,
    /// The validation split is this fraction of the documents, chosen by `split_seed` (the
    /// training run's `data.valid_fraction` / `data.seed` select the same documents); 0
    /// evaluates on every document.
    pub valid_fraction: f64,
    pub split_seed: u64,
    /// Samples per forward pass.
    pub batch: usize,
    /// Evaluate only the first N samples of the split (all when `None`).
    pub max_samples: Option<u64>,
    /// The host's data cache root (materialized shards); `None`: the default root.
    pub cache_dir: Option<PathBuf>,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            data: PathBuf::new(),
            valid_fraction: 0.05,
            split_seed: 0,
            batch: 8,
            max_samples: None,
            cache_dir: None,
        }
    }
}

impl EvalConfig {
    pub fn validate(&self) -> Result<(), TrainError> {
        let bad = |m: String| Err(TrainError::Eval(m));
        if !(0.0..1.0).contains(&self.valid_fraction) {
            return bad(format!("valid_fraction must be in [0, 1), got {}", self.valid_fraction));
        }
        if self.batch == 0 {
            return bad("batch must be at least 1".into());
        }
        if self.max_samples == Some(0) {
            return bad("max_samples must be at least 1".into());
        }
        Ok(())
    }
}

/// The result of one evaluation.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct EvalResult {
    /// Mean loss per predicted token, nats.
    pub loss: f64,
    pub perplexity: f64,
    /// Tokens predicted.
    pub tokens: u64,
    pub samples: u64,
}

/// Evaluate `model` (the whole model, this rank's TP slice; `tp` its TP group).
pub fn evaluate(
    model: &Model,
    tp: &mut TensorComm,
    cfg: &EvalConfig,
    device: Device,
) -> Result<EvalResult, TrainError> {
    cfg.validate()?;
    if !(model.plan.first && model.plan.last) {
        return Err(TrainError::Internal(
            "evaluation runs the whole model on each TP rank".into(),
        ));
    }
    let seq = model.spec.seq_len;
    let split = if cfg.valid_fraction == 0.0 {
        Split::All
    } else {
        Split::Valid {
            valid_fraction: cfg.valid_fraction,
            seed: cfg.split_seed,
        }
    };
    let ds = GptDataset::open_with(
        &cfg.data,
        seq,
        split,
        &OpenOptions {
            cache_dir: cfg.cache_dir.clone(),
            ..OpenOptions::for_vocab(model.spec.vocab_size as u64)
        },
    )?;
    let available = ds.num_samples();
    let n = cfg.max_samples.map_or(available, |m| m.min(available));
    if n == 0 {
        return Err(TrainError::Eval(format!(
            "{}: the split holds no sample of {} tokens",
            cfg.data.display(),
            seq + 1
        )));
    }
    let mut total = 0.0f64;
    let mut tokens = 0u64;
    let mut next = 0u64;
    while next < n {
        let rows = (n - next).min(cfg.batch as u64);
        let samples: Vec<u64> = (next..next + rows).collect();
        let mut ids = Vec::with_capacity(rows as usize * (seq + 1));
        ds.samples_into(&samples, &mut ids)?;
        let t = Tensor::from_slice(&ids).view([rows as i64, seq as i64 + 1]);
        let batch = MicroBatch {
            tokens: t.narrow(1, 0, seq as i64).to_device(device),
            targets: t.narrow(1, 1, seq as i64).contiguous().to_device(device),
        };
        let (loss, _) = tch::no_grad(|| forward_stage(model, None, &batch, tp, false, device != Device::Cpu, false))?;
        let batch_tokens = rows * seq as u64;
        total += loss.double_value(&[]) * batch_tokens as f64;
        tokens += batch_tokens;
        next += rows;
    }
    let loss = total / tokens as f64;
    Ok(EvalResult {
        loss,
        perplexity: loss.exp(),
        tokens,
        samples: n,
    })
}
