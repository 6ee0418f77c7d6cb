//! One rank's training run, start to finish: join the fabric, build the communicators of the
//! layout, build this rank's slice of the model, then per step: micro-batches through the
//! pipeline schedule, data-parallel bucket sync (overlapped with backward), tied-embedding
//! sync, global-norm clipping, AdamW (ZeRO-1 optional), metrics; validation every K steps.

use crate::checkpointing::{Checkpointing, ResumeRequest, job_state};
use crate::comm::{CommClock, TensorComm};
use crate::error::TrainError;
use crate::grads::GradSync;
use crate::metrics::{CommittedSave, H200_PEAK_FLOPS, MetricsWriter, RunSummary, StepMetrics};
use crate::model::{MicroBatch, Model, StagePlan, partition_layers};
use crate::optim::{AdamImpl, AdamState, clip_coefficient, learning_rate, sum_of_squares};
use crate::pipeline::{StepIo, run_schedule};
use crate::progress::{Progress, ProgressFile};
use crate::schedule::{MAX_MICRO_BATCHES, forward_schedule, train_schedule};
use crate::spec::{DeviceSpec, JobSpec};
use gantry_checkpoint::Which;
use gantry_collectives::layout::{Coords, Dim};
use gantry_collectives::{Fabric, ParallelLayout, ReduceOp};
use gantry_sharding::gpt::{GptDataset, OpenOptions, Prefetcher, Split};
use gantry_sharding::sampler::Sampler;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// Everything a rank needs to know about where it sits.
pub struct RankPlace {
    pub rank: usize,
    pub layout: ParallelLayout,
    pub dp_rank: usize,
    pub tp_rank: usize,
    pub stage: usize,
}

/// The rank that writes `metrics.jsonl` and `summary.json`: the last pipeline stage (where the
/// loss is known), data- and tensor-parallel rank 0.
pub fn reporting_rank(layout: &ParallelLayout) -> usize {
    layout.rank_of(Coords {
        dp: 0,
        tp: 0,
        pp: layout.pp() - 1,
    })
}

impl RankPlace {
    pub fn reports(&self) -> bool {
        self.rank == reporting_rank(&self.layout)
    }
}

/// The validation split and its sampler (first and last stage only: the others read no data).
struct ValidSet {
    data: GptDataset,
    sampler: Sampler,
}

struct Comms {
    tp: TensorComm,
    pp: TensorComm,
    /// Small data-parallel values on the main thread (losses); gradients use their own thread.
    dp_main: TensorComm,
    world: TensorComm,
    /// First and last pipeline stage of the same (dp, tp) coordinates: the tied embedding.
    embed: TensorComm,
}

fn build_comms(
    fabric: &Fabric,
    place: &RankPlace,
    tied: bool,
    clock: &CommClock,
) -> Result<(Comms, Option<gantry_collectives::Communicator>), TrainError> {
    let l = &place.layout;
    let r = place.rank;
    let group = |dim: Dim, name: &str| -> Result<TensorComm, TrainError> {
        let members = l.group(dim, r);
        let c = fabric.group(&format!("{name}/{}", l.color(dim, r)), members)?;
        Ok(TensorComm::new(Some(c), clock.clone()))
    };
    let tp = group(Dim::Tp, "tp")?;
    let pp = group(Dim::Pp, "pp")?;
    let dp_main = group(Dim::Dp, "dp-main")?;
    let dp_grads = fabric.group(&format!("dp-grads/{}", l.color(Dim::Dp, r)), l.group(Dim::Dp, r))?;
    let world = TensorComm::new(Some(fabric.world()), clock.clone());
    let embed = if tied && l.pp() > 1 && (place.stage == 0 || place.stage + 1 == l.pp()) {
        let pp_members = l.group(Dim::Pp, r);
        let members = vec![pp_members[0], pp_members[l.pp() - 1]];
        let key = format!("embed/{}", l.color(Dim::Pp, r));
        TensorComm::new(Some(fabric.group(&key, members)?), clock.clone())
    } else {
        TensorComm::new(None, clock.clone())
    };
    Ok((
        Comms {
            tp,
            pp,
            dp_main,
            world,
            embed,
        },
        Some(dp_grads),
    ))
}

