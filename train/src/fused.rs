//! ATen's fused AdamW kernel (`at::_fused_adamw_`), which tch 0.24 does not bind, through the
//! C shim in `csrc/fused_adamw.cpp` (compiled by `build.rs`).
//!
//! One call updates any number of tensors in place with a single multi-tensor kernel on CUDA
//! (one vectorized, threaded loop per tensor on CPU). Semantics (PyTorch's `AdamW`, with
//! `amsgrad = false`, `maximize = false`, no AMP grad scaler), per element, with `t` the
//! value of the tensor's `step`:
//!
//! ```text
//! param   -= lr * weight_decay * param
//! exp_avg  = beta1 * exp_avg + (1 - beta1) * grad
//! exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * grad²
//! param   -= lr / (1 - beta1^t) * exp_avg / (sqrt(exp_avg_sq) / sqrt(1 - beta2^t) + eps)
//! ```
//!
//! The kernel only *reads* `step` (a one-element float tensor on the parameter's device);
//! the caller advances it (PyTorch's optimizer does `step += 1` before the call).

use std::ffi::{c_char, c_int, c_void};
use tch::{Kind, Tensor};

/// Why a fused AdamW step was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum FusedAdamError {
    #[error("fused AdamW: tensor {index}: {what}")]
    Invalid { index: usize, what: String },
    #[error("fused AdamW: libtorch: {0}")]
    Torch(String),
}

/// One parameter tensor and its AdamW state. `param`, `grad`, `exp_avg` and `exp_avg_sq` must
/// be contiguous, of one floating kind (f32, f16 or bf16), one shape and one device; `step` a
/// one-element f32 tensor on that device.
pub struct FusedAdamItem<'a> {
    pub param: &'a mut Tensor,
    pub grad: &'a Tensor,
    pub exp_avg: &'a mut Tensor,
    pub exp_avg_sq: &'a mut Tensor,
    pub step: &'a Tensor,
}

/// AdamW hyper-parameters of one fused call (one parameter group).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWHyper {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
    pub eps: f64,
}

