// C entry points for two autograd operations tch 0.24 does not bind:
//
// - `gantry_backward_with`: backward from a non-scalar output with a given gradient
//   (`out.backward(grad)`). Without it a unit's backward has to be seeded with
//   `(out * grad).sum()`, which costs a multiply, a reduction and their backward over the
//   whole activation for every unit.
// - `gantry_set_grad`: point a parameter's `.grad` at a tensor of the caller's choosing
//   (Python's `p.grad = g`). The trainer points every parameter's gradient at a view into a
//   flat per-bucket buffer; autograd then accumulates into it in place (the accumulate-grad
//   node adds into a defined `.grad` when grad mode is off, as it is during backward), so a
//   bucket needs no packing before it is reduced or handed to the optimizer.
//
// Tensors arrive as tch handles (`C_tensor*` is an `at::Tensor*`). Errors come back through
// the caller's buffer, never as exceptions.

#include <ATen/core/Tensor.h>

#include "shim_report.h"

#include <cstddef>
#include <sstream>

using gantry_shim::guarded;
using gantry_shim::report;

extern "C" {

// Backpropagate `grad` (same shape as `output`) from `output`, accumulating into the leaves'
// `.grad`; the graph is freed. Returns 0, or 1 with a message in `err`.
int gantry_backward_with(const at::Tensor *output, const at::Tensor *grad, char *err,
                         size_t err_len) {
  return guarded(err, err_len, "unknown C++ exception in Tensor::backward", [&] {
    output->backward(*grad, /*retain_graph=*/false, /*create_graph=*/false);
    return 0;
  });
}

// Make `grad` the `.grad` of `param` (shared, not copied). It must match the parameter's
// dtype, device and shape, the checks Python's `p.grad = g` makes. Returns 0, or 1 with a
// message in `err`.
int gantry_set_grad(const at::Tensor *param, const at::Tensor *grad, char *err,
                    size_t err_len) {
  return guarded(err, err_len, "unknown C++ exception setting a gradient", [&] {
    if (grad->scalar_type() != param->scalar_type() || grad->device() != param->device() ||
        grad->sizes() != param->sizes()) {
      std::ostringstream msg;
      msg << "gradient " << grad->toString() << grad->sizes() << " on " << grad->device()
          << " does not match parameter " << param->toString() << param->sizes() << " on "
          << param->device();
      report(err, err_len, msg.str().c_str());
      return 1;
    }
    param->mutable_grad() = *grad;
    return 0;
  });
}

}  // extern "C"
