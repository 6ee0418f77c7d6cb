//! What a rank learns from whoever started it rather than from the job spec: the job's id,
//! the AdamW implementation, whether to log the samples it trains on, where to write its
//! progress. The binary reads these environment variables once ([`RunContext::from_vars`]
//! with its own lookup) and passes the plain fields down; nothing in this crate reads the
//! environment. The variable names are an interface: the worker daemon and the tests set them.

use crate::error::TrainError;
use crate::fused_ops::FusedOps;
use crate::optim::AdamImpl;
use gantry_checkpoint::S3Options;
use gantry_sharding::gpt::OpenOptions;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// The job's id in the cluster (set by the worker); recorded in each checkpoint's lineage.
pub const JOB_ID_ENV: &str = "GANTRY_JOB_ID";
/// The job's attempt, counted from 1 (set by the worker): with the job id, it fences the
/// checkpoints of attempts a later one replaced ([`gantry_checkpoint::fence`]).
pub const ATTEMPT_ENV: &str = gantry_collectives::rank_env::ATTEMPT;
/// `fused` (the default) or `manual`: see [`AdamImpl`].
pub const ADAMW_ENV: &str = "GANTRY_ADAMW";
/// `on` (the default) or `off`: the fused operators, see [`FusedOps`].
pub const FUSED_OPS_ENV: &str = "GANTRY_FUSED_OPS";
/// Set (to anything): the first stage's TP rank 0 writes `samples-rank-<r>.jsonl`, which
/// sample of which epoch it trained on at each step.
pub const LOG_SAMPLES_ENV: &str = "GANTRY_LOG_SAMPLES";
/// Where this rank replaces its progress object after each step ([`crate::progress`]).
pub const PROGRESS_FILE_ENV: &str = "GANTRY_PROGRESS_FILE";
/// Root of the host's data cache (materialized shards, verdicts); without it the system
/// temporary directory's ([`gantry_sharding::materialize::default_cache_root`]).
pub const DATA_CACHE_ENV: &str = gantry_sharding::materialize::CACHE_ENV;

/// A rank's run context, as plain fields.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunContext {
    /// `GANTRY_JOB_ID`; without it, the run directory's name.
    pub job_id: Option<String>,
    /// `GANTRY_ATTEMPT`.
    pub attempt: Option<u32>,
    /// `GANTRY_ADAMW`.
    pub adamw: AdamImpl,
    /// `GANTRY_FUSED_OPS`.
    pub fused_ops: FusedOps,
    /// `GANTRY_LOG_SAMPLES` is set.
    pub log_samples: bool,
    /// `GANTRY_PROGRESS_FILE`, when set and not empty.
    pub progress_file: Option<PathBuf>,
    /// `GANTRY_DATA_CACHE`, when set and not empty.
    pub data_cache: Option<PathBuf>,
    /// How checkpoints reach S3: the `AWS_*` variables the binary read
    /// ([`S3Options::with_environment`]).
    pub s3: S3Options,
}

impl RunContext {
    /// The context from environment variables as `lookup` returns them (the binary passes
    /// the process environment's `var_os`). A value that is not Unicode counts as unset, as it always did; an
    /// unknown `GANTRY_ADAMW` is an error naming the variable.
    pub fn from_vars(lookup: impl Fn(&str) -> Option<OsString>) -> Result<RunContext, TrainError> {
        let text = |name: &str| lookup(name).and_then(|v| v.into_string().ok());
        let forced = AdamImpl::parse(text(ADAMW_ENV).as_deref()).map_err(TrainError::Device)?;
        let fused_ops = FusedOps::parse(text(FUSED_OPS_ENV).as_deref()).map_err(TrainError::Device)?;
        let attempt = text(ATTEMPT_ENV)
            .map(|a| {
                a.trim()
                    .parse()
                    .map_err(|_| TrainError::Bootstrap(format!("{ATTEMPT_ENV}=`{a}` is not a non-negative integer")))
            })
            .transpose()?;
        Ok(RunContext {
            job_id: text(JOB_ID_ENV),
            attempt,
            adamw: AdamImpl::choose(forced),
            fused_ops: fused_ops.unwrap_or_default(),
            log_samples: lookup(LOG_SAMPLES_ENV).is_some(),
            progress_file: lookup(PROGRESS_FILE_ENV).filter(|p| !p.is_empty()).map(PathBuf::from),
            data_cache: lookup(DATA_CACHE_ENV).filter(|p| !p.is_empty()).map(PathBuf::from),
            s3: S3Options::default(),
        })
    }

