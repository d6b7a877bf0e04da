// CUDA kernels of the newton_schulz family around cuBLAS: the prologue (Frobenius norm, scale, cast and the
// wide orientation in two passes over G) and the epilogue's transposed copy. Torch-free: csrc/cuda/
// newton_schulz.cu checks arguments, allocates, calls the launchers at the bottom and runs the iteration on
// ATen's batched GEMMs. Semantics: python/fusedlab/reference/newton_schulz.py; arithmetic: the CPU kernel's
// (csrc/cpu/newton_schulz.cpp).
//
// Prologue, per matrix of a batch of contiguous sources S [rows, cols]:
//   pass 1 (sumsq_kernel): `chunks` blocks per matrix, each the float64 sum of squares of one contiguous
//     chunk, reduced in a fixed tree and written to partials[matrix * chunks + chunk];
//   pass 2 (scale_cast_kernel): every block first adds its matrix's partials in a fixed tree (the second
//     level of the reduction: no atomics, so the norm depends on the shape only, not on scheduling or on the
//     device), then writes cast(acc(S) * inv), inv = acc(1 / max(norm * norm_scale, eps)) with the norm in
//     float64 and acc = float64 for a float64 result, else float32, as the CPU kernel computes it. The write is
//     S itself (flat, coalesced) or S^T through 32 x 32 shared-memory tiles.
//
// Besides nvcc, tests/cuda/host_sim.h compiles these kernels as host C++ (a std::thread per CUDA thread, a
// barrier per __syncthreads), so they use shared-memory trees instead of warp shuffles, 1-D grids and blocks,
// and the conversions below have host versions (bit-exact round-to-nearest-even, as the device's).
#pragma once

#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__) && !defined(FL_HOST_SIM)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif
#if !defined(__CUDA_ARCH__)
#include <cmath>
#include <cstring>
#endif

#include "fusedlab/macros.h"

