//! ATen's fused AdamW kernel (`at::_fused_adamw_`) and the multi-tensor norm, scale and zero
//! (`_foreach_norm`, `_foreach_mul_`, `_foreach_zero_`), which tch 0.24 does not bind, through
//! the C shim in `csrc/fused_adamw.cpp` (compiled by `build.rs`). The step after backward uses
//! them so that its cost on CUDA is a handful of launches whatever the number of buckets.
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
use tch::{Kind, TchError, Tensor};

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
    // `out` receives `n` new handles, owned by the caller, when the result is zero.
    fn gantry_foreach_norm(
        tensors: *const *const c_void,
        n: usize,
        out: *mut *mut c_void,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn gantry_foreach_mul_(
        tensors: *const *const c_void,
        n: usize,
        factor: *const c_void,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn gantry_foreach_zero_(tensors: *const *const c_void, n: usize, err: *mut c_char, err_len: usize) -> c_int;
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

fn handles(tensors: &[&Tensor]) -> Vec<*const c_void> {
    tensors.iter().map(|t| t.as_ptr().cast()).collect()
}

fn torch_error(op: &str) -> impl FnOnce(String) -> TchError + '_ {
    move |message| TchError::Torch(format!("{op}: {message}"))
}

/// The 2-norm of each tensor, as 0-dimensional tensors of its kind on its device, without a
/// host synchronization (`_foreach_norm`: on CUDA one multi-tensor kernel for all of them).
/// The tensors must share a device and be floating point; none may be undefined.
pub fn foreach_norm(tensors: &[&Tensor]) -> Result<Vec<Tensor>, TchError> {
    if tensors.is_empty() {
        return Ok(Vec::new());
    }
    if let Some(i) = tensors.iter().position(|t| !t.defined()) {
        return Err(TchError::Torch(format!("_foreach_norm: tensor {i} is undefined")));
    }
    let ins = handles(tensors);
    let mut outs: Vec<*mut c_void> = vec![std::ptr::null_mut(); tensors.len()];
    // SAFETY: `ins` holds `n` live handles borrowed for the call and `outs` has room for `n`;
    // on success the shim stored `n` fresh `at::Tensor*` there, which tch's `Tensor` owns and
    // frees (tch's handles are `at::Tensor*` made with `new`). On failure it stored none.
    crate::autograd::call_shim(|err, err_len| unsafe {
        gantry_foreach_norm(ins.as_ptr(), ins.len(), outs.as_mut_ptr(), err, err_len)
    })
    .map_err(torch_error("_foreach_norm"))?;
    // SAFETY: see above: each pointer is a new handle that nothing else owns.
    Ok(outs
        .into_iter()
        .map(|p| unsafe { Tensor::from_ptr(p.cast()) })
        .collect())
}

/// Multiply every tensor in place by `factor`, a 0-dimensional tensor on their device (read
/// there: no host synchronization). `_foreach_mul_`: on CUDA one multi-tensor kernel; on the
/// CPU one `mul_` per tensor, which is what a scalar multiply computes (the factor is
/// rounded to the tensors' kind either way).
pub fn foreach_mul_(tensors: &[&Tensor], factor: &Tensor) -> Result<(), TchError> {
    if tensors.is_empty() {
        return Ok(());
    }
    if !factor.defined() || factor.dim() != 0 {
        return Err(TchError::Torch(
            "_foreach_mul_: the factor must be a 0-dimensional tensor".into(),
        ));
    }
    let ins = handles(tensors);
    // SAFETY: `n` live handles and one live factor, borrowed for the call; the shim catches
    // every C++ exception (wrong devices or kinds among them).
    crate::autograd::call_shim(|err, err_len| unsafe {
        gantry_foreach_mul_(ins.as_ptr(), ins.len(), factor.as_ptr().cast(), err, err_len)
    })
    .map_err(torch_error("_foreach_mul_"))
}

/// Zero every tensor in place (`_foreach_zero_`: on CUDA one multi-tensor kernel).
pub fn foreach_zero_(tensors: &[&Tensor]) -> Result<(), TchError> {
    if tensors.is_empty() {
        return Ok(());
    }
    let ins = handles(tensors);
    // SAFETY: `n` live handles borrowed for the call; the shim catches every C++ exception.
    crate::autograd::call_shim(|err, err_len| unsafe { gantry_foreach_zero_(ins.as_ptr(), ins.len(), err, err_len) })
        .map_err(torch_error("_foreach_zero_"))
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

    #[test]
    fn foreach_norm_mul_and_zero_match_their_single_tensor_forms() {
        tch::manual_seed(5);
        let ts: Vec<Tensor> = [1i64, 7, 1000, 4099]
            .iter()
            .map(|&n| Tensor::randn([n], (Kind::Float, Device::Cpu)))
            .collect();
        let refs: Vec<&Tensor> = ts.iter().collect();
        let norms = foreach_norm(&refs).unwrap();
        assert_eq!(norms.len(), ts.len());
        for (t, n) in ts.iter().zip(&norms) {
            assert_eq!(n.dim(), 0);
            let exact = t
                .to_kind(Kind::Double)
                .square()
                .sum(Kind::Double)
                .sqrt()
                .double_value(&[]);
            let got = n.double_value(&[]);
            assert!(((got - exact) / exact).abs() < 1e-6, "{got} vs {exact}");
        }

        let expected: Vec<Tensor> = ts.iter().map(|t| t * 0.37f64).collect();
        let factor = Tensor::from(0.37f64).to_kind(Kind::Float);
        foreach_mul_(&refs, &factor).unwrap();
        for (t, e) in ts.iter().zip(&expected) {
            assert!(t.equal(e), "a scaled tensor differs from the scalar multiply");
        }
        let wrong = Tensor::from_slice(&[1f32, 2.0]);
        assert!(foreach_mul_(&refs, &wrong).is_err());

        foreach_zero_(&refs).unwrap();
        assert!(ts.iter().all(|t| t.abs().sum(Kind::Double).double_value(&[]) == 0.0));
        assert!(foreach_norm(&[]).unwrap().is_empty());
        assert!(foreach_zero_(&[]).is_ok());
    }

    #[test]
    fn foreach_refusals_are_errors() {
        let ints = Tensor::from_slice(&[1i64, 2]);
        let e = foreach_norm(&[&ints]).unwrap_err();
        assert!(e.to_string().contains("_foreach_norm"), "{e}");
        let undefined = Tensor::new();
        assert!(foreach_norm(&[&undefined]).is_err());
    }
}
