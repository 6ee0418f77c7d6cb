//! Data parallelism: gradient buckets synchronized over the data-parallel ranks, overlapped
//! with backward; the tied embedding's sum across pipeline ends; the global gradient norm,
//! clipping, the AdamW update of the buckets (ZeRO-1: of this rank's shard) and ZeRO-1's
//! gather of the updated shards.
//!
//! Each bucket's parameters and gradients live in flat buffers ([`buckets`]): backward
//! accumulates into the bucket's gradient buffer directly. During the last micro-batch's
//! backward, when the last unit touching every parameter of a bucket has finished
//! ([`DataParallel::unit_done`]), the bucket's gradients are handed to the gradient exchange
//! ([`exchange`]: NCCL on a side stream on CUDA, the gantry communicator on its own thread,
//! [`thread`], on the CPU): it averages them — or, with ZeRO-1, reduce-scatters them so each
//! rank keeps only its shard — while backward continues. [`DataParallel::finish_step`] waits
//! for every bucket, then queues the rest of the step's update on the device and reads the
//! loss and the norm once. Without data parallelism the buffer itself is the reduced gradient.
//!
//! Data flow of a step: `reset` → backward with `unit_done` per finished unit →
//! `finish_step(states, world, optim, lr, step, loss_sum)` → [`StepStats`]. Checkpointing asks
//! [`DataParallel::optimizer_slices`] which flat range of which parameters each AdamW state
//! holds; the degree and this rank's coordinate come from the [`RankPlace`] only.

mod buckets;
mod exchange;
mod thread;

use crate::comm::{CommClock, TensorComm};
use crate::error::TrainError;
use crate::fused::foreach_mul_;
use crate::model::Model;
use crate::optim::{AdamImpl, AdamState, clip_coefficient_tensor, norm_method, total_sum_of_squares, update_all};
use crate::param::ParamId;
use crate::place::RankPlace;
use crate::spec::OptimSpec;
use buckets::{Bucket, FlatBuckets, plan_buckets};
use exchange::{DpCoords, GradientExchange};
use gantry_collectives::cuda::wait_for_compute;
use gantry_collectives::{Communicator, ReduceOp};
use std::ops::Range;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

pub use buckets::ALIGN;

/// What a step's update measured, read from the device together once the update is queued.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepStats {
    /// The global gradient norm before clipping.
    pub grad_norm: f64,
    /// This rank's sum of its micro-batch losses (zero off the last pipeline stage).
    pub loss_sum: f64,
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
    /// Averages complete buckets over the data-parallel ranks (`None`: only one rank).
    exchange: Option<Box<dyn GradientExchange>>,
    /// ZeRO-1 (only with more than one data-parallel rank).
    zero: bool,
    dp_rank: usize,
    dp: usize,
    /// Buckets launched and not yet waited for.
    in_flight: usize,
    device: Device,
    /// Synchronized gradients per bucket (the shard under ZeRO-1), after the wait.
    reduced: Vec<Option<Tensor>>,
    /// The buckets' parameter and gradient buffers, which the model's tensors are views of.
    flat: FlatBuckets,
    /// First and last pipeline stage of the same (dp, tp) coordinates: the tied embedding.
    embed: TensorComm,
    /// Where the waits for the exchange are counted as communication.
    clock: CommClock,
}

/// How a rank's data parallelism is set up (the spec's `parallel` section).
pub struct DataParallelConfig {
    pub zero1: bool,
    pub bucket_bytes: usize,
}

