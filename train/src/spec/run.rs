//! The `[data]`, `[optim]` and `[train]` sections: what the run reads, how it steps and how
//! long it runs, and the rules that involve only one of them.

use super::{SpecError, invalid, num};
use gantry_checkpoint::location::{Role, StorageLocation, deserialize_as};
use gantry_collectives::OmpWait;
use gantry_sharding::remote::StreamSetup;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSpec {
    /// A dataset written by `gantry data prepare` or `gantry data synth`: a directory,
    /// `file://…` or `s3://bucket/prefix` (any other scheme is refused naming it).
    #[serde(deserialize_with = "dataset_location")]
    pub path: StorageLocation,
    /// Fraction of documents held out for validation.
    pub valid_fraction: f64,
    pub seed: u64,
    /// For an `s3://` dataset: the most it may take in each host's data cache, in GB (10^9
    /// bytes; `--data-cache-gb`). Shards are then fetched ahead of the ranks and evicted
    /// behind them, so a dataset larger than the budget can be read. 0: no budget (the whole
    /// dataset is fetched, while training runs, and kept).
    pub cache_gb: f64,
    /// Where this process reads the dataset when `path` is not a local directory: the host's
    /// checked copy in its data cache, set by the binary once fetched (`gantry rank`). Not
    /// part of the spec file.
    #[serde(skip)]
    pub local: Option<PathBuf>,
    /// For an `s3://` dataset: how this rank streams it into `local` (set by the binary,
    /// `gantry rank`, once the manifest and `.idx` files are there). Not part of the spec file.
    #[serde(skip)]
    pub stream: Option<StreamSetup>,
}

fn dataset_location<'de, D: serde::Deserializer<'de>>(d: D) -> Result<StorageLocation, D::Error> {
    deserialize_as(d, Role::Dataset)
}

impl Default for DataSpec {
    fn default() -> Self {
        DataSpec {
            path: StorageLocation::Local(PathBuf::from("data/synth")),
            valid_fraction: 0.05,
            seed: 1234,
            cache_gb: 0.0,
            local: None,
            stream: None,
        }
    }
}

impl DataSpec {
    /// The directory this process reads the dataset from: `local` when set, else `path` when
    /// it is local. An `s3://` dataset not yet fetched to this host is an error naming it.
    pub fn dir(&self) -> Result<&Path, SpecError> {
        match (&self.local, &self.path) {
            (Some(dir), _) => Ok(dir),
            (None, StorageLocation::Local(dir)) => Ok(dir),
            (None, remote) => Err(invalid(
                "data.path",
                format!(
                    "{remote} is not on this host: an s3:// dataset is read from the host's data cache once \
                     `gantry rank` (or `gantry launch`) has fetched it there"
                ),
            )),
        }
    }

    /// The held-out fraction must leave training documents; a cache budget is a finite
    /// number of GB, at least 0.
    pub fn validate(&self) -> Result<(), SpecError> {
        if !(0.0..1.0).contains(&self.valid_fraction) {
            return Err(invalid(
                "data.valid_fraction",
                format!("{} is not in [0, 1)", self.valid_fraction),
            ));
        }
        if !self.cache_gb.is_finite() || self.cache_gb < 0.0 {
            return Err(invalid(
                "data.cache_gb",
                format!("{} is not a number of GB >= 0 (0: no budget)", self.cache_gb),
            ));
        }
        Ok(())
    }