/// Token rows of a prefetched batch as model inputs and targets.
fn micro_batch(tokens: &[i64], rows: usize, seq_len: usize, device: Device) -> MicroBatch {
    let t = Tensor::from_slice(tokens).view([rows as i64, seq_len as i64 + 1]);
    MicroBatch {
        tokens: t.narrow(1, 0, seq_len as i64).to_device(device),
        targets: t.narrow(1, 1, seq_len as i64).contiguous().to_device(device),
    }
}

/// Middle pipeline stages read neither tokens nor targets: their units only see activations.
fn empty_batch() -> MicroBatch {
    MicroBatch {
        tokens: Tensor::zeros([0], (Kind::Int64, Device::Cpu)),
        targets: Tensor::zeros([0], (Kind::Int64, Device::Cpu)),
    }
}

pub fn device_of(spec: &JobSpec) -> Result<Device, TrainError> {
    match spec.train.device {
        DeviceSpec::Cpu => Ok(Device::Cpu),
        DeviceSpec::Cuda => {
            if tch::Cuda::is_available() {
                Ok(Device::Cuda(0))
            } else {
                Err(TrainError::Device(
                    "train.device = \"cuda\" but no CUDA device is visible (libtorch_cuda.so not loaded or no GPU)"
                        .into(),
                ))
            }
        }
    }
}

/// Train per `spec` as rank `fabric.rank()`, writing metrics under `run_dir` when this rank
/// reports. Returns the run summary (meaningful on the reporting rank).
pub fn train(spec: &JobSpec, fabric: &Fabric, run_dir: &Path) -> Result<RunSummary, TrainError> {
    train_observed(spec, fabric, run_dir, &mut |_| {})
}

