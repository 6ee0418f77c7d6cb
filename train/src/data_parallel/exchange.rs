//! The data-parallel gradient exchange: one interface, [`GradientExchange`], with a backend per
//! kind of device, chosen by [`crate::comm::choose_backend`] ([`start`]).
//!
//! [`DataParallel`](super::DataParallel) keeps the bookkeeping for both: it launches a bucket
//! when the last unit touching it has finished backward, counts the buckets in flight, waits for
//! them before the update and knows each rank's shard. The exchange only moves the numbers:
//! - [`HostExchange`] (CPU tensors): the bucket is copied to a `Vec<f32>` and handed to the
//!   thread that owns the gantry communicator ([`super::thread`]), which averages it while the
//!   main thread continues backward.
//! - [`DeviceExchange`] (CUDA tensors): NCCL averages the bucket's flat gradient buffer in place
//!   — all_reduce, or ZeRO-1's reduce_scatter leaving this rank's shard at its own offset — on
//!   a side stream, so backward's kernels keep running on the compute stream meanwhile. The
//!   side stream waits for the compute stream before each launch (the bucket's gradients are
//!   complete) and the compute stream waits for the side stream before the update reads the
//!   result. ZeRO-1's all_gather runs in place on the flat parameter buffer the same way.
//!   The buffers are the model's own and never freed while the exchange lives, so no
//!   allocator can hand them out while NCCL still uses them.

use super::thread::{DpThread, Job};
use crate::comm::{Backend, choose_backend};
use crate::error::TrainError;
use gantry_collectives::cuda::SideStream;
use gantry_collectives::nccl::{NcclCommunicator, NcclError};
use gantry_collectives::{Communicator, DType, ReduceOp};
use std::collections::VecDeque;
use tch::{Device, Kind, Tensor};

/// This rank's place in data parallelism, as the exchange needs it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct DpCoords {
    /// Data-parallel degree (more than one wherever an exchange exists).
    pub dp: usize,
    pub dp_rank: usize,
    /// ZeRO-1: reduce-scatter the gradients, all-gather the updated parameters.
    pub zero: bool,
    /// Global rank, for errors.
    pub rank: usize,
}

/// Averages gradient buckets over the data-parallel ranks.
pub(crate) trait GradientExchange {
    /// Start averaging bucket `b`, whose flat gradient buffer `grads` backward has finished.
    fn launch(&mut self, b: usize, grads: &Tensor) -> Result<(), TrainError>;

    /// The next launched bucket to finish, with its averaged gradients: all of them, or under
    /// ZeRO-1 this rank's shard. Work queued on the compute stream afterwards sees them.
    fn next_done(&mut self) -> Result<(usize, Tensor), TrainError>;

    /// ZeRO-1: gather every rank's updated shard of each bucket into `params[b]`, the bucket's
    /// flat parameter buffer; `shards[b]` holds this rank's shard.
    fn all_gather(&mut self, shards: &[Tensor], params: &[Tensor]) -> Result<(), TrainError>;

    /// Wait, within the communicator's deadline, until the exchange's queued work has run.
    /// Called once a step, after the update is queued and just before the step's one read of
    /// the loss and norm, so that read never blocks on a dead peer's exchange. The host
    /// backend has nothing queued: its results came back through `next_done`.
    fn settle(&mut self) -> Result<(), TrainError> {
        Ok(())
    }
}

/// The exchange for `dp_grads` (the data-parallel group) on `device`; `None` for a single
/// data-parallel rank, whose gradient buffers are already the average.
pub(crate) fn start(
    dp_grads: Communicator,
    device: Device,
    at: DpCoords,
) -> Result<Option<Box<dyn GradientExchange>>, TrainError> {
    Ok(match (choose_backend(device, at.dp), device) {
        (Backend::Local, _) => None,
        (Backend::Nccl, Device::Cuda(ordinal)) => Some(Box::new(DeviceExchange::new(dp_grads, ordinal, at)?)),
        _ => Some(Box::new(HostExchange::spawn(dp_grads, device, at)?)),
    })
}

/// Where NCCL's in-place reduce-scatter leaves, and its in-place all-gather reads, rank
/// `dp_rank`'s block of `count` elements of `dtype` in a buffer at `base`.
pub(crate) fn shard_ptr(base: u64, dp_rank: usize, count: usize, dtype: DType) -> u64 {
    base + (dp_rank * count * dtype.size()) as u64
}

/// Today's host path: the gantry communicator on its own thread.
pub(crate) struct HostExchange {
    thread: DpThread,
    device: Device,
    at: DpCoords,
}

