//! Data-parallel gradient synchronization in buckets, overlapped with backward.
//!
//! Parameters are grouped into buckets (about `bucket_mb` each) in reverse creation order,
//! which is the order backward finishes them. A bucket never mixes parameters that the
//! optimizer or the norm treat differently (weight decay or not, counted in the global norm
//! or not), and a tied embedding shared across pipeline stages gets a bucket of its own so the
//! first and last stage hold identically shaped buckets for it.
//!
//! Each bucket's parameters and gradients live in flat buffers ([`crate::flat`]): backward
//! accumulates into the bucket's gradient buffer directly. During the last micro-batch's
//! backward, when the last unit touching every parameter of a bucket has finished, the
//! bucket's gradients are handed to a dedicated thread that owns the data-parallel
//! communicator: it all-reduces (average) them — or, with ZeRO-1, reduce-scatters them so
//! each rank keeps only its shard — while the main thread continues backward.
//! [`GradSync::finish`] waits for every bucket. Without data parallelism the buffer itself is
//! the reduced gradient.

use crate::error::TrainError;
use crate::flat::{ALIGN, FlatBuckets};
use crate::model::Model;
use crate::param::ParamId;
use gantry_collectives::{CommError, Communicator, ReduceOp};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;
use tch::{Device, Tensor};

pub struct Bucket {
    pub params: Vec<ParamId>,
    /// Start of each parameter in the flat bucket, a multiple of [`ALIGN`] elements (the gaps
    /// between parameters stay zero).
    pub offsets: Vec<usize>,
    /// Flat length, padded to a multiple of the DP size.
    pub len: usize,
    pub decay: bool,
    pub counts_in_norm: bool,
    /// Holds only the tied embedding of a pipelined model.
    pub tied: bool,
}

impl Bucket {
    /// This rank's range of the flat bucket: all of it, or its ZeRO-1 shard.
    pub fn shard(&self, zero: bool, dp_rank: usize, dp: usize) -> std::ops::Range<usize> {
        if zero {
            let n = self.len / dp;
            dp_rank * n..(dp_rank + 1) * n
        } else {
            0..self.len
        }
    }
}

/// Group the model's parameters into buckets of about `bucket_bytes`.
pub fn plan_buckets(model: &Model, tp_rank: usize, dp: usize, bucket_bytes: usize, pipelined: bool) -> Vec<Bucket> {
    let mut buckets: Vec<Bucket> = Vec::new();
    let mut open: Vec<Option<usize>> = vec![None; 4];
    let params: Vec<(ParamId, &crate::param::Param)> = model.params.iter().collect();
    for &(id, p) in params.iter().rev() {
        let tied = pipelined && model.spec.tie_embeddings && p.name == "embed.wte";
        let (decay, norm) = (p.decay, p.counts_in_norm(tp_rank));
        let key = usize::from(decay) * 2 + usize::from(norm);
        let slot = if tied { None } else { open[key] };
        let b = match slot {
            Some(b) if buckets[b].len * 4 < bucket_bytes => b,
            _ => {
                buckets.push(Bucket {
                    params: Vec::new(),
                    offsets: Vec::new(),
                    len: 0,
                    decay,
                    counts_in_norm: norm,
                    tied,
                });
                let b = buckets.len() - 1;
                if !tied {
                    open[key] = Some(b);
                }
                b
            }
        };
        let bucket = &mut buckets[b];
        let start = bucket.len.next_multiple_of(ALIGN);
        bucket.offsets.push(start);
        bucket.params.push(id);
        bucket.len = start + p.numel();
    }
    for b in &mut buckets {
        b.len = b.len.div_ceil(dp) * dp;
    }
    buckets
}

enum Job {
    AllReduce(usize, Vec<f32>),
    ReduceScatter(usize, Vec<f32>),
    AllGather(usize, Vec<f32>),
}

type JobResult = (usize, Result<Vec<f32>, CommError>);

/// The thread that owns the data-parallel communicator.
struct DpThread {
    jobs: Option<Sender<Job>>,
    results: Receiver<JobResult>,
    handle: Option<JoinHandle<()>>,
}

