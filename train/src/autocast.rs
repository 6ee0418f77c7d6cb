//! bf16 autocast on CUDA, through the C shim `csrc/autocast.cpp`.
//!
//! `tch::autocast(true, ..)` switches CUDA autocast on and leaves its dtype at libtorch's
//! default, `Half`; gantry trains without a grad scaler, where fp16 lets small logit gradients
//! underflow. It also calls libtorch's deprecated `at::autocast::is_enabled/set_enabled`,
//! which print a warning around every unit's forward. [`Bf16Autocast`] (and
//! [`with_bf16_autocast`]) replace it: CUDA autocast on or off with dtype `BFloat16`, the
//! previous state restored when the guard drops, the cast cache cleared when the outermost
//! autocast ends, as `torch.autocast("cuda", dtype=torch.bfloat16)` does.
//!
//! The state is per thread: the thread that trains, evaluates or generates enters autocast
//! itself. CPU tensors are not affected (that would be CPU autocast, which gantry does not
//! use), so the guard is harmless on a CPU rank, and the state can be queried without a GPU.

use crate::autograd::call_shim;
use crate::error::TrainError;
use std::ffi::{c_char, c_int};
use std::marker::PhantomData;
use tch::Kind;

unsafe extern "C" {
    // csrc/autocast.cpp; dtypes are `c10::ScalarType` numbers (see `kind_of`).
    fn gantry_autocast_state(enabled: *mut c_int, dtype: *mut c_int, err: *mut c_char, err_len: usize) -> c_int;
    fn gantry_autocast_enter(
        enabled: c_int,
        dtype: c_int,
        prev_enabled: *mut c_int,
        prev_dtype: *mut c_int,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn gantry_autocast_exit(prev_enabled: c_int, prev_dtype: c_int, err: *mut c_char, err_len: usize) -> c_int;
}

// `c10::ScalarType` numbers of the dtypes CUDA autocast casts to (the shim pins them with
// static_asserts).
const SCALAR_HALF: c_int = 5;
const SCALAR_FLOAT: c_int = 6;
const SCALAR_BFLOAT16: c_int = 15;

fn kind_of(scalar_type: c_int) -> Option<Kind> {
    match scalar_type {
        SCALAR_HALF => Some(Kind::Half),
        SCALAR_FLOAT => Some(Kind::Float),
        SCALAR_BFLOAT16 => Some(Kind::BFloat16),
        _ => None,
    }
}

/// Why an autocast call failed: libtorch's message.
#[derive(Debug, thiserror::Error)]
#[error("autocast {op}: {message}")]
pub struct AutocastError {
    pub op: &'static str,
    pub message: String,
}

impl From<AutocastError> for TrainError {
    fn from(e: AutocastError) -> TrainError {
        TrainError::Device(e.to_string())
    }
}

fn call(op: &'static str, f: impl FnOnce(*mut c_char, usize) -> c_int) -> Result<(), AutocastError> {
    call_shim(f).map_err(|message| AutocastError { op, message })
}

/// This thread's CUDA autocast setting, as libtorch reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AutocastState {
    pub enabled: bool,
    /// The dtype autocast casts to; `None` for a dtype other than f16, bf16 or f32.
    pub dtype: Option<Kind>,
}

/// This thread's CUDA autocast setting (works without a GPU).
pub fn cuda_autocast_state() -> Result<AutocastState, AutocastError> {
    let (mut enabled, mut dtype) = (0, 0);
    // SAFETY: both out-pointers are live locals; the shim catches every C++ exception and
    // writes at most `len` bytes into the error buffer.
    call("state", |err, len| unsafe {
        gantry_autocast_state(&mut enabled, &mut dtype, err, len)
    })?;
    Ok(AutocastState {
        enabled: enabled != 0,
        dtype: kind_of(dtype),
    })
}

/// CUDA autocast to bf16 (or off) on this thread while the guard lives; the previous state
/// comes back when it drops. Not `Send`: it must drop on the thread that entered it.
#[must_use = "autocast ends when the guard drops"]
pub struct Bf16Autocast {
    prev_enabled: c_int,
    prev_dtype: c_int,
    _this_thread: PhantomData<*const ()>,
}

