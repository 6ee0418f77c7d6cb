//! Where a rank sits: its layout, its coordinates in it and its device. Built once, where a
//! rank starts (the binary, from the one `ParallelLayout::new` of the rank), and passed down
//! to everything that needs to know: the trainer, data parallelism, checkpointing, samples.

use crate::error::TrainError;
use crate::spec::{DeviceSpec, JobSpec};
use gantry_collectives::ParallelLayout;
use gantry_collectives::layout::Coords;
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

/// The device `train.device` names; CUDA must be visible.
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
}
