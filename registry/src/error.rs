use crate::name::NameError;
use crate::split::WeightError;
use std::path::PathBuf;

/// What went wrong in the registry, naming the model, version, alias, checkpoint or database
/// record at fault.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("no model named {0:?}")]
    UnknownModel(String),
    #[error("model {model:?} has no version {version}")]
    UnknownVersion { model: String, version: u32 },
    #[error("model {model:?} has no alias {alias:?}")]
    UnknownAlias { model: String, alias: String },
    /// The checkpoint could not be opened or failed verification; `message` is the checkpoint
    /// crate's, naming the object at fault.
    #[error("checkpoint {url} refused: {message}")]
    Checkpoint { url: String, message: String },
    /// The location is outside the registry's `--checkpoint-roots`; whether anything is
    /// there is not said.
    #[error("checkpoint location {url} is outside this registry's checkpoint roots")]
    OutsideRoots { url: String },
    #[error(transparent)]
    BadName(#[from] NameError),
    #[error("bad alias targets: {0}")]
    BadWeights(#[from] WeightError),
    #[error("that checkpoint is already registered as {model}@{version}")]
    AlreadyRegistered { model: String, version: u32 },
    #[error("bad page cursor {cursor:?}: {reason}")]
    BadCursor { cursor: String, reason: String },
    #[error("registry database {path}: {message}")]
    Database { path: PathBuf, message: String },
    #[error("registry database {path}: record `{key}` is not readable: {message}")]
    Corrupt {
        path: PathBuf,
        key: String,
        message: String,
    },
    #[error("registry database {path} has schema version {found}; this gantry reads up to {supported}")]
    Schema { path: PathBuf, found: u64, supported: u64 },
}