impl Bf16Autocast {
    /// Enter CUDA autocast on this thread: `enabled` with dtype bf16, or switched off for the
    /// guard's life when `!enabled` (as `tch::autocast(false, ..)`).
    pub fn enter(enabled: bool) -> Result<Bf16Autocast, AutocastError> {
        let (mut prev_enabled, mut prev_dtype) = (0, 0);
        // SAFETY: as in `cuda_autocast_state`.
        call("enter", |err, len| unsafe {
            gantry_autocast_enter(
                c_int::from(enabled),
                SCALAR_BFLOAT16,
                &mut prev_enabled,
                &mut prev_dtype,
                err,
                len,
            )
        })?;
        Ok(Bf16Autocast {
            prev_enabled,
            prev_dtype,
            _this_thread: PhantomData,
        })
    }
}

impl Drop for Bf16Autocast {
    fn drop(&mut self) {
        // SAFETY: as in `cuda_autocast_state`; the values are the ones `enter` read.
        let left = call("exit", |err, len| unsafe {
            gantry_autocast_exit(self.prev_enabled, self.prev_dtype, err, len)
        });
        if let Err(e) = left {
            // Setting thread-local flags does not fail in practice; if it ever does, say so
            // rather than panic in a destructor.
            tracing::error!("{e}");
        }
    }
}

/// Run `f` under [`Bf16Autocast::enter`]`(enabled)`; the previous state is restored after,
/// also when `f` panics.
pub fn with_bf16_autocast<T>(enabled: bool, f: impl FnOnce() -> T) -> Result<T, AutocastError> {
    let _guard = Bf16Autocast::enter(enabled)?;
    Ok(f())
}

/// What a rank computes in, for its start-up log: bf16 autocast on a GPU, f32 on the CPU.
pub fn compute_dtype(on_gpu: bool) -> &'static str {
    if on_gpu { "bf16 autocast" } else { "f32" }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> AutocastState {
        cuda_autocast_state().unwrap()
    }

    #[test]
    fn the_guard_sets_bf16_and_restores_the_previous_state() {
        // libtorch's own default on a fresh thread: off, f16 (what tch::autocast left).
        let before = state();
        assert_eq!(
            before,
            AutocastState {
                enabled: false,
                dtype: Some(Kind::Half)
            }
        );
        let inside = with_bf16_autocast(true, state).unwrap();
        assert_eq!(
            inside,
            AutocastState {
                enabled: true,
                dtype: Some(Kind::BFloat16)
            }
        );
        assert_eq!(state(), before);
    }

    #[test]
    fn nested_guards_unwind_in_order() {
        let outer = Bf16Autocast::enter(true).unwrap();
        {
            let _off = Bf16Autocast::enter(false).unwrap();
            assert!(!state().enabled);
            assert_eq!(state().dtype, Some(Kind::BFloat16));
            let on_again = with_bf16_autocast(true, state).unwrap();
            assert!(on_again.enabled);
            assert!(!state().enabled);
        }
        assert_eq!(
            state(),
            AutocastState {
                enabled: true,
                dtype: Some(Kind::BFloat16)
            }
        );
        drop(outer);
        assert_eq!(
            state(),
            AutocastState {
                enabled: false,
                dtype: Some(Kind::Half)
            }
        );
    }

    #[test]
    fn the_state_is_per_thread_and_survives_a_panic() {
        let _on = Bf16Autocast::enter(true).unwrap();
        let other = std::thread::spawn(state).join().unwrap();
        assert!(!other.enabled, "another thread must not see this thread's autocast");
        let caught = std::panic::catch_unwind(|| {
            with_bf16_autocast(false, || panic!("inside autocast")).unwrap();
        });
        assert!(caught.is_err());
        assert_eq!(
            state(),
            AutocastState {
                enabled: true,
                dtype: Some(Kind::BFloat16)
            }
        );
    }

    #[test]
    fn a_cpu_forward_under_the_guard_stays_f32() {
        // CUDA autocast leaves CPU tensors alone: a CPU rank may enter it as the pipeline does.
        let a = tch::Tensor::randn([4, 8], (Kind::Float, tch::Device::Cpu));
        let b = tch::Tensor::randn([8, 3], (Kind::Float, tch::Device::Cpu));
        let y = with_bf16_autocast(true, || a.matmul(&b)).unwrap();
        assert_eq!(y.kind(), Kind::Float);
        assert_eq!(compute_dtype(false), "f32");
        assert_eq!(compute_dtype(true), "bf16 autocast");
    }
}
