//! Errors of the worker daemon. A rank that cannot start is not an error of the daemon: it is
//! reported to the coordinator as `FAILED_TO_START` with [`StartError`]'s text.

use crate::reconcile::RankKey;
use gantry_coordinator::auth::AuthError;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("invalid worker configuration: `{field}`: {reason}")]
    Config { field: &'static str, reason: String },
    #[error("bad label `{item}` (expected key=value, comma-separated): {reason}")]
    BadLabel { item: String, reason: String },
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("cannot create the state directory {path}: {source}")]
    StateDir { path: PathBuf, source: std::io::Error },
    #[error("the worker service on {addr} failed: {reason}")]
    Serve { addr: String, reason: String },
    #[error("the coordinator at {url} rejected this worker: {reason}")]
    Rejected { url: String, reason: String },
}

/// Why a rank process could not be started; sent as the `FAILED_TO_START` message.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{key}: cannot create {path}: {source}")]
    Io {
        key: RankKey,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{key}: the assignment has no program")]
    NoProgram { key: RankKey },
    #[error("{key}: the command is empty (argv has no program)")]
    EmptyArgv { key: RankKey },
    #[error("{key}: working directory {path} of `{program}`: {reason}")]
    Workdir {
        key: RankKey,
        program: String,
        path: PathBuf,
        reason: String,
    },
    #[error("{key}: cannot start `{program}`: {source}")]
    Spawn {
        key: RankKey,
        program: String,
        source: std::io::Error,
    },
    #[error("{key}: cannot start a supervisor thread: {source}")]
    Thread { key: RankKey, source: std::io::Error },
    #[error("{key}: the thread starting it ended before the process started")]
    Lost { key: RankKey },
    #[error("{key}: already ran on this worker and was forgotten; a rank is never started twice")]
    AlreadyRan { key: RankKey },
}
