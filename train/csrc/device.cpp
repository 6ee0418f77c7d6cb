// Make a CUDA device this thread's current one (`torch.cuda.set_device(i)`), which tch 0.24
// does not bind. A rank computes on `cuda:{local rank}`; its tensors carry that device, but
// anything libtorch does on "the current device" (the current stream, the CUDA context a
// library call creates) would otherwise land on device 0, so every rank of a host would hold a
// context on GPU 0.
//
// Goes through the device guard registered for CUDA, which exists only once libtorch_cuda.so is
// loaded: without it the call fails with libtorch's message instead of crashing. Errors come
// back through the caller's buffer (shim_report.h).

#include <c10/core/Device.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include "shim_report.h"

#include <cstddef>

using gantry_shim::guarded;
using gantry_shim::report;

extern "C" {

// Set the current CUDA device of the calling thread to `index`. Returns 0, or 1 with a message.
int gantry_set_cuda_device(int index, char *err, size_t err_len) {
  return guarded(err, err_len, "unknown C++ exception setting the CUDA device", [&] {
    if (!c10::impl::hasDeviceGuardImpl(c10::DeviceType::CUDA)) {
      report(err, err_len, "libtorch has no CUDA backend loaded (libtorch_cuda.so)");
      return 1;
    }
    c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)
        ->setDevice(c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(index)));
    return 0;
  });
}

}  // extern "C"