unsafe extern "C" {
    // csrc/fused_adamw.cpp. Each pointer array holds `n` `at::Tensor*` (tch `C_tensor*`)
    // handles; `err` receives a NUL-terminated message when the result is nonzero.
    fn gantry_fused_adamw(
        params: *const *const c_void,
        grads: *const *const c_void,
        exp_avgs: *const *const c_void,
        exp_avg_sqs: *const *const c_void,
        state_steps: *const *const c_void,
        n: usize,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
}

fn check(index: usize, it: &FusedAdamItem<'_>) -> Result<(), FusedAdamError> {
    let invalid = |what: String| FusedAdamError::Invalid { index, what };
    let kind = it.param.kind();
    if !matches!(kind, Kind::Float | Kind::Half | Kind::BFloat16) {
        return Err(invalid(format!("parameter kind {kind:?} is not f32, f16 or bf16")));
    }
    let device = it.param.device();
    let shape = it.param.size();
    for (name, t) in [
        ("param", &*it.param),
        ("grad", it.grad),
        ("exp_avg", &*it.exp_avg),
        ("exp_avg_sq", &*it.exp_avg_sq),
    ] {
        if !t.defined() {
            return Err(invalid(format!("{name} is undefined")));
        }
        if t.kind() != kind || t.device() != device || t.size() != shape {
            return Err(invalid(format!(
                "{name} is {:?} {:?} on {:?}; the parameter is {kind:?} {shape:?} on {device:?}",
                t.kind(),
                t.size(),
                t.device()
            )));
        }
        if !t.is_contiguous() {
            return Err(invalid(format!("{name} is not contiguous")));
        }
    }
    let s = it.step;
    if !s.defined() || s.kind() != Kind::Float || s.device() != device || s.numel() != 1 {
        return Err(invalid(format!("step must be one f32 element on {device:?}")));
    }
    Ok(())
}

/// One fused AdamW step over `items`, in place. `step` tensors are read, not advanced.
pub fn adamw_step(items: &mut [FusedAdamItem<'_>], h: &AdamWHyper) -> Result<(), FusedAdamError> {
    if items.is_empty() {
        return Ok(());
    }
    for (i, it) in items.iter().enumerate() {
        check(i, it)?;
    }
    let ptrs = |f: &dyn Fn(&FusedAdamItem<'_>) -> *const c_void| items.iter().map(f).collect::<Vec<_>>();
    let params = ptrs(&|it| it.param.as_ptr().cast());
    let grads = ptrs(&|it| it.grad.as_ptr().cast());
    let exp_avgs = ptrs(&|it| it.exp_avg.as_ptr().cast());
    let exp_avg_sqs = ptrs(&|it| it.exp_avg_sq.as_ptr().cast());
    let steps = ptrs(&|it| it.step.as_ptr().cast());
    // SAFETY: every array holds `items.len()` live tensor handles, borrowed from `items` for
    // the whole call (the in-place targets mutably). The kernel was handed contiguous tensors
    // of matching kind, shape and device (checked above), so it stays within their storage.
    // The shim catches every C++ exception and writes at most `err_len` bytes, NUL included.
    crate::autograd::call_shim(|err, err_len| unsafe {
        gantry_fused_adamw(
            params.as_ptr(),
            grads.as_ptr(),
            exp_avgs.as_ptr(),
            exp_avg_sqs.as_ptr(),
            steps.as_ptr(),
            items.len(),
            h.lr,
            h.beta1,
            h.beta2,
            h.weight_decay,
            h.eps,
            err,
            err_len,
        )
    })
    .map_err(FusedAdamError::Torch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn hyper() -> AdamWHyper {
        AdamWHyper {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            weight_decay: 0.0,
            eps: 1e-8,
        }
    }

    #[test]
    fn first_step_moves_by_lr_times_sign() {
        let mut p = Tensor::from_slice(&[1.0f32, -2.0, 3.0]);
        let g = Tensor::from_slice(&[0.5f32, -0.25, 0.0]);
        let (mut m, mut v) = (p.zeros_like(), p.zeros_like());
        let step = Tensor::from_slice(&[1.0f32]);
        let mut items = [FusedAdamItem {
            param: &mut p,
            grad: &g,
            exp_avg: &mut m,
            exp_avg_sq: &mut v,
            step: &step,
        }];
        adamw_step(&mut items, &hyper()).unwrap();
        let got = Vec::<f32>::try_from(&p).unwrap();
        assert!(
            (got[0] - 0.9).abs() < 1e-6 && (got[1] + 1.9).abs() < 1e-6 && (got[2] - 3.0).abs() < 1e-6,
            "{got:?}"
        );
        // The kernel reads the step; it does not advance it.
        assert_eq!(step.double_value(&[0]), 1.0);
    }

    #[test]
    fn mismatched_inputs_are_typed_errors_not_crashes() {
        let mut p = Tensor::zeros([4], (Kind::Float, Device::Cpu));
        let short = Tensor::zeros([3], (Kind::Float, Device::Cpu));
        let (mut m, mut v) = (p.zeros_like(), p.zeros_like());
        let step = Tensor::from_slice(&[1.0f32]);
        let mut items = [FusedAdamItem {
            param: &mut p,
            grad: &short,
            exp_avg: &mut m,
            exp_avg_sq: &mut v,
            step: &step,
        }];
        let e = adamw_step(&mut items, &hyper()).unwrap_err();
        assert!(matches!(e, FusedAdamError::Invalid { index: 0, .. }), "{e}");

        let g = Tensor::zeros([4], (Kind::Float, Device::Cpu));
        let int_step = Tensor::from_slice(&[1i64]);
        let mut items = [FusedAdamItem {
            param: &mut p,
            grad: &g,
            exp_avg: &mut m,
            exp_avg_sq: &mut v,
            step: &int_step,
        }];
        assert!(adamw_step(&mut items, &hyper()).is_err());
    }

    #[test]
    fn a_libtorch_exception_comes_back_as_an_error() {
        // Bypass the Rust-side checks: integer tensors make ATen's dtype dispatch throw.
        let p = Tensor::zeros([4], (Kind::Int, Device::Cpu));
        let s = Tensor::from_slice(&[1.0f32]);
        let ps = [p.as_ptr().cast::<c_void>()];
        let ss = [s.as_ptr().cast::<c_void>()];
        let mut err = vec![0u8; 64];
        // SAFETY: one live handle per array and n = 1; `err` is 64 writable bytes.
        let rc = unsafe {
            gantry_fused_adamw(
                ps.as_ptr(),
                ps.as_ptr(),
                ps.as_ptr(),
                ps.as_ptr(),
                ss.as_ptr(),
                1,
                0.1,
                0.9,
                0.95,
                0.0,
                1e-8,
                err.as_mut_ptr().cast(),
                err.len(),
            )
        };
        assert_eq!(rc, 1);
        // Truncated to the buffer, NUL-terminated.
        let end = err.iter().position(|&b| b == 0).unwrap();
        assert!(end > 0 && end < err.len(), "{:?}", String::from_utf8_lossy(&err[..end]));
    }
}
