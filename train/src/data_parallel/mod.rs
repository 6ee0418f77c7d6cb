//! Data parallelism: gradient buckets synchronized over the data-parallel ranks, overlapped
//! with backward; the tied embedding's sum across pipeline ends; the global gradient norm,
//! clipping, the AdamW update of the buckets (ZeRO-1: of this rank's shard) and ZeRO-1's
//! gather of the updated shards.
//!
//! Each bucket's parameters and gradients live in flat buffers ([`buckets`]): backward
//! accumulates into the bucket's gradient buffer directly. During the last micro-batch's
//! backward, when the last unit touching every parameter of a bucket has finished
//! ([`DataParallel::unit_done`]), the bucket's gradients are handed to a dedicated thread that
//! owns the data-parallel communicator ([`thread`]): it all-reduces (average) them — or, with
//! ZeRO-1, reduce-scatters them so each rank keeps only its shard — while the main thread
//! continues backward. [`DataParallel::finish_step`] waits for every bucket, then does the
//! rest of the step's update. Without data parallelism the buffer itself is the reduced
//! gradient.
//!
//! Data flow of a step: `reset` → backward with `unit_done` per finished unit →
//! `finish_step(states, world, optim, lr, step)` → [`StepStats`]. Checkpointing asks
//! [`DataParallel::optimizer_slices`] which flat range of which parameters each AdamW state
//! holds; the degree and this rank's coordinate come from the [`RankPlace`] only.

mod buckets;
mod thread;

use crate::comm::{CommClock, TensorComm};
use crate::error::TrainError;
use crate::model::Model;
use crate::optim::{AdamImpl, AdamState, clip_coefficient, sum_of_squares};
use crate::param::ParamId;
use crate::place::RankPlace;
use crate::spec::OptimSpec;
use buckets::{Bucket, FlatBuckets, plan_buckets};
use gantry_collectives::{Communicator, ReduceOp};
use std::ops::Range;
use std::time::Instant;
use tch::{Device, Kind, Tensor};
use thread::{DpThread, Job};

pub use buckets::ALIGN;

/// What a step's update measured.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepStats {
    /// The global gradient norm before clipping.
    pub grad_norm: f64,
}

/// One bucket's parameters and this rank's flat range of it, as an AdamW state holds them.
pub struct OptimizerSlice<'a> {
    pub params: &'a [ParamId],
    /// Start of each parameter in the bucket's flat buffer.
    pub offsets: &'a [usize],
    /// The flat range this rank's AdamW state covers (all of the bucket, or its ZeRO-1 shard).
    pub shard: Range<usize>,
}

/// A rank's data parallelism: its buckets, their flat buffers and the communication thread.
pub struct DataParallel {
    buckets: Vec<Bucket>,
    /// Per parameter: its bucket.
    bucket_of: Vec<usize>,
    /// Per parameter: how many units read it (a tied embedding: two).
    uses: Vec<usize>,
    uses_left: Vec<usize>,
    params_left: Vec<usize>,
    thread: Option<DpThread>,
    /// ZeRO-1 (only with more than one data-parallel rank).
    zero: bool,
    dp_rank: usize,
    dp: usize,
    rank: usize,
    in_flight: usize,
    device: Device,
    /// Synchronized gradients per bucket (the shard under ZeRO-1), after the wait.
    reduced: Vec<Option<Tensor>>,
    /// The buckets' parameter and gradient buffers, which the model's tensors are views of.
    flat: FlatBuckets,
    /// First and last pipeline stage of the same (dp, tp) coordinates: the tied embedding.
    embed: TensorComm,
    /// Where the waits for the thread are counted as communication.
    clock: CommClock,
}

/// How a rank's data parallelism is set up (the spec's `parallel` section).
pub struct DataParallelConfig {
    pub zero1: bool,
    pub bucket_bytes: usize,
}

