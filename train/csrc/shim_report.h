// Shared by the C shims: C++ exceptions never cross into Rust; their message is copied into a
// caller-provided buffer instead.
#pragma once

#include <cstddef>
#include <cstring>

namespace gantry_shim {

inline void report(char *err, size_t err_len, const char *msg) {
  if (err == nullptr || err_len == 0) return;
  std::strncpy(err, msg, err_len - 1);
  err[err_len - 1] = '\0';
}

}  // namespace gantry_shim
