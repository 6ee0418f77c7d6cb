// CUDA autocast through libtorch's current (non-deprecated) API, for three reasons tch 0.24
// cannot serve:
//
// - `tch::autocast(true, ..)` only switches CUDA autocast on; its dtype stays libtorch's
//   default, `Half`. Gantry trains with no grad scaler, so it needs `BFloat16`
//   (`at::autocast::set_autocast_dtype(at::kCUDA, at::kBFloat16)`), which tch does not bind.
// - tch calls the deprecated `at::autocast::is_enabled()` / `set_enabled()`, each of which
//   prints a deprecation warning, around every unit's forward.
// - Both settings are per thread, so whoever enters autocast must restore them on exit.
//
// `gantry_autocast_enter` / `gantry_autocast_exit` do what `torch.autocast("cuda", dtype)`'s
// __enter__/__exit__ (and tch's `autocast`) do, with `is_autocast_enabled(at::kCUDA)` and
// friends: remember the previous state, set dtype and enabled, increment the nesting; on exit
// decrement it, clear the cast cache when the outermost autocast ends, restore the previous
// enabled flag and dtype. The query works without a GPU (the flags are thread-local state in
// libtorch_cpu), so the CPU tests check it.
//
// Dtypes cross as `c10::ScalarType` numbers; the ones the Rust side names are pinned below.
// Errors come back through the caller's buffer, never as exceptions (shim_report.h).

#include <ATen/autocast_mode.h>

#include "shim_report.h"

#include <cstddef>

using gantry_shim::guarded;

static_assert(static_cast<int>(at::kHalf) == 5, "c10::ScalarType::Half moved");
static_assert(static_cast<int>(at::kFloat) == 6, "c10::ScalarType::Float moved");
static_assert(static_cast<int>(at::kBFloat16) == 15, "c10::ScalarType::BFloat16 moved");

extern "C" {

// This thread's CUDA autocast state: whether it is on and the dtype it casts to.
int gantry_autocast_state(int *enabled, int *dtype, char *err, size_t err_len) {
  return guarded(err, err_len, "unknown C++ exception reading the autocast state", [&] {
    *enabled = at::autocast::is_autocast_enabled(at::kCUDA) ? 1 : 0;
    *dtype = static_cast<int>(at::autocast::get_autocast_dtype(at::kCUDA));
    return 0;
  });
}

// Enter CUDA autocast on this thread with `enabled` and `dtype`; the state before is written
// to `prev_enabled` / `prev_dtype` for `gantry_autocast_exit`.
int gantry_autocast_enter(int enabled, int dtype, int *prev_enabled, int *prev_dtype, char *err,
                          size_t err_len) {
  return guarded(err, err_len, "unknown C++ exception entering autocast", [&] {
    *prev_enabled = at::autocast::is_autocast_enabled(at::kCUDA) ? 1 : 0;
    *prev_dtype = static_cast<int>(at::autocast::get_autocast_dtype(at::kCUDA));
    at::autocast::set_autocast_dtype(at::kCUDA, static_cast<at::ScalarType>(dtype));
    at::autocast::set_autocast_enabled(at::kCUDA, enabled != 0);
    at::autocast::increment_nesting();
    return 0;
  });
}

// Leave the autocast `gantry_autocast_enter` entered: the outermost exit clears the cache of
// casted weights; the previous enabled flag and dtype come back.
int gantry_autocast_exit(int prev_enabled, int prev_dtype, char *err, size_t err_len) {
  return guarded(err, err_len, "unknown C++ exception leaving autocast", [&] {
    if (at::autocast::decrement_nesting() == 0) {
      at::autocast::clear_cache();
    }
    at::autocast::set_autocast_enabled(at::kCUDA, prev_enabled != 0);
    at::autocast::set_autocast_dtype(at::kCUDA, static_cast<at::ScalarType>(prev_dtype));
    return 0;
  });
}

}  // extern "C"