/// As [`train`], calling `on_commit(step)` on rank 0 as each checkpoint commits (the
/// registration hook; it must not block for long).
pub fn train_observed(
    spec: &JobSpec,
    fabric: &Fabric,
    run_dir: &Path,
    on_commit: &mut dyn FnMut(u64),
) -> Result<RunSummary, TrainError> {
    spec.validate(fabric.world_size())?;
    let p = &spec.parallel;
    let layout =
        ParallelLayout::new(fabric.world_size(), p.dp, p.tp, p.pp).map_err(|e| TrainError::Bootstrap(e.to_string()))?;
    let coords = layout.coords(fabric.rank());
    let place = RankPlace {
        rank: fabric.rank(),
        layout,
        dp_rank: coords.dp,
        tp_rank: coords.tp,
        stage: coords.pp,
    };
    let device = device_of(spec)?;
    let autocast = device != Device::Cpu;
    let micro = spec.micro_batches();
    if micro >= MAX_MICRO_BATCHES {
        return Err(TrainError::Internal(format!(
            "{micro} micro-batches per step is more than {MAX_MICRO_BATCHES}"
        )));
    }
    let ranges = partition_layers(&spec.model, p.pp, &p.stage_layers);
    let plan = StagePlan {
        first: place.stage == 0,
        last: place.stage + 1 == p.pp,
        layers: ranges[place.stage].clone(),
    };
    let clock = CommClock::default();
    let (mut comms, dp_grads) = build_comms(fabric, &place, spec.model.tie_embeddings, &clock)?;
    let model = Model::build(&spec.model, plan.clone(), p.tp, place.tp_rank, spec.train.seed, device)?;
    tracing::info!(
        rank = place.rank,
        dp = place.dp_rank,
        tp = place.tp_rank,
        stage = place.stage,
        layers = ?plan.layers,
        params = model.params.numel(),
        "stage built"
    );
    let bucket_bytes = (p.bucket_mb * 1024.0 * 1024.0) as usize;
    let mut grads = GradSync::new(
        &model,
        dp_grads,
        p.zero1,
        place.tp_rank,
        place.rank,
        bucket_bytes,
        p.pp > 1,
    )?;
    let forced = AdamImpl::parse(std::env::var("GANTRY_ADAMW").ok().as_deref()).map_err(TrainError::Device)?;
    let adam_impl = AdamImpl::choose(forced);
    let mut states: Vec<AdamState> = grads
        .buckets
        .iter()
        .zip(&grads.flat.params)
        .map(|(b, values)| {
            // The master weights are the parameters' flat buffer (or this rank's ZeRO-1
            // shard of it): updating them in place updates the model.
            let r = b.shard(grads.zero, grads.dp_rank, grads.dp);
            AdamState::with_impl(values.narrow(0, r.start as i64, r.len() as i64), b.decay, adam_impl)
        })
        .collect();

    // Checkpoints: every rank agrees on an attempt id (rank 0's), so the committer never
    // mixes this run's writes with a crashed run's leftovers under the same step.
    let mut ckpt = if spec.checkpoint.enabled() {
        let mut id = [if place.rank == 0 { attempt_nonce() } else { 0.0 }];
        comms.world.all_reduce_f64(&mut id, ReduceOp::Sum)?;
        Checkpointing::start(spec, &place, &format!("{:013x}", id[0] as u64))?
    } else {
        None
    };
    let resumed = match &ckpt {
        Some(c) => {
            let which = match ResumeRequest::of(spec)? {
                ResumeRequest::Fresh => None,
                ResumeRequest::Open(w) => Some(w),
                ResumeRequest::Auto => auto_resume_step(c, &place, &mut comms.world)?.map(Which::Step),
            };
            c.resume(spec, which, &model, &grads, &mut states, &place)?
        }
        None => None,
    };
    let start_step = resumed.as_ref().map_or(0, |r| r.step);
    let end_step = if spec.train.stop_after > 0 {
        spec.train.stop_after
    } else {
        spec.train.steps
    };
    if resumed.is_some() && start_step >= end_step {
        // Every rank resumed the same step, so every rank returns here.
        return nothing_to_train(spec, start_step, end_step);
    }
    let job_id = std::env::var("GANTRY_JOB_ID").unwrap_or_else(|_| {
        run_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    });

    // Data: only the first stage (tokens) and the last (targets) read it.
    let needs_data = plan.first || plan.last;
    let seq = spec.model.seq_len;
    let split = |valid: bool| {
        let (f, s) = (spec.data.valid_fraction, spec.data.seed);
        if f == 0.0 {
            Split::All
        } else if valid {
            Split::Valid {
                valid_fraction: f,
                seed: s,
            }
        } else {
            Split::Train {
                valid_fraction: f,
                seed: s,
            }
        }
    };
    // Opened for the model's vocabulary: a token id the embedding cannot hold is an error
    // naming the shard, document and id before the first step (or, for a shard whose largest
    // id neither the manifest nor this host's dataset check recorded, on its first read).
    let opts = OpenOptions::for_vocab(spec.model.vocab_size as u64);
    let mut prefetch = None;
    // The data position after the last completed step (kept on data-reading ranks).
    let mut data_cursor = None;
    if needs_data {
        let ds = Arc::new(GptDataset::open_with(&spec.data.path, seq, split(false), &opts)?);
        let sampler = Sampler::new(ds.num_samples(), spec.data.seed, spec.train.global_batch)
            .map_err(gantry_sharding::gpt::DatasetError::from)?;
        let mut cursor = sampler.start(ds.data().fingerprint());
        cursor
            .advance(start_step)
            .map_err(gantry_sharding::gpt::DatasetError::from)?;
        if let Some(saved) = resumed.as_ref().and_then(|r| r.cursor.as_ref()) {
            // A checkpoint of this run's data resumes the same global stream; anything else
            // (another dataset, seed, sequence length or global batch) is refused by name.
            sampler
                .check_cursor(saved, ds.data().fingerprint())
                .map_err(gantry_sharding::gpt::DatasetError::from)?;
            if saved.consumed != cursor.consumed {
                return Err(TrainError::Internal(format!(
                    "checkpoint at step {start_step} says {} samples consumed, expected {}",
                    saved.consumed, cursor.consumed
                )));
            }
        }
        data_cursor = Some(cursor.clone());
        prefetch = Some(Prefetcher::spawn(
            ds,
            sampler,
            cursor,
            place.dp_rank,
            p.dp,
            micro,
            2 * micro,
        ));
    }
    // Built once, before training, so an unusable validation split fails at start.
    let valid = if needs_data && spec.data.valid_fraction > 0.0 {
        let data = GptDataset::open_with(&spec.data.path, seq, split(true), &opts)?;
        let sampler = Sampler::new(data.num_samples(), spec.data.seed, spec.train.global_batch)
            .map_err(gantry_sharding::gpt::DatasetError::from)?;
        Some(ValidSet { data, sampler })
    } else {
        None
    };

    let mut metrics = if place.reports() {
        Some(MetricsWriter::create(&run_dir.join("metrics.jsonl"))?)
    } else {
        None
    };
    let act_shape = vec![spec.train.micro_batch as i64, seq as i64, spec.model.d_model as i64];
    let ops = train_schedule(p.schedule, place.stage, p.pp, micro);
    let tokens_per_step = (spec.train.global_batch * seq) as u64;
    let mut summary = RunSummary {
        params: spec.model.num_params(),
        ..RunSummary::default()
    };
    let (mut sum_tps, mut sum_ms, mut sum_comm, mut sum_update) = (0.0, 0.0, 0.0, 0.0);
    let run_start = Instant::now();
    summary.steps = start_step;
    let log_samples = std::env::var_os("GANTRY_LOG_SAMPLES").is_some() && plan.first && place.tp_rank == 0;
    let mut progress_file = ProgressFile::from_env();
    let mut sample_log = Vec::new();
    for step in start_step..end_step {
        let t0 = Instant::now();
        clock.take();
        let batches: Vec<MicroBatch> = match &prefetch {
            Some(pf) => (0..micro)
                .map(|_| {
                    pf.next_batch().map(|b| {
                        if log_samples {
                            sample_log.extend(b.samples.iter().map(|s| (step + 1, s.epoch, s.sample)));
                        }
                        micro_batch(&b.tokens, b.samples.len(), seq, device)
                    })
                })
                .collect::<Result<_, _>>()?,
            None => (0..micro).map(|_| empty_batch()).collect(),
        };
        grads.reset();
        let loss_sum = {
            let mut io = StepIo {
                model: &model,
                tp: &mut comms.tp,
                pp: &mut comms.pp,
                batches: &batches,
                act_shape: act_shape.clone(),
                device,
                autocast,
                loss_scale: 1.0 / micro as f64,
            };
            let grads = &mut grads;
            let model = &model;
            run_schedule(&mut io, &ops, true, &mut |mb, u| {
                if mb + 1 == micro {
                    grads.unit_done(model, u)?;
                }
                Ok(())
            })?
        };
        let update_start = Instant::now();
        let wait = Instant::now();
        grads.finish()?;
        clock.add(wait.elapsed().as_secs_f64());

        // Tied embedding: first and last stage sum their gradients.
        for (b, bucket) in grads.buckets.iter().enumerate() {
            if bucket.tied {
                let g = grads.reduced[b].as_mut().expect("finished");
                comms.embed.all_reduce_(g, ReduceOp::Sum)?;
            }
        }
        // Global gradient norm over distinct gradient values: each bucket's sum of squares
        // stays on the device; their total is read once (one synchronization per step).
        let mut sumsq = [0f64];
        if grads.zero || place.dp_rank == 0 {
            let per_bucket: Vec<Tensor> = grads
                .buckets
                .iter()
                .zip(&grads.reduced)
                .filter(|(bucket, _)| bucket.counts_in_norm)
                .map(|(_, g)| sum_of_squares(g.as_ref().expect("finished")))
                .collect();
            if !per_bucket.is_empty() {
                sumsq[0] = Tensor::stack(&per_bucket, 0).sum(Kind::Double).double_value(&[]);
            }
        }
        comms.world.all_reduce_f64(&mut sumsq, ReduceOp::Sum)?;
        let grad_norm = sumsq[0].sqrt();
        let coef = clip_coefficient(grad_norm, spec.optim.grad_clip);
        let lr = learning_rate(&spec.optim, step, spec.train.steps);
        for (g, state) in grads.reduced.iter_mut().zip(states.iter_mut()) {
            let g = g.as_mut().expect("finished");
            if coef != 1.0 {
                // In place: the gradient buffer is ours and rewritten next step.
                let _ = g.g_mul_scalar_(coef);
            }
            state.try_update(g, &spec.optim, lr, step + 1)?;
        }
        if grads.zero {
            let shards = states.iter().map(|s| s.master.shallow_clone()).collect();
            let wait = Instant::now();
            grads.all_gather(shards)?;
            clock.add(wait.elapsed().as_secs_f64());
        }

        // The step's loss: mean over micro-batches, then over data-parallel ranks.
        let mut loss = [loss_sum / micro as f64];
        if plan.last {
            comms.dp_main.all_reduce_f64(&mut loss, ReduceOp::Avg)?;
            if !loss[0].is_finite() {
                return Err(TrainError::NonFiniteLoss {
                    rank: place.rank,
                    step,
                    loss: loss[0],
                });
            }
        }
        if device != Device::Cpu {
            tch::Cuda::synchronize(0);
        }
        let step_s = t0.elapsed().as_secs_f64();
        let update_s = update_start.elapsed().as_secs_f64();
        let comm_s = clock.take();
        let val_loss =
            if (spec.train.eval_every > 0 && (step + 1) % spec.train.eval_every == 0) || step + 1 == spec.train.steps {
                Some(evaluate(
                    spec,
                    &model,
                    &mut comms,
                    valid.as_ref(),
                    &place,
                    &act_shape,
                    device,
                    autocast,
                )?)
            } else {
                None
            };
        if let Some(c) = data_cursor.as_mut() {
            c.advance(1).map_err(gantry_sharding::gpt::DatasetError::from)?;
        }
        let done = step + 1;
        let mut ckpt_stall_ms = None;
        let mut ckpt_committed = None;
        if let Some(c) = ckpt.as_mut() {
            let report = if c.due(done, done == end_step) {
                let job = job_state(spec, tokens_per_step * done, data_cursor.as_ref(), &job_id);
                let rank_state = serde_json::json!({
                    "rank": place.rank, "dp": place.dp_rank, "tp": place.tp_rank, "pp": place.stage,
                    // Training draws no random numbers after initialization (no dropout): the
                    // seeds are the whole RNG state.
                    "rng": { "init_seed": spec.train.seed, "data_seed": spec.data.seed },
                });
                let (stall_s, previous) = c.save(done, &model, &grads, &states, &place, job, rank_state)?;
                ckpt_stall_ms = Some(stall_s * 1e3);
                previous
            } else {
                c.poll()?
            };
            if let Some(r) = report.as_ref().filter(|_| place.rank == 0) {
                on_commit(r.step);
            }
            ckpt_committed = report.map(|r| CommittedSave {
                step: r.step,
                bytes: r.bytes,
                write_s: r.write_s,
                save_s: r.commit_s,
            });
        }
        let tps = tokens_per_step as f64 / step_s;
        let mfu = (device != Device::Cpu)
            .then(|| spec.model.flops_per_token() * tps / H200_PEAK_FLOPS / fabric.world_size() as f64);
        let m = StepMetrics {
            step: step + 1,
            loss: loss[0],
            lr,
            grad_norm,
            tokens: tokens_per_step * (step + 1),
            tokens_per_s: tps,
            step_ms: step_s * 1e3,
            comm_ms: comm_s * 1e3,
            update_ms: update_s * 1e3,
            mfu,
            val_loss: val_loss.flatten(),
            ckpt_stall_ms,
            ckpt_committed,
        };
        if step > start_step || end_step - start_step == 1 {
            sum_tps += tps;
            sum_ms += step_s * 1e3;
            sum_comm += comm_s * 1e3;
            sum_update += update_s * 1e3;
        }
        if let Some(w) = metrics.as_mut() {
            w.write(&m)?;
        }
        if let Some(f) = progress_file.as_mut() {
            f.write(&Progress {
                step: m.step,
                step_ms: m.step_ms,
                tokens_per_s: m.tokens_per_s,
                // Only the last stage computes the loss (averaged over DP above, the same on
                // its TP ranks); earlier stages never learn it, so they write 0.0 rather than
                // pay a broadcast per step for a progress file.
                loss: if plan.last { m.loss } else { 0.0 },
            });
        }
        summary.steps = step + 1;
        summary.final_loss = Some(m.loss);
        summary.tokens = m.tokens;
        if m.val_loss.is_some() {
            summary.val_loss = m.val_loss;
        }
    }
    if let Some(c) = ckpt.as_mut()
        && let Some(r) = c.finish()?
    {
        if place.rank == 0 {
            on_commit(r.step);
        }
        tracing::info!(
            rank = place.rank,
            step = r.step,
            bytes = r.bytes,
            save_s = r.commit_s,
            "checkpoint committed"
        );
        if let Some(w) = metrics.as_mut() {
            w.write_committed(&CommittedSave {
                step: r.step,
                bytes: r.bytes,
                write_s: r.write_s,
                save_s: r.commit_s,
            })?;
        }
    }
    if log_samples {
        let path = run_dir.join(format!("samples-rank-{}.jsonl", place.rank));
        let text: String = sample_log
            .iter()
            .map(|(s, e, i)| {
                format!(
                    "{{\"step\":{s},\"dp\":{},\"epoch\":{e},\"sample\":{i}}}\n",
                    place.dp_rank
                )
            })
            .collect();
        std::fs::write(&path, text).map_err(|e| TrainError::io(&path, e))?;
    }
    let counted = (end_step - start_step).saturating_sub(1).max(1) as f64;
    summary.mean_tokens_per_s = sum_tps / counted;
    summary.mean_step_ms = sum_ms / counted;
    summary.mean_update_ms = sum_update / counted;
    summary.comm_share = if sum_ms > 0.0 { sum_comm / sum_ms } else { 0.0 };
    summary.mean_mfu = (device != Device::Cpu).then(|| {
        spec.model.flops_per_token() * summary.mean_tokens_per_s / H200_PEAK_FLOPS / fabric.world_size() as f64
    });
    tracing::info!(
        rank = place.rank,
        seconds = run_start.elapsed().as_secs_f64(),
        "training done"
    );
    if spec.train.sample_tokens > 0 {
        summary.samples = crate::generate::sample(spec, &model, &mut comms.tp, &mut comms.pp, &place, device)?;
    }
    Ok(summary)
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

/// `checkpoint.resume = "auto"`: the newest committed step, or `None` to start from step 0.
/// Rank 0 lists the store and the others take its answer, so every rank opens the same step
/// even if the listing changes while they start.
fn auto_resume_step(c: &Checkpointing, place: &RankPlace, world: &mut TensorComm) -> Result<Option<u64>, TrainError> {
    // Steps travel as step + 1 (0 = none) in an f64: exact up to 2^53.
    let mut found = [if place.rank == 0 {
        c.latest_committed()?.map_or(0.0, |s| s as f64 + 1.0)
    } else {
        0.0
    }];
    world.all_reduce_f64(&mut found, ReduceOp::Sum)?;
    let step = (found[0] > 0.0).then(|| found[0] as u64 - 1);
    if place.rank == 0 {
        match step {
            Some(s) => tracing::info!(
                dir = c.url(),
                step = s,
                "checkpoint.resume = auto: resuming from the latest committed checkpoint"
            ),
            None => tracing::info!(
                dir = c.url(),
                "checkpoint.resume = auto: no committed checkpoint; starting from step 0"
            ),
        }
    }
    Ok(step)
}

/// 52 random bits (they survive an f64 all-reduce exactly) from the clock and the pid.
fn attempt_nonce() -> f64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mixed = xxhash_rust::xxh3::xxh3_64(&[t.to_le_bytes(), u64::from(std::process::id()).to_le_bytes()].concat());
    (mixed & ((1 << 52) - 1)) as f64
}

