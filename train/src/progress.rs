//! A per-rank progress file for the worker daemon: with `GANTRY_PROGRESS_FILE` set (read by
//! the binary into [`crate::run_context::RunContext::progress_file`]), every rank (not only
//! the reporting one) replaces that file after each step with one JSON object,
//! `{"step":…,"step_ms":…,"tokens_per_s":…,"loss":…}`, so a worker can tell a live rank from
//! a stuck one without parsing logs.
//!
//! Written as `<path>.tmp` then renamed, so a reader sees the previous step's object or this
//! one, never half of one. One small write per step.

use crate::run_context::PROGRESS_FILE_ENV;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Steps completed.
    pub step: u64,
    pub step_ms: f64,
    /// Job-wide tokens per second of the step.
    pub tokens_per_s: f64,
    /// The step's loss where this rank knows it (last pipeline stage), else 0.0.
    pub loss: f64,
}

pub struct ProgressFile {
    path: PathBuf,
    tmp: PathBuf,
    /// A failed write was reported; later failures stay quiet.
    warned: bool,
}

impl ProgressFile {
    pub fn new(path: PathBuf) -> ProgressFile {
        let mut tmp = path.clone().into_os_string();
        tmp.push(".tmp");
        ProgressFile {
            path,
            tmp: PathBuf::from(tmp),
            warned: false,
        }
    }

    /// Replace the file's contents with `p`. A failure is logged once and otherwise ignored:
    /// the file only informs a watcher, and losing it must not cost the training run.
    pub fn write(&mut self, p: &Progress) {
        let bytes = serde_json::to_vec(p).expect("progress serializes");
        let result = std::fs::write(&self.tmp, bytes).and_then(|()| std::fs::rename(&self.tmp, &self.path));
        if let Err(e) = result
            && !self.warned
        {
            self.warned = true;
            tracing::warn!(
                path = %self.path.display(),
                error = %e,
                "cannot write the progress file ({PROGRESS_FILE_ENV}); training goes on without it"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_write_replaces_the_whole_object() {
        let dir = std::env::temp_dir().join(format!("gantry-progress-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("p.json");
        let mut f = ProgressFile::new(path.clone());
        for step in 1..=3 {
            f.write(&Progress {
                step,
                step_ms: 12.5,
                tokens_per_s: 1000.0,
                loss: 2.0 / step as f64,
            });
            let back: Progress = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
            assert_eq!(back.step, step);
            assert_eq!(back.loss, 2.0 / step as f64);
        }
        assert!(!dir.join("p.json.tmp").exists());
        // An unwritable path is not an error for the caller.
        let mut bad = ProgressFile::new(dir.join("missing/p.json"));
        bad.write(&Progress::default());
        bad.write(&Progress::default());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
