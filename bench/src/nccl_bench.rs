//! `gantry bench nccl`: NCCL's world-size-1 all_reduce on device memory, per dtype (f32 and
//! bf16: the dtypes gantry's gradients travel in), through `gantry_collectives::nccl`.
//!
//! On a single-GPU host this is what can be proved of the binding (see the `nccl` module):
//! the libraries load, a communicator initializes, NCCL accepts each dtype with every reduce
//! op and leaves the data intact (over one rank every op is the identity), and how long an
//! in-place sum all_reduce of `count` elements takes. Without a GPU, driver or `libnccl.so`
//! the answer is the typed [`NcclError::Unavailable`] naming what is missing, never a panic.

use cudarc::driver::{CudaContext, CudaStream, DevicePtr, DeviceRepr, DriverError};
use gantry_collectives::nccl::{NcclCommunicator, NcclError, NcclResult, NcclUniqueId, nccl_available, nccl_version};
use gantry_collectives::{DType, ReduceOp};
use serde::Serialize;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What to measure.
#[derive(Clone, Debug, PartialEq)]
pub struct NcclBenchConfig {
    /// Elements per all_reduce.
    pub count: usize,
    /// f32 and/or bf16, measured in this order.
    pub dtypes: Vec<DType>,
    /// Untimed all_reduces per dtype before timing.
    pub warmup: usize,
    /// Timed all_reduces per dtype.
    pub iters: usize,
}

impl Default for NcclBenchConfig {
    fn default() -> Self {
        NcclBenchConfig {
            count: 64 << 20,
            dtypes: vec![DType::F32, DType::BF16],
            warmup: 5,
            iters: 20,
        }
    }
}

impl NcclBenchConfig {
    /// Checked before anything is loaded.
    pub fn validate(&self) -> NcclResult {
        let bad = |message: String| {
            Err(NcclError::InvalidArgument {
                op: "gantry bench nccl",
                message,
            })
        };
        if self.count == 0 || self.iters == 0 {
            return bad(format!(
                "count and iters must be positive (count {}, iters {})",
                self.count, self.iters
            ));
        }
        if self.dtypes.is_empty() {
            return bad("no dtype to measure".into());
        }
        if let Some(d) = self.dtypes.iter().find(|d| !matches!(d, DType::F32 | DType::BF16)) {
            return bad(format!("dtype {d}: this benchmark measures f32 and bf16"));
        }
        if self.count.checked_mul(4).is_none() {
            return bad(format!("count {} overflows", self.count));
        }
        Ok(())
    }
}

/// One dtype's figures.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct NcclRow {
    pub dtype: String,
    /// Every reduce op left the data intact.
    pub ok: bool,
    pub count: usize,
    pub bytes: usize,
    /// Elements that differed from what was uploaded, summed over the ops.
    pub mismatches: usize,
    pub iters: usize,
    /// Mean time of one in-place sum all_reduce over the timed iterations.
    pub avg_us: f64,
    /// bytes / avg time (world size 1: NCCL's in-place identity, a bound on its overhead).
    pub algbw_gbps: f64,
    pub world: usize,
    pub nccl_version: Option<String>,
    pub device_name: Option<String>,
}

/// Runs `f`, turning a panic inside cudarc into [`NcclError::Panicked`].
fn guard<T>(op: &'static str, f: impl FnOnce() -> NcclResult<T>) -> NcclResult<T> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        let message = payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown panic".into());
        Err(NcclError::Panicked { op, message })
    })
}

fn cuda_err(op: &'static str) -> impl FnOnce(DriverError) -> NcclError {
    move |e| NcclError::Cuda {
        op,
        code: format!("{:?}", e.0),
    }
}

/// The bf16 bits of `x`, an integer of at most 8 significant bits (exact: its low 16 f32 bits
/// are zero).
fn bf16_bits(x: f32) -> u16 {
    (x.to_bits() >> 16) as u16
}

