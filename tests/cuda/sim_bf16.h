// bfloat16 stand-in for the host simulation of the cat kernels: the bits of a float's upper half, rounded to
// nearest even on store (as __float2bfloat16_rn), with its fp32 view for fusedlab/cat_cuda_common.cuh.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "fusedlab/cat_cuda_common.cuh"

struct SimBf16 {
  uint16_t bits;
};

template <>
struct fusedlab::cat::cuda::Elem<SimBf16> {
  static float load(SimBf16 x) {
    const uint32_t u = static_cast<uint32_t>(x.bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  static SimBf16 store(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if (std::isnan(f)) return SimBf16{0x7fc0};
    u += 0x7fffu + ((u >> 16) & 1u);
    return SimBf16{static_cast<uint16_t>(u >> 16)};
  }
};
