//! The trainer's typed errors: each says which rank, step, layout or file is at fault.

use crate::spec::SpecError;
use gantry_collectives::CommError;
use gantry_collectives::nccl::NcclError;
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
    FusedOps(#[from] crate::fused_ops::FusedOpsError),
    #[error(transparent)]
    Autograd(#[from] crate::autograd::AutogradError),
    #[error(transparent)]
    Checkpoint(#[from] gantry_checkpoint::CheckpointError),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// libtorch could not create a parameter (or a table) while the model was built.
    #[error("building the model: tensor `{tensor}` of shape {shape:?}: libtorch: {source}")]
    ModelBuild {
        tensor: String,
        shape: Vec<i64>,
        source: tch::TchError,
    },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// `checkpoint.resume` found a checkpoint past the step this run ends at.
    #[error(
        "checkpoint.resume: the checkpoint is at step {step}, past the end of this run ({field} = {end}); \
         nothing was trained. Raise {field} above {step} to train on from it, or resume an earlier step"
    )]
    ResumedPastEnd { step: u64, end: u64, field: &'static str },
    #[error("rank {rank}: loss is not finite at step {step} ({loss})")]
    NonFiniteLoss { rank: usize, step: u64, loss: f64 },
    #[error("rank {rank}: the data-parallel gradient thread failed: {message}")]
    GradientThread { rank: usize, message: String },
    /// A group's NCCL communicator could not be made: no GPU or `libnccl.so`, or the
    /// rendezvous of its unique id failed.
    #[error("rank {rank}: cannot make the NCCL communicator of group `{group}` for its CUDA tensors: {source}")]
    NcclSetup {
        rank: usize,
        group: String,
        source: CommError,
    },
    /// An NCCL operation on a group's device communicator failed or ran past its deadline.
    #[error("rank {rank}: NCCL {op} on group `{group}` failed: {source}")]
    Nccl {
        rank: usize,
        group: String,
        op: &'static str,
        source: NcclError,
    },
    /// An operation NCCL cannot run as asked (a CUDA tensor on a group without NCCL, a dtype
    /// NCCL lacks, another device's tensor).
    #[error("rank {rank}: {op} on group `{group}`: {why}")]
    NcclMisuse {
        rank: usize,
        group: String,
        op: &'static str,
        why: String,
    },
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
    /// Whether this is NCCL (or CUDA) missing on this machine, as opposed to a failure of it.
    pub fn is_nccl_unavailable(&self) -> bool {
        match self {
            TrainError::NcclSetup {
                source: CommError::Nccl(e),
                ..
            }
            | TrainError::Nccl { source: e, .. } => e.is_unavailable(),
            _ => false,
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> TrainError {
        TrainError::Io {
            path: path.into(),
            source,
        }
    }
}
