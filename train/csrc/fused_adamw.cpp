// C entry points for ATen's fused AdamW kernel (`at::_fused_adamw_`) and the multi-tensor
// (`_foreach_`) norm, scale and zero that the step after backward uses; tch 0.24 binds none
// of them. Tensors arrive as tch handles: in torch-sys a `C_tensor*` is a `torch::Tensor*`,
// i.e. an `at::Tensor*` (libtch/torch_api.h: `typedef torch::Tensor *tensor;`).
//
// Only the operator header and the Tensor class are included (not <torch/torch.h>) to keep
// this translation unit cheap to compile. C++ exceptions never cross into Rust: they are
// caught here and reported through a caller-provided buffer.

#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/_foreach_mul_ops.h>
#include <ATen/ops/_foreach_norm_ops.h>
#include <ATen/ops/_foreach_zero_ops.h>
#include <ATen/ops/_fused_adamw_ops.h>

#include "shim_report.h"

#include <cstddef>
#include <memory>
#include <optional>
#include <vector>

namespace {

std::vector<at::Tensor> gather(const at::Tensor *const *handles, size_t n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    out.push_back(*handles[i]);  // a reference-count bump, not a copy of the data
  }
  return out;
}

}  // namespace

using gantry_shim::guarded;

extern "C" {

// One AdamW step over `n` tensors (amsgrad = false, maximize = false, no grad_scale or
// found_inf): params, exp_avgs and exp_avg_sqs are updated in place. The kernel reads each
// `state_steps[i]` (a one-element float tensor on the param's device) as the 1-based step
// for bias correction; it does not increment it. Returns 0 on success; otherwise 1 with a
// NUL-terminated message (truncated to `err_len`) in `err`.
int gantry_fused_adamw(const at::Tensor *const *params, const at::Tensor *const *grads,
                       const at::Tensor *const *exp_avgs,
                       const at::Tensor *const *exp_avg_sqs,
                       const at::Tensor *const *state_steps, size_t n, double lr,
                       double beta1, double beta2, double weight_decay, double eps,
                       char *err, size_t err_len) {
  return guarded(err, err_len, "unknown C++ exception in at::_fused_adamw_", [&] {
    at::NoGradGuard no_grad;
    std::vector<at::Tensor> p = gather(params, n);
    std::vector<at::Tensor> g = gather(grads, n);
    std::vector<at::Tensor> m = gather(exp_avgs, n);
    std::vector<at::Tensor> v = gather(exp_avg_sqs, n);
    std::vector<at::Tensor> s = gather(state_steps, n);
    std::vector<at::Tensor> max_v;  // empty: amsgrad is off
    // Equivalent to at::_fused_adamw_ (ATen/ops/_fused_adamw.h, `double lr` overload).
    at::_ops::_fused_adamw_::call(p, g, m, v, max_v, s, lr, beta1, beta2, weight_decay, eps,
                                  /*amsgrad=*/false, /*maximize=*/false,
                                  /*grad_scale=*/std::nullopt, /*found_inf=*/std::nullopt);
    return 0;
  });
}

// The 2-norm of each of `n` tensors (one `_foreach_norm`: on CUDA one multi-tensor launch
// for the partial sums and one for the totals). On success `out[i]` receives a new
// `at::Tensor*` (a tch handle the caller owns and frees) holding the 0-dimensional norm of
// `tensors[i]` in its kind.
int gantry_foreach_norm(const at::Tensor *const *tensors, size_t n, at::Tensor **out, char *err,
                        size_t err_len) {
  return guarded(err, err_len, "unknown C++ exception in at::_foreach_norm", [&] {
    at::NoGradGuard no_grad;
    std::vector<at::Tensor> norms =
        at::_ops::_foreach_norm_Scalar::call(gather(tensors, n), 2, std::nullopt);
    if (norms.size() != n) {
      gantry_shim::report(err, err_len, "at::_foreach_norm returned a norm count unlike its input");
      return 1;
    }
    // Own every handle until all exist, so a failed allocation leaks nothing.
    std::vector<std::unique_ptr<at::Tensor>> owned;
    owned.reserve(norms.size());
    for (at::Tensor &t : norms) {
      owned.push_back(std::make_unique<at::Tensor>(std::move(t)));
    }
    for (size_t i = 0; i < n; ++i) {
      out[i] = owned[i].release();
    }
    return 0;
  });
}

// Multiply each of `n` tensors in place by the one-element tensor `factor` (read on the
// device: no host synchronization).
int gantry_foreach_mul_(const at::Tensor *const *tensors, size_t n, const at::Tensor *factor,
                        char *err, size_t err_len) {
  return guarded(err, err_len, "unknown C++ exception in at::_foreach_mul_", [&] {
    at::NoGradGuard no_grad;
    at::_ops::_foreach_mul__Tensor::call(gather(tensors, n), *factor);
    return 0;
  });
}

// Zero each of `n` tensors in place (on CUDA one multi-tensor launch).
int gantry_foreach_zero_(const at::Tensor *const *tensors, size_t n, char *err, size_t err_len) {
  return guarded(err, err_len, "unknown C++ exception in at::_foreach_zero_", [&] {
    at::NoGradGuard no_grad;
    at::_ops::_foreach_zero_::call(gather(tensors, n));
    return 0;
  });
}

}  // extern "C"