impl HostExchange {
    fn spawn(comm: Communicator, device: Device, at: DpCoords) -> Result<HostExchange, TrainError> {
        let thread = DpThread::spawn(comm, at.dp, at.dp_rank).map_err(|e| TrainError::GradientThread {
            rank: at.rank,
            message: format!("cannot start it: {e}"),
        })?;
        Ok(HostExchange { thread, device, at })
    }

    fn failed(&self, message: &str) -> TrainError {
        TrainError::GradientThread {
            rank: self.at.rank,
            message: message.into(),
        }
    }
}

impl GradientExchange for HostExchange {
    fn launch(&mut self, b: usize, grads: &Tensor) -> Result<(), TrainError> {
        let host = Vec::<f32>::try_from(&grads.f_to_device(Device::Cpu)?)?;
        let job = if self.at.zero {
            Job::ReduceScatter(b, host)
        } else {
            Job::AllReduce(b, host)
        };
        if !self.thread.send(job) {
            return Err(self.failed("the thread has stopped"));
        }
        Ok(())
    }

    fn next_done(&mut self) -> Result<(usize, Tensor), TrainError> {
        let (b, r) = self.thread.recv().ok_or_else(|| self.failed("the thread exited"))?;
        Ok((b, Tensor::f_from_slice(&r?)?.f_to_device(self.device)?))
    }

    fn all_gather(&mut self, shards: &[Tensor], params: &[Tensor]) -> Result<(), TrainError> {
        for (b, s) in shards.iter().enumerate() {
            let host = Vec::<f32>::try_from(&s.f_to_device(Device::Cpu)?)?;
            if !self.thread.send(Job::AllGather(b, host)) {
                return Err(self.failed("the thread has stopped"));
            }
        }
        for _ in shards {
            let (b, r) = self.thread.recv().ok_or_else(|| self.failed("the thread exited"))?;
            let full = Tensor::f_from_slice(&r?)?.f_to_device(self.device)?;
            let mut dst = params
                .get(b)
                .ok_or_else(|| self.failed("a result for an unknown bucket"))?
                .shallow_clone();
            tch::no_grad(|| dst.f_copy_(&full))?;
        }
        Ok(())
    }
}

/// NCCL on device memory, on a side stream.
pub(crate) struct DeviceExchange {
    nccl: NcclCommunicator,
    side: SideStream,
    at: DpCoords,
    /// The data-parallel group's name, for errors.
    group: String,
    /// Launched buckets in launch order (NCCL runs them in that order on the side stream),
    /// with the view that will hold each one's averaged gradients.
    pending: VecDeque<(usize, Tensor)>,
}

impl DeviceExchange {
    /// The NCCL twin of `comm` on device `ordinal`, enqueueing on a new side stream.
    /// Collective over the data-parallel group.
    fn new(comm: Communicator, ordinal: usize, at: DpCoords) -> Result<DeviceExchange, TrainError> {
        let group = comm.name().to_string();
        let mut nccl = comm.nccl_peer(ordinal).map_err(|source| TrainError::NcclSetup {
            rank: at.rank,
            group: group.clone(),
            source,
        })?;
        let failed = |op| {
            let group = group.clone();
            move |source| TrainError::Nccl {
                rank: at.rank,
                group,
                op,
                source,
            }
        };
        let side = SideStream::new(ordinal).map_err(failed("cuStreamCreate"))?;
        nccl.use_stream(&side).map_err(failed("use_stream"))?;
        Ok(DeviceExchange {
            nccl,
            side,
            at,
            group,
            pending: VecDeque::new(),
        })
    }

    fn failed(&self, op: &'static str) -> impl FnOnce(NcclError) -> TrainError {
        let (rank, group) = (self.at.rank, self.group.clone());
        move |source| TrainError::Nccl {
            rank,
            group,
            op,
            source,
        }
    }

    /// `t`'s elements per rank, once it is known to be a flat bucket buffer NCCL can work on
    /// in place: contiguous f32 on this device, split evenly over the ranks.
    fn per_rank(&self, t: &Tensor, op: &'static str) -> Result<usize, TrainError> {
        let (n, dp) = (t.numel(), self.at.dp);
        let fits = t.kind() == Kind::Float
            && t.is_contiguous()
            && t.device() == Device::Cuda(self.nccl.device_ordinal())
            && n % dp == 0;
        if !fits {
            return Err(TrainError::NcclMisuse {
                rank: self.at.rank,
                group: self.group.clone(),
                op,
                why: format!(
                    "expected a contiguous f32 buffer on CUDA device {} of a multiple of {dp} elements, got {:?} {:?} of {n}",
                    self.nccl.device_ordinal(),
                    t.kind(),
                    t.device()
                ),
            });
        }
        Ok(n / dp)
    }

