// CUDA kernels of the resample family. Torch-free: csrc/cuda/resample.cu only checks arguments, allocates
// and calls the launchers at the bottom. Numerics come from fusedlab/resample.h (shared with the CPU kernels);
// python/fusedlab/reference/resample.py defines the semantics.
//
// Layout: one thread block per group (grid-stride over groups). Per group: max, then weights with their sums
// and the last positive index, then the decision; when resampling, a block-wide scan builds the CDF (shared
// memory for K <= kSharedMaxK, else a global float64 workspace row per block) and every point is located by
// binary search. Multinomial and residual never sort: each uniform is located, offspring are counted with
// atomics, and the sorted ancestor vector is written from the inclusive scan of the counts (output i takes the
// first j whose count prefix exceeds i), which is the same as merging the sorted uniforms.
//
// Besides nvcc, tests/cuda/host_sim.h compiles the kernels as host C++ (one std::thread per CUDA thread,
// std::barrier for __syncthreads) so their logic runs, race-checked, on machines without a GPU; hence only
// the constructs that file emulates are used here.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#include <cassert>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#endif

#include "fusedlab/macros.h"
#include "fusedlab/philox.h"
#include "fusedlab/resample.h"

// Device-side check of user-supplied ancestors; the torch glue maps it to CUDA_KERNEL_ASSERT.
#ifndef FL_KERNEL_ASSERT
#define FL_KERNEL_ASSERT(cond) assert(cond)
#endif