/// Measure every dtype of `cfg` on device 0 with a world-size-1 communicator.
pub fn run(cfg: &NcclBenchConfig) -> NcclResult<Vec<NcclRow>> {
    cfg.validate()?;
    nccl_available()?;
    // World size 1: nothing to wait for, so a minute is only a guard against a stuck driver.
    let comm = NcclCommunicator::new(0, 0, 1, &NcclUniqueId::new()?, Duration::from_secs(60))?;
    let version = nccl_version().ok();
    let device = guard("cuDeviceGetName", || {
        CudaContext::new(comm.device_ordinal())
            .and_then(|c| c.name())
            .map_err(cuda_err("cuDeviceGetName"))
    })
    .ok();
    let stream = comm.stream().clone();
    // Small integers: exact in f32 and bf16, unchanged by every op over one rank.
    let values: Vec<f32> = (0..cfg.count).map(|i| (i % 251) as f32 - 125.0).collect();
    let mut rows = Vec::new();
    for &dtype in &cfg.dtypes {
        let (ok, mismatches, avg_us) = match dtype {
            DType::BF16 => {
                let host: Vec<u16> = values.iter().map(|&x| bf16_bits(x)).collect();
                measure(&comm, &stream, &host, dtype, cfg)?
            }
            _ => measure(&comm, &stream, &values, dtype, cfg)?,
        };
        let bytes = cfg.count * dtype.size();
        rows.push(NcclRow {
            dtype: dtype.to_string(),
            ok,
            count: cfg.count,
            bytes,
            mismatches,
            iters: cfg.iters,
            avg_us,
            algbw_gbps: bytes as f64 / (avg_us * 1e-6) / 1e9,
            world: 1,
            nccl_version: version.clone(),
            device_name: device.clone(),
        });
    }
    comm.destroy()?;
    Ok(rows)
}

/// Upload `host`, all_reduce it in place with every op (download and compare after each),
/// then time `cfg.iters` sum all_reduces after `cfg.warmup`. (ok, mismatches, mean µs)
fn measure<T: DeviceRepr + PartialEq>(
    comm: &NcclCommunicator,
    stream: &Arc<CudaStream>,
    host: &[T],
    dtype: DType,
    cfg: &NcclBenchConfig,
) -> NcclResult<(bool, usize, f64)> {
    const OP: &str = "gantry bench nccl";
    guard(OP, || {
        let buf = stream.clone_htod(host).map_err(cuda_err("cuMemcpyHtoDAsync"))?;
        let ptr = buf.device_ptr(stream).0;
        let mut mismatches = 0;
        for op in ReduceOp::ALL {
            // SAFETY: `buf` holds `count` elements of `dtype` on the communicator's device and
            // outlives the synchronize below.
            unsafe { comm.all_reduce(ptr, ptr, cfg.count, dtype, op)? };
            comm.synchronize()?;
            let back = stream.clone_dtoh(&buf).map_err(cuda_err("cuMemcpyDtoHAsync"))?;
            mismatches += back.iter().zip(host).filter(|(a, b)| a != b).count();
        }
        for _ in 0..cfg.warmup {
            // SAFETY: as above.
            unsafe { comm.all_reduce(ptr, ptr, cfg.count, dtype, ReduceOp::Sum)? };
        }
        comm.synchronize()?;
        let start = Instant::now();
        for _ in 0..cfg.iters {
            // SAFETY: as above.
            unsafe { comm.all_reduce(ptr, ptr, cfg.count, dtype, ReduceOp::Sum)? };
        }
        comm.synchronize()?;
        let avg_us = start.elapsed().as_secs_f64() * 1e6 / cfg.iters as f64;
        Ok((mismatches == 0, mismatches, avg_us))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_checked_before_loading_anything() {
        assert!(NcclBenchConfig::default().validate().is_ok());
        for cfg in [
            NcclBenchConfig {
                count: 0,
                ..NcclBenchConfig::default()
            },
            NcclBenchConfig {
                dtypes: vec![],
                ..NcclBenchConfig::default()
            },
            NcclBenchConfig {
                dtypes: vec![DType::F32, DType::I64],
                ..NcclBenchConfig::default()
            },
        ] {
            let e = run(&cfg).unwrap_err();
            assert!(matches!(e, NcclError::InvalidArgument { .. }), "{e}");
        }
    }

    #[test]
    fn bf16_bits_of_small_integers_are_exact() {
        for i in -125..=125 {
            let x = i as f32;
            let back = f32::from_bits(u32::from(bf16_bits(x)) << 16);
            assert_eq!(back, x);
        }
    }

    /// Without a GPU: the typed error naming what is missing; with one: both dtypes pass.
    #[test]
    fn unavailable_without_gpu_else_both_dtypes_pass() {
        let cfg = NcclBenchConfig {
            count: 1 << 16,
            iters: 2,
            warmup: 1,
            ..NcclBenchConfig::default()
        };
        match nccl_available() {
            Err(_) => {
                let e = run(&cfg).unwrap_err();
                assert!(e.is_unavailable(), "{e}");
            }
            Ok(()) => {
                let rows = run(&cfg).unwrap();
                assert_eq!(rows.len(), 2);
                assert!(rows.iter().all(|r| r.ok && r.mismatches == 0), "{rows:?}");
            }
        }
    }
}
