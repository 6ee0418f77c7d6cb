//! Fused operators with their own backward (`csrc/fused_ops.cpp`, C++ autograd functions, so
//! the autograd engine, [`crate::autograd::backward_with`] and the flat gradient buffers see
//! ordinary graph nodes), and the switch that picks them.
//!
//! [`linear_gelu_tanh`] is GPT-2's MLP input projection: ATen evaluates a tanh per element in
//! GELU's forward and again in its backward; the fused forward writes GELU in place over the
//! addmm output and its derivative in the same pass (one exponential), and backward is a
//! multiply, the bias column sum and the two matmuls.

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
}

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
    let mut out: *mut c_void = std::ptr::null_mut();
    let b = bias.map_or(std::ptr::null(), |b| b.as_ptr().cast());
    // SAFETY: the handles are live tch tensors borrowed for the call (`b` null or live); the
    // shim catches every C++ exception, writes at most `len` bytes into `err`, and sets `out`
    // only when it returns 0.
    crate::autograd::call_shim(|err, len| unsafe {
        gantry_linear_gelu_tanh(x.as_ptr().cast(), w.as_ptr().cast(), b, &mut out, err, len)
    })
    .map_err(|message| FusedOpsError {
        op: "linear + GELU",
        message,
    })?;
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
    }
}
