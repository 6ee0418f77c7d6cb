//! The trainer's typed errors: each says which rank, step, layout or file is at fault.

use crate::spec::SpecError;
use gantry_collectives::CommError;
use gantry_sharding::gpt::DatasetError;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Comm(#[from] CommError),
    #[error(transparent)]
    Data(#[from] DatasetError),
    #[error(transparent)]
    FusedAdam(#[from] crate::fused::FusedAdamError),
    #[error(transparent)]
    Autograd(#[from] crate::autograd::AutogradError),
    #[error(transparent)]
    Checkpoint(#[from] gantry_checkpoint::CheckpointError),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("rank {rank}: loss is not finite at step {step} ({loss})")]
    NonFiniteLoss { rank: usize, step: u64, loss: f64 },
    #[error("rank {rank}: the data-parallel gradient thread failed: {message}")]
    GradientThread { rank: usize, message: String },
    #[error("bootstrap: {0}")]
    Bootstrap(String),
    #[error("{0}")]
    Device(String),
    #[error("evaluation: {0}")]
    Eval(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl TrainError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> TrainError {
        TrainError::Io {
            path: path.into(),
            source,
        }
    }
}