namespace fusedlab {
namespace resample {
namespace cuda {

constexpr int kThreads = 256;
// Groups of at most kSmallMaxK particles (with shared-memory scratch) are resampled by blocks of kSmallThreads:
// a 256-thread block would leave three quarters of its threads idle through every barrier of the group.
constexpr int kSmallThreads = 64;
constexpr int kSmallMaxK = 64;
// Groups up to this size keep their CDF (K doubles) and offspring counts (K ints) in shared memory.
constexpr int kSharedMaxK = 4096;
// Largest K: tile offsets (j + kThreads) stay far from int overflow, and counts fit an int.
constexpr int64_t kMaxK = int64_t(1) << 30;
// gather_ stages a whole group in shared memory when it is at most this big (fits the default 48 KiB).
constexpr int64_t kStageMaxBytes = 32 * 1024;
// Fused resample+gather when each block's copy is small or there are enough groups to fill the GPU.
constexpr int64_t kFusedMaxGroupBytes = 32 * 1024;
constexpr int kFusedMinBlocksPerSM = 2;
// Global-workspace path (one scratch row per block): the grid shrinks to keep the rows within this many bytes.
constexpr int64_t kWorkspaceBudget = int64_t(512) << 20;

// ------------------------------------------------------------------------------------------------ parameters

template <typename scalar_t>
struct ResampleParams {
  const scalar_t* lw;   // [B, K]
  const double* u;      // [B, u_cols], or null: the kernel draws them from `rng` (fusedlab/philox.h)
  scalar_t* lw_out;     // [B, K]
  int64_t* anc;         // [B, K]
  double* ess;          // [B]
  double* log_norm;     // [B]
  uint8_t* status;      // [B, 2]: the resampled and degenerate flags as 0/1 bytes
  double* ws_cdf;       // [gridDim.x, K] when K > kSharedMaxK, else null
  int* ws_count;        // [gridDim.x, K] likewise (multinomial and residual only)
  int64_t B;
  int K;
  int u_cols;
  int method;
  double ess_threshold;
  PhiloxArgs rng;  // used when u is null
};

// Rows of `row_vecs` vectors of `vec_bytes` bytes; `lanes` = 1 << log2_lanes threads share a row.
struct RowsParams {
  const void* src;
  void* dst;
  int64_t row_vecs;
  int vec_bytes;
  int log2_lanes;
};

// n / d for n < 2^31 with a multiply-high instead of a division (same scheme as ATen's IntDivider).
struct FastDivU32 {
  uint32_t d, magic, shift;
  FastDivU32() : d(1), magic(1), shift(0) {}
  explicit FastDivU32(uint32_t divisor) : d(divisor), magic(1), shift(0) {
    while (shift < 31 && (uint32_t(1) << shift) < d) ++shift;
    magic = static_cast<uint32_t>(((uint64_t(1) << 32) * ((uint64_t(1) << shift) - d)) / d + 1);
  }
  FL_HD FL_INLINE uint32_t div(uint32_t n) const {
#if defined(__CUDA_ARCH__)
    const uint32_t t = __umulhi(n, magic);
#else
    const uint32_t t = static_cast<uint32_t>((uint64_t(n) * magic) >> 32);
#endif
    return (t + n) >> shift;
  }
};

// ------------------------------------------------------------------------------------------------ block tools

struct Sums {
  double a, b;
  int last;
};

struct SumsOp {
  __device__ FL_INLINE Sums operator()(const Sums& x, const Sums& y) const {
    return Sums{x.a + y.a, x.b + y.b, x.last > y.last ? x.last : y.last};
  }
};

struct MaxOp {
  __device__ FL_INLINE double operator()(double x, double y) const { return x > y ? x : y; }
};

// Carries the running total of a tiled block scan from one tile to the next (only warp 0's copy is used).
template <typename T>
struct RunningPrefix {
  T total;
  __device__ FL_INLINE T operator()(T block_aggregate) {
    const T old = total;
    total += block_aggregate;
    return old;
  }
};

// A block's shared state for resampling one group at a time with NT threads.
template <int NT>
struct GroupShared {
  using ReduceMax = cub::BlockReduce<double, NT>;
  using ReduceSums = cub::BlockReduce<Sums, NT>;
  using ScanD = cub::BlockScan<double, NT, cub::BLOCK_SCAN_WARP_SCANS>;
  using ScanI = cub::BlockScan<int, NT, cub::BLOCK_SCAN_WARP_SCANS>;
  union {
    typename ReduceMax::TempStorage max;
    typename ReduceSums::TempStorage sums;
    typename ScanD::TempStorage scan_d;
    typename ScanI::TempStorage scan_i;
  } tmp;
  double m;
  Sums sums, rsums;
};

#if !defined(FL_HOST_SIM)
__device__ FL_INLINE unsigned char* dynamic_smem() {
  extern __shared__ __align__(16) unsigned char fl_dynamic_smem[];
  return fl_dynamic_smem;
}
#endif

// cnt[0..K) (offspring counts, M in total) -> out[0..M): j repeated cnt[j] times, in order of j.
// Scans cnt in place into inclusive prefix sums; out[i] is then the first j with prefix > i, so every
// thread writes a balanced share however the offspring are spread. Caller syncs before (cnt complete).
template <int NT>
__device__ FL_INLINE void write_runs(int* cnt, int K, int64_t* out, int M, GroupShared<NT>& sh) {
  RunningPrefix<int> prefix{0};
  for (int t0 = 0; t0 < K; t0 += NT) {
    const int j = t0 + static_cast<int>(threadIdx.x);
    int v = j < K ? cnt[j] : 0;
    typename GroupShared<NT>::ScanI(sh.tmp.scan_i).InclusiveSum(v, v, prefix);
    if (j < K) cnt[j] = v;
    __syncthreads();
  }
  for (int i = threadIdx.x; i < M; i += NT) {
    int lo = 0, hi = K - 1;  // cnt[K-1] == M > i
    while (lo < hi) {
      const int mid = lo + (hi - lo) / 2;
      if (cnt[mid] > i) hi = mid; else lo = mid + 1;
    }
    out[i] = lo;
  }
}

// ------------------------------------------------------------------------------------------------ one group

// Resample group b with the whole block (NT threads). `cdf` and `cnt` are K-long scratch rows (shared or global).
template <typename scalar_t, int NT>
__device__ FL_INLINE void resample_group(const ResampleParams<scalar_t>& p, int64_t b, double* cdf, int* cnt,
                                         GroupShared<NT>& sh) {
  const int K = p.K;
  const int tid = threadIdx.x;
  const scalar_t* x = p.lw + b * K;
  scalar_t* lw_out = p.lw_out + b * K;
  int64_t* anc = p.anc + b * K;
  const bool counting = p.method == kMultinomial || p.method == kResidual;

  __syncthreads();  // the previous group's scratch and broadcasts are free again

  double m = -INFINITY;
  for (int j = tid; j < K; j += NT) {
    const double v = clean_log_weight(static_cast<double>(x[j]));
    m = v > m ? v : m;
  }
  m = typename GroupShared<NT>::ReduceMax(sh.tmp.max).Reduce(m, MaxOp());
  if (tid == 0) sh.m = m;
  __syncthreads();
  m = sh.m;
  const bool degenerate = !(m > -INFINITY && m < INFINITY);

  Sums s{0.0, 0.0, -1};
  for (int j = tid; j < K; j += NT) {
    const double w = degenerate ? 1.0 : exp(clean_log_weight(static_cast<double>(x[j])) - m);
    cdf[j] = w;
    s.a += w;
    s.b += w * w;
    if (w > 0.0) s.last = j;  // j increases per thread
    if (counting) cnt[j] = 0;
  }
  s = typename GroupShared<NT>::ReduceSums(sh.tmp.sums).Reduce(s, SumsOp());
  if (tid == 0) sh.sums = s;
  __syncthreads();
  const double sw = sh.sums.a;
  const int last = sh.sums.last;  // >= 0: a finite max has weight 1, a degenerate group all 1
  const double e = degenerate ? 0.0 : ess(sw, sh.sums.b);
  const bool res = degenerate || should_resample(e, p.ess_threshold, K);
  if (tid == 0) {
    p.ess[b] = e;
    p.log_norm[b] = degenerate ? -INFINITY : log_norm(m, sw, K);
    p.status[2 * b] = res ? 1 : 0;
    p.status[2 * b + 1] = degenerate ? 1 : 0;
  }
  if (!res) {  // uniform over the block: every thread returns here
    const double log_total = m + log(sw), log_k = log(static_cast<double>(K));
    for (int j = tid; j < K; j += NT) {
      anc[j] = j;
      lw_out[j] = static_cast<scalar_t>(carried_log_weight(clean_log_weight(static_cast<double>(x[j])), log_total, log_k));
    }
    return;
  }
  for (int j = tid; j < K; j += NT) lw_out[j] = scalar_t(0);

  int base = 0, M = K, lst = last;
  double total = sw;
  if (p.method == kResidual) {
    // n_j = floor(K w_j / S) deterministic copies (residual_copies: whole numbers kept whole); the residuals
    // K w_j / S - n_j replace the weights.
    Sums r{0.0, 0.0, -1};
    for (int j = tid; j < K; j += NT) {
      const double kw = static_cast<double>(K) * cdf[j] / sw;
      const double n = residual_copies(kw, K);
      const double rw = residual_weight(kw, n);
      cdf[j] = rw;
      cnt[j] = static_cast<int>(n);
      r.a += rw;
      r.b += n;
      if (rw > 0.0) r.last = j;
    }
    r = typename GroupShared<NT>::ReduceSums(sh.tmp.sums).Reduce(r, SumsOp());
    if (tid == 0) sh.rsums = r;
    __syncthreads();
    r = sh.rsums;
    const int n_det = r.b < static_cast<double>(K) ? static_cast<int>(r.b) : K;
    write_runs(cnt, K, anc, n_det, sh);
    if (n_det == K) return;
    __syncthreads();  // everyone is done reading cnt before it is reset
    for (int j = tid; j < K; j += NT) cnt[j] = 0;
    base = n_det;
    M = K - n_det;
    total = r.a;
    lst = r.last >= 0 ? r.last : last;  // r.last < 0 only if rounding lost every residual
  }

  // CDF in place: cumsum / total, exactly 1 from lst on (tiles past lst need no scan).
  RunningPrefix<double> prefix{0.0};
  for (int t0 = 0; t0 < K; t0 += NT) {
    const int j = t0 + tid;
    if (t0 <= lst) {
      double v = j < K ? cdf[j] : 0.0;
      typename GroupShared<NT>::ScanD(sh.tmp.scan_d).InclusiveSum(v, v, prefix);
      if (j < K) cdf[j] = j >= lst ? 1.0 : v / total;
    } else if (j < K) {
      cdf[j] = 1.0;
    }
    __syncthreads();
  }

  // the group's uniforms: given, or drawn here from the call's Philox stream (no launch of their own)
  const double* u = p.u != nullptr ? p.u + b * p.u_cols : nullptr;
  uint64_t seed = 0, offset = 0;
  if (u == nullptr) philox_seed_offset(p.rng, seed, offset);
  auto uniform = [&](int i) { return u != nullptr ? u[i] : philox_uniform(seed, offset, b, i); };
  if (p.method == kSystematic || p.method == kStratified) {  // points already sorted: write in place
    const bool one = p.method == kSystematic;
    const double u0 = one ? uniform(0) : 0.0;
    for (int i = tid; i < K; i += NT) anc[i] = search_cdf(cdf, lst, grid_point(i, one ? u0 : uniform(i), K));
    return;
  }
  for (int i = tid; i < M; i += NT) atomicAdd(&cnt[search_cdf(cdf, lst, uniform(i))], 1);
  __syncthreads();
  write_runs(cnt, K, anc + base, M, sh);
}

// ------------------------------------------------------------------------------------------------ row copies

template <int kBytes> struct VecOf;
template <> struct VecOf<16> { using type = uint4; };
template <> struct VecOf<8> { using type = uint2; };
template <> struct VecOf<4> { using type = uint32_t; };
template <> struct VecOf<2> { using type = uint16_t; };
template <> struct VecOf<1> { using type = uint8_t; };

// One group: dst row i <- src row anc[i], rows of n vectors, `lanes` of the block's NT threads per row.
template <typename V, int NT>
__device__ FL_INLINE void copy_group_rows(const V* src, V* dst, const int64_t* anc, int K, int64_t n,
                                          int log2_lanes) {
  const int lanes = 1 << log2_lanes;
  const int lane = threadIdx.x & (lanes - 1);
  for (int i = threadIdx.x >> log2_lanes; i < K; i += NT >> log2_lanes) {
    const V* s = src + anc[i] * n;
    V* d = dst + static_cast<int64_t>(i) * n;
    for (int64_t c = lane; c < n; c += lanes) d[c] = s[c];
  }
}

template <int NT>
__device__ FL_INLINE void copy_group(const RowsParams& g, int64_t b, const int64_t* anc, int K) {
  const int64_t off = b * K * g.row_vecs;
  switch (g.vec_bytes) {
#define FL_COPY_CASE(NB)                                                                              \
  case NB: {                                                                                          \
    using V = typename VecOf<NB>::type;                                                               \
    copy_group_rows<V, NT>(static_cast<const V*>(g.src) + off, static_cast<V*>(g.dst) + off, anc, K, g.row_vecs, \
                       g.log2_lanes);                                                                 \
    break;                                                                                            \
  }
    FL_COPY_CASE(16)
    FL_COPY_CASE(8)
    FL_COPY_CASE(4)
    FL_COPY_CASE(2)
    FL_COPY_CASE(1)
#undef FL_COPY_CASE
  }
}

// ------------------------------------------------------------------------------------------------ kernels

template <typename scalar_t, bool kShared>
__device__ FL_INLINE void group_scratch(const ResampleParams<scalar_t>& p, double*& cdf, int*& cnt) {
  if (kShared) {
    cdf = reinterpret_cast<double*>(dynamic_smem());
    cnt = reinterpret_cast<int*>(cdf + p.K);
  } else {
    cdf = p.ws_cdf + static_cast<int64_t>(blockIdx.x) * p.K;
    cnt = p.ws_count != nullptr ? p.ws_count + static_cast<int64_t>(blockIdx.x) * p.K : nullptr;
  }
}

// Blocks of NT threads, one group at a time; at least 2 blocks of 256 or 8 of 64 resident per SM.
template <typename scalar_t, bool kShared, int NT = kThreads>
__global__ void __launch_bounds__(NT, NT == kThreads ? 2 : 8) resample_kernel(ResampleParams<scalar_t> p) {
  __shared__ GroupShared<NT> sh;
  double* cdf;
  int* cnt;
  group_scratch<scalar_t, kShared>(p, cdf, cnt);
  for (int64_t b = blockIdx.x; b < p.B; b += gridDim.x) resample_group<scalar_t, NT>(p, b, cdf, cnt, sh);
}

// Resample a group, then copy its state rows; the block's own ancestor writes are visible after the barrier
// (plain loads, never the read-only cache, for data written in this kernel).
template <typename scalar_t, bool kShared, int NT = kThreads>
__global__ void __launch_bounds__(NT, NT == kThreads ? 2 : 8) resample_gather_kernel(ResampleParams<scalar_t> p,
                                                                                    RowsParams g) {
  __shared__ GroupShared<NT> sh;
  double* cdf;
  int* cnt;
  group_scratch<scalar_t, kShared>(p, cdf, cnt);
  for (int64_t b = blockIdx.x; b < p.B; b += gridDim.x) {
    resample_group<scalar_t, NT>(p, b, cdf, cnt, sh);
    __syncthreads();
    copy_group<NT>(g, b, p.anc + b * p.K, p.K);
  }
}

// Out of place: out row r <- state row (r / K) * K + anc[r], over all B*K rows. An out-of-range ancestor
// fails FL_KERNEL_ASSERT (a device-side assertion, as in torch's index kernels) once the thread is done;
// its row is copied from itself, so nothing is read out of bounds even with assertions compiled out.
template <typename V, bool kSmallIndex>
__global__ void __launch_bounds__(kThreads) gather_kernel(const V* __restrict__ src, V* __restrict__ dst,
                                                          const int64_t* __restrict__ anc, int64_t rows, int K,
                                                          int64_t n, int log2_lanes, FastDivU32 divK) {
  const int lanes = 1 << log2_lanes;
  const int lane = threadIdx.x & (lanes - 1);
  const int64_t stride = (static_cast<int64_t>(gridDim.x) * kThreads) >> log2_lanes;
  bool ok = true;
  for (int64_t r = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) >> log2_lanes; r < rows;
       r += stride) {
    const int64_t b = kSmallIndex ? static_cast<int64_t>(divK.div(static_cast<uint32_t>(r))) : r / K;
    int64_t a = anc[r];
    if (a < 0 || a >= K) {
      ok = false;
      a = r - b * K;
    }
    const V* s = src + (b * K + a) * n;
    V* d = dst + r * n;
    for (int64_t c = lane; c < n; c += lanes) d[c] = s[c];
  }
  // Checked last: nothing stays live across the assertion's call, so it costs no spills.
  FL_KERNEL_ASSERT(ok && "fusedlab.gather: ancestors must lie in [0, K)");
}

// In place, one block per group staged through shared memory (K * n * sizeof(V) <= kStageMaxBytes), so
// rows that are both read and overwritten are safe.
template <typename V>
__global__ void __launch_bounds__(kThreads) gather_inplace_staged_kernel(V* state, const int64_t* anc, int64_t B,
                                                                         int K, int64_t n, int log2_lanes) {
  V* buf = reinterpret_cast<V*>(dynamic_smem());
  const int lanes = 1 << log2_lanes;
  const int lane = threadIdx.x & (lanes - 1);
  const int64_t group = static_cast<int64_t>(K) * n;
  bool ok = true;
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    V* g = state + b * group;
    const int64_t* a = anc + b * K;
    __syncthreads();  // the previous group's write-back is done with buf
    for (int i = threadIdx.x >> log2_lanes; i < K; i += kThreads >> log2_lanes) {
      int64_t ai = a[i];
      if (ai < 0 || ai >= K) {
        ok = false;
        ai = i;
      }
      for (int64_t c = lane; c < n; c += lanes) buf[i * n + c] = g[ai * n + c];
    }
    __syncthreads();
    for (int64_t e = threadIdx.x; e < group; e += kThreads) g[e] = buf[e];
  }
  FL_KERNEL_ASSERT(ok && "fusedlab.gather_: ancestors must lie in [0, K)");
}

// ------------------------------------------------------------------------------------------------ launch plans

struct ResamplePlan {
  int64_t grid;        // blocks
  int threads;         // per block: kSmallThreads for small groups in shared memory, else kThreads
  size_t smem;         // dynamic shared memory bytes
  bool shared;         // scratch in shared memory, else ws rows [grid, K]
  bool counts;         // the method needs offspring counts
};

// Threads per block of the resample kernels: kSmallThreads for groups of at most kSmallMaxK particles whose
// scratch is in shared memory (the only kSmallThreads kernels instantiated), else kThreads.
inline int group_threads(bool shared, int64_t K) { return shared && K <= kSmallMaxK ? kSmallThreads : kThreads; }

inline ResamplePlan plan_resample(int64_t B, int64_t K, int method, int sm_count) {
  ResamplePlan plan;
  plan.counts = method == kMultinomial || method == kResidual;
  const int64_t row_bytes = K * (8 + (plan.counts ? 4 : 0));
  plan.shared = K <= kSharedMaxK;
  plan.threads = group_threads(plan.shared, K);
  if (plan.shared) {
    plan.grid = B < 0x7fffffff ? B : 0x7fffffff;
    plan.smem = static_cast<size_t>(row_bytes);
  } else {
    int64_t g = static_cast<int64_t>(sm_count) * 4;
    const int64_t fit = kWorkspaceBudget / row_bytes;
    g = fit < g ? (fit > 0 ? fit : 1) : g;
    plan.grid = B < g ? B : g;
    plan.smem = 0;
  }
  return plan;
}

struct RowsPlan {
  int vec_bytes;
  int log2_lanes;  // threads per row: the next power of two >= vectors per row, at most a warp
  int64_t row_vecs;
};

// Widest of 16/8/4/2/1-byte vectors that divides the row size and both base addresses.
inline RowsPlan plan_rows(const void* src, const void* dst, int64_t row_bytes) {
  RowsPlan plan;
  const uint64_t addr = reinterpret_cast<uint64_t>(src) | reinterpret_cast<uint64_t>(dst);
  int v = 16;
  while (v > 1 && ((row_bytes % v) != 0 || (addr % v) != 0)) v /= 2;
  plan.vec_bytes = v;
  plan.row_vecs = row_bytes / v;
  plan.log2_lanes = 0;
  while (plan.log2_lanes < 5 && (int64_t(1) << plan.log2_lanes) < plan.row_vecs) ++plan.log2_lanes;
  return plan;
}

// Fused single launch unless few groups each carry a lot of state: then one block per group would copy
// with a fraction of the GPU, and a second, full-width gather launch is faster.
inline bool use_fused_gather(int64_t B, int64_t K, int64_t row_bytes, int sm_count) {
  return K * row_bytes <= kFusedMaxGroupBytes || B >= static_cast<int64_t>(kFusedMinBlocksPerSM) * sm_count;
}

#if defined(__CUDACC__)

// The most dynamic shared memory any plan asks for: K = kSharedMaxK doubles and offspring counts.
constexpr size_t kMaxPlanSmem = static_cast<size_t>(kSharedMaxK) * (8 + 4);

template <typename Kernel>
inline cudaError_t allow_smem(Kernel kernel, size_t smem) {
  // Above 48 KiB (static + dynamic) a kernel must opt in; 32 KiB leaves room for the static part. The limit is
  // raised to the largest plan's, never to this call's size: the attribute is process-wide, and a smaller
  // value set by another host thread between its set and our launch would fail our launch.
  if (smem <= 32 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kMaxPlanSmem));
}