    /// Later compute-stream work (the update, the next forward) waits for everything queued on
    /// the side stream so far; the host does not.
    fn fence_compute(&self) -> Result<(), TrainError> {
        self.side.before_compute().map_err(self.failed("before_compute"))
    }
}

impl GradientExchange for DeviceExchange {
    fn launch(&mut self, b: usize, grads: &Tensor) -> Result<(), TrainError> {
        let (op, count) = if self.at.zero {
            ("reduce_scatter", self.per_rank(grads, "reduce_scatter")?)
        } else {
            ("all_reduce", self.per_rank(grads, "all_reduce")? * self.at.dp)
        };
        self.side.after_compute().map_err(self.failed("after_compute"))?;
        let base = grads.data_ptr() as u64;
        let done = if self.at.zero {
            let recv = shard_ptr(base, self.at.dp_rank, count, DType::F32);
            // SAFETY: `grads` is the bucket's contiguous f32 buffer of `count * dp` elements on
            // this device (checked), kept alive by `FlatBuckets` for the exchange's life; the
            // side stream waits for backward's writes to it, the compute stream for this call
            // before it reads or zeroes the buffer again (`next_done`). In place as NCCL
            // defines it: recv = send + rank * count.
            unsafe { self.nccl.reduce_scatter(base, recv, count, DType::F32, ReduceOp::Avg) }
                .map_err(self.failed(op))?;
            grads.f_narrow(0, (self.at.dp_rank * count) as i64, count as i64)?
        } else {
            // SAFETY: as above, `count` elements, in place.
            unsafe { self.nccl.all_reduce(base, base, count, DType::F32, ReduceOp::Avg) }.map_err(self.failed(op))?;
            grads.shallow_clone()
        };
        self.pending.push_back((b, done));
        Ok(())
    }

    fn next_done(&mut self) -> Result<(usize, Tensor), TrainError> {
        let Some((b, g)) = self.pending.pop_front() else {
            return Err(TrainError::Internal(
                "waited for a bucket none of which is in flight".into(),
            ));
        };
        // No host wait here: the step's one read waits (`settle`), after the update is queued.
        self.fence_compute()?;
        Ok((b, g))
    }

    fn all_gather(&mut self, shards: &[Tensor], params: &[Tensor]) -> Result<(), TrainError> {
        const OP: &str = "all_gather";
        if shards.len() != params.len() {
            return Err(TrainError::Internal(format!(
                "{} shards for {} buckets",
                shards.len(),
                params.len()
            )));
        }
        let mut counts = Vec::with_capacity(params.len());
        for (s, p) in shards.iter().zip(params) {
            let count = self.per_rank(p, OP)?;
            let mut mine = p.f_narrow(0, (self.at.dp_rank * count) as i64, count as i64)?;
            // AdamW's master weights are normally this very view; anything else is copied in.
            if s.data_ptr() != mine.data_ptr() {
                tch::no_grad(|| mine.f_copy_(s))?;
            }
            counts.push(count);
        }
        self.side.after_compute().map_err(self.failed("after_compute"))?;
        let (dp_rank, params_ptrs) = (self.at.dp_rank, params.iter().map(|p| p.data_ptr() as u64));
        let gathered = self.nccl.group(|c| {
            for (base, &count) in params_ptrs.zip(&counts) {
                // SAFETY: each buffer is a bucket's contiguous f32 parameters of `count * dp`
                // elements on this device (checked), alive for the exchange's life and ordered
                // with compute by the events around this group. In place as NCCL defines it:
                // send = recv + rank * count.
                unsafe { c.all_gather(shard_ptr(base, dp_rank, count, DType::F32), base, count, DType::F32)? };
            }
            Ok(())
        });
        gathered.map_err(self.failed(OP))?;
        // The next step's forward reads the parameters after the gather; the next step's
        // `settle` bounds the wait for it.
        self.fence_compute()
    }

    /// Polls the side stream within the communicator's deadline: a peer that died
    /// mid-collective ends in a timeout naming the op here, not in a hang at the step's read.
    fn settle(&mut self) -> Result<(), TrainError> {
        self.nccl.synchronize().map_err(self.failed("synchronize"))
    }
}

#[cfg(test)]
mod tests {
    use super::super::buckets::Bucket;
    use super::super::{DataParallel, DataParallelConfig};
    use super::*;
    use crate::comm::{CommClock, TensorComm, on_ranks};
    use crate::place::RankPlace;
    use gantry_collectives::ParallelLayout;

