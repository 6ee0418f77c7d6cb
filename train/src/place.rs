//! Where a rank sits: its layout, its coordinates in it and its device. Built once, where a
//! rank starts (the binary, from the one `ParallelLayout::new` of the rank), and passed down
//! to everything that needs to know: the trainer, data parallelism, checkpointing, samples.

use crate::autograd::call_shim;
use crate::error::TrainError;
use crate::spec::{DeviceSpec, JobSpec};
use gantry_collectives::ParallelLayout;
use gantry_collectives::layout::Coords;
use std::ffi::{c_char, c_int};
use tch::Device;

/// Everything a rank needs to know about where it sits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RankPlace {
    pub rank: usize,
    pub layout: ParallelLayout,
    pub dp_rank: usize,
    pub tp_rank: usize,
    pub stage: usize,
    pub device: Device,
}

impl RankPlace {
    /// Rank `rank` of `layout`, computing on `device`.
    ///
    /// # Panics
    /// If `rank` is outside the layout (a bug in the caller: the rank comes from the same
    /// world the layout was built for).
    pub fn new(layout: ParallelLayout, rank: usize, device: Device) -> RankPlace {
        let coords = layout.coords(rank);
        RankPlace {
            rank,
            layout,
            dp_rank: coords.dp,
            tp_rank: coords.tp,
            stage: coords.pp,
            device,
        }
    }

    /// Whether this rank writes `metrics.jsonl` and `summary.json` (see [`reporting_rank`]).
    pub fn reports(&self) -> bool {
        self.rank == reporting_rank(&self.layout)
    }

    /// The first pipeline stage reads tokens.
    pub fn first_stage(&self) -> bool {
        self.stage == 0
    }

    /// The last pipeline stage reads targets and computes the loss.
    pub fn last_stage(&self) -> bool {
        self.stage + 1 == self.layout.pp()
    }

    /// Whether this rank computes on a GPU (bf16 autocast, MFU, device synchronization).
    pub fn on_gpu(&self) -> bool {
        self.device != Device::Cpu
    }
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

/// How the launcher shared the host's GPUs among its ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GpuView {
    /// Every rank on the host sees the same GPUs (torchrun's convention: `gantry launch
    /// --local`/`--nproc`, a Slurm task, torchrun): local rank `i` takes the `i`-th.
    Shared,
    /// The launcher made this rank's own GPUs the only ones it sees (the gantry worker sets
    /// `CUDA_VISIBLE_DEVICES` per rank to the GPUs the coordinator gave it, and says so with
    /// `GANTRY_OWN_GPUS=1`): it takes the first.
    Own,
}

/// A rank's place on its host, as far as choosing a GPU goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalRank {
    /// `LOCAL_RANK`.
    pub rank: usize,
    /// `LOCAL_WORLD_SIZE`: the job's ranks on this host.
    pub ranks_on_host: usize,
    pub view: GpuView,
}

impl LocalRank {
    /// The only rank of its host, seeing its GPUs (tools that run one process: eval, serving).
    pub fn alone() -> LocalRank {
        LocalRank {
            rank: 0,
            ranks_on_host: 1,
            view: GpuView::Shared,
        }
    }
}

/// The CUDA device index `local` computes on when `visible` devices are visible to it (CUDA
/// itself applies `CUDA_VISIBLE_DEVICES`, so `visible` and the index are in its numbering).
/// One GPU per rank: with a shared view, a host whose ranks outnumber its visible GPUs is
/// refused by every one of its ranks, with both numbers.
pub fn cuda_device_for(local: LocalRank, visible: usize) -> Result<usize, String> {
    if visible == 0 {
        return Err("no CUDA device is visible to this rank (check CUDA_VISIBLE_DEVICES)".into());
    }
    match local.view {
        GpuView::Own => Ok(0),
        GpuView::Shared => {
            let ranks = local.ranks_on_host.max(local.rank + 1);
            if ranks > visible {
                Err(format!(
                    "{ranks} ranks on this host need one GPU each but {visible} CUDA device{} visible \
                     (after CUDA_VISIBLE_DEVICES); run at most {visible} ranks per host",
                    if visible == 1 { " is" } else { "s are" }
                ))
            } else {
                Ok(local.rank)
            }
        }
    }
}