// `g` null: resample only; otherwise the fused kernel also copies the state rows. Returns the status of the
// shared-memory opt-in; launch errors are for the caller's cudaGetLastError.
template <typename scalar_t>
cudaError_t launch_resample(const ResampleParams<scalar_t>& p, const ResamplePlan& plan, const RowsParams* g,
                            cudaStream_t stream) {
  if (p.B == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(plan.grid)), block(plan.threads);
  cudaError_t err = cudaSuccess;
  const bool small = plan.threads == kSmallThreads;  // shared scratch of at most kSmallMaxK rows: no opt-in
  if (g == nullptr) {
    if (small) {
      resample_kernel<scalar_t, true, kSmallThreads><<<grid, block, plan.smem, stream>>>(p);
    } else if (plan.shared) {
      err = allow_smem(resample_kernel<scalar_t, true>, plan.smem);
      if (err == cudaSuccess) resample_kernel<scalar_t, true><<<grid, block, plan.smem, stream>>>(p);
    } else {
      resample_kernel<scalar_t, false><<<grid, block, 0, stream>>>(p);
    }
  } else {
    if (small) {
      resample_gather_kernel<scalar_t, true, kSmallThreads><<<grid, block, plan.smem, stream>>>(p, *g);
    } else if (plan.shared) {
      err = allow_smem(resample_gather_kernel<scalar_t, true>, plan.smem);
      if (err == cudaSuccess) resample_gather_kernel<scalar_t, true><<<grid, block, plan.smem, stream>>>(p, *g);
    } else {
      resample_gather_kernel<scalar_t, false><<<grid, block, 0, stream>>>(p, *g);
    }
  }
  return err;
}