impl DataParallel {
    /// Bucket `model`'s parameters (making them views of flat buffers) and start the thread
    /// that owns `dp_grads`, the data-parallel communicator, when there is more than one
    /// data-parallel rank. `embed` sums the tied embedding between the pipeline's ends.
    pub fn new(
        model: &Model,
        place: &RankPlace,
        dp_grads: Communicator,
        embed: TensorComm,
        config: &DataParallelConfig,
        clock: &CommClock,
    ) -> Result<DataParallel, TrainError> {
        let (dp, dp_rank) = (place.layout.dp(), place.dp_rank);
        let pipelined = place.layout.pp() > 1;
        let buckets = plan_buckets(model, place.tp_rank, dp, config.bucket_bytes, pipelined);
        let flat = FlatBuckets::adopt(model, &buckets)?;
        let n = model.params.len();
        let mut bucket_of = vec![0; n];
        for (b, bucket) in buckets.iter().enumerate() {
            for p in &bucket.params {
                bucket_of[p.0] = b;
            }
        }
        let mut uses = vec![0; n];
        for u in 0..model.units.len() {
            for p in model.unit_params(u) {
                uses[p.0] += 1;
            }
        }
        let nb = buckets.len();
        Ok(DataParallel {
            params_left: buckets.iter().map(|b| b.params.len()).collect(),
            buckets,
            bucket_of,
            uses_left: uses.clone(),
            uses,
            thread: (dp > 1).then(|| DpThread::spawn(dp_grads, dp, dp_rank)),
            zero: config.zero1 && dp > 1,
            dp_rank,
            dp,
            rank: place.rank,
            in_flight: 0,
            device: model.params.device(),
            reduced: (0..nb).map(|_| None).collect(),
            flat,
            embed,
            clock: clock.clone(),
        })
    }

    /// One AdamW state per bucket, running `imp`. The master weights are the parameters' flat
    /// buffer (or this rank's ZeRO-1 shard of it): updating them in place updates the model.
    pub fn adamw_states(&self, imp: AdamImpl) -> Vec<AdamState> {
        self.buckets
            .iter()
            .zip(&self.flat.params)
            .map(|(b, values)| {
                let r = self.shard_of(b);
                AdamState::with_impl(values.narrow(0, r.start as i64, r.len() as i64), b.decay, imp)
            })
            .collect()
    }

