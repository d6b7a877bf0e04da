// Shared by the CUDA kernels of the cat family (cat_decode.cuh, cat_attention.cuh): fp32 views of the stored
// element types, exp2/log2 that also run in the host simulation (tests/cuda/host_sim.h), and the
// online-softmax merge weight. Torch-free.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#include <cassert>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#include "fusedlab/macros.h"

// Loop unrolling for nvcc; host compilers (the simulation) just run the loop.
#if defined(__CUDACC__)
#define FL_UNROLL _Pragma("unroll")
#else
#define FL_UNROLL
#endif

// Device-side check of user-supplied values; the torch glue maps it to CUDA_KERNEL_ASSERT.
#ifndef FL_KERNEL_ASSERT
#define FL_KERNEL_ASSERT(cond) assert(cond)
#endif

namespace fusedlab {
namespace cat {
namespace cuda {

// fp32 view of a stored element, and back. The host simulation adds its own bfloat16 stand-in.
template <typename T>
struct Elem;

template <>
struct Elem<float> {
  static FL_HD FL_INLINE float load(float x) { return x; }
  static FL_HD FL_INLINE float store(float x) { return x; }
};

#if defined(__CUDACC__)
template <>
struct Elem<__half> {
  static __device__ FL_INLINE float load(__half x) { return __half2float(x); }
  static __device__ FL_INLINE __half store(float x) { return __float2half_rn(x); }
};

template <>
struct Elem<__nv_bfloat16> {
  static __device__ FL_INLINE float load(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ FL_INLINE __nv_bfloat16 store(float x) { return __float2bfloat16_rn(x); }
};
#endif

FL_HD FL_INLINE float exp2_f32(float x) {
#if defined(__CUDA_ARCH__)
  return exp2f(x);
#else
  return std::exp2(x);
#endif
}

// x * y rounded on its own: never contracted into an FMA with what consumes it, so a product recomputed in
// another kernel has the same bits wherever it is used.
FL_HD FL_INLINE float mul_rn(float x, float y) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(x, y);
#else
  return x * y;
#endif
}

// acc + x * y as one fused multiply-add on the device whatever -fmad says, so kernels that recompute the same
// sums (a forward and its backward) get the same bits; the host build (the simulation) rounds the product.
FL_HD FL_INLINE float fma_rn(float x, float y, float acc) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(x, y, acc);
#else
  return acc + x * y;
#endif
}

FL_HD FL_INLINE float log2_f32(float x) {
#if defined(__CUDA_ARCH__)
  return log2f(x);
#else
  return std::log2(x);
#endif
}

// Weight of an online-softmax state with running max m in a merge whose max is mx; a state that saw no key
// (m = -inf) weighs 0, also when mx is -inf too (exp2(-inf - -inf) would be NaN).
FL_HD FL_INLINE float state_weight(float m, float mx) { return m == -INFINITY ? 0.0f : exp2_f32(m - mx); }

}  // namespace cuda
}  // namespace cat
}  // namespace fusedlab
