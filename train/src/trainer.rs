//! One rank's training run as a recipe. Setup: the communicators of the layout, this rank's
//! stage of the model, data parallelism and AdamW ([`crate::data_parallel`]), checkpointing
//! and resume ([`crate::checkpointing`]), the data ([`crate::feed`]) and the reporter
//! ([`crate::reporter`]). Then per step: micro-batches through the pipeline schedule (the DP
//! buckets start as units finish backward), `finish_step` (tied embedding, global norm,
//! clipping, AdamW, ZeRO-1 gather), the step's loss, validation every K steps, a checkpoint
//! when due, metrics. The loss and the norm stay on the device until `finish_step` has queued
//! the update, and are then read together: one host synchronization per step. Where the rank sits ([`RankPlace`]) and what its launcher said
//! ([`RunContext`]) come in as arguments: nothing here reads the environment.

use crate::checkpointing::{Checkpointing, Resumed, job_state, rank_state};
use crate::comm::{CommClock, TensorComm};
use crate::data_parallel::{DataParallel, DataParallelConfig};
use crate::error::TrainError;
use crate::feed::DataFeed;
use crate::metrics::{CommittedSave, RunSummary, StepMetrics};
use crate::model::{MicroBatch, Model, StagePlan};
use crate::optim::{AdamState, learning_rate};
use crate::pipeline::partition_layers;
use crate::pipeline::{StepIo, run_schedule};
use crate::place::RankPlace;
use crate::reporter::Reporter;
use crate::run_context::RunContext;
use crate::schedule::{MAX_MICRO_BATCHES, Op, forward_schedule, train_schedule};
use crate::spec::JobSpec;
use gantry_checkpoint::SaveReport;
use gantry_collectives::layout::Dim;
use gantry_collectives::{Communicator, Fabric, ReduceOp};
use std::path::Path;
use std::time::Instant;
use tch::{Kind, Tensor};

/// Train per `spec` as `place` (which must be this rank of `fabric`), writing metrics under
/// `run_dir` when this rank reports. Returns the run summary (meaningful on the reporting rank).
pub fn train(
    spec: &JobSpec,
    fabric: &Fabric,
    place: &RankPlace,
    context: &RunContext,
    run_dir: &Path,
) -> Result<RunSummary, TrainError> {
    train_observed(spec, fabric, place, context, run_dir, &mut |_| {})
}

/// As [`train`], calling `on_commit(step)` on rank 0 as each checkpoint commits (the
/// registration hook; it must not block for long).
pub fn train_observed(
    spec: &JobSpec,
    fabric: &Fabric,
    place: &RankPlace,
    context: &RunContext,
    run_dir: &Path,
    on_commit: &mut dyn FnMut(u64),
) -> Result<RunSummary, TrainError> {
    check_place(fabric, place)?;
    spec.validate(place.layout.world())?;
    let mut rank = Rank::build(spec, fabric, place, context)?;
    let mut ckpt = Checkpointing::start_agreed(spec, place, &context.s3, context.fence(), &mut rank.comms.world)?;
    if let Some(c) = ckpt.as_mut() {
        // The trainer calls `before_update` each step, so a snapshot's copy off the GPU may
        // overlap the next step's forward and backward.
        c.defer_update_fence();
    }
    let resumed = match &ckpt {
        Some(c) => rank.resume(c)?,
        None => None,
    };
    let start_step = resumed.as_ref().map_or(0, |r| r.step);
    let end_step = end_step(spec);
    if resumed.is_some() && start_step >= end_step {
        // Every rank resumed the same step, so every rank returns here.
        return nothing_to_train(spec, start_step, end_step);
    }
    let data_options = context.dataset_options(spec.model.vocab_size as u64);
    let saved_cursor = resumed.as_ref().and_then(|r| r.cursor.as_ref());
    let mut feed = DataFeed::open(spec, place, start_step, saved_cursor, &data_options)?;
    let mut reporter = Reporter::new(spec, place, context, run_dir, start_step..end_step)?;
    let job_id = context.job_id_or_dir(run_dir);
    let run_start = Instant::now();
    for step in start_step..end_step {
        let mut metrics = rank.step(step, &feed, &mut reporter, ckpt.as_mut())?;
        feed.step_done()?;
        if let Some(c) = ckpt.as_mut() {
            let done = step + 1;
            let report = if c.due(done, done == end_step) {
                let job = job_state(spec, metrics.tokens, feed.cursor(), &job_id);
                let (stall_s, previous) = c.save(
                    done,
                    &rank.model,
                    &rank.dp,
                    &rank.states,
                    place,
                    job,
                    rank_state(spec, place),
                )?;
                metrics.ckpt_stall_ms = Some(stall_s * 1e3);
                previous
            } else {
                c.poll()?
            };
            metrics.ckpt_committed = report.as_ref().map(|r| committed(place, r, on_commit));
        }
        reporter.step(&metrics)?;
    }
    if let Some(c) = ckpt.as_mut()
        && let Some(r) = c.finish()?
    {
        tracing::info!(
            rank = place.rank,
            step = r.step,
            bytes = r.bytes,
            save_s = r.commit_s,
            "checkpoint committed"
        );
        reporter.committed_after_end(&committed(place, &r, on_commit))?;
    }
    let mut summary = reporter.finish()?;
    tracing::info!(
        rank = place.rank,
        seconds = run_start.elapsed().as_secs_f64(),
        "training done"
    );
    if spec.train.sample_tokens > 0 {
        let comms = &mut rank.comms;
        // The feed's options: a streamed dataset reads through the same stream.
        summary.samples = crate::generate::sample(
            spec,
            &rank.model,
            &mut comms.tp,
            &mut comms.pp,
            place,
            &feed.dataset_options(),
        )?;
    }
    Ok(summary)
}

