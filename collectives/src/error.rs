//! Typed errors. Every failure of a collective names the rank at fault (as far as this rank can
//! tell), the operation and its sequence number.

use crate::header::{OpDesc, OpKind};
use std::io;
use std::time::Duration;

/// What went wrong on one link (a byte pipe to one peer). The communicator turns these into
/// [`CommError`]s that name the operation.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("connection closed by peer")]
    Closed,
    #[error("peer process is gone")]
    PeerDied,
    /// The peer aborted its communicator; it may know who is really at fault.
    #[error("peer aborted: {reason}")]
    Aborted { culprit: Option<usize>, reason: String },
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The data plane's handshake with the peer failed: it does not hold this job's secret,
    /// or it refused ours. Never blamed on a rank (whoever answered may not be the rank).
    #[error("authentication failed: {0}")]
    Auth(String),
}

#[derive(Debug, thiserror::Error)]
pub enum CommError {
    #[error("rank {rank} did not respond within {waited:?} during {op} seq {seq}: {detail}")]
    RankTimeout {
        rank: usize,
        op: OpKind,
        seq: u64,
        waited: Duration,
        detail: String,
    },

    #[error("rank {rank} died or closed its connection during {op} seq {seq}: {detail}")]
    PeerLost {
        rank: usize,
        op: OpKind,
        seq: u64,
        detail: String,
    },

    #[error("{op} seq {seq} aborted because rank {rank} failed: {reason}")]
    Aborted {
        rank: usize,
        op: OpKind,
        seq: u64,
        reason: String,
    },

    #[error(
        "collective mismatch at seq {seq}: rank {local_rank} called {local} but rank {remote_rank} called {remote} (its seq {remote_seq}){detail}"
    )]
    Mismatch {
        seq: u64,
        local_rank: usize,
        local: OpDesc,
        remote_rank: usize,
        remote_seq: u64,
        remote: OpDesc,
        /// Set when the calls look alike but their messages differ (step or length), which
        /// happens when ranks run with different segment sizes, thresholds or algorithms.
        detail: String,
    },

    #[error("invalid argument to {op}: {message}")]
    InvalidArgument { op: OpKind, message: String },

    #[error("communicator is broken by an earlier error ({0}); create a new one")]
    Broken(String),

    #[error("transport setup failed: {0}")]
    Setup(String),

    #[error("rendezvous: {0}")]
    Rendezvous(#[from] crate::store::StoreError),

    #[error("NCCL: {0}")]
    Nccl(#[from] crate::nccl::NcclError),

    #[error("I/O error while {context}: {source}")]
    Io { context: String, source: io::Error },
}

impl CommError {
    /// The rank this error blames, if any.
    pub fn rank(&self) -> Option<usize> {
        match self {
            CommError::RankTimeout { rank, .. }
            | CommError::PeerLost { rank, .. }
            | CommError::Aborted { rank, .. } => Some(*rank),
            CommError::Mismatch { remote_rank, .. } => Some(*remote_rank),
            _ => None,
        }
    }
}

pub type Result<T, E = CommError> = std::result::Result<T, E>;

/// How long to wait by default for any one collective.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);
