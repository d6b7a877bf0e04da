// Helpers the CUDA glue files share (torch- and CUDA-runtime-dependent: glue code only, never device headers).
#pragma once

#include <c10/core/Device.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime_api.h>

#include <atomic>

namespace fusedlab {

// Streaming multiprocessors of a device, asked once per device: launch plans size their grids by it.
inline int sm_count(c10::DeviceIndex device) {
  static std::atomic<int> cache[64];
  if (device >= 0 && device < 64) {
    const int known = cache[device].load(std::memory_order_relaxed);
    if (known > 0) return known;
  }
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  if (device >= 0 && device < 64) cache[device].store(n, std::memory_order_relaxed);
  return n;
}

}  // namespace fusedlab