impl DpThread {
    fn spawn(mut comm: Communicator) -> DpThread {
        let (jobs, rx) = channel::<Job>();
        let (tx, results) = channel::<JobResult>();
        let handle = std::thread::Builder::new()
            .name("gantry-dp-grads".into())
            .spawn(move || {
                let size = comm.size();
                for job in rx {
                    let out = match job {
                        Job::AllReduce(b, mut v) => (b, comm.all_reduce_in_place(&mut v, ReduceOp::Avg).map(|_| v)),
                        // In place on the packed bucket we own (`reduce_scatter` would copy
                        // it first); this rank's block is then its shard.
                        Job::ReduceScatter(b, mut v) => {
                            let (n, r) = (v.len() / size, comm.rank());
                            let out = comm.reduce_scatter_in_place(&mut v, ReduceOp::Avg);
                            (
                                b,
                                out.map(|_| {
                                    v.copy_within(r * n..(r + 1) * n, 0);
                                    v.truncate(n);
                                    v
                                }),
                            )
                        }
                        Job::AllGather(b, v) => {
                            let mut out = vec![0f32; v.len() * size];
                            (b, comm.all_gather(&v, &mut out).map(|_| out))
                        }
                    };
                    if tx.send(out).is_err() {
                        break;
                    }
                }
            })
            .expect("spawn the data-parallel gradient thread");
        DpThread {
            jobs: Some(jobs),
            results,
            handle: Some(handle),
        }
    }
}

impl Drop for DpThread {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

pub struct GradSync {
    pub buckets: Vec<Bucket>,
    /// Per parameter: its bucket.
    bucket_of: Vec<usize>,
    /// Per parameter: how many units read it (a tied embedding: two).
    uses: Vec<usize>,
    uses_left: Vec<usize>,
    params_left: Vec<usize>,
    thread: Option<DpThread>,
    pub zero: bool,
    pub dp_rank: usize,
    pub dp: usize,
    rank: usize,
    in_flight: usize,
    device: Device,
    /// Synchronized gradients per bucket (the shard under ZeRO-1), after `finish`.
    pub reduced: Vec<Option<Tensor>>,
    /// The buckets' parameter and gradient buffers, which the model's tensors are views of.
    pub flat: FlatBuckets,
}

impl GradSync {
    pub fn new(
        model: &Model,
        dp_comm: Option<Communicator>,
        zero: bool,
        tp_rank: usize,
        rank: usize,
        bucket_bytes: usize,
        pipelined: bool,
    ) -> Result<GradSync, TrainError> {
        let dp_comm = dp_comm.filter(|c| c.size() > 1);
        let (dp, dp_rank) = dp_comm.as_ref().map_or((1, 0), |c| (c.size(), c.rank()));
        let buckets = plan_buckets(model, tp_rank, dp, bucket_bytes, pipelined);
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
        Ok(GradSync {
            params_left: buckets.iter().map(|b| b.params.len()).collect(),
            buckets,
            bucket_of,
            uses_left: uses.clone(),
            uses,
            thread: dp_comm.map(DpThread::spawn),
            zero: zero && dp > 1,
            dp_rank,
            dp,
            rank,
            in_flight: 0,
            device: model.params.device(),
            reduced: (0..nb).map(|_| None).collect(),
            flat,
        })
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
                self.send(t, job)?;
                self.in_flight += 1;
            }
        }
        Ok(())
    }

    fn send(&self, t: &DpThread, job: Job) -> Result<(), TrainError> {
        t.jobs
            .as_ref()
            .and_then(|j| j.send(job).ok())
            .ok_or_else(|| TrainError::GradientThread {
                rank: self.rank,
                message: "the thread has stopped".into(),
            })
    }

    /// Wait for every bucket of the step.
    pub fn finish(&mut self) -> Result<(), TrainError> {
        while self.in_flight > 0 {
            let t = self.thread.as_ref().expect("in flight implies a thread");
            let (b, r) = t.results.recv().map_err(|_| TrainError::GradientThread {
                rank: self.rank,
                message: "the thread exited".into(),
            })?;
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

    /// ZeRO-1: gather every rank's updated shard of each bucket into the parameters' flat
    /// buffers (without ZeRO-1 the update already happened in place).
    pub fn all_gather(&mut self, shards: Vec<Tensor>) -> Result<(), TrainError> {
        let Some(t) = &self.thread else { return Ok(()) };
        let n = shards.len();
        for (b, s) in shards.into_iter().enumerate() {
            let host = Vec::<f32>::try_from(&s.to_device(Device::Cpu))?;
            self.send(t, Job::AllGather(b, host))?;
        }
        for _ in 0..n {
            let (b, r) = t.results.recv().map_err(|_| TrainError::GradientThread {
                rank: self.rank,
                message: "the thread exited".into(),
            })?;
            let full = Tensor::from_slice(&r?).to_device(self.device);
            tch::no_grad(|| self.flat.params[b].copy_(&full));
        }
        Ok(())
    }
}
