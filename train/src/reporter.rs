//! What a rank tells the outside about its run: `metrics.jsonl` (the reporting rank only,
//! [`crate::metrics`]), the per-rank progress file a worker watches ([`crate::progress`]),
//! the samples log (`samples-rank-<r>.jsonl`, with `GANTRY_LOG_SAMPLES`) and the run summary
//! with its means. The trainer hands it each step's [`StepMetrics`]; it owns every file.

use crate::error::TrainError;
use crate::metrics::{CommittedSave, H200_PEAK_FLOPS, MetricsWriter, RunSummary, StepMetrics};
use crate::place::RankPlace;
use crate::progress::{Progress, ProgressFile};
use crate::run_context::RunContext;
use crate::spec::JobSpec;
use gantry_sharding::sampler::SampleRef;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// Which sample of which epoch this rank trained on at each step.
struct SampleLog {
    path: PathBuf,
    dp_rank: usize,
    /// (step, epoch, sample)
    seen: Vec<(u64, u64, u64)>,
}

/// Sums over the steps the summary's means count.
#[derive(Default)]
struct Sums {
    tokens_per_s: f64,
    step_ms: f64,
    comm_ms: f64,
    update_ms: f64,
}

pub struct Reporter {
    metrics: Option<MetricsWriter>,
    progress: Option<ProgressFile>,
    samples: Option<SampleLog>,
    /// Only the last stage knows the loss.
    last_stage: bool,
    steps: Range<u64>,
    sums: Sums,
    summary: RunSummary,
    /// Model FLOPs per token and the world size, on a GPU (MFU); `None` on the CPU.
    mfu_basis: Option<(f64, usize)>,
}

impl Reporter {
    /// The reporter of a run that trains `steps` (a resumed run starts past 0). The reporting
    /// rank (re)opens `metrics.jsonl` under `run_dir` for appending.
    pub fn new(
        spec: &JobSpec,
        place: &RankPlace,
        context: &RunContext,
        run_dir: &Path,
        steps: Range<u64>,
    ) -> Result<Reporter, TrainError> {
        let metrics = if place.reports() {
            Some(MetricsWriter::create(&run_dir.join("metrics.jsonl"))?)
        } else {
            None
        };
        let samples = (context.log_samples && place.first_stage() && place.tp_rank == 0).then(|| SampleLog {
            path: run_dir.join(format!("samples-rank-{}.jsonl", place.rank)),
            dp_rank: place.dp_rank,
            seen: Vec::new(),
        });
        Ok(Reporter {
            metrics,
            progress: context.progress_file.clone().map(ProgressFile::new),
            samples,
            last_stage: place.last_stage(),
            summary: RunSummary {
                params: spec.model.num_params(),
                steps: steps.start,
                ..RunSummary::default()
            },
            steps,
            sums: Sums::default(),
            mfu_basis: place
                .on_gpu()
                .then(|| (spec.model.flops_per_token(), place.layout.world())),
        })
    }

    /// Model FLOPs utilization at `tokens_per_s` (GPU runs only).
    pub fn mfu(&self, tokens_per_s: f64) -> Option<f64> {
        self.mfu_basis
            .map(|(flops, world)| flops * tokens_per_s / H200_PEAK_FLOPS / world as f64)
    }

    /// Step `step` (counting from 1) trains on `samples`.
    pub fn saw_samples(&mut self, step: u64, samples: &[SampleRef]) {
        if let Some(log) = self.samples.as_mut() {
            log.seen.extend(samples.iter().map(|s| (step, s.epoch, s.sample)));
        }
    }

    /// A finished step: counted in the means, written to `metrics.jsonl` and the progress file.
    pub fn step(&mut self, m: &StepMetrics) -> Result<(), TrainError> {
        // The first step of a run (compilation, allocation, prefetch warm-up) is left out of
        // the means unless it is the only one.
        if m.step - 1 > self.steps.start || self.steps.end - self.steps.start == 1 {
            self.sums.tokens_per_s += m.tokens_per_s;
            self.sums.step_ms += m.step_ms;
            self.sums.comm_ms += m.comm_ms;
            self.sums.update_ms += m.update_ms;
        }
        if let Some(w) = self.metrics.as_mut() {
            w.write(m)?;
        }
        if let Some(f) = self.progress.as_mut() {
            f.write(&Progress {
                step: m.step,
                step_ms: m.step_ms,
                tokens_per_s: m.tokens_per_s,
                // Only the last stage computes the loss (averaged over DP, the same on its TP
                // ranks); earlier stages never learn it, so they write 0.0 rather than pay a
                // broadcast per step for a progress file.
                loss: if self.last_stage { m.loss } else { 0.0 },
            });
        }
        self.summary.steps = m.step;
        self.summary.final_loss = Some(m.loss);
        self.summary.tokens = m.tokens;
        if m.val_loss.is_some() {
            self.summary.val_loss = m.val_loss;
        }
        Ok(())
    }

