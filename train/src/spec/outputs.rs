//! The `[checkpoint]` and `[registry]` sections: where the run's checkpoints go, what it
//! resumes from, and where committed checkpoints are registered as model versions.

use super::{SpecError, invalid, num, seconds};
use serde::{Deserialize, Serialize};

/// Where and when to save checkpoints, and what to resume from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointSpec {
    /// A local directory, `file:///…` or `s3://bucket/prefix` (S3 settings from the standard
    /// `AWS_*` environment variables). Empty = no checkpoints.
    pub dir: String,
    /// Save every this many steps (0 = only at the end of the run).
    pub every: u64,
    /// Save when the run ends (at `steps` or `stop_after`).
    pub at_end: bool,
    /// Keep the newest K committed checkpoints (0 = keep all) ...
    pub keep_last: usize,
    /// ... plus every step divisible by this (0 = none).
    pub keep_every: u64,
    /// Resume from `latest` or a step number; `auto` = the latest committed checkpoint if
    /// there is one, else start fresh; empty = start fresh.
    pub resume: String,
    /// Chunk objects are cut at about this many MiB.
    pub chunk_mb: f64,
    /// How long rank 0 waits for the other ranks' writes before giving up on a save.
    pub commit_timeout_s: f64,
}

impl Default for CheckpointSpec {
    fn default() -> Self {
        CheckpointSpec {
            dir: String::new(),
            every: 0,
            at_end: true,
            keep_last: 0,
            keep_every: 0,
            resume: String::new(),
            chunk_mb: 256.0,
            commit_timeout_s: 600.0,
        }
    }
}

impl CheckpointSpec {
    pub fn enabled(&self) -> bool {
        !self.dir.is_empty()
    }

    /// A resume target that parses and has a directory to come from, a positive chunk size,
    /// a bounded commit deadline.
    pub fn validate(&self) -> Result<(), SpecError> {
        let resume = &self.resume;
        if !resume.is_empty() && resume != "auto" && resume.parse::<gantry_checkpoint::Which>().is_err() {
            return Err(invalid(
                "checkpoint.resume",
                format!("{resume:?} is neither `latest`, `auto` nor a step number"),
            ));
        }
        if !resume.is_empty() && !self.enabled() {
            return Err(invalid("checkpoint.resume", "needs checkpoint.dir"));
        }
        if !(self.chunk_mb.is_finite() && self.chunk_mb > 0.0) {
            return Err(invalid(
                "checkpoint.chunk_mb",
                format!("{} is not a positive number of MiB", num(self.chunk_mb)),
            ));
        }
        seconds("checkpoint.commit_timeout_s", self.commit_timeout_s)
    }
}

/// Registering the run's committed checkpoints as versions of a model in a registry
/// (`gantry registry serve`); rank 0 does it in the background, so training never waits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistrySpec {
    /// The registry's address (`http://host:port`); empty = do not register.
    pub url: String,
    /// The model the checkpoints become versions of.
    pub model: String,
    /// `final`: the run's last committed checkpoint; `every`: each committed checkpoint.
    pub register: String,
    /// Move this alias (e.g. `staging`) to each new version; empty = none.
    pub alias: String,
    /// The environment variable that holds a write token.
    pub token_env: String,
}

impl Default for RegistrySpec {
    fn default() -> Self {
        RegistrySpec {
            url: String::new(),
            model: String::new(),
            register: "final".into(),
            alias: String::new(),
            token_env: "GANTRY_REGISTRY_TOKEN".into(),
        }
    }
}

impl RegistrySpec {
    pub fn enabled(&self) -> bool {
        !self.url.is_empty()
    }

    /// When registering: a model to register under and a known policy. That registering
    /// needs checkpoints is [`JobSpec::validate`](super::JobSpec::validate)'s.
    pub fn validate(&self) -> Result<(), SpecError> {
        if !self.enabled() {
            return Ok(());
        }
        if self.model.trim().is_empty() {
            return Err(invalid(
                "registry.model",
                "names the model the checkpoints become versions of",
            ));
        }
        if self.register != "final" && self.register != "every" {
            return Err(invalid(
                "registry.register",
                format!("{:?} is neither `final` nor `every`", self.register),
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
    fn checkpoint_and_registry_refuse_their_own_fields() {
        CheckpointSpec::default().validate().unwrap();
        RegistrySpec::default().validate().unwrap();
        let with_dir = CheckpointSpec {
            dir: "/tmp/ckpt".into(),
            ..CheckpointSpec::default()
        };
        for resume in ["auto", "latest", "12"] {
            CheckpointSpec {
                resume: resume.into(),
                ..with_dir.clone()
            }
            .validate()
            .unwrap();
        }
        for (spec, want) in [
            (
                CheckpointSpec {
                    resume: "soon".into(),
                    ..with_dir.clone()
                },
                "checkpoint.resume",
            ),
            (
                CheckpointSpec {
                    resume: "auto".into(),
                    ..CheckpointSpec::default()
                },
                "checkpoint.resume",
            ),
            (
                CheckpointSpec {
                    chunk_mb: f64::NAN,
                    ..with_dir.clone()
                },
                "checkpoint.chunk_mb",
            ),
            (
                CheckpointSpec {
                    commit_timeout_s: 0.0,
                    ..with_dir
                },
                "checkpoint.commit_timeout_s",
            ),
        ] {
            assert_eq!(field(spec.validate().unwrap_err()), want);
        }
        let registry = RegistrySpec {
            url: "http://127.0.0.1:1".into(),
            model: "m".into(),
            ..RegistrySpec::default()
        };
        registry.validate().unwrap();
        let no_model = RegistrySpec {
            model: " ".into(),
            ..registry.clone()
        };
        assert_eq!(field(no_model.validate().unwrap_err()), "registry.model");
        let bad_policy = RegistrySpec {
            register: "often".into(),
            ..registry
        };
        assert_eq!(field(bad_policy.validate().unwrap_err()), "registry.register");
    }
}
