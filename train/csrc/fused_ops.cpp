// Fused operators with their own autograd functions (`torch::autograd::Function`), so the
// existing autograd engine, `gantry_backward_with` and the flat gradient buffers work on them
// unchanged.
//
// - `gantry_linear_gelu_tanh`: GPT-2's MLP input projection, gelu_tanh(x·wᵀ + b). ATen runs
//   addmm, then GELU (a tanh per element), and in backward gelu_backward (a tanh per element
//   again) before the matmuls. Here the forward computes GELU in place over the addmm output
//   and, in the same pass and with one exponential, its derivative, which is all backward
//   needs from the activation: backward is one multiply, the bias column sum and the two
//   matmuls. Saved: x, w and the derivative (eager saves x, w and the pre-activation).
//
// - `gantry_linear`: x·wᵀ + b for every other linear layer of the model, autograd like
//   `at::linear`'s. What differs is the kernel: in f32 the forward and the input gradient run
//   on oneDNN (`mkldnn::_linear_pointwise`, the op TorchInductor emits for CPU linears) instead
//   of MKL's sgemm, which libtorch uses for `at::linear` and `mm`. On AMD CPUs MKL takes its
//   AVX2 "zen" path; oneDNN's kernels were 5-10% faster on this project's Zen 4 VM for the
//   model's shapes, and matmuls are 60-85% of a CPU training step. The weight gradient runs on
//   oneDNN's matmul (ATen's `mkldnn_matmul`, which reads the transposed gradient in place) and
//   is added by the matmul itself into the parameter's `.grad` where the trainer's flat buffers
//   already hold one (`weight_grad`). f64 (tests) and libtorch builds without oneDNN run ATen's
//   addmm/mm.
//   `gantry_linear_gelu_tanh` uses the same two kernels.
//
// Tensors arrive as tch handles (`at::Tensor*`); the result is handed back as a new handle
// that tch owns (`at_free` deletes it). Errors come back through the caller's buffer.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/accumulate.h>
#include <torch/csrc/autograd/custom_function.h>

#include "shim_report.h"

#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

// gelu_avx2.cpp, built with -mavx2 -mfma where the target is x86-64 (else a stub that says so).
extern "C" void gantry_gelu_tanh_avx2(const float *in, float *out, float *deriv, int64_t n);
extern "C" int gantry_gelu_avx2_built();