    /// A save that committed after the last step: a line of its own in `metrics.jsonl`.
    pub fn committed_after_end(&mut self, c: &CommittedSave) -> Result<(), TrainError> {
        match self.metrics.as_mut() {
            Some(w) => w.write_committed(c),
            None => Ok(()),
        }
    }

    /// Write the samples log and return the summary with its means (samples not yet drawn).
    pub fn finish(self) -> Result<RunSummary, TrainError> {
        if let Some(log) = &self.samples {
            let text: String = log
                .seen
                .iter()
                .map(|(s, e, i)| format!("{{\"step\":{s},\"dp\":{},\"epoch\":{e},\"sample\":{i}}}\n", log.dp_rank))
                .collect();
            std::fs::write(&log.path, text).map_err(|e| TrainError::io(&log.path, e))?;
        }
        let counted = (self.steps.end - self.steps.start).saturating_sub(1).max(1) as f64;
        let mut summary = self.summary;
        summary.mean_tokens_per_s = self.sums.tokens_per_s / counted;
        summary.mean_step_ms = self.sums.step_ms / counted;
        summary.mean_update_ms = self.sums.update_ms / counted;
        summary.comm_share = if self.sums.step_ms > 0.0 {
            self.sums.comm_ms / self.sums.step_ms
        } else {
            0.0
        };
        summary.mean_mfu = self
            .mfu_basis
            .map(|(flops, world)| flops * summary.mean_tokens_per_s / H200_PEAK_FLOPS / world as f64);
        Ok(summary)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gantry_collectives::ParallelLayout;
    use tch::Device;

    fn metrics(step: u64, step_ms: f64) -> StepMetrics {
        StepMetrics {
            step,
            loss: 5.0 - step as f64,
            tokens: 100 * step,
            tokens_per_s: 1000.0 / step_ms,
            step_ms,
            comm_ms: step_ms / 4.0,
            update_ms: 1.0,
            ..StepMetrics::default()
        }
    }

    #[test]
    fn the_first_step_stays_out_of_the_means_and_files_are_written() {
        let dir = std::env::temp_dir().join(format!("gantry-reporter-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let place = RankPlace::new(ParallelLayout::new(1, 1, 1, 1).unwrap(), 0, Device::Cpu);
        let context = RunContext {
            log_samples: true,
            progress_file: Some(dir.join("progress.json")),
            ..RunContext::default()
        };
        let mut r = Reporter::new(&JobSpec::default(), &place, &context, &dir, 2..5).unwrap();
        assert_eq!(r.mfu(1e9), None);
        r.saw_samples(3, &[SampleRef { epoch: 0, sample: 7 }]);
        for (step, ms) in [(3, 100.0), (4, 10.0), (5, 30.0)] {
            r.step(&metrics(step, ms)).unwrap();
        }
        let s = r.finish().unwrap();
        assert_eq!((s.steps, s.final_loss, s.tokens), (5, Some(0.0), 500));
        assert_eq!(s.mean_step_ms, 20.0);
        assert_eq!(s.comm_share, 0.25);
        let log = std::fs::read_to_string(dir.join("samples-rank-0.jsonl")).unwrap();
        assert_eq!(log, "{\"step\":3,\"dp\":0,\"epoch\":0,\"sample\":7}\n");
        let progress: Progress = serde_json::from_slice(&std::fs::read(dir.join("progress.json")).unwrap()).unwrap();
        assert_eq!(progress.step, 5);
        assert_eq!(
            crate::metrics::read_metrics(&dir.join("metrics.jsonl")).unwrap().len(),
            3
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