template <typename V>
void launch_gather_typed(const void* src, void* dst, const int64_t* anc, int64_t B, int K, const RowsPlan& r,
                         int sm_count, cudaStream_t stream) {
  const int64_t rows = B * K;
  const int64_t threads = rows << r.log2_lanes;
  int64_t blocks = (threads + kThreads - 1) / kThreads;
  const int64_t cap = static_cast<int64_t>(sm_count) * 32;
  blocks = blocks < cap ? blocks : cap;
  const V* s = static_cast<const V*>(src);
  V* d = static_cast<V*>(dst);
  if (rows < (int64_t(1) << 31))
    gather_kernel<V, true><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        s, d, anc, rows, K, r.row_vecs, r.log2_lanes, FastDivU32(static_cast<uint32_t>(K)));
  else
    gather_kernel<V, false><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        s, d, anc, rows, K, r.row_vecs, r.log2_lanes, FastDivU32());
}

// dst[b, i] = src[b, anc[b, i]] for rows of row_bytes bytes; src and dst must not overlap.
inline void launch_gather(const void* src, void* dst, const int64_t* anc, int64_t B, int K, int64_t row_bytes,
                                 int sm_count, cudaStream_t stream) {
  if (B == 0 || row_bytes == 0) return;
  const RowsPlan r = plan_rows(src, dst, row_bytes);
  switch (r.vec_bytes) {
    case 16: launch_gather_typed<uint4>(src, dst, anc, B, K, r, sm_count, stream); break;
    case 8: launch_gather_typed<uint2>(src, dst, anc, B, K, r, sm_count, stream); break;
    case 4: launch_gather_typed<uint32_t>(src, dst, anc, B, K, r, sm_count, stream); break;
    case 2: launch_gather_typed<uint16_t>(src, dst, anc, B, K, r, sm_count, stream); break;
    default: launch_gather_typed<uint8_t>(src, dst, anc, B, K, r, sm_count, stream); break;
  }
}

