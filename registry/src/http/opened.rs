//! Opened checkpoints, kept for the next request. Opening one means starting a store (its own
//! small I/O runtime) and reading and parsing the manifest; a download or a per-TP-rank view
//! is many requests against the same version, so they share one. Versions are immutable, so
//! an entry never goes stale; the least recently used is dropped past [`OPEN_CHECKPOINTS`].
//!
//! Everything here blocks (the checkpoint crate's API is synchronous): call it from the
//! blocking pool.

use super::error::ApiError;
use crate::model::VersionRecord;
use axum::http::StatusCode;
use gantry_checkpoint::{Checkpoint, CheckpointError, S3Options, StorageLocation, Store, Which};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

/// How many opened checkpoints to keep.
pub const OPEN_CHECKPOINTS: usize = 16;

/// `(checkpoint url, step)`.
type Key = (String, u64);

#[derive(Default)]
pub struct OpenedCheckpoints {
    /// Most recently used last.
    entries: Mutex<VecDeque<(Key, Arc<Checkpoint>)>>,
}

impl OpenedCheckpoints {
    /// The committed checkpoint behind a version. A checkpoint that vanished or broke since
    /// registration is a 422 naming it.
    pub fn open(&self, v: &VersionRecord, s3: &S3Options) -> Result<Arc<Checkpoint>, ApiError> {
        let key = (v.checkpoint_url.clone(), v.step);
        {
            let mut entries = self.entries.lock().expect("checkpoint cache lock");
            if let Some(i) = entries.iter().position(|(k, _)| *k == key) {
                let hit = entries.remove(i).expect("position is in range");
                let ckpt = hit.1.clone();
                entries.push_back(hit);
                return Ok(ckpt);
            }
        }
        let refused = |e: CheckpointError| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "checkpoint_unavailable",
                format!("{}@{}: checkpoint {}: {e}", v.model, v.version, v.checkpoint_url),
            )
        };
        let gone = || {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "checkpoint_unavailable",
                format!("{}@{}: checkpoint {} is gone", v.model, v.version, v.checkpoint_url),
            )
        };
        let location = StorageLocation::parse(&v.checkpoint_url).map_err(|e| refused(e.into()))?;
        // Opened for reading: a missing local directory is gone, never created.
        let store = Store::open_existing(&location, s3).map_err(|e| match e {
            CheckpointError::Location(l) if l.is_absent() => gone(),
            e => refused(e),
        })?;
        let ckpt = Arc::new(Checkpoint::open(&store, Which::Step(v.step)).map_err(refused)?);
        let mut entries = self.entries.lock().expect("checkpoint cache lock");
        if !entries.iter().any(|(k, _)| *k == key) {
            entries.push_back((key, ckpt.clone()));
            while entries.len() > OPEN_CHECKPOINTS {
                entries.pop_front();
            }
        }
        Ok(ckpt)
    }
}