    /// Per bucket (in the order of [`DataParallel::adamw_states`]): its parameters and the
    /// flat range this rank's state holds.
    pub fn optimizer_slices(&self) -> impl Iterator<Item = OptimizerSlice<'_>> {
        self.buckets.iter().map(|b| OptimizerSlice {
            params: &b.params,
            offsets: &b.offsets,
            shard: self.shard_of(b),
        })
    }

    /// Whether ZeRO-1 shards the optimizer states over the data-parallel ranks.
    pub fn sharded(&self) -> bool {
        self.zero
    }

    fn shard_of(&self, bucket: &Bucket) -> Range<usize> {
        bucket.shard(self.zero, self.dp_rank, self.dp)
    }

    /// Start of a step: zero the gradients and expect every bucket again.
    pub fn reset(&mut self) {
        self.flat.zero_grads();
        self.uses_left.clone_from(&self.uses);
        for (b, bucket) in self.buckets.iter().enumerate() {
            self.params_left[b] = bucket.params.len();
        }
        self.reduced.iter_mut().for_each(|r| *r = None);
    }

    /// Unit `unit` finished its last backward of the step: launch the buckets it completes.
    pub fn unit_done(&mut self, model: &Model, unit: usize) -> Result<(), TrainError> {
        for p in model.unit_params(unit) {
            self.uses_left[p.0] -= 1;
            if self.uses_left[p.0] == 0 {
                let b = self.bucket_of[p.0];
                self.params_left[b] -= 1;
                if self.params_left[b] == 0 {
                    self.launch(b)?;
                }
            }
        }
        Ok(())
    }

    fn launch(&mut self, b: usize) -> Result<(), TrainError> {
        let flat = &self.flat.grads[b];
        match &self.thread {
            None => self.reduced[b] = Some(flat.shallow_clone()),
            Some(t) => {
                let host = Vec::<f32>::try_from(&flat.to_device(Device::Cpu))?;
                let job = if self.zero {
                    Job::ReduceScatter(b, host)
                } else {
                    Job::AllReduce(b, host)
                };
                if !t.send(job) {
                    return Err(self.thread_failed("the thread has stopped"));
                }
                self.in_flight += 1;
            }
        }
        Ok(())
    }

    fn thread_failed(&self, message: &str) -> TrainError {
        TrainError::GradientThread {
            rank: self.rank,
            message: message.into(),
        }
    }

    /// The rest of a step after backward: wait for every bucket, sum the tied embedding
    /// between the pipeline's ends, measure the global norm over `world`, clip, run AdamW
    /// (`step` counts from 0) and, under ZeRO-1, gather the updated shards.
    pub fn finish_step(
        &mut self,
        states: &mut [AdamState],
        world: &mut TensorComm,
        optim: &OptimSpec,
        lr: f64,
        step: u64,
    ) -> Result<StepStats, TrainError> {
        let wait = Instant::now();
        self.wait_for_buckets()?;
        self.clock.add(wait.elapsed().as_secs_f64());
        self.sum_tied_embedding()?;
        let grad_norm = self.global_norm(world)?;
        let coef = clip_coefficient(grad_norm, optim.grad_clip);
        for (g, state) in self.reduced.iter_mut().zip(states.iter_mut()) {
            let g = g.as_mut().expect("finished");
            if coef != 1.0 {
                // In place: the gradient buffer is ours and rewritten next step.
                let _ = g.g_mul_scalar_(coef);
            }
            state.try_update(g, optim, lr, step + 1)?;
        }
        if self.zero {
            let shards = states.iter().map(|s| s.master.shallow_clone()).collect();
            let wait = Instant::now();
            self.all_gather(shards)?;
            self.clock.add(wait.elapsed().as_secs_f64());
        }
        Ok(StepStats { grad_norm })
    }

    /// Wait for every bucket of the step.
    fn wait_for_buckets(&mut self) -> Result<(), TrainError> {
        while self.in_flight > 0 {
            let t = self.thread.as_ref().expect("in flight implies a thread");
            let (b, r) = t.recv().ok_or_else(|| self.thread_failed("the thread exited"))?;
            self.in_flight -= 1;
            let v = r?;
            self.reduced[b] = Some(Tensor::from_slice(&v).to_device(self.device));
        }
        if let Some(b) = self.reduced.iter().position(Option::is_none) {
            return Err(TrainError::Internal(format!(
                "bucket {b} never became ready (a unit's backward was not reported)"
            )));
        }
        Ok(())
    }

    /// Tied embedding: first and last stage sum their gradients.
    fn sum_tied_embedding(&mut self) -> Result<(), TrainError> {
        for (b, bucket) in self.buckets.iter().enumerate() {
            if bucket.tied {
                let g = self.reduced[b].as_mut().expect("finished");
                self.embed.all_reduce_(g, ReduceOp::Sum)?;
            }
        }
        Ok(())
    }

    /// The global gradient norm over distinct gradient values: each bucket's sum of squares
    /// stays on the device; their total is read once (one synchronization per step).
    fn global_norm(&self, world: &mut TensorComm) -> Result<f64, TrainError> {
        let mut sumsq = [0f64];
        // Without ZeRO-1 every data-parallel replica holds the same gradients: one counts.
        if self.zero || self.dp_rank == 0 {
            let per_bucket: Vec<Tensor> = self
                .buckets
                .iter()
                .zip(&self.reduced)
                .filter(|(bucket, _)| bucket.counts_in_norm)
                .map(|(_, g)| sum_of_squares(g.as_ref().expect("finished")))
                .collect();
            if !per_bucket.is_empty() {
                sumsq[0] = Tensor::stack(&per_bucket, 0).sum(Kind::Double).double_value(&[]);
            }
        }
        world.all_reduce_f64(&mut sumsq, ReduceOp::Sum)?;
        Ok(sumsq[0].sqrt())
    }

    /// ZeRO-1: gather every rank's updated shard of each bucket into the parameters' flat
    /// buffers (without ZeRO-1 the update already happened in place).
    fn all_gather(&mut self, shards: Vec<Tensor>) -> Result<(), TrainError> {
        let Some(t) = &self.thread else { return Ok(()) };
        let n = shards.len();
        for (b, s) in shards.into_iter().enumerate() {
            let host = Vec::<f32>::try_from(&s.to_device(Device::Cpu))?;
            if !t.send(Job::AllGather(b, host)) {
                return Err(self.thread_failed("the thread has stopped"));
            }
        }
        for _ in 0..n {
            let (b, r) = t.recv().ok_or_else(|| self.thread_failed("the thread exited"))?;
            let full = Tensor::from_slice(&r?).to_device(self.device);
            tch::no_grad(|| self.flat.params[b].copy_(&full));
        }
        Ok(())
    }
}