impl DataParallel {
    /// Bucket `model`'s parameters (making them views of flat buffers) and start the gradient
    /// exchange over `dp_grads`, the data-parallel communicator, when there is more than one
    /// data-parallel rank: NCCL on a side stream for a CUDA `place.device`, the gantry
    /// collectives on their own thread otherwise ([`exchange`]). `embed` sums the tied
    /// embedding between the pipeline's ends.
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
        let zero = config.zero1 && dp > 1;
        let at = DpCoords {
            dp,
            dp_rank,
            zero,
            rank: place.rank,
        };
        let exchange = exchange::start(dp_grads, place.device, at)?;
        Ok(DataParallel {
            params_left: buckets.iter().map(|b| b.params.len()).collect(),
            buckets,
            bucket_of,
            uses_left: uses.clone(),
            uses,
            exchange,
            zero,
            dp_rank,
            dp,
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
    pub fn reset(&mut self) -> Result<(), TrainError> {
        self.flat.zero_grads()?;
        self.uses_left.clone_from(&self.uses);
        for (b, bucket) in self.buckets.iter().enumerate() {
            self.params_left[b] = bucket.params.len();
        }
        self.reduced.iter_mut().for_each(|r| *r = None);
        Ok(())
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
        match &mut self.exchange {
            None => self.reduced[b] = Some(flat.shallow_clone()),
            Some(x) => {
                x.launch(b, flat)?;
                self.in_flight += 1;
            }
        }
        Ok(())
    }

    /// The rest of a step after backward: wait for every bucket, sum the tied embedding
    /// between the pipeline's ends, measure the global norm over `world`, clip, run AdamW
    /// (`step` counts from 0), read the norm with `loss_sum` (this rank's micro-batch loss
    /// sum, a 0-dimensional f64 tensor on the device) and, under ZeRO-1, gather the updated
    /// shards. Norm, clip coefficient, scaling and update are queued on the device without a
    /// read; the read after them is the step's one host synchronization (a `world` of more
    /// than one rank adds its all-reduce of the norm).
    pub fn finish_step(
        &mut self,
        states: &mut [AdamState],
        world: &mut TensorComm,
        optim: &OptimSpec,
        lr: f64,
        step: u64,
        loss_sum: &Tensor,
    ) -> Result<StepStats, TrainError> {
        let wait = Instant::now();
        self.wait_for_buckets()?;
        self.clock.add(wait.elapsed().as_secs_f64());
        self.sum_tied_embedding()?;
        let grad_norm = self.global_norm(world)?;
        let grads: Vec<&Tensor> = self.reduced.iter().map(|g| g.as_ref().expect("finished")).collect();
        if optim.grad_clip > 0.0 {
            // In place, one multi-tensor multiply: the gradient buffers are ours and rewritten
            // next step. The factor is rounded to f32 as a scalar multiply would round it.
            let coef = clip_coefficient_tensor(&grad_norm, optim.grad_clip).f_to_kind(Kind::Float)?;
            foreach_mul_(&grads, &coef)?;
        }
        update_all(states, &grads, optim, lr, step + 1)?;
        if let Some(x) = self.exchange.as_mut() {
            x.settle()?;
        }
        if let (Device::Cuda(ordinal), Some(deadline)) = (self.device, world.timeout()) {
            // The read below is libtorch's blocking copy: a TP or PP collective on the compute
            // stream whose peer died would hang it. Poll the stream within the deadline first.
            wait_for_compute(ordinal, deadline).map_err(|source| TrainError::Nccl {
                rank: world.rank(),
                group: "the compute stream".into(),
                op: "step",
                source,
            })?;
        }
        let read = Tensor::f_stack(&[loss_sum.f_to_kind(Kind::Double)?, grad_norm], 0)?.f_to_device(Device::Cpu)?;
        let read = Vec::<f64>::try_from(&read)?;
        let stats = StepStats {
            loss_sum: read[0],
            grad_norm: read[1],
        };
        if self.zero {
            let shards = states.iter().map(|s| s.master.shallow_clone()).collect();
            let wait = Instant::now();
            self.all_gather(shards)?;
            self.clock.add(wait.elapsed().as_secs_f64());
        }
        Ok(stats)
    }

    /// Wait for every bucket of the step.
    fn wait_for_buckets(&mut self) -> Result<(), TrainError> {
        while self.in_flight > 0 {
            let Some(x) = self.exchange.as_mut() else {
                return Err(TrainError::Internal("buckets in flight without an exchange".into()));
            };
            let (b, g) = x.next_done()?;
            self.in_flight -= 1;
            let slot = self.reduced.get_mut(b).ok_or_else(|| {
                TrainError::Internal(format!("the exchange finished bucket {b}, which does not exist"))
            })?;
            *slot = Some(g);
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

    /// The global gradient norm over distinct gradient values, as a 0-dimensional f64 tensor
    /// on the device, not read: the counted buckets' squares summed there (one multi-tensor
    /// norm on CUDA, see [`norm_method`]), then over `world` (no call at all for a world of
    /// one, so a single-device run does not synchronize here).
    fn global_norm(&self, world: &mut TensorComm) -> Result<Tensor, TrainError> {
        // Without ZeRO-1 every data-parallel replica holds the same gradients: one counts.
        let counted: Vec<&Tensor> = if self.zero || self.dp_rank == 0 {
            (self.buckets.iter().zip(&self.reduced))
                .filter(|(bucket, _)| bucket.counts_in_norm)
                .map(|(_, g)| g.as_ref().expect("finished"))
                .collect()
        } else {
            Vec::new()
        };
        let mut sumsq = total_sum_of_squares(&counted, norm_method(self.device), self.device)?;
        if !world.is_trivial() {
            world.all_reduce_(&mut sumsq, ReduceOp::Sum)?;
        }
        Ok(sumsq.f_sqrt()?)
    }

    /// ZeRO-1: gather every rank's updated shard of each bucket into the parameters' flat
    /// buffers (without ZeRO-1 the update already happened in place).
    fn all_gather(&mut self, shards: Vec<Tensor>) -> Result<(), TrainError> {
        match &mut self.exchange {
            Some(x) => x.all_gather(&shards, &self.flat.params),
            None => Ok(()),
        }
    }
}
