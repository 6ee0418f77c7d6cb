//! Fused operators with their own backward (`csrc/fused_ops.cpp`, C++ autograd functions, so
//! the autograd engine, [`crate::autograd::backward_with`] and the flat gradient buffers see
//! ordinary graph nodes), and the switch that picks them.
//!
//! [`linear_gelu_tanh`] is GPT-2's MLP input projection: ATen evaluates a tanh per element in
//! GELU's forward and again in its backward; the fused forward writes GELU in place over the
//! addmm output and its derivative in the same pass (one exponential), and backward is a
//! multiply, the bias column sum and the two matmuls.
//!
//! [`linear`] is every other linear layer (attention in and out, MLP out, the head): the same
//! graph as `at::linear`, but in f32 its forward and input gradient run on oneDNN instead of
//! MKL's sgemm (faster on AMD CPUs, where MKL takes a generic AVX2 path; see the C++ file), and
//! [`linear_gelu_tanh`] runs its matmuls the same way. Both add their weight gradient straight
//! into a `.grad` the weight already has ([`weight_grads_accumulated_in_place`]).

use std::ffi::{c_char, c_int, c_void};
use tch::{Device, Kind, Tensor};

unsafe extern "C" {
    // csrc/fused_ops.cpp: `x`, `w`, `bias` (null for none) are tch handles; on success `out`
    // receives a new handle that the caller owns.
    fn gantry_linear_gelu_tanh(
        x: *const c_void,
        w: *const c_void,
        bias: *const c_void,
        out: *mut *mut c_void,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    // The same contract: `out` = x·wᵀ + bias.
    fn gantry_linear(
        x: *const c_void,
        w: *const c_void,
        bias: *const c_void,
        out: *mut *mut c_void,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    // 1 when f32 linears run on oneDNN, else 0; never fails.
    fn gantry_linear_uses_onednn() -> c_int;
    // A counter; never fails.
    fn gantry_linear_grads_accumulated_in_place() -> u64;
}

/// A shim of the shape `(x, w, bias, out, err, err_len)`.
type LinearShim =
    unsafe extern "C" fn(*const c_void, *const c_void, *const c_void, *mut *mut c_void, *mut c_char, usize) -> c_int;

/// Why a fused operator refused its inputs or failed: libtorch's or the shim's message.
#[derive(Debug, thiserror::Error)]
#[error("fused {op}: {message}")]
pub struct FusedOpsError {
    pub op: &'static str,
    pub message: String,
}

/// Whether the model uses the fused operators (`GANTRY_FUSED_OPS=on|off`, read by the binary
/// into [`crate::run_context::RunContext::fused_ops`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FusedOps {
    /// Where they apply: CPU tensors of f32 or f64. Elsewhere the unfused ATen ops run.
    #[default]
    On,
    /// ATen's ops only (the reference the fused ones are tested against).
    Off,
}

impl FusedOps {
    /// Parse a `GANTRY_FUSED_OPS` value; `None` or an empty value means the default.
    pub fn parse(value: Option<&str>) -> Result<Option<FusedOps>, String> {
        match value.map(str::trim) {
            None | Some("") => Ok(None),
            Some(v) if ["on", "fused", "1"].iter().any(|k| v.eq_ignore_ascii_case(k)) => Ok(Some(FusedOps::On)),
            Some(v) if ["off", "unfused", "0"].iter().any(|k| v.eq_ignore_ascii_case(k)) => Ok(Some(FusedOps::Off)),
            Some(v) => Err(format!("GANTRY_FUSED_OPS=`{v}`: expected `on` or `off`")),
        }
    }

    /// Whether a fused operator takes these tensors (CPU, f32 or f64): otherwise the caller
    /// runs ATen's ops, which is also what every other device gets.
    pub fn applies(self, x: &Tensor) -> bool {
        self == FusedOps::On && x.device() == Device::Cpu && matches!(x.kind(), Kind::Float | Kind::Double)
    }
}

/// `gelu_tanh(x · wᵀ + bias)` with the fused backward. `x` is `[…, in]`, `w` `[out, in]`, `bias`
/// `[out]`; all f32 or all f64 on the CPU (anything else is refused with the shapes named).
pub fn linear_gelu_tanh(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor, FusedOpsError> {
    call_linear(gantry_linear_gelu_tanh, "linear + GELU", x, w, bias)
}

/// `x · wᵀ + bias` with `at::linear`'s gradients, on oneDNN in f32. Shapes and kinds as for
/// [`linear_gelu_tanh`].
pub fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor, FusedOpsError> {
    call_linear(gantry_linear, "linear", x, w, bias)
}

/// Whether [`linear`] and [`linear_gelu_tanh`] run their f32 matmuls on oneDNN: libtorch was
/// built with it (x86-64 and aarch64 builds of PyTorch are). Otherwise they use ATen's.
pub fn linear_uses_onednn() -> bool {
    // SAFETY: no arguments; the shim looks the operator up once and catches what it throws.
    unsafe { gantry_linear_uses_onednn() != 0 }
}

/// How many weight gradients the backward of [`linear`] and [`linear_gelu_tanh`] has added
/// straight into a `.grad` the weight already had (the trainer's flat gradient buffers), in
/// this process so far. There the matmul accumulates into the buffer itself and autograd gets
/// no weight gradient: no temporary the size of the weight and no separate pass adding it in,
/// per micro-batch (Megatron's gradient-accumulation fusion). Weights without a `.grad` get it
/// the usual way.
pub fn weight_grads_accumulated_in_place() -> u64 {
    // SAFETY: no arguments; the shim reads an atomic.
    unsafe { gantry_linear_grads_accumulated_in_place() }
}

fn call_linear(
    shim: LinearShim,
    op: &'static str,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Tensor, FusedOpsError> {
    let mut out: *mut c_void = std::ptr::null_mut();
    let b = bias.map_or(std::ptr::null(), |b| b.as_ptr().cast());
    // SAFETY: the handles are live tch tensors borrowed for the call (`b` null or live); the
    // shim catches every C++ exception, writes at most `len` bytes into `err`, and sets `out`
    // only when it returns 0.
    crate::autograd::call_shim(|err, len| unsafe { shim(x.as_ptr().cast(), w.as_ptr().cast(), b, &mut out, err, len) })
        .map_err(|message| FusedOpsError { op, message })?;
    // SAFETY: on success `out` is a new `at::Tensor*` nobody else holds; tch frees it on drop.
    Ok(unsafe { Tensor::from_ptr(out.cast()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_knob_parses() {
        assert_eq!(FusedOps::parse(None), Ok(None));
        assert_eq!(FusedOps::parse(Some(" ")), Ok(None));
        assert_eq!(FusedOps::parse(Some("ON")), Ok(Some(FusedOps::On)));
        assert_eq!(FusedOps::parse(Some("off")), Ok(Some(FusedOps::Off)));
        assert!(
            FusedOps::parse(Some("maybe"))
                .unwrap_err()
                .contains("GANTRY_FUSED_OPS=`maybe`")
        );
    }

    /// The speed of the f32 linears rests on this: the libtorch this project builds against
    /// (the x86-64 PyTorch wheel) has oneDNN and its linear operator under the name and
    /// signature the shim expects.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn f32_linears_run_on_onednn() {
        assert!(linear_uses_onednn());
    }

    #[test]
    fn mismatched_inputs_are_refused_with_their_shapes() {
        let x = Tensor::zeros([2, 3], (Kind::Float, Device::Cpu));
        let w = Tensor::zeros([4, 5], (Kind::Float, Device::Cpu));
        let e = linear_gelu_tanh(&x, &w, None).unwrap_err();
        assert!(e.message.contains("[2, 3]") && e.message.contains("[4, 5]"), "{e}");
        let w = Tensor::zeros([4, 3], (Kind::Float, Device::Cpu));
        let e = linear_gelu_tanh(&x, &w, Some(&Tensor::zeros([5], (Kind::Float, Device::Cpu)))).unwrap_err();
        assert!(e.message.contains("bias"), "{e}");
        let e = linear_gelu_tanh(&x.to_kind(Kind::Double), &w, None).unwrap_err();
        assert!(e.message.contains("one kind"), "{e}");
        let e = linear_gelu_tanh(&x.to_kind(Kind::Int64), &w.to_kind(Kind::Int64), None).unwrap_err();
        assert!(e.message.contains("f32 or f64"), "{e}");
        let e = linear(&x, &Tensor::zeros([4, 5], (Kind::Float, Device::Cpu)), None).unwrap_err();
        assert!(e.op == "linear" && e.message.contains("[4, 5]"), "{e}");
    }
}