// ATen's oneDNN matmul: result = beta·result + alpha·(mat1·mat2), reading a transposed operand
// in place and adding into `result` by oneDNN's sum post-op. Exported by libtorch (TORCH_API)
// but its header (ATen/native/mkldnn/Matmul.h) is not shipped, hence the declaration. Without
// oneDNN in libtorch it throws, so it is only called where `at::hasMKLDNN()`.
namespace at::native {
TORCH_API void mkldnn_matmul(const Tensor &mat1, const Tensor &mat2, const Tensor &result, float beta,
                             float alpha);
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

bool has_avx2_fma() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool ok =
      gantry_gelu_avx2_built() != 0 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

// The same formula as gelu_avx2.cpp, element by element (float64, and float32 on a CPU
// without AVX2/FMA).
template <typename T>
void gelu_tanh_scalar(const T *in, T *out, T *deriv, int64_t n) {
  const T beta = T(0.7978845608028654), c = T(0.044715);
  for (int64_t i = 0; i < n; ++i) {
    T x = in[i], x2 = x * x;
    T z = std::exp(-T(2) * beta * x * (T(1) + c * x2));
    T s = T(1) / (T(1) + z);
    T xs = x * s;
    deriv[i] = s + xs * (z * s) * T(2) * beta * (T(1) + T(3) * c * x2);
    out[i] = xs;
  }
}

// GELU of `pre` in place, its derivative into a new tensor (returned). `pre` is contiguous.
at::Tensor gelu_tanh_inplace(at::Tensor &pre) {
  at::Tensor deriv = at::empty_like(pre);
  const int64_t n = pre.numel();
  // Chunks of at least 16K elements: below that a thread costs more than it saves.
  constexpr int64_t grain = 1 << 14;
  if (pre.scalar_type() == at::kFloat) {
    float *p = pre.data_ptr<float>(), *d = deriv.data_ptr<float>();
    const bool avx2 = has_avx2_fma();
    at::parallel_for(0, n, grain, [&](int64_t b, int64_t e) {
      if (avx2) {
        gantry_gelu_tanh_avx2(p + b, p + b, d + b, e - b);
      } else {
        gelu_tanh_scalar<float>(p + b, p + b, d + b, e - b);
      }
    });
  } else {
    double *p = pre.data_ptr<double>(), *d = deriv.data_ptr<double>();
    at::parallel_for(0, n, grain, [&](int64_t b, int64_t e) { gelu_tanh_scalar<double>(p + b, p + b, d + b, e - b); });
  }
  return deriv;
}

// oneDNN's linear, `mkldnn::_linear_pointwise(X, W, B, attr, scalars, algorithm)`: X·Wᵀ + B
// for a 2-d X and a [out, in] W of any strides (X is made contiguous inside). Looked up once;
// absent where libtorch was built without oneDNN.
using DnnLinearFn = at::Tensor(const at::Tensor &, const at::Tensor &, const std::optional<at::Tensor> &,
                               c10::string_view, c10::List<std::optional<c10::Scalar>>,
                               std::optional<c10::string_view>);

const std::optional<c10::TypedOperatorHandle<DnnLinearFn>> &dnn_linear() {
  static const std::optional<c10::TypedOperatorHandle<DnnLinearFn>> op =
      []() -> std::optional<c10::TypedOperatorHandle<DnnLinearFn>> {
    if (!at::hasMKLDNN()) return std::nullopt;
    auto handle = c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
    if (!handle.has_value()) return std::nullopt;
    try {
      return handle->typed<DnnLinearFn>();
    } catch (const std::exception &) {
      return std::nullopt;  // another signature in this libtorch: ATen's matmul it is
    }
  }();
  return op;
}

// x2 [M, in] · wᵀ (+ b) for w [out, in], any strides: oneDNN in f32 where there is one.
at::Tensor mm_nt(const at::Tensor &x2, const at::Tensor &w, const at::Tensor &b) {
  const auto &dnn = dnn_linear();
  // Empty operands stay with ATen, which defines them (zeros for an empty inner dimension).
  if (dnn.has_value() && x2.scalar_type() == at::kFloat && x2.numel() > 0 && w.numel() > 0) {
    const std::optional<at::Tensor> bias = b.defined() ? std::optional<at::Tensor>(b) : std::nullopt;
    return dnn->call(x2, w, bias, "none", c10::List<std::optional<c10::Scalar>>(), std::nullopt);
  }
  return b.defined() ? at::addmm(b, x2, w.t()) : at::mm(x2, w.t());
}

// g [M, out] · w for w [out, in]: the input gradient of a linear layer.
at::Tensor mm_nn(const at::Tensor &g, const at::Tensor &w) { return mm_nt(g, w.t(), at::Tensor()); }

// `x` [..., n] as [rows, n]; explicit rows, since `reshape({-1, 0})` of an empty tensor is
// ambiguous to ATen.
at::Tensor as_rows(const at::Tensor &x, int64_t n) {
  const int64_t rows = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  return x.reshape({rows, n});
}

std::vector<int64_t> out_shape(const at::Tensor &x, int64_t out) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out;
  return shape;
}

// result = beta·result + a·b: oneDNN in f32 (5-8% faster than MKL's sgemm for the weight
// gradients' shapes on the Zen 4 VM, 2 threads, with the transposed gradient read in place),
// ATen's addmm (MKL) for f64 and empty operands.
void matmul_into(const at::Tensor &result, const at::Tensor &a, const at::Tensor &b, float beta) {
  if (at::hasMKLDNN() && result.scalar_type() == at::kFloat && a.scalar_type() == at::kFloat &&
      b.scalar_type() == at::kFloat && a.numel() > 0 && b.numel() > 0) {
    at::native::mkldnn_matmul(a, b, result, beta, 1.f);
  } else if (beta == 0.f) {
    at::mm_out(const_cast<at::Tensor &>(result), a, b);
  } else {
    result.addmm_(a, b);
  }
}