    /// The data cache budget in bytes, `None` without one.
    pub fn cache_budget(&self) -> Option<u64> {
        (self.cache_gb > 0.0).then_some((self.cache_gb * 1e9) as u64)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimSpec {
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: u64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Clip the global gradient norm to this; 0 disables clipping.
    pub grad_clip: f64,
}

impl Default for OptimSpec {
    fn default() -> Self {
        OptimSpec {
            lr: 1e-3,
            min_lr: 1e-4,
            warmup_steps: 10,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            grad_clip: 1.0,
        }
    }
}

impl OptimSpec {
    /// A positive learning rate that decays to no less than 0, and betas in [0, 1).
    pub fn validate(&self) -> Result<(), SpecError> {
        let (lr, min_lr) = (self.lr, self.min_lr);
        if lr.is_nan() || lr <= 0.0 || min_lr.is_nan() || min_lr < 0.0 || min_lr > lr {
            return Err(invalid(
                "optim.lr",
                format!("need 0 <= min_lr ({min_lr}) <= lr ({lr}), lr > 0"),
            ));
        }
        for (field, b) in [("optim.beta1", self.beta1), ("optim.beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return Err(invalid(field, format!("{b} is not in [0, 1)")));
            }
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceSpec {
    Cpu,
    Cuda,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSpec {
    pub steps: u64,
    /// Samples per optimizer step over all data-parallel ranks.
    pub global_batch: usize,
    /// Samples per micro-batch on one rank.
    pub micro_batch: usize,
    pub seed: u64,
    pub device: DeviceSpec,
    /// Validation loss every this many steps (and at the end); 0 = only at the end.
    pub eval_every: u64,
    /// Global batches of the validation split per evaluation.
    pub eval_batches: u64,
    /// Intra-op threads per rank; 0 = cores / ranks on this host.
    pub threads: usize,
    /// At the end, continue validation text with this many sampled tokens (0 = none).
    pub sample_tokens: usize,
    /// Stop after this many steps (0 = run all `steps`), keeping the learning-rate schedule of
    /// `steps`: a run cut short on purpose, to be resumed from its checkpoint.
    pub stop_after: u64,
    /// Memory one rank may use, GiB. The spec is refused before anything is built when the
    /// estimate of its largest rank (weights, gradients and AdamW moments, the activations of
    /// the micro-batches in flight, the logits, the prefetched token batches; see
    /// [`JobSpec::memory_estimate`]) is larger. 0 = this machine's memory (`MemTotal`) divided
    /// among the ranks on it, checked by `gantry launch` and `gantry rank`.
    pub max_memory_gib: f64,
    /// How idle OpenMP threads wait: `auto` (the launcher decides from ranks, threads and
    /// cores: sleep where ranks crowd the cores, libgomp's default where one rank owns them),
    /// `passive` (sleep) or `active` (spin). Applied by the launcher as `OMP_WAIT_POLICY`
    /// (`gantry launch --local`, `gantry submit`); an `OMP_WAIT_POLICY` already in the ranks'
    /// environment wins. Each rank logs the policy it runs with.
    pub omp_wait: OmpWait,
}

impl Default for TrainSpec {
    fn default() -> Self {
        TrainSpec {
            steps: 100,
            global_batch: 16,
            micro_batch: 4,
            seed: 42,
            device: DeviceSpec::Cpu,
            eval_every: 0,
            eval_batches: 4,
            threads: 0,
            sample_tokens: 0,
            stop_after: 0,
            max_memory_gib: 0.0,
            omp_wait: OmpWait::Auto,
        }
    }
}

impl TrainSpec {
    /// The rules of this section alone: batches of at least one sample, a stop within the
    /// run, a memory limit that is a number. Whether the batch divides over DP is
    /// [`JobSpec::validate`](super::JobSpec::validate)'s.
    pub fn validate(&self) -> Result<(), SpecError> {
        for (field, v) in [
            ("train.global_batch", self.global_batch),
            ("train.micro_batch", self.micro_batch),
        ] {
            if v == 0 {
                return Err(invalid(field, "must be at least 1"));
            }
        }
        if self.stop_after > self.steps {
            return Err(invalid(
                "train.stop_after",
                format!("{} is past train.steps {}", self.stop_after, self.steps),
            ));
        }
        let limit = self.max_memory_gib;
        if !(limit.is_finite() && limit >= 0.0) {
            return Err(invalid(
                "train.max_memory_gib",
                format!("{} is not a number of GiB (0 = this machine's memory)", num(limit)),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::invalid_field as field;

    #[test]
    fn each_section_refuses_its_own_fields() {
        DataSpec::default().validate().unwrap();
        OptimSpec::default().validate().unwrap();
        TrainSpec::default().validate().unwrap();
        let data = DataSpec {
            valid_fraction: 1.0,
            ..DataSpec::default()
        };
        assert_eq!(field(data.validate().unwrap_err()), "data.valid_fraction");
        for (optim, want) in [
            (
                OptimSpec {
                    min_lr: 1.0,
                    ..OptimSpec::default()
                },
                "optim.lr",
            ),
            (
                OptimSpec {
                    lr: f64::NAN,
                    ..OptimSpec::default()
                },
                "optim.lr",
            ),
            (
                OptimSpec {
                    beta2: 1.0,
                    ..OptimSpec::default()
                },
                "optim.beta2",
            ),
        ] {
            assert_eq!(field(optim.validate().unwrap_err()), want);
        }
        for (train, want) in [
            (
                TrainSpec {
                    micro_batch: 0,
                    ..TrainSpec::default()
                },
                "train.micro_batch",
            ),
            (
                TrainSpec {
                    stop_after: 101,
                    ..TrainSpec::default()
                },
                "train.stop_after",
            ),
            (
                TrainSpec {
                    max_memory_gib: f64::INFINITY,
                    ..TrainSpec::default()
                },
                "train.max_memory_gib",
            ),
        ] {
            assert_eq!(field(train.validate().unwrap_err()), want);
        }
    }

    fn data(overrides: &[&str]) -> Result<DataSpec, String> {
        let o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        let spec = crate::spec::JobSpec::parse("", "job.toml", &o).map_err(|e| e.to_string())?;
        spec.data.validate().map_err(|e| e.to_string())?;
        Ok(spec.data)
    }

    #[test]
    fn the_data_cache_budget_is_gb_at_least_zero() {
        assert_eq!(data(&[]).unwrap().cache_budget(), None, "no budget by default");
        assert_eq!(data(&["data.cache_gb=0.0"]).unwrap().cache_budget(), None);
        assert_eq!(data(&["data.cache_gb=0.25"]).unwrap().cache_budget(), Some(250_000_000));
        for bad in ["data.cache_gb=-1.0", "data.cache_gb=inf", "data.cache_gb=nan"] {
            let e = data(&[bad]).unwrap_err();
            assert!(e.contains("data.cache_gb"), "{bad}: {e}");
        }
        // The resolved spec keeps it; the stream the binary sets is not part of it.
        let spec = crate::spec::JobSpec::parse("", "job.toml", &["data.cache_gb=2.5".into()]).unwrap();
        let back = crate::spec::JobSpec::parse(&spec.to_toml(), "spec.toml", &[]).unwrap();
        assert_eq!(back.data.cache_gb, 2.5);
        assert!(back.data.stream.is_none());
    }
}
