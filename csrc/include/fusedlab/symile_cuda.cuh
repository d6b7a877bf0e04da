// CUDA kernels of the symile family: the "n_squared" Symile loss's log-sum-exps (forward) and its gradient
// sums (backward), fused, without the N^M logits or any N^(M-1) x d product; and mip scoring (below). Semantics:
// python/fusedlab/reference/symile.py; csrc/cpu/symile.cpp is the same algorithm with library GEMMs.
// Torch-free: csrc/cuda/symile.cu checks arguments, allocates, launches and finishes in ATen
// (fusedlab/symile_glue.h, shared with the CPU kernel).
//
// Every anchor's logits are slices of one tensor S[u, i, j] = s (r_0[i] * W_u) . r_1[j], where a tuple u
// picks one row of each outer modality 2..M-1 (the last varies fastest) and W_u is the product of those
// rows (W = 1 for M = 2). One block owns a range of tuples and a group of rows i, and walks its
// [BI x BJ] tiles of S (tile products in fp32 on CUDA cores, d in slices of BT through shared memory):
// * forward: three online log-sum-exps, kept as (max, sum) pairs: per row i over its j and
//   the block's tuples (anchor 0), per column j over the block's rows and tuples (anchor 1), per tuple over
//   the block's (i, j) (the outer anchors). A row's or a column's pair is updated by one fixed thread, so
//   the partials need no atomics; the glue merges them across blocks.
// * backward: with E = sum_a exp(S - L_a) (every anchor's probability of the entry), the unscaled gradient
//   sums U_1[j] += E^T (r_0 * W_u), U_0[i] += W_u * (E r_1) and, for each outer modality m,
//   U_m[u_m] += sum_i r_0[i] * (E r_1)[i] * prod_{o != m} (row of o in u), added with fp32 atomics (not
//   bitwise reproducible; the glue refuses under torch.use_deterministic_algorithms). The glue applies
//   the grad factor, the aligned tuples' term and the scale.
//
// tests/cuda/host_sim.h runs these kernels as host C++ (tests/test_symile_cuda_sim.py); only what it
// emulates is used: __syncthreads, __shfl_xor_sync over whole warps, atomicAdd, static shared memory,
// 1-D grids.
#pragma once

#include <cmath>
#include <cstdint>

#include "fusedlab/cat_cuda_common.cuh"  // Elem, exp2_f32, mul_rn, FL_UNROLL