/// Mean validation loss over `eval_batches` global batches (the same batches every time).
/// Returns `Some` on the last stage.
#[allow(clippy::too_many_arguments)]
fn evaluate(
    spec: &JobSpec,
    model: &Model,
    comms: &mut Comms,
    valid: Option<&ValidSet>,
    place: &RankPlace,
    act_shape: &[i64],
    device: Device,
    autocast: bool,
) -> Result<Option<f64>, TrainError> {
    if spec.data.valid_fraction == 0.0 {
        return Ok(None);
    }
    let micro = spec.micro_batches();
    let seq = spec.model.seq_len;
    let ops = forward_schedule(place.stage, place.layout.pp(), micro);
    let mut cursor = valid.map(|v| v.sampler.start(v.data.data().fingerprint()));
    let mut total = 0.0;
    for _ in 0..spec.train.eval_batches {
        let batches: Vec<MicroBatch> = match (valid, &mut cursor) {
            (Some(v), Some(c)) => {
                let out = (0..micro)
                    .map(|m| {
                        v.data
                            .micro_batch(&v.sampler, c, place.dp_rank, place.layout.dp(), micro, m)
                            .map(|b| micro_batch(&b.tokens, b.samples.len(), seq, device))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                c.advance(1).map_err(gantry_sharding::gpt::DatasetError::from)?;
                out
            }
            _ => (0..micro).map(|_| empty_batch()).collect(),
        };
        let mut io = StepIo {
            model,
            tp: &mut comms.tp,
            pp: &mut comms.pp,
            batches: &batches,
            act_shape: act_shape.to_vec(),
            device,
            autocast,
            loss_scale: 1.0,
        };
        let loss_sum = tch::no_grad(|| run_schedule(&mut io, &ops, false, &mut |_, _| Ok(())))?;
        total += loss_sum / micro as f64;
    }
    if !model.plan.last {
        return Ok(None);
    }
    let mut mean = [total / spec.train.eval_batches.max(1) as f64];
    comms.dp_main.all_reduce_f64(&mut mean, ReduceOp::Avg)?;
    Ok(Some(mean[0]))
}