// In place when a group fits kStageMaxBytes; returns false (nothing launched) otherwise.
inline bool launch_gather_inplace_staged(void* state, const int64_t* anc, int64_t B, int K, int64_t row_bytes,
                                         cudaStream_t stream) {
  if (K * row_bytes > kStageMaxBytes) return false;
  if (B == 0 || row_bytes == 0) return true;
  const RowsPlan r = plan_rows(state, state, row_bytes);
  const dim3 grid(static_cast<unsigned>(B < 0x7fffffff ? B : 0x7fffffff));
  const size_t smem = static_cast<size_t>(K * row_bytes);
  switch (r.vec_bytes) {
#define FL_STAGED_CASE(NB)                                                                             \
  case NB:                                                                                             \
    gather_inplace_staged_kernel<typename VecOf<NB>::type><<<grid, kThreads, smem, stream>>>(          \
        static_cast<typename VecOf<NB>::type*>(state), anc, B, K, r.row_vecs, r.log2_lanes);           \
    break;
    FL_STAGED_CASE(16)
    FL_STAGED_CASE(8)
    FL_STAGED_CASE(4)
    FL_STAGED_CASE(2)
    FL_STAGED_CASE(1)
#undef FL_STAGED_CASE
  }
  return true;
}

#endif  // __CUDACC__

}  // namespace cuda
}  // namespace resample
}  // namespace fusedlab
