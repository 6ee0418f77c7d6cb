// Shared by the C shims: C++ exceptions never cross into Rust; their message is copied into a
// caller-provided buffer instead.
#pragma once

#include <cstddef>
#include <cstring>
#include <exception>

namespace gantry_shim {

inline void report(char *err, size_t err_len, const char *msg) {
  if (err == nullptr || err_len == 0) return;
  std::strncpy(err, msg, err_len - 1);
  err[err_len - 1] = '\0';
}

// Run `body` (returning 0 on success, nonzero with `err` filled on a refusal); an exception
// becomes 1 with its message in `err`, or `what` for one that is not a std::exception.
template <typename Body>
int guarded(char *err, size_t err_len, const char *what, Body &&body) {
  try {
    return body();
  } catch (const std::exception &e) {
    report(err, err_len, e.what());
  } catch (...) {
    report(err, err_len, what);
  }
  return 1;
}

}  // namespace gantry_shim