/// The place a rank was given must be its own: the same world and rank as the fabric it joined.
fn check_place(fabric: &Fabric, place: &RankPlace) -> Result<(), TrainError> {
    if place.rank != fabric.rank() || place.layout.world() != fabric.world_size() {
        return Err(TrainError::Bootstrap(format!(
            "rank {} of {} ranks was asked to train as rank {} of a {} layout",
            fabric.rank(),
            fabric.world_size(),
            place.rank,
            place.layout
        )));
    }
    Ok(())
}

/// The step this run stops after: `train.stop_after` if set, else `train.steps`.
fn end_step(spec: &JobSpec) -> u64 {
    if spec.train.stop_after > 0 {
        spec.train.stop_after
    } else {
        spec.train.steps
    }
}

/// A committed save as `metrics.jsonl` records it; rank 0 tells the registration hook.
fn committed(place: &RankPlace, r: &SaveReport, on_commit: &mut dyn FnMut(u64)) -> CommittedSave {
    if place.rank == 0 {
        on_commit(r.step);
    }
    CommittedSave {
        step: r.step,
        bytes: r.bytes,
        write_s: r.write_s,
        save_s: r.commit_s,
    }
}

/// A checkpoint at or past the step this run ends at: past it is refused (its loss and
/// weights belong to a longer run); at it, there is nothing to do, and the summary says so
/// with no loss (none was measured).
fn nothing_to_train(spec: &JobSpec, step: u64, end: u64) -> Result<RunSummary, TrainError> {
    let field = if spec.train.stop_after > 0 {
        "train.stop_after"
    } else {
        "train.steps"
    };
    if step > end {
        return Err(TrainError::ResumedPastEnd { step, end, field });
    }
    tracing::info!(
        step,
        "the checkpoint is at step {step}, where this run ends ({field} = {end}): nothing to train"
    );
    Ok(RunSummary {
        steps: step,
        final_loss: None,
        params: spec.model.num_params(),
        ..RunSummary::default()
    })
}

struct Comms {
    tp: TensorComm,
    pp: TensorComm,
    /// Small data-parallel values on the main thread (losses); gradients use their own thread.
    dp_main: TensorComm,
    world: TensorComm,
}

/// This rank's communicators, plus the two data parallelism owns: the gradients' DP group
/// (driven from its own thread) and the tied embedding's group of the pipeline's ends.
fn build_comms(
    fabric: &Fabric,
    place: &RankPlace,
    tied: bool,
    clock: &CommClock,
) -> Result<(Comms, Communicator, TensorComm), TrainError> {
    let l = &place.layout;
    let r = place.rank;
    // Groups that carry tensors get an NCCL communicator on a CUDA device (made collectively,
    // in the same order on every rank); `dp-main` carries host values only.
    let device = place.device;
    let group = |dim: Dim, name: &str| -> Result<TensorComm, TrainError> {
        let members = l.group(dim, r);
        let c = fabric.group(&format!("{name}/{}", l.color(dim, r)), members)?;
        TensorComm::for_device(Some(c), clock.clone(), device)
    };
    let tp = group(Dim::Tp, "tp")?;
    let pp = group(Dim::Pp, "pp")?;
    let dp_main = fabric.group(&format!("dp-main/{}", l.color(Dim::Dp, r)), l.group(Dim::Dp, r))?;
    let dp_main = TensorComm::new(Some(dp_main), clock.clone());
    let dp_grads = fabric.group(&format!("dp-grads/{}", l.color(Dim::Dp, r)), l.group(Dim::Dp, r))?;
    // The global norm's sum of squares is a device tensor.
    let world = TensorComm::for_device(Some(fabric.world()), clock.clone(), device)?;
    let embed = if tied && l.pp() > 1 && (place.first_stage() || place.last_stage()) {
        let pp_members = l.group(Dim::Pp, r);
        let members = vec![pp_members[0], pp_members[l.pp() - 1]];
        let key = format!("embed/{}", l.color(Dim::Pp, r));
        TensorComm::for_device(Some(fabric.group(&key, members)?), clock.clone(), device)?
    } else {
        TensorComm::new(None, clock.clone())
    };
    let comms = Comms { tp, pp, dp_main, world };
    Ok((comms, dp_grads, embed))
}

