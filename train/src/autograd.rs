//! Two autograd operations tch 0.24 does not bind, through the C shim `csrc/autograd.cpp`:
//! backward from a non-scalar tensor with a given gradient ([`backward_with`]), and making a
//! tensor of our choosing a parameter's `.grad` ([`set_grad`]).
//!
//! The executor uses the first at every unit and tensor-parallel cut boundary (instead of
//! seeding backward with `(out · grad).sum()`, a full extra pass over the activation and its
//! backward); the trainer uses the second to make every gradient a view into its bucket's
//! flat buffer ([`crate::data_parallel`]).

use std::ffi::{c_char, c_int, c_void};
use tch::Tensor;

unsafe extern "C" {
    // csrc/autograd.cpp; each pointer is a tch tensor handle (`at::Tensor*`).
    fn gantry_backward_with(output: *const c_void, grad: *const c_void, err: *mut c_char, err_len: usize) -> c_int;
    fn gantry_set_grad(param: *const c_void, grad: *const c_void, err: *mut c_char, err_len: usize) -> c_int;
}

/// Why a shim call failed: libtorch's message.
#[derive(Debug, thiserror::Error)]
#[error("{op}: {message}")]
pub struct AutogradError {
    pub op: &'static str,
    pub message: String,
}

/// Call a C shim that returns 0 on success, or nonzero with a NUL-terminated message written
/// into the buffer it is handed (`f` gets the buffer and its length); the message on failure.
/// Every shim in `csrc/` follows this convention.
pub(crate) fn call_shim(f: impl FnOnce(*mut c_char, usize) -> c_int) -> Result<(), String> {
    let mut err = vec![0u8; 4096];
    if f(err.as_mut_ptr().cast(), err.len()) == 0 {
        return Ok(());
    }
    let end = err.iter().position(|&b| b == 0).unwrap_or(err.len());
    Err(String::from_utf8_lossy(&err[..end]).into_owned())
}

fn call(op: &'static str, f: impl FnOnce(*mut c_char, usize) -> c_int) -> Result<(), AutogradError> {
    call_shim(f).map_err(|message| AutogradError { op, message })
}

/// Backpropagate `grad` from `output` (same shape), accumulating into the leaves' `.grad`;
/// frees the graph. Exactly `output.backward(gradient=grad)` in PyTorch.
pub fn backward_with(output: &Tensor, grad: &Tensor) -> Result<(), AutogradError> {
    // SAFETY: both handles are live tch tensors borrowed for the call; the shim catches
    // every C++ exception and writes at most `len` bytes, NUL included.
    call("backward", |err, len| unsafe {
        gantry_backward_with(output.as_ptr().cast(), grad.as_ptr().cast(), err, len)
    })
}

/// Make `grad` the `.grad` of `param`, shared rather than copied: backward then accumulates
/// into `grad`'s storage. It must have the parameter's kind, device and shape.
pub fn set_grad(param: &Tensor, grad: &Tensor) -> Result<(), AutogradError> {
    // SAFETY: as in `backward_with`; the shim checks kind, device and shape before it
    // assigns, so the parameter never holds a gradient of the wrong shape.
    call("set_grad", |err, len| unsafe {
        gantry_set_grad(param.as_ptr().cast(), grad.as_ptr().cast(), err, len)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn backward_with_a_gradient_equals_the_seeded_sum() {
        let x = Tensor::randn([3, 4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let w = Tensor::randn([4, 5], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let g = Tensor::randn([3, 5], (Kind::Float, Device::Cpu));
        backward_with(&x.matmul(&w).tanh(), &g).unwrap();
        let (gx, gw) = (x.grad().copy(), w.grad().copy());
        let _ = x.grad().zero_();
        let _ = w.grad().zero_();
        (x.matmul(&w).tanh() * &g).sum(Kind::Float).backward();
        assert!(gx.allclose(&x.grad(), 1e-6, 1e-6, false));
        assert!(gw.allclose(&w.grad(), 1e-6, 1e-6, false));
    }

    #[test]
    fn a_shared_gradient_is_accumulated_in_place() {
        let flat = Tensor::zeros([10], (Kind::Float, Device::Cpu));
        let w = Tensor::ones([2, 3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        set_grad(&w, &flat.narrow(0, 2, 6).view([2, 3])).unwrap();
        for _ in 0..2 {
            (&w * 3.0).sum(Kind::Float).backward();
        }
        let got = Vec::<f32>::try_from(&flat).unwrap();
        assert_eq!(got, [0.0, 0.0, 6.0, 6.0, 6.0, 6.0, 6.0, 6.0, 0.0, 0.0]);
    }

    #[test]
    fn a_gradient_of_the_wrong_shape_is_refused() {
        let w = Tensor::ones([2, 3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let e = set_grad(&w, &Tensor::zeros([6], (Kind::Float, Device::Cpu))).unwrap_err();
        assert!(e.message.contains("does not match parameter"), "{e}");
        assert!(!w.grad().defined());
        let e = backward_with(&(&w * 2.0), &Tensor::zeros([3, 2], (Kind::Float, Device::Cpu))).unwrap_err();
        assert_eq!(e.op, "backward");
    }
}
