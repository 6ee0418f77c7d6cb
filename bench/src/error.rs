//! The one error type of the benchmark cores.

use std::path::{Path, PathBuf};

/// What went wrong in a benchmark: a setting out of range (named by its flag), a file, a
/// component under test, or a result that does not match what was handed in.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A benchmark setting is out of range; `flag` is its command-line name.
    #[error("{flag} {reason}")]
    Setting { flag: &'static str, reason: String },
    /// A file or directory operation of the benchmark itself (not of the component measured).
    #[error("{action} {}: {error}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(transparent)]
    Checkpoint(#[from] gantry_checkpoint::CheckpointError),
    #[error(transparent)]
    Comm(#[from] gantry_collectives::CommError),
    #[error(transparent)]
    Dataset(#[from] gantry_sharding::gpt::DatasetError),
    #[error(transparent)]
    Auth(#[from] gantry_coordinator::auth::AuthError),
    #[error("cannot connect to the coordinator: {0}")]
    Connect(#[from] tonic::transport::Error),
    /// A gRPC call to the coordinator failed; `call` names it.
    #[error("{call}: {status}")]
    Rpc { call: &'static str, status: tonic::Status },
    /// An HTTP request to the registry failed; `request` names the path.
    #[error("{request}: {detail}")]
    Http { request: String, detail: String },
    /// A daemon, child process or server the benchmark started did not do its part.
    #[error("{0}")]
    Harness(String),
    /// The component returned something other than what was handed in (bytes, sizes).
    #[error("{0}")]
    Mismatch(String),
}

impl BenchError {
    /// For `map_err`: an I/O error of `action` on `path`.
    pub(crate) fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> BenchError {
        let path = path.to_path_buf();
        move |error| BenchError::Io { action, path, error }
    }

    pub(crate) fn setting(flag: &'static str, reason: impl Into<String>) -> BenchError {
        BenchError::Setting {
            flag,
            reason: reason.into(),
        }
    }
}

pub type Result<T, E = BenchError> = std::result::Result<T, E>;