namespace fusedlab {
namespace symile {
namespace cuda {

using fusedlab::cat::cuda::Elem;
using fusedlab::cat::cuda::exp2_f32;
using fusedlab::cat::cuda::fma_rn;
using fusedlab::cat::cuda::mul_rn;

constexpr int kThreads = 128;
constexpr int kRowGroups = 16;  // ti = tid / 8: rows ti + 16 r of a tile
constexpr int kColLanes = 8;    // tj = tid % 8: columns tj + 8 c, a row's lanes in one warp
constexpr int BI = 32, BJ = 32, BT = 32;
constexpr int RM = BI / kRowGroups, RN = BJ / kColLanes;
static_assert(BI == BJ && BI % kRowGroups == 0 && BT % kColLanes == 0, "the backward reuses one accumulator shape");
constexpr int kMaxModalities = 8;
constexpr float kLog2e = 1.4426950408889634f;

template <typename T>
struct SymileParams {
  const T* r[kMaxModalities];  // M modalities, each [N, d] contiguous
  const float* scale;          // the logit scale s (one element, on the device)
  int M, N, d;
  int U;            // tuples: N^(M-2), below 2^31 (32-bit index math: a 64-bit division is a call that spills)
  int u_chunk;      // tuples per block
  int row_groups;   // blocks per tuple chunk: rows split into this many groups of whole BI tiles
  int tiles_per_group;
  // forward outputs: (max, sum of exp(S - max)) pairs, natural units
  float2* row_part;    // [u chunks, N]: anchor 0, per row over the block's (j, u)
  float2* col_part;    // [u chunks * row_groups, N]: anchor 1, per column over the block's (i, u)
  float2* tuple_part;  // [row_groups, U]: per tuple over the block's (i, j)
  // backward inputs and outputs
  const float* lse;  // [M, N] natural log-sum-exps of every anchor
  float* grad_sum[kMaxModalities];  // U_m [N, d] fp32, zero-filled by the glue
};

// Block index = chunk * row_groups + group.
struct BlockWork {
  int chunk, group, u0, u1;
  int i0, i1;  // rows [i0, i1)
};

template <typename T>
__device__ FL_INLINE BlockWork block_work(const SymileParams<T>& p) {
  BlockWork w;
  const int blk = static_cast<int>(blockIdx.x);
  w.chunk = blk / p.row_groups;
  w.group = blk % p.row_groups;
  w.u0 = w.chunk * p.u_chunk;
  w.u1 = p.U - w.u0 > p.u_chunk ? w.u0 + p.u_chunk : p.U;
  w.i0 = w.group * p.tiles_per_group * BI;
  const int64_t i1 = static_cast<int64_t>(w.i0) + static_cast<int64_t>(p.tiles_per_group) * BI;
  w.i1 = i1 < p.N ? static_cast<int>(i1) : p.N;
  return w;
}

// a[m] for a runtime m without indexing the kernel's parameter array dynamically (which would copy it to
// local memory): a compare per entry.
template <typename V, int N>
__device__ FL_INLINE V pick(const V (&a)[N], int m) {
  V v = a[0];
FL_UNROLL
  for (int k = 1; k < N; ++k)
    if (k == m) v = a[k];
  return v;
}

// Row index of outer modality m (2..M-1) in tuple u.
template <typename T>
__device__ FL_INLINE int tuple_row(const SymileParams<T>& p, int u, int m) {
  for (int o = p.M - 1; o > m; --o) u /= p.N;
  return u % p.N;
}

// Slice [t0, t0 + BT) of rows [row0, row0 + ROWS) of src into dst[ROWS][BT + 1], times W_u when `outer`
// (the tuple's rows of modalities 2..M-1) is given; zero past the matrix's edges.
template <typename T, int ROWS>
__device__ FL_INLINE void load_slice(const SymileParams<T>& p, float* dst, const T* src, int row0, int t0,
                                     const T* const* outer) {
  for (int idx = static_cast<int>(threadIdx.x); idx < ROWS * BT; idx += kThreads) {
    const int r = idx / BT, c = idx % BT, i = row0 + r, t = t0 + c;
    float x = 0.0f;
    if (i < p.N && t < p.d) {
      x = Elem<T>::load(src[static_cast<int64_t>(i) * p.d + t]);
      if (outer != nullptr)
        for (int m = 2; m < p.M; ++m) x *= Elem<T>::load(outer[m][t]);
    }
    dst[r * (BT + 1) + c] = x;
  }
}

// The rows tuple u picks from each outer modality (entries 2..M-1), by threads 0..M-1.
template <typename T>
__device__ FL_INLINE void tuple_rows(const SymileParams<T>& p, int u, const T** outer) {
  const int m = static_cast<int>(threadIdx.x);
  if (m >= 2 && m < p.M) outer[m] = pick(p.r, m) + static_cast<int64_t>(tuple_row(p, u, m)) * p.d;
}

// s[r][c] += sa[ti + 16 r] . sb[tj + 8 c] over one staged slice of BT columns ([*, BT + 1] tiles).
__device__ FL_INLINE void slice_products(const float* sa, const float* sb, int ti, int tj, float (&s)[RM][RN]) {
  for (int t = 0; t < BT; ++t) {
    float x[RM], y[RN];
FL_UNROLL
    for (int r = 0; r < RM; ++r) x[r] = sa[(ti + kRowGroups * r) * (BT + 1) + t];
FL_UNROLL
    for (int c = 0; c < RN; ++c) y[c] = sb[(tj + kColLanes * c) * (BT + 1) + t];
FL_UNROLL
    for (int r = 0; r < RM; ++r)
FL_UNROLL
      for (int c = 0; c < RN; ++c) s[r][c] = fma_rn(x[r], y[c], s[r][c]);  // the same bits in both kernels
  }
}

// The scaled logits of tile (u, rows [i0, i0 + BI), columns [j0, j0 + BJ)): thread (ti, tj) gets rows
// ti + 16 r and columns tj + 8 c; entries outside the N x N square are -inf. Natural units, the scale applied
// by an uncontracted multiply: the backward's E = exp(S - L) cancels against g / N on the aligned tuples
// only if S has the forward's bits and L is the natural log-sum-exp the glue rounded once (as float32
// PyTorch's); logits in log2 units took L through two more roundings at |S| ~ 1e3, and the gradients
// erred ~40x more than PyTorch's (tests/test_symile_cuda_sim.py, large logits).
template <typename T>
__device__ FL_INLINE void tile_logits(const SymileParams<T>& p, float* sa, float* sb, const T* const* outer,
                                      int i0, int j0, float scale, float (&s)[RM][RN]) {
  const int tid = static_cast<int>(threadIdx.x), ti = tid / kColLanes, tj = tid % kColLanes;
FL_UNROLL
  for (int r = 0; r < RM; ++r)
FL_UNROLL
    for (int c = 0; c < RN; ++c) s[r][c] = 0.0f;
  for (int t0 = 0; t0 < p.d; t0 += BT) {
    __syncthreads();  // the previous slice (or the previous user of sa, sb) is read
    load_slice<T, BI>(p, sa, p.r[0], i0, t0, p.M > 2 ? outer : nullptr);
    load_slice<T, BJ>(p, sb, p.r[1], j0, t0, nullptr);
    __syncthreads();
    slice_products(sa, sb, ti, tj, s);
  }
FL_UNROLL
  for (int r = 0; r < RM; ++r)
FL_UNROLL
    for (int c = 0; c < RN; ++c) {
      const bool in = i0 + ti + kRowGroups * r < p.N && j0 + tj + kColLanes * c < p.N;
      s[r][c] = in ? mul_rn(s[r][c], scale) : -INFINITY;
    }
}

// exp(x) as the kernels take it: exp2 of x log2(e) (x <= 0 here: a logit minus a maximum or a log-sum-exp).
FL_HD FL_INLINE float exp_f32(float x) { return exp2_f32(x * kLog2e); }

// Weight of a pair with max m in a merge whose max is mx; a pair that saw nothing (m = -inf) weighs 0, also
// when mx is -inf too (exp(-inf - -inf) would be NaN).
FL_HD FL_INLINE float pair_weight(float m, float mx) { return m == -INFINITY ? 0.0f : exp_f32(m - mx); }

// Online log-sum-exp pairs: merge (m2, l2) into (m, l).
FL_HD FL_INLINE float2 lse_merge(float2 a, float2 b) {
  const float mx = a.x > b.x ? a.x : b.x;
  return float2{mx, a.y * pair_weight(a.x, mx) + b.y * pair_weight(b.x, mx)};
}

__device__ FL_INLINE float2 lanes_merge(float2 v) {
FL_UNROLL
  for (int o = 1; o < kColLanes; o *= 2) {
    const float m2 = __shfl_xor_sync(0xffffffffu, v.x, o), l2 = __shfl_xor_sync(0xffffffffu, v.y, o);
    v = lse_merge(v, float2{m2, l2});
  }
  return v;
}

// (max, sum of exp(x - max)) of a few values; (-inf, 0) when all are -inf.
template <int N>
FL_HD FL_INLINE float2 pair_of(const float (&x)[N]) {
  float mx = -INFINITY;
FL_UNROLL
  for (int k = 0; k < N; ++k) mx = x[k] > mx ? x[k] : mx;
  float l = 0.0f;
  if (mx != -INFINITY)
FL_UNROLL
    for (int k = 0; k < N; ++k) l += exp_f32(x[k] - mx);
  return float2{mx, l};
}

// (min blocks 1: with the bare thread bound ptxas took 40 registers for sm_90a and spilled; it takes ~60.)
template <typename T>
__global__ void __launch_bounds__(kThreads, 1) symile_fwd_kernel(const SymileParams<T> p) {
  __shared__ float sa[BI * (BT + 1)];
  __shared__ float sb[BJ * (BT + 1)];
  __shared__ float2 srow[BI];                // a tile's per-row pairs (for the tuple's pair)
  __shared__ float2 scol[kRowGroups][BJ];    // per column, one pair per row group
  __shared__ float2 stuple;                    // the current tuple's running pair
  __shared__ const T* outer[kMaxModalities];  // the tuple's rows of modalities 2..M-1
  const int tid = static_cast<int>(threadIdx.x), ti = tid / kColLanes, tj = tid % kColLanes;
  const BlockWork w = block_work(p);
  const float scale = *p.scale;
  float2* row_acc = p.row_part + static_cast<int64_t>(w.chunk) * p.N;
  float2* col_acc = p.col_part + static_cast<int64_t>(blockIdx.x) * p.N;
  // this block is the only writer of its partials: reset its rows and columns first
  for (int i = w.i0 + tid; i < w.i1; i += kThreads) row_acc[i] = float2{-INFINITY, 0.0f};
  for (int j = tid; j < p.N; j += kThreads) col_acc[j] = float2{-INFINITY, 0.0f};
  for (int u = w.u0; u < w.u1; ++u) {
    __syncthreads();  // the previous tuple's rows and stuple are read
    tuple_rows(p, u, outer);
    if (tid == 0) stuple = float2{-INFINITY, 0.0f};
    for (int i0 = w.i0; i0 < w.i1; i0 += BI) {
      for (int j0 = 0; j0 < p.N; j0 += BJ) {
        float s[RM][RN];
        // the previous tile's srow and scol are read (tile_logits' own barriers run once per d-slice: none
        // when d = 0)
        __syncthreads();
        tile_logits(p, sa, sb, outer, i0, j0, scale, s);
        // anchor 0: each row's pair, merged across its 8 lanes, then into the row's accumulator
FL_UNROLL
        for (int r = 0; r < RM; ++r) {
          const float2 v = lanes_merge(pair_of(s[r]));
          const int il = ti + kRowGroups * r, i = i0 + il;
          if (tj == 0) {
            srow[il] = v;
            if (i < w.i1) row_acc[i] = lse_merge(row_acc[i], v);
          }
        }
        // anchor 1: each column's pair over this thread's rows, merged across row groups below
FL_UNROLL
        for (int c = 0; c < RN; ++c) {
          float col[RM];
FL_UNROLL
          for (int r = 0; r < RM; ++r) col[r] = s[r][c];
          scol[ti][tj + kColLanes * c] = pair_of(col);
        }
        __syncthreads();
        if (tid < BJ && j0 + tid < p.N) {
          float2 v = scol[0][tid];
          for (int k = 1; k < kRowGroups; ++k) v = lse_merge(v, scol[k][tid]);
          col_acc[j0 + tid] = lse_merge(col_acc[j0 + tid], v);
        }
        if (tid == kThreads - 1) {
          float2 v = srow[0];
          for (int k = 1; k < BI; ++k) v = lse_merge(v, srow[k]);
          stuple = lse_merge(stuple, v);
        }
      }
    }
    __syncthreads();
    if (tid == 0) p.tuple_part[static_cast<int64_t>(w.group) * p.U + u] = stuple;
  }
}

// ------------------------------------------------------------------------------------------------ backward

// (min blocks 1: with the bare thread bound ptxas capped the registers at 72 and spilled; it takes 121.)
template <typename T>
__global__ void __launch_bounds__(kThreads, 1) symile_bwd_kernel(const SymileParams<T> p) {
  __shared__ float sa[BI * (BT + 1)];
  __shared__ float sb[BJ * (BT + 1)];
  __shared__ float se[BI * (BJ + 1)];  // E of the tile
  __shared__ float sh[BI * (BT + 1)];  // (E r_1)[i, t] r_0[i, t] per slice, summed over i for the outer rows
  __shared__ const T* outer[kMaxModalities];    // the tuple's rows of modalities 2..M-1
  __shared__ float* outer_sum[kMaxModalities];  // U_m at those rows
  __shared__ float outer_shift, outer_weight;   // the outer anchors' terms: exp(S - b) * w
  const int tid = static_cast<int>(threadIdx.x), ti = tid / kColLanes, tj = tid % kColLanes;
  const BlockWork w = block_work(p);
  const float scale = *p.scale;
  const float* l0 = p.lse;
  const float* l1 = p.lse + p.N;
  for (int u = w.u0; u < w.u1; ++u) {
    __syncthreads();
    tuple_rows(p, u, outer);
    if (tid >= 2 && tid < p.M)
      outer_sum[tid] = pick(p.grad_sum, tid) + static_cast<int64_t>(tuple_row(p, u, tid)) * p.d;
    if (tid == 0) {
      // sum_m exp(S - a_m) = exp(S - b) sum_m exp(b - a_m), b the least a_m: no factor exceeds 1
      float b = INFINITY;
      for (int m = 2; m < p.M; ++m) {
        const float a = p.lse[static_cast<int64_t>(m) * p.N + tuple_row(p, u, m)];
        b = a < b ? a : b;
      }
      float wsum = 0.0f;
      for (int m = 2; m < p.M; ++m)
        wsum += exp_f32(b - p.lse[static_cast<int64_t>(m) * p.N + tuple_row(p, u, m)]);
      outer_shift = p.M > 2 ? b : 0.0f;
      outer_weight = wsum;
    }
    __syncthreads();  // the shift published before any use (tile_logits' barriers do it too, but only when d > 0)
    for (int i0 = w.i0; i0 < w.i1; i0 += BI) {
      for (int j0 = 0; j0 < p.N; j0 += BJ) {
        float s[RM][RN];
        tile_logits(p, sa, sb, outer, i0, j0, scale, s);
FL_UNROLL
        for (int r = 0; r < RM; ++r) {
          const int i = i0 + ti + kRowGroups * r;
          const float a0 = i < p.N ? l0[i] : 0.0f;
FL_UNROLL
          for (int c = 0; c < RN; ++c) {
            const int j = j0 + tj + kColLanes * c;
            float e = 0.0f;
            if (s[r][c] != -INFINITY) {
              e = exp_f32(s[r][c] - a0) + exp_f32(s[r][c] - l1[j]);
              if (p.M > 2) e += exp_f32(s[r][c] - outer_shift) * outer_weight;
            }
            se[(ti + kRowGroups * r) * (BJ + 1) + tj + kColLanes * c] = e;
          }
        }
        for (int t0 = 0; t0 < p.d; t0 += BT) {
          __syncthreads();  // se written; the previous slice's sa, sb, sh are read
          load_slice<T, BI>(p, sa, p.r[0], i0, t0, p.M > 2 ? outer : nullptr);  // Q = r_0 * W_u
          load_slice<T, BJ>(p, sb, p.r[1], j0, t0, nullptr);
          __syncthreads();
          // U_1[j, t] += sum_i E[i, j] Q[i, t]: thread rows are columns j, its columns slice positions t
          float acc[BJ / kRowGroups][BT / kColLanes];
FL_UNROLL
          for (int r = 0; r < BJ / kRowGroups; ++r)
FL_UNROLL
            for (int c = 0; c < BT / kColLanes; ++c) acc[r][c] = 0.0f;
          for (int i = 0; i < BI; ++i)
FL_UNROLL
            for (int r = 0; r < BJ / kRowGroups; ++r) {
              const float e = se[i * (BJ + 1) + ti + kRowGroups * r];
FL_UNROLL
              for (int c = 0; c < BT / kColLanes; ++c) acc[r][c] += e * sa[i * (BT + 1) + tj + kColLanes * c];
            }
FL_UNROLL
          for (int r = 0; r < BJ / kRowGroups; ++r) {
            const int j = j0 + ti + kRowGroups * r;
FL_UNROLL
            for (int c = 0; c < BT / kColLanes; ++c) {
              const int t = t0 + tj + kColLanes * c;
              if (j < p.N && t < p.d) atomicAdd(&p.grad_sum[1][static_cast<int64_t>(j) * p.d + t], acc[r][c]);
            }
          }
          // H[i, t] = sum_j E[i, j] r_1[j, t]; U_0[i, t] += H W_u[t]; sh = H r_0 for the outer rows
FL_UNROLL
          for (int r = 0; r < RM; ++r)
FL_UNROLL
            for (int c = 0; c < BT / kColLanes; ++c) acc[r][c] = 0.0f;
          for (int j = 0; j < BJ; ++j)
FL_UNROLL
            for (int r = 0; r < RM; ++r) {
              const float e = se[(ti + kRowGroups * r) * (BJ + 1) + j];
FL_UNROLL
              for (int c = 0; c < BT / kColLanes; ++c) acc[r][c] += e * sb[j * (BT + 1) + tj + kColLanes * c];
            }
FL_UNROLL
          for (int r = 0; r < RM; ++r) {
            const int il = ti + kRowGroups * r, i = i0 + il;
FL_UNROLL
            for (int c = 0; c < BT / kColLanes; ++c) {
              const int tl = tj + kColLanes * c, t = t0 + tl;
              float wt = 1.0f, r0 = 0.0f;
              if (i < p.N && t < p.d) {
                for (int m = 2; m < p.M; ++m) wt *= Elem<T>::load(outer[m][t]);
                r0 = Elem<T>::load(p.r[0][static_cast<int64_t>(i) * p.d + t]);
                atomicAdd(&p.grad_sum[0][static_cast<int64_t>(i) * p.d + t], acc[r][c] * wt);
              }
              if (p.M > 2) sh[il * (BT + 1) + tl] = acc[r][c] * r0;
            }
          }
          if (p.M > 2) {
            __syncthreads();
            // U_m[u_m, t] += (sum_i sh[i, t]) prod_{o != m} r_o[u_o, t]
            if (tid < BT && t0 + tid < p.d) {
              const int t = t0 + tid;
              float gw = 0.0f;
              for (int i = 0; i < BI; ++i) gw += sh[i * (BT + 1) + tid];
              for (int m = 2; m < p.M; ++m) {
                float other = gw;
                for (int o = 2; o < p.M; ++o)
                  if (o != m) other *= Elem<T>::load(outer[o][t]);
                atomicAdd(&outer_sum[m][t], other);
              }
            }
          }
        }
        __syncthreads();  // se is rewritten by the next tile
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------ mip

constexpr int kMaxQueries = 8;

template <typename T>
struct MipParams {
  const T* cand;                  // [C, d]
  const T* queries[kMaxQueries];  // [B, d] (row stride d) or [d] (row stride 0)
  int64_t q_stride[kMaxQueries];
  T* out;                         // [B, C]
  int nq, B, C, d;
};

// One block per [BI x BJ] tile of the scores out[b, c] = sum_t (prod_m q_m[b, t]) cand[c, t]: the query
// product of each d slice is formed while it is staged in shared memory and never stored; fp32 sums.
// Block index = (b tile) * ceil(C / BJ) + c tile.
template <typename T>
__global__ void __launch_bounds__(kThreads) mip_kernel(const MipParams<T> p) {
  __shared__ float sa[BI * (BT + 1)];
  __shared__ float sb[BJ * (BT + 1)];
  const int tid = static_cast<int>(threadIdx.x), ti = tid / kColLanes, tj = tid % kColLanes;
  const int c_tiles = (p.C + BJ - 1) / BJ;
  const int b0 = static_cast<int>(blockIdx.x) / c_tiles * BI, c0 = static_cast<int>(blockIdx.x) % c_tiles * BJ;
  float s[RM][RN];
FL_UNROLL
  for (int r = 0; r < RM; ++r)
FL_UNROLL
    for (int c = 0; c < RN; ++c) s[r][c] = 0.0f;
  for (int t0 = 0; t0 < p.d; t0 += BT) {
    __syncthreads();  // the previous slice is read
    for (int idx = tid; idx < BI * BT; idx += kThreads) {
      const int r = idx / BT, c = idx % BT, b = b0 + r, t = t0 + c;
      float x = 0.0f;
      if (b < p.B && t < p.d) {
        x = 1.0f;
        for (int m = 0; m < p.nq; ++m) x *= Elem<T>::load(pick(p.queries, m)[b * pick(p.q_stride, m) + t]);
      }
      sa[r * (BT + 1) + c] = x;
    }
    for (int idx = tid; idx < BJ * BT; idx += kThreads) {
      const int r = idx / BT, c = idx % BT, cc = c0 + r, t = t0 + c;
      sb[r * (BT + 1) + c] = cc < p.C && t < p.d ? Elem<T>::load(p.cand[static_cast<int64_t>(cc) * p.d + t]) : 0.0f;
    }
    __syncthreads();
    slice_products(sa, sb, ti, tj, s);
  }
FL_UNROLL
  for (int r = 0; r < RM; ++r)
FL_UNROLL
    for (int c = 0; c < RN; ++c) {
      const int b = b0 + ti + kRowGroups * r, cc = c0 + tj + kColLanes * c;
      if (b < p.B && cc < p.C) p.out[static_cast<int64_t>(b) * p.C + cc] = Elem<T>::store(s[r][c]);
    }
}

FL_HD FL_INLINE int64_t mip_blocks(int64_t B, int64_t C) { return ((B + BI - 1) / BI) * ((C + BJ - 1) / BJ); }

// ------------------------------------------------------------------------------------------------ launch plan

struct SymilePlan {
  int u_chunk, chunks;
  int row_groups, tiles_per_group;
  int64_t blocks;
};

// Enough blocks for a few per SM: tuples split first (no cross-block merge beyond the partial pairs), then
// rows when there are too few tuples (M = 2 has one).
inline SymilePlan plan_symile(int64_t N, int64_t U, int sms) {
  SymilePlan pl;
  const int64_t target = 4 * static_cast<int64_t>(sms > 0 ? sms : 1);
  const int64_t row_tiles = (N + BI - 1) / BI;
  int64_t chunks = U < target ? U : target;
  const int64_t u_chunk = (U + chunks - 1) / chunks;
  chunks = (U + u_chunk - 1) / u_chunk;
  pl.u_chunk = static_cast<int>(u_chunk);
  pl.chunks = static_cast<int>(chunks);
  int64_t groups = (target + pl.chunks - 1) / pl.chunks;
  groups = groups < row_tiles ? groups : row_tiles;
  pl.tiles_per_group = static_cast<int>((row_tiles + groups - 1) / groups);
  pl.row_groups = static_cast<int>((row_tiles + pl.tiles_per_group - 1) / pl.tiles_per_group);
  pl.blocks = pl.chunks * pl.row_groups;
  return pl;
}

#if defined(__CUDACC__)
template <typename T>
cudaError_t launch_symile_forward(const SymileParams<T>& p, int64_t blocks, cudaStream_t stream) {
  if (blocks > 0) symile_fwd_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_symile_backward(const SymileParams<T>& p, int64_t blocks, cudaStream_t stream) {
  if (blocks > 0) symile_bwd_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_mip(const MipParams<T>& p, cudaStream_t stream) {
  const int64_t blocks = mip_blocks(p.B, p.C);
  if (blocks > 0) mip_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}
#endif

}  // namespace cuda
}  // namespace symile
}  // namespace fusedlab