// The weight gradient gᵀ·x for w [out, in] (g [M, out], x2 [M, in]). Where autograd would add
// it into a `.grad` the parameter already has (the trainer's flat gradient buffers, zeroed once
// per step), the matmul adds it there itself and nothing is returned, so autograd skips the
// accumulate node for it: no [out, in] temporary per micro-batch and no separate pass adding it
// in (Megatron's gradient-accumulation fusion). Elsewhere (no `.grad` yet, another kind or
// shape, a strided `.grad`, grad mode on for a double backward) the gradient is returned for
// autograd to place.
std::atomic<uint64_t> accumulated_in_place{0};  // for tests: the fusion really happens

at::Tensor weight_grad(const at::Tensor &w, const at::Tensor &g, const at::Tensor &x2) {
  if (w.is_leaf() && !at::GradMode::is_enabled()) {
    const at::Tensor &acc = w.grad();
    // Contiguous, as the flat buckets' views are: oneDNN then writes the buffer in place.
    if (acc.defined() && acc.scalar_type() == g.scalar_type() && acc.device() == g.device() &&
        acc.sizes() == w.sizes() && acc.is_contiguous() && !acc.requires_grad()) {
      matmul_into(acc, g.t(), x2, 1.f);
      accumulated_in_place.fetch_add(1, std::memory_order_relaxed);
      return at::Tensor();
    }
  }
  at::Tensor gw = at::empty({g.size(1), x2.size(1)}, g.options());
  matmul_into(gw, g.t(), x2, 0.f);
  return gw;
}

// The gradients of x·wᵀ + b for the output gradient `g` [M, out] (past any activation):
// input, weight (see `weight_grad`) and bias, each only where autograd needs it.
variable_list linear_grads(AutogradContext *ctx, const at::Tensor &x, const at::Tensor &w, const at::Tensor &g) {
  at::Tensor gx, gw, gb;
  if (ctx->needs_input_grad(0)) gx = mm_nn(g, w).view(x.sizes());
  if (ctx->needs_input_grad(1)) gw = weight_grad(w, g, as_rows(x, x.size(-1)));
  if (ctx->saved_data["bias"].toBool() && ctx->needs_input_grad(2)) gb = g.sum(0);
  return {gx, gw, gb};
}

struct Linear : public torch::autograd::Function<Linear> {
  static at::Tensor forward(AutogradContext *ctx, const at::Tensor &x, const at::Tensor &w,
                            const std::optional<at::Tensor> &bias) {
    const at::Tensor b = bias.has_value() ? *bias : at::Tensor();
    ctx->save_for_backward({x, w});
    ctx->saved_data["bias"] = b.defined();
    return mm_nt(as_rows(x, x.size(-1)), w, b).view(out_shape(x, w.size(0)));
  }

  static variable_list backward(AutogradContext *ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &w = saved[1];
    return linear_grads(ctx, x, w, as_rows(grads[0], w.size(0)));
  }
};

struct LinearGeluTanh : public torch::autograd::Function<LinearGeluTanh> {
  static at::Tensor forward(AutogradContext *ctx, const at::Tensor &x, const at::Tensor &w,
                            const std::optional<at::Tensor> &bias) {
    const at::Tensor b = bias.has_value() ? *bias : at::Tensor();
    const int64_t in = x.size(-1), out = w.size(0);
    at::Tensor pre = mm_nt(as_rows(x, in), w, b);
    at::Tensor deriv = gelu_tanh_inplace(pre);
    ctx->save_for_backward({x, w, deriv});
    ctx->saved_data["bias"] = b.defined();
    return pre.view(out_shape(x, out));
  }