    fn coords(rank: usize, zero: bool) -> DpCoords {
        DpCoords {
            dp: 2,
            dp_rank: rank,
            zero,
            rank,
        }
    }

    /// NCCL's in-place blocks are exactly the shards the optimizer states hold.
    #[test]
    fn in_place_blocks_are_the_zero1_shards() {
        for dp in 1..=4 {
            let bucket = Bucket {
                params: Vec::new(),
                offsets: Vec::new(),
                len: 96 * dp,
                decay: true,
                counts_in_norm: true,
                tied: false,
            };
            for r in 0..dp {
                let shard = bucket.shard(true, r, dp);
                let base = 0x7f00_0000_0000;
                assert_eq!(
                    shard_ptr(base, r, shard.len(), DType::F32),
                    base + 4 * shard.start as u64
                );
                assert_eq!(shard_ptr(base, r, 10, DType::BF16), base + 20 * r as u64);
            }
        }
    }

    /// The host backend through the interface: two buckets averaged, then ZeRO-1's
    /// reduce-scatter to this rank's shard and all-gather of the shards into the parameters.
    #[test]
    fn the_host_backend_averages_shards_and_gathers() {
        let results = on_ranks(2, |rank, world| {
            let mut x = start(world, Device::Cpu, coords(rank, false))
                .unwrap()
                .expect("two ranks");
            let r = rank as f32;
            x.launch(0, &Tensor::from_slice(&[r, 2.0 * r, 1.0, 3.0])).unwrap();
            x.launch(1, &Tensor::from_slice(&[4.0 + r, -r])).unwrap();
            let mut done: Vec<(usize, Vec<f32>)> = (0..2)
                .map(|_| {
                    x.next_done()
                        .map(|(b, g)| (b, Vec::<f32>::try_from(&g).unwrap()))
                        .unwrap()
                })
                .collect();
            done.sort_by_key(|d| d.0);
            done
        });
        for done in results {
            assert_eq!(done, [(0, vec![0.5, 1.0, 1.0, 3.0]), (1, vec![4.5, -0.5])]);
        }

        let results = on_ranks(2, |rank, world| {
            let mut x = start(world, Device::Cpu, coords(rank, true))
                .unwrap()
                .expect("two ranks");
            let r = rank as f32;
            x.launch(0, &Tensor::from_slice(&[r, 1.0, 2.0 * r, 3.0])).unwrap();
            let (b, shard) = x.next_done().unwrap();
            let shard = Vec::<f32>::try_from(&shard).unwrap();
            let params = Tensor::zeros([4], (Kind::Float, Device::Cpu));
            let mine = Tensor::from_slice(&[10.0 * (r + 1.0), 20.0 * (r + 1.0)]);
            x.all_gather(&[mine], &[params.shallow_clone()]).unwrap();
            (b, shard, Vec::<f32>::try_from(&params).unwrap())
        });
        let shards = [vec![0.5, 1.0], vec![1.0, 3.0]];
        for (rank, (b, shard, params)) in results.into_iter().enumerate() {
            assert_eq!((b, &shard), (0, &shards[rank]));
            assert_eq!(params, [10.0, 20.0, 20.0, 40.0]);
        }
    }

    /// A CUDA rank without NCCL gets no silent host detour: `DataParallel::new` (which picks
    /// the backend from the place's device) fails on every rank with `Unavailable`, naming
    /// the data-parallel group.
    #[test]
    fn a_cuda_rank_without_nccl_is_refused_by_name() {
        if gantry_collectives::nccl::nccl_available().is_ok() {
            return; // Two ranks cannot share this machine's GPU; nothing to refuse here.
        }
        let errors = on_ranks(2, |rank, world| {
            let group = world.name().to_string();
            let model = crate::model::tiny_test_model(crate::spec::Arch::Gpt2);
            let layout = ParallelLayout::new(2, 2, 1, 1).unwrap();
            let place = RankPlace::new(layout, rank, Device::Cuda(0));
            let config = DataParallelConfig {
                zero1: true,
                bucket_bytes: 1 << 20,
            };
            let clock = CommClock::default();
            let embed = TensorComm::new(None, clock.clone());
            match DataParallel::new(&model, &place, world, embed, &config, &clock) {
                Ok(_) => panic!("a CUDA rank got a gradient exchange without NCCL"),
                Err(e) => (group, e.is_nccl_unavailable(), e.to_string()),
            }
        });
        for (rank, (group, unavailable, message)) in errors.into_iter().enumerate() {
            assert!(unavailable, "{message}");
            assert!(message.contains(&format!("rank {rank}")), "{message}");
            assert!(message.contains(&format!("group `{group}`")), "{message}");
        }
    }
}