    /// How this rank opens the job's dataset: the model's vocabulary checked, the host's data
    /// cache where the launcher put it.
    pub fn dataset_options(&self, vocab_size: u64) -> OpenOptions {
        OpenOptions {
            cache_dir: self.data_cache.clone(),
            ..OpenOptions::for_vocab(vocab_size)
        }
    }

    /// The checkpoint fence of a cluster job's attempt (the worker sets both variables), or
    /// `None`: unfenced saves (a local launch).
    pub fn fence(&self) -> Option<gantry_checkpoint::Fence> {
        let (job, attempt) = (self.job_id.as_deref()?, self.attempt?);
        match gantry_checkpoint::Fence::new(job, attempt) {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::warn!("checkpoints are not fenced: {e}");
                None
            }
        }
    }

    /// The job id for checkpoint lineage: `GANTRY_JOB_ID`, else the run directory's name.
    pub fn job_id_or_dir(&self, run_dir: &Path) -> String {
        self.job_id.clone().unwrap_or_else(|| {
            run_dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn context(vars: &[(&str, &str)]) -> Result<RunContext, TrainError> {
        let map: HashMap<String, OsString> = vars.iter().map(|(k, v)| (k.to_string(), OsString::from(v))).collect();
        RunContext::from_vars(|k| map.get(k).cloned())
    }

    #[test]
    fn nothing_set_is_the_default() {
        let c = context(&[]).unwrap();
        assert_eq!(c, RunContext::default());
        assert_eq!(c.adamw, AdamImpl::Fused);
        assert_eq!(c.fused_ops, FusedOps::On);
        assert_eq!(c.job_id_or_dir(Path::new("runs/quickstart-7")), "quickstart-7");
    }

    #[test]
    fn every_variable_becomes_a_field() {
        let c = context(&[
            (JOB_ID_ENV, "12"),
            (ATTEMPT_ENV, "3"),
            (ADAMW_ENV, "manual"),
            (FUSED_OPS_ENV, "off"),
            (LOG_SAMPLES_ENV, ""),
            (PROGRESS_FILE_ENV, "/state/rank-3.progress.json"),
            (DATA_CACHE_ENV, "/scratch/cache"),
        ])
        .unwrap();
        assert_eq!(c.job_id_or_dir(Path::new("runs/x")), "12");
        assert_eq!(c.fence(), Some(gantry_checkpoint::Fence::new("12", 3).unwrap()));
        assert_eq!(
            context(&[(JOB_ID_ENV, "12")]).unwrap().fence(),
            None,
            "no attempt: unfenced"
        );
        assert_eq!(
            context(&[(ATTEMPT_ENV, "3")]).unwrap().fence(),
            None,
            "no job: unfenced"
        );
        let e = context(&[(ATTEMPT_ENV, "x")]).unwrap_err().to_string();
        assert!(e.contains("GANTRY_ATTEMPT=`x`"), "{e}");
        assert_eq!(c.adamw, AdamImpl::Manual);
        assert_eq!(c.fused_ops, FusedOps::Off);
        // Set to anything, even empty, turns the samples log on.
        assert!(c.log_samples);
        assert_eq!(c.progress_file, Some(PathBuf::from("/state/rank-3.progress.json")));
        // An empty progress path is no progress file.
        assert_eq!(context(&[(PROGRESS_FILE_ENV, "")]).unwrap().progress_file, None);
        assert_eq!(
            c.dataset_options(64).cache_dir.as_deref(),
            Some(Path::new("/scratch/cache"))
        );
    }

    #[test]
    fn an_unknown_adamw_names_the_variable() {
        let e = context(&[(ADAMW_ENV, "apex")]).unwrap_err().to_string();
        assert!(e.contains("GANTRY_ADAMW=`apex`"), "{e}");
        let e = context(&[(FUSED_OPS_ENV, "sometimes")]).unwrap_err().to_string();
        assert!(e.contains("GANTRY_FUSED_OPS=`sometimes`"), "{e}");
    }
}
