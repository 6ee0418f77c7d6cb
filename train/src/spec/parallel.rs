//! The `[parallel]` section: the DP × TP × PP degrees, the pipeline schedule and the
//! data-parallel settings. The degrees are checked by [`ParallelLayout::new`], the one place
//! that knows the layout's rules, so a spec and a running rank refuse a layout the same way.

use super::{SpecError, invalid, num, seconds};
use gantry_collectives::layout::{Dim, LayoutError, ParallelLayout};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// One forward, one backward in the steady state: at most `pp` micro-batches in flight.
    #[serde(rename = "1f1b")]
    OneFOneB,
    /// All forwards, then all backwards: simpler, holds every micro-batch's activations.
    Gpipe,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ParallelSpec {
    pub dp: usize,
    pub tp: usize,
    pub pp: usize,
    pub schedule: Schedule,
    /// Layers per pipeline stage; empty = balanced by parameter count.
    pub stage_layers: Vec<usize>,
    /// ZeRO-1: shard optimizer state over data-parallel ranks.
    pub zero1: bool,
    /// Gradient bucket size for the data-parallel all-reduce, MiB.
    pub bucket_mb: f64,
    /// Deadline of every collective call, seconds.
    pub timeout_s: f64,
}

impl Default for ParallelSpec {
    fn default() -> Self {
        ParallelSpec {
            dp: 1,
            tp: 1,
            pp: 1,
            schedule: Schedule::OneFOneB,
            stage_layers: Vec::new(),
            zero1: false,
            bucket_mb: 25.0,
            timeout_s: 300.0,
        }
    }
}

impl ParallelSpec {
    /// The layout of these degrees over `world` ranks, refused with [`ParallelLayout::new`]'s
    /// error (which names each factor) under the field it concerns.
    pub fn layout(&self, world: usize) -> Result<ParallelLayout, SpecError> {
        ParallelLayout::new(world, self.dp, self.tp, self.pp).map_err(layout_error)
    }

    /// The rules of this section alone: the layout over `world` ranks, one stage size per
    /// stage, a positive bucket size, a bounded deadline. Whether the model splits over
    /// these degrees is [`JobSpec::validate`](super::JobSpec::validate)'s.
    pub fn validate(&self, world: usize) -> Result<(), SpecError> {
        self.layout(world)?;
        if !self.stage_layers.is_empty() && self.stage_layers.len() != self.pp {
            return Err(invalid(
                "parallel.stage_layers",
                format!("{} entries for pp {}", self.stage_layers.len(), self.pp),
            ));
        }
        if !(self.bucket_mb.is_finite() && self.bucket_mb > 0.0) {
            return Err(invalid(
                "parallel.bucket_mb",
                format!("{} is not a positive number of MiB", num(self.bucket_mb)),
            ));
        }
        seconds("parallel.timeout_s", self.timeout_s)
    }
}

/// A degree of 0 is that degree's field's fault; a product that misses the world is the
/// section's.
fn layout_error(e: LayoutError) -> SpecError {
    let field = match e {
        LayoutError::ZeroDegree { dim: Dim::Dp, .. } => "parallel.dp",
        LayoutError::ZeroDegree { dim: Dim::Tp, .. } => "parallel.tp",
        LayoutError::ZeroDegree { dim: Dim::Pp, .. } => "parallel.pp",
        _ => "parallel",
    };
    invalid(field, e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invalid_field(e: SpecError) -> (&'static str, String) {
        match e {
            SpecError::Invalid { field, message } => (field, message),
            other => panic!("expected SpecError::Invalid, got {other:?}"),
        }
    }

    #[test]
    fn layout_errors_are_the_layouts_own_under_the_field_at_fault() {
        let p = ParallelSpec {
            dp: 2,
            tp: 2,
            ..ParallelSpec::default()
        };
        assert_eq!(p.layout(4).unwrap(), ParallelLayout::new(4, 2, 2, 1).unwrap());
        let (field, msg) = invalid_field(p.validate(2).unwrap_err());
        assert_eq!(field, "parallel");
        assert_eq!(msg, ParallelLayout::new(2, 2, 2, 1).unwrap_err().to_string());
        let zero_tp = ParallelSpec { tp: 0, ..p };
        let (field, msg) = invalid_field(zero_tp.validate(4).unwrap_err());
        assert_eq!(field, "parallel.tp");
        assert!(msg.contains("tp must be at least 1"), "{msg}");
    }

    #[test]
    fn stage_sizes_bucket_and_deadline_are_checked_here() {
        let ok = ParallelSpec {
            pp: 2,
            stage_layers: vec![1, 3],
            ..ParallelSpec::default()
        };
        ok.validate(2).unwrap();
        let cases = [
            (
                ParallelSpec {
                    stage_layers: vec![4],
                    ..ok.clone()
                },
                "parallel.stage_layers",
            ),
            (
                ParallelSpec {
                    bucket_mb: 0.0,
                    ..ok.clone()
                },
                "parallel.bucket_mb",
            ),
            (
                ParallelSpec {
                    timeout_s: f64::NAN,
                    ..ok.clone()
                },
                "parallel.timeout_s",
            ),
        ];
        for (spec, want) in cases {
            assert_eq!(invalid_field(spec.validate(2).unwrap_err()).0, want);
        }
    }
}
