use crate::location::LocationError;
use crate::planner::PlanError;

/// What went wrong with a checkpoint, naming the object, tensor or rank at fault.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(transparent)]
    Location(#[from] LocationError),
    #[error("bad checkpoint location {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("{op} {key} in {url}: {source}")]
    Store {
        url: String,
        op: &'static str,
        key: String,
        #[source]
        source: Box<object_store::Error>,
    },
    #[error("no committed checkpoint in {url}")]
    NoCheckpoint { url: String },
    #[error("no readable checkpoint in {url}: every committed step was skipped ({})", skipped.join("; "))]
    NoReadableCheckpoint { url: String, skipped: Vec<String> },
    #[error("{path} is {kind}, not a regular file: checkpoints hold only plain files and directories")]
    NotPlainFile { path: String, kind: &'static str },
    #[error("step {step} in {url} is not committed (no manifest.json): it does not exist for readers")]
    NotCommitted { url: String, step: u64 },
    #[error("{object}: {message}")]
    Manifest { object: String, message: String },
    #[error("{object} is missing")]
    MissingObject { object: String },
    #[error("{object} is truncated: expected {expected} bytes, found {found}")]
    Truncated { object: String, expected: u64, found: u64 },
    #[error(
        "{object}: checksum mismatch in tensor {tensor} (bytes {offset}..{end}): expected xxh3 {expected}, found {found}"
    )]
    Checksum {
        object: String,
        tensor: String,
        offset: u64,
        end: u64,
        expected: String,
        found: String,
    },
    #[error("checkpoint {url}: {source}")]
    Plan {
        url: String,
        #[source]
        source: PlanError,
    },
    #[error("step {step}: ranks {missing:?} did not finish writing within {waited_s:.0} s; not committed")]
    CommitTimeout {
        step: u64,
        missing: Vec<usize>,
        waited_s: f64,
    },
    #[error("step {step}: rank 0 did not commit within {waited_s:.0} s (this rank's share was written)")]
    CommitNotSeen { step: u64, waited_s: f64 },
    #[error("step {step}: the save was cancelled (its rank is stopping); not committed")]
    Cancelled { step: u64 },
    #[error("step {step} is already committed in {url}")]
    AlreadyCommitted { step: u64, url: String },
    #[error(
        "{action}: attempt {attempt} of job {job} is fenced off {url}: attempt {newer} of the job has claimed it since (fence/{job}/)"
    )]
    Fenced {
        /// What was refused ("step 12 not committed", "cannot start saving").
        action: String,
        job: String,
        attempt: u32,
        newer: u32,
        url: String,
    },
    #[error("checkpoint model mismatch: {0}")]
    ModelMismatch(String),
    #[error("step {step}: the snapshot of tensor {tensor} did not complete: {message}; not saved")]
    SnapshotFailed { step: u64, tensor: String, message: String },
    #[error("the checkpoint writer thread stopped")]
    WriterGone,
    #[error("{0}")]
    Io(String),
}