/// The device `train.device` names for the rank at `local`: the CPU, or its own CUDA device
/// ([`cuda_device_for`]), which is made the thread's current device.
pub fn device_of(spec: &JobSpec, local: LocalRank) -> Result<Device, TrainError> {
    match spec.train.device {
        DeviceSpec::Cpu => Ok(Device::Cpu),
        DeviceSpec::Cuda => {
            if !tch::Cuda::is_available() {
                return Err(TrainError::Device(
                    "train.device = \"cuda\" but no CUDA device is visible (libtorch_cuda.so not loaded or no GPU)"
                        .into(),
                ));
            }
            let visible = usize::try_from(tch::Cuda::device_count()).unwrap_or(0);
            let index = cuda_device_for(local, visible)
                .map_err(|e| TrainError::Device(format!("train.device = \"cuda\": {e}")))?;
            set_current_cuda_device(index)?;
            Ok(Device::Cuda(index))
        }
    }
}

unsafe extern "C" {
    // csrc/device.cpp.
    fn gantry_set_cuda_device(index: c_int, err: *mut c_char, err_len: usize) -> c_int;
}

/// Make `cuda:{index}` the calling thread's current CUDA device (`torch.cuda.set_device`), so
/// that what libtorch puts on "the current device" lands on this rank's GPU, not on GPU 0.
/// Fails with libtorch's message where CUDA is not loaded.
pub fn set_current_cuda_device(index: usize) -> Result<(), TrainError> {
    let index = c_int::try_from(index).map_err(|_| TrainError::Device(format!("CUDA device {index} out of range")))?;
    // SAFETY: the shim catches every C++ exception and writes at most `len` bytes.
    call_shim(|err, len| unsafe { gantry_set_cuda_device(index, err, len) })
        .map_err(|e| TrainError::Device(format!("setting CUDA device {index}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coordinates_and_roles_follow_the_layout() {
        // 8 ranks: dp 2 × tp 2 × pp 2, TP innermost.
        let layout = ParallelLayout::new(8, 2, 2, 2).unwrap();
        let p = RankPlace::new(layout, 5, Device::Cpu);
        assert_eq!((p.dp_rank, p.tp_rank, p.stage), (0, 1, 1));
        assert!(p.last_stage() && !p.first_stage() && !p.reports());
        assert_eq!(reporting_rank(&layout), 4);
        assert!(RankPlace::new(layout, 4, Device::Cpu).reports());
        assert!(RankPlace::new(layout, 2, Device::Cpu).first_stage());
        assert!(!RankPlace::new(layout, 0, Device::Cpu).on_gpu());
    }

    fn shared(rank: usize, ranks_on_host: usize) -> LocalRank {
        LocalRank {
            rank,
            ranks_on_host,
            view: GpuView::Shared,
        }
    }

    #[test]
    fn one_gpu_per_local_rank() {
        // Four ranks on a host with four (or more) visible GPUs: cuda:0..3.
        for r in 0..4 {
            assert_eq!(cuda_device_for(shared(r, 4), 4), Ok(r));
            assert_eq!(cuda_device_for(shared(r, 4), 8), Ok(r));
        }
        assert_eq!(cuda_device_for(LocalRank::alone(), 1), Ok(0));
        // The worker's per-rank mask: every rank's own GPU is its cuda:0.
        let own = |rank| LocalRank {
            rank,
            ranks_on_host: 4,
            view: GpuView::Own,
        };
        assert_eq!(cuda_device_for(own(3), 1), Ok(0));
        assert_eq!(cuda_device_for(own(1), 2), Ok(0));
    }

    #[test]
    fn more_ranks_than_gpus_is_refused_by_every_rank() {
        for r in 0..4 {
            let e = cuda_device_for(shared(r, 4), 2).unwrap_err();
            assert!(
                e.contains("4 ranks on this host") && e.contains("2 CUDA devices are visible"),
                "{e}"
            );
        }
        let e = cuda_device_for(shared(1, 2), 1).unwrap_err();
        assert!(e.contains("2 ranks") && e.contains("1 CUDA device is visible"), "{e}");
        // A LOCAL_RANK past LOCAL_WORLD_SIZE still gets a device only if there is one.
        assert!(cuda_device_for(shared(2, 1), 2).is_err());
        for view in [GpuView::Shared, GpuView::Own] {
            let local = LocalRank {
                rank: 0,
                ranks_on_host: 1,
                view,
            };
            let e = cuda_device_for(local, 0).unwrap_err();
            assert!(e.contains("no CUDA device is visible"), "{e}");
        }
    }

    #[test]
    fn setting_a_cuda_device_without_cuda_fails_cleanly() {
        // On a host where libtorch_cuda.so did not load (this one), a message, not a crash.
        if tch::Cuda::is_available() {
            return;
        }
        let e = set_current_cuda_device(0).unwrap_err();
        assert!(e.to_string().contains("setting CUDA device 0"), "{e}");
    }
}