/// A rank ready to train: its stage of the model, its communicators, data parallelism and
/// the AdamW state of each bucket.
struct Rank<'a> {
    spec: &'a JobSpec,
    place: &'a RankPlace,
    model: Model,
    comms: Comms,
    dp: DataParallel,
    states: Vec<AdamState>,
    clock: CommClock,
    /// This stage's program for a training step.
    ops: Vec<Op>,
    /// Shape of the activations exchanged between stages.
    act_shape: Vec<i64>,
    micro: usize,
    tokens_per_step: u64,
}

impl<'a> Rank<'a> {
    fn build(
        spec: &'a JobSpec,
        fabric: &Fabric,
        place: &'a RankPlace,
        context: &RunContext,
    ) -> Result<Rank<'a>, TrainError> {
        let micro = spec.micro_batches();
        if micro >= MAX_MICRO_BATCHES {
            return Err(TrainError::Internal(format!(
                "{micro} micro-batches per step is more than {MAX_MICRO_BATCHES}"
            )));
        }
        let clock = CommClock::default();
        let (comms, dp_grads, embed) = build_comms(fabric, place, spec.model.tie_embeddings, &clock)?;
        let mut model = build_stage(spec, place)?;
        model.fused = context.fused_ops;
        let config = DataParallelConfig {
            zero1: spec.parallel.zero1,
            bucket_bytes: (spec.parallel.bucket_mb * 1024.0 * 1024.0) as usize,
        };
        let dp = DataParallel::new(&model, place, dp_grads, embed, &config, &clock)?;
        let seq = spec.model.seq_len;
        Ok(Rank {
            states: dp.adamw_states(context.adamw),
            ops: train_schedule(spec.parallel.schedule, place.stage, place.layout.pp(), micro),
            act_shape: vec![spec.train.micro_batch as i64, seq as i64, spec.model.d_model as i64],
            tokens_per_step: (spec.train.global_batch * seq) as u64,
            spec,
            place,
            model,
            comms,
            dp,
            clock,
            micro,
        })
    }

    fn resume(&mut self, c: &Checkpointing) -> Result<Option<Resumed>, TrainError> {
        let (spec, place) = (self.spec, self.place);
        c.resume_requested(
            spec,
            &self.model,
            &self.dp,
            &mut self.states,
            place,
            &mut self.comms.world,
        )
    }

    /// One training step (`step` counts from 0): forward and backward, the update, the loss,
    /// validation when due. The checkpoint fields of the metrics are the caller's.
    fn step(
        &mut self,
        step: u64,
        feed: &DataFeed,
        reporter: &mut Reporter,
        ckpt: Option<&mut Checkpointing>,
    ) -> Result<StepMetrics, TrainError> {
        let spec = self.spec;
        let t0 = Instant::now();
        self.clock.take();
        let batches = feed.next_step(&mut |samples| reporter.saw_samples(step + 1, samples))?;
        let loss_sum = self.forward_backward(&batches)?;
        let update_start = Instant::now();
        let lr = learning_rate(&spec.optim, step, spec.train.steps);
        if let Some(c) = ckpt {
            // A GPU snapshot still copying the weights on its side stream must finish before
            // the update overwrites them (forward and backward above overlapped it).
            c.before_update()?;
        }
        let stats = self.dp.finish_step(
            &mut self.states,
            &mut self.comms.world,
            &spec.optim,
            lr,
            step,
            &loss_sum,
        )?;
        // No device synchronize: `finish_step`'s one read of the loss and norm came after the
        // update in the compute stream's order, so the step's time is complete without a
        // second host wait.
        let loss = self.step_loss(stats.loss_sum, step)?;
        let step_s = t0.elapsed().as_secs_f64();
        let update_s = update_start.elapsed().as_secs_f64();
        let comm_s = self.clock.take();
        let eval_due = spec.train.eval_every > 0 && (step + 1).is_multiple_of(spec.train.eval_every);
        let val_loss = if eval_due || step + 1 == spec.train.steps {
            self.evaluate(feed)?
        } else {
            None
        };
        let tokens_per_s = self.tokens_per_step as f64 / step_s;
        Ok(StepMetrics {
            step: step + 1,
            loss,
            lr,
            grad_norm: stats.grad_norm,
            tokens: self.tokens_per_step * (step + 1),
            tokens_per_s,
            step_ms: step_s * 1e3,
            comm_ms: comm_s * 1e3,
            update_ms: update_s * 1e3,
            mfu: reporter.mfu(tokens_per_s),
            val_loss,
            ckpt_stall_ms: None,
            ckpt_committed: None,
        })
    }

    /// Run the step's pipeline program; the last micro-batch's finished units hand their
    /// buckets to data parallelism. Returns the sum of the micro-batch losses, on the device
    /// and not read (see [`run_schedule`]).
    fn forward_backward(&mut self, batches: &[MicroBatch]) -> Result<Tensor, TrainError> {
        self.dp.reset()?;
        let micro = self.micro;
        let mut io = StepIo {
            model: &self.model,
            tp: &mut self.comms.tp,
            pp: &mut self.comms.pp,
            batches,
            act_shape: self.act_shape.clone(),
            device: self.place.device,
            autocast: self.place.on_gpu(),
            loss_scale: 1.0 / micro as f64,
        };
        let (dp, model) = (&mut self.dp, &self.model);
        run_schedule(&mut io, &self.ops, true, &mut |mb, u| {
            if mb + 1 == micro {
                dp.unit_done(model, u)?;
            }
            Ok(())
        })
    }

    /// The step's loss from this rank's micro-batch loss sum as read after the update: mean
    /// over micro-batches, then over data-parallel ranks (known on the last stage only; a
    /// non-finite loss stops the run there).
    fn step_loss(&mut self, loss_sum: f64, step: u64) -> Result<f64, TrainError> {
        let mut loss = [loss_sum / self.micro as f64];
        if self.place.last_stage() {
            self.comms.dp_main.all_reduce_f64(&mut loss, ReduceOp::Avg)?;
            if !loss[0].is_finite() {
                return Err(TrainError::NonFiniteLoss {
                    rank: self.place.rank,
                    step,
                    loss: loss[0],
                });
            }
        }
        Ok(loss[0])
    }

    /// Mean validation loss over `eval_batches` global batches (the same batches every time).
    /// Returns `Some` on the last stage.
    fn evaluate(&mut self, feed: &DataFeed) -> Result<Option<f64>, TrainError> {
        let spec = self.spec;
        if spec.data.valid_fraction == 0.0 {
            return Ok(None);
        }
        let ops = forward_schedule(self.place.stage, self.place.layout.pp(), self.micro);
        let mut pass = feed.valid_pass();
        // Summed on the device and read once, at the end.
        let mut total = Tensor::zeros([], (Kind::Double, self.place.device));
        for _ in 0..spec.train.eval_batches {
            let batches = pass.next_step()?;
            let mut io = StepIo {
                model: &self.model,
                tp: &mut self.comms.tp,
                pp: &mut self.comms.pp,
                batches: &batches,
                act_shape: self.act_shape.clone(),
                device: self.place.device,
                autocast: self.place.on_gpu(),
                loss_scale: 1.0,
            };
            let loss_sum = tch::no_grad(|| run_schedule(&mut io, &ops, false, &mut |_, _| Ok(())))?;
            total += loss_sum / self.micro as f64;
        }
        if !self.model.plan.last {
            return Ok(None);
        }
        let mut mean = [total.f_double_value(&[])? / spec.train.eval_batches.max(1) as f64];
        self.comms.dp_main.all_reduce_f64(&mut mean, ReduceOp::Avg)?;
        Ok(Some(mean[0]))
    }
}

/// This rank's pipeline stage of the model: its layers, its tensor-parallel slice.
fn build_stage(spec: &JobSpec, place: &RankPlace) -> Result<Model, TrainError> {
    let pp = place.layout.pp();
    let ranges = partition_layers(&spec.model, pp, &spec.parallel.stage_layers);
    let plan = StagePlan {
        first: place.first_stage(),
        last: place.last_stage(),
        layers: ranges[place.stage].clone(),
    };
    let model = Model::build(
        &spec.model,
        plan.clone(),
        place.layout.tp(),
        place.tp_rank,
        spec.train.seed,
        place.device,
    )?;
    tracing::info!(
        rank = place.rank,
        dp = place.dp_rank,
        tp = place.tp_rank,
        stage = place.stage,
        layers = ?plan.layers,
        params = model.params.numel(),
        "stage built"
    );
    Ok(model)
}