namespace fusedlab {
namespace newton_schulz {
namespace cuda {

constexpr int kThreads = 256;
constexpr int kTile = 32;                     // transposed writes: kTile x kTile tiles,
constexpr int kTileRows = kThreads / kTile;   // kTileRows rows of threads
constexpr int kUnroll = 8;                    // independent loads per thread and loop trip (memory parallelism)
constexpr int64_t kUnit = int64_t(kThreads) * kUnroll;  // elements per block and trip of the flat passes
constexpr int kMaxChunks = 4 * kThreads;      // partials per matrix: each thread adds at most 4 in the 2nd level
constexpr int64_t kMinChunk = 8192;           // elements per pass-1 block at least (fewer blocks for small ones)
constexpr int kBlocksPerSM = 8;               // pass-2 blocks aimed at per SM (2048 threads / kThreads)
constexpr int64_t kMaxGrid = 0x7fffffff;      // gridDim.x limit

// Storage types of the half types (layout of at::BFloat16 / at::Half, __nv_bfloat16 / __half).
struct bf16_t {
  uint16_t bits;
};
struct fp16_t {
  uint16_t bits;
};

// ------------------------------------------------------------------------------------------------ conversions

FL_HD FL_INLINE float float_from_bits(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

FL_HD FL_INLINE uint32_t bits_of_float(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

// float -> bfloat16, round to nearest even (c10::BFloat16's rounding; NaN -> 0x7FC0).
FL_HD FL_INLINE uint16_t bf16_bits_from_float(float f) {
  const uint32_t u = bits_of_float(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// float -> IEEE half, round to nearest even, overflow to inf, subnormals kept.
FL_HD FL_INLINE uint16_t fp16_bits_from_float(float f) {
  const uint32_t u = bits_of_float(f);
  const uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
  if (a >= 0x7f800000u) return static_cast<uint16_t>(sign | (a > 0x7f800000u ? 0x7e00u : 0x7c00u));
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520 rounds up to inf
  if (a >= 0x38800000u) {                                             // normal: >= 2^-14
    uint32_t r = a - 0x38000000u;                                     // exponent rebiased from 127 to 15
    r += 0x0fffu + ((r >> 13) & 1u);
    return static_cast<uint16_t>(sign | (r >> 13));
  }
  if (a <= 0x33000000u) return static_cast<uint16_t>(sign);  // <= 2^-25: rounds to zero (the tie included)
  const uint32_t e = a >> 23, mant = (a & 0x7fffffu) | 0x800000u;
  const uint32_t shift = 126u - e;  // 14 ... 24: the subnormal's units are 2^-24
  uint32_t q = mant >> shift;
  const uint32_t rem = mant & ((1u << shift) - 1u), half = 1u << (shift - 1u);
  if (rem > half || (rem == half && (q & 1u))) ++q;
  return static_cast<uint16_t>(sign | q);
}

FL_HD FL_INLINE float float_from_fp16_bits(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0x1fu) return float_from_bits(sign | 0x7f800000u | (m << 13));
  if (e == 0u) {
    const float v = static_cast<float>(m) * 5.9604644775390625e-8f;  // m * 2^-24, exact
    return sign ? -v : v;
  }
  return float_from_bits(sign | ((e + 112u) << 23) | (m << 13));
}

FL_HD FL_INLINE float widen(bf16_t v) { return float_from_bits(static_cast<uint32_t>(v.bits) << 16); }
FL_HD FL_INLINE float widen(fp16_t v) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(v.bits));
#else
  return float_from_fp16_bits(v.bits);
#endif
}
FL_HD FL_INLINE float widen(float v) { return v; }
FL_HD FL_INLINE double widen(double v) { return v; }

template <typename T>
struct Narrow;
template <>
struct Narrow<float> {
  static FL_HD FL_INLINE float from(float x) { return x; }
};
template <>
struct Narrow<double> {
  static FL_HD FL_INLINE double from(double x) { return x; }
};
template <>
struct Narrow<bf16_t> {
  static FL_HD FL_INLINE bf16_t from(float x) {
#if defined(__CUDA_ARCH__)
    return bf16_t{__bfloat16_as_ushort(__float2bfloat16_rn(x))};
#else
    return bf16_t{bf16_bits_from_float(x)};
#endif
  }
};
template <>
struct Narrow<fp16_t> {
  static FL_HD FL_INLINE fp16_t from(float x) {
#if defined(__CUDA_ARCH__)
    return fp16_t{__half_as_ushort(__float2half_rn(x))};
#else
    return fp16_t{fp16_bits_from_float(x)};
#endif
  }
};

// The CPU kernel's accumulation dtype: float64 for a float64 result, else float32.
template <typename TOut>
using AccOf = typename std::conditional<std::is_same<TOut, double>::value, double, float>::type;

// inv = acc(1 / max(sqrt(ss) * norm_scale, eps)), in float64 as the CPU kernel computes it; a NaN norm stays
// NaN (torch's clamp_min propagates it), and a zero matrix with eps = 0 gets inf (then 0 * inf = NaN, as on CPU).
template <typename Acc>
FL_HD FL_INLINE Acc inverse_norm(double ss, double norm_scale, double eps) {
  double d = sqrt(ss) * norm_scale;
  d = d < eps ? eps : d;
  return static_cast<Acc>(1.0 / d);
}

// ------------------------------------------------------------------------------------------------ plan

struct ProloguePlan {
  int64_t batch, rows, cols;  // the sources S [batch, rows, cols], contiguous
  bool transpose;             // write S^T [batch, cols, rows] instead of S
  int chunks;                 // pass-1 blocks (partial sums) per matrix
  int64_t chunk_len;          // elements per chunk (the last may be shorter)
  int groups;                 // pass-2 blocks per matrix, each taking every groups-th tile or unit
};

// `chunks` depends on the shape alone (so does the float64 norm, bit for bit); `groups` only spreads the
// elementwise pass-2 work over the device. min_chunk is a parameter for the host simulation only.
inline ProloguePlan plan_prologue(int64_t batch, int64_t rows, int64_t cols, bool transpose, int sm_count,
                                  int64_t min_chunk = kMinChunk) {
  ProloguePlan p{batch, rows, cols, transpose, 1, 1, 1};
  const int64_t numel = rows * cols;
  if (batch <= 0 || numel <= 0) return p;
  int64_t chunks = (numel + min_chunk - 1) / min_chunk;
  chunks = chunks < kMaxChunks ? chunks : kMaxChunks;
  const int64_t grid_cap = kMaxGrid / batch;
  chunks = chunks < grid_cap ? chunks : grid_cap;
  chunks = chunks > 1 ? chunks : 1;
  p.chunk_len = (numel + chunks - 1) / chunks;
  p.chunks = static_cast<int>((numel + p.chunk_len - 1) / p.chunk_len);  // no empty chunk
  const int64_t units =
      transpose ? ((rows + kTile - 1) / kTile) * ((cols + kTile - 1) / kTile) : (numel + kUnit - 1) / kUnit;
  const int64_t target = static_cast<int64_t>(sm_count > 0 ? sm_count : 1) * kBlocksPerSM;
  int64_t groups = (target + batch - 1) / batch;
  groups = groups < units ? groups : units;
  groups = groups < grid_cap ? groups : grid_cap;
  p.groups = static_cast<int>(groups > 1 ? groups : 1);
  return p;
}

// ------------------------------------------------------------------------------------------------ block tools

// Sum over the block of one double per thread, in a fixed tree (the same order on every run and device);
// every thread gets the result. Ends with a barrier, so a second call may follow at once.
__device__ FL_INLINE double block_sum(double v) {
  __shared__ double buf[kThreads];
  const int tid = threadIdx.x;
  buf[tid] = v;
  __syncthreads();
  for (int w = kThreads / 2; w > 0; w >>= 1) {
    if (tid < w) buf[tid] += buf[tid + w];
    __syncthreads();
  }
  const double r = buf[0];
  __syncthreads();
  return r;
}

// dst[c * rows + r] = f(src[r * cols + c]) over the tiles group, group + groups, ... of one matrix: read along
// rows of src, written along rows of dst, through a padded shared tile (no bank conflicts for 2- and 4-byte
// types). Every thread of the block makes the same trips (the barriers inside).
template <typename TIn, typename TOut, typename F>
__device__ FL_INLINE void transpose_tiles(const TIn* src, TOut* dst, int64_t rows, int64_t cols, int group, int groups,
                                          F f) {
  __shared__ TOut tile[kTile][kTile + 1];
  const int tx = threadIdx.x % kTile, ty = threadIdx.x / kTile;
  const int64_t tiles_c = (cols + kTile - 1) / kTile, tiles = ((rows + kTile - 1) / kTile) * tiles_c;
  for (int64_t t = group; t < tiles; t += groups) {
    const int64_t r0 = (t / tiles_c) * kTile, c0 = (t % tiles_c) * kTile;
    for (int i = ty; i < kTile; i += kTileRows) {
      const int64_t r = r0 + i, c = c0 + tx;
      if (r < rows && c < cols) tile[i][tx] = f(src[r * cols + c]);
    }
    __syncthreads();
    for (int i = ty; i < kTile; i += kTileRows) {
      const int64_t c = c0 + i, r = r0 + tx;
      if (c < cols && r < rows) dst[c * rows + r] = tile[tx][i];
    }
    __syncthreads();  // the tile is read before the next trip overwrites it
  }
}

template <typename T>
struct Identity {
  FL_HD FL_INLINE T operator()(T v) const { return v; }
};

template <typename TIn, typename TOut>
struct ScaleCast {
  AccOf<TOut> inv;
  FL_HD FL_INLINE TOut operator()(TIn v) const {
    return Narrow<TOut>::from(static_cast<AccOf<TOut>>(widen(v)) * inv);
  }
};

// ------------------------------------------------------------------------------------------------ kernels

// Pass 1: partials[m * chunks + k] = sum of squares (float64) of chunk k of matrix m.
template <typename TIn>
__global__ void __launch_bounds__(kThreads) sumsq_kernel(const TIn* __restrict__ src, double* __restrict__ partials,
                                                         ProloguePlan p) {
  const int64_t mat = blockIdx.x / p.chunks, k = blockIdx.x % p.chunks, numel = p.rows * p.cols;
  const TIn* s = src + mat * numel;
  const int64_t begin = k * p.chunk_len;
  const int64_t end = begin + p.chunk_len < numel ? begin + p.chunk_len : numel;
  double acc[kUnroll];
  for (int u = 0; u < kUnroll; ++u) acc[u] = 0.0;
  int64_t e = begin + threadIdx.x;
  for (; e + (kUnroll - 1) * kThreads < end; e += kUnit) {
    double v[kUnroll];
    for (int u = 0; u < kUnroll; ++u) v[u] = static_cast<double>(widen(s[e + u * kThreads]));
    for (int u = 0; u < kUnroll; ++u) acc[u] += v[u] * v[u];
  }
  for (; e < end; e += kThreads) {  // fewer than kUnroll trips left
    const double v = static_cast<double>(widen(s[e]));
    acc[0] += v * v;
  }
  double t = 0.0;
  for (int u = 0; u < kUnroll; ++u) t += acc[u];
  t = block_sum(t);
  if (threadIdx.x == 0) partials[blockIdx.x] = t;
}

// Pass 2: dst = cast(acc(S) * inv), as S [rows, cols] or, with Transpose, as S^T [cols, rows].
template <typename TIn, typename TOut, bool Transpose>
__global__ void __launch_bounds__(kThreads) scale_cast_kernel(const TIn* __restrict__ src, TOut* __restrict__ dst,
                                                              const double* __restrict__ partials, ProloguePlan p,
                                                              double norm_scale, double eps) {
  const int64_t mat = blockIdx.x / p.groups, numel = p.rows * p.cols;
  const int group = static_cast<int>(blockIdx.x % p.groups);
  // second level: each thread adds partials tid, tid + kThreads, ... (at most 4) in order, then the tree
  double v = 0.0;
  for (int k = threadIdx.x; k < p.chunks; k += kThreads) v += partials[mat * p.chunks + k];
  const ScaleCast<TIn, TOut> f{inverse_norm<AccOf<TOut>>(block_sum(v), norm_scale, eps)};
  const TIn* s = src + mat * numel;
  TOut* d = dst + mat * numel;
  if constexpr (Transpose) {
    transpose_tiles(s, d, p.rows, p.cols, group, p.groups, f);
  } else {
    for (int64_t base = group * kUnit; base < numel; base += static_cast<int64_t>(p.groups) * kUnit) {
      TIn x[kUnroll] = {};
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t e = base + u * kThreads + threadIdx.x;
        if (e < numel) x[u] = s[e];
      }
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t e = base + u * kThreads + threadIdx.x;
        if (e < numel) d[e] = f(x[u]);
      }
    }
  }
}

// The epilogue's copy: dst [batch, cols, rows] = src [batch, rows, cols]^T, T a same-sized word (the bits
// move unchanged). Block b takes tiles of matrix b / groups.
template <typename T>
__global__ void __launch_bounds__(kThreads) transpose_kernel(const T* __restrict__ src, T* __restrict__ dst,
                                                             int64_t rows, int64_t cols, int groups) {
  const int64_t mat = blockIdx.x / groups;
  transpose_tiles(src + mat * rows * cols, dst + mat * rows * cols, rows, cols, static_cast<int>(blockIdx.x % groups),
                  groups, Identity<T>());
}

// ------------------------------------------------------------------------------------------------ launchers

#if defined(__CUDACC__) && !defined(FL_HOST_SIM)

// partials: batch * plan.chunks doubles of scratch. Errors are for the caller's cudaGetLastError.
template <typename TIn, typename TOut>
void launch_prologue(const TIn* src, TOut* dst, double* partials, const ProloguePlan& p, double norm_scale,
                     double eps, cudaStream_t stream) {
  if (p.batch == 0 || p.rows * p.cols == 0) return;
  sumsq_kernel<TIn><<<static_cast<unsigned>(p.batch * p.chunks), kThreads, 0, stream>>>(src, partials, p);
  const unsigned grid = static_cast<unsigned>(p.batch * p.groups);
  if (p.transpose)
    scale_cast_kernel<TIn, TOut, true><<<grid, kThreads, 0, stream>>>(src, dst, partials, p, norm_scale, eps);
  else
    scale_cast_kernel<TIn, TOut, false><<<grid, kThreads, 0, stream>>>(src, dst, partials, p, norm_scale, eps);
}

// dst = src^T per matrix, for elements of elem_bytes (2, 4 or 8) bytes.
inline void launch_transpose(const void* src, void* dst, int64_t batch, int64_t rows, int64_t cols, int elem_bytes,
                             int sm_count, cudaStream_t stream) {
  if (batch == 0 || rows * cols == 0) return;
  const int groups = plan_prologue(batch, rows, cols, true, sm_count).groups;
  const unsigned grid = static_cast<unsigned>(batch * groups);
  switch (elem_bytes) {
    case 2:
      transpose_kernel<uint16_t><<<grid, kThreads, 0, stream>>>(static_cast<const uint16_t*>(src),
                                                                 static_cast<uint16_t*>(dst), rows, cols, groups);
      break;
    case 4:
      transpose_kernel<uint32_t><<<grid, kThreads, 0, stream>>>(static_cast<const uint32_t*>(src),
                                                                 static_cast<uint32_t*>(dst), rows, cols, groups);
      break;
    default:
      transpose_kernel<uint64_t><<<grid, kThreads, 0, stream>>>(static_cast<const uint64_t*>(src),
                                                                 static_cast<uint64_t*>(dst), rows, cols, groups);
      break;
  }
}

#endif  // __CUDACC__ && !FL_HOST_SIM

}  // namespace cuda
}  // namespace newton_schulz
}  // namespace fusedlab