  static variable_list backward(AutogradContext *ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &w = saved[1], &deriv = saved[2];
    return linear_grads(ctx, x, w, as_rows(grads[0], w.size(0)).mul(deriv));
  }
};

std::string describe(const at::Tensor &t) {
  std::ostringstream s;
  s << t.toString() << t.sizes() << " on " << t.device();
  return s.str();
}

// Why the fused op cannot take these tensors, or an empty string.
std::string refusal(const at::Tensor &x, const at::Tensor &w, const at::Tensor &b) {
  if (!x.defined() || !w.defined()) return "input or weight is undefined";
  if (x.device().type() != at::kCPU || w.device().type() != at::kCPU ||
      (b.defined() && b.device().type() != at::kCPU))
    return "the fused operators run on the CPU; got input " + describe(x) + ", weight " + describe(w);
  auto k = x.scalar_type();
  if ((k != at::kFloat && k != at::kDouble) || w.scalar_type() != k || (b.defined() && b.scalar_type() != k))
    return "expected one kind, f32 or f64; got input " + describe(x) + ", weight " + describe(w) +
           (b.defined() ? ", bias " + describe(b) : "");
  if (x.dim() < 1 || w.dim() != 2 || x.size(-1) != w.size(1))
    return "input " + describe(x) + " does not match weight " + describe(w) + " ([out, in])";
  if (b.defined() && (b.dim() != 1 || b.size(0) != w.size(0)))
    return "bias " + describe(b) + " does not match weight " + describe(w);
  return "";
}

}  // namespace

using gantry_shim::guarded;
using gantry_shim::report;

// The shims' one body: refuse what `refusal` names, else *out = a new handle of Op applied to
// x, w and the optional bias; C++ exceptions reported through `err` (`what` when unnamed).
template <class Op>
int apply_checked(const at::Tensor *x, const at::Tensor *w, const at::Tensor *bias, at::Tensor **out, char *err,
                  size_t err_len, const char *what) {
  return guarded(err, err_len, what, [&] {
    at::Tensor b = bias ? *bias : at::Tensor();
    std::string why = refusal(*x, *w, b);
    if (!why.empty()) {
      report(err, err_len, why.c_str());
      return 1;
    }
    *out = new at::Tensor(Op::apply(*x, *w, bias ? std::optional<at::Tensor>(*bias) : std::nullopt));
    return 0;
  });
}

extern "C" {

// 1 when f32 linears run on oneDNN (libtorch has it and its `_linear_pointwise`), else 0.
int gantry_linear_uses_onednn() { return dnn_linear().has_value() ? 1 : 0; }

// How many weight gradients the linears' backward added straight into an existing `.grad`
// (see `weight_grad`) since the process started.
uint64_t gantry_linear_grads_accumulated_in_place() {
  return accumulated_in_place.load(std::memory_order_relaxed);
}

// *out = x·wᵀ + bias (oneDNN in f32, see the top of this file); `bias` may be null. Shapes,
// kinds and the result as for `gantry_linear_gelu_tanh`.
int gantry_linear(const at::Tensor *x, const at::Tensor *w, const at::Tensor *bias, at::Tensor **out, char *err,
                  size_t err_len) {
  return apply_checked<Linear>(x, w, bias, out, err, err_len, "unknown C++ exception in the linear layer");
}

// *out = gelu_tanh(x·wᵀ + bias) with the fused backward; `bias` may be null. `x` is
// `[..., in]`, `w` `[out, in]`, `bias` `[out]`, all f32 or all f64 on the CPU. Returns 0 with a
// new handle in *out, or 1 with a message in `err` (*out untouched).
int gantry_linear_gelu_tanh(const at::Tensor *x, const at::Tensor *w, const at::Tensor *bias, at::Tensor **out,
                            char *err, size_t err_len) {
  return apply_checked<LinearGeluTanh>(x, w, bias, out, err, err_len,
                                       "unknown C++ exception in the fused linear + GELU");
}

}  // extern "C"
