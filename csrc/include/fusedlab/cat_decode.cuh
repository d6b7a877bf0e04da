// CUDA kernels of CAT's generation step, fusedlab::cat_decode: per sequence b and query head h, the new query
// q[b, h] attends in one softmax to the first n_slots[b] compressed slots kc/vc[b, hkv] and the first n_raw[b]
// raw keys k/v[b, hkv] of the current chunk (hkv = h / (H / Hkv)). Semantics: python/fusedlab/reference/cat.py
// (cat_decode). Torch-free: csrc/cuda/cat.cu checks arguments, allocates and calls the launcher at the bottom.
//
// Split-K ("flash-decoding"). A sequence's keys, its slots then its raw keys as one index range [0, n) with
// n = n_slots[b] + n_raw[b], are cut into `splits` equal shares computed from the fills on the device, so a
// short sequence still spreads over all its splits and no host sync is needed. One block of kWarps warps per
// (b, kv head, group of up to kMaxHeadsPerBlock query heads of that kv head, split) reads each K/V row once
// for all its query heads (grouped-query attention). A row is read by LPR lanes with 16-byte loads, so one
// warp instruction covers 32 / LPR consecutive rows (coalesced); the LPR partial dot products are summed with
// xor shuffles, and every lane group keeps its own fp32 online-softmax state (running max in log2 units,
// sum, E output dims per lane). The states are merged across lane groups (shuffles), then across warps
// (shared memory); with one split the block writes the output, otherwise fp32 partials [B, H, splits, D] and
// (max, sum) pairs that a second small kernel combines.
//
// Empty shares are exact: a state with no keys has max -inf and weight 0 in every merge. A sequence with no
// keys at all (n_slots = n_raw = 0) gets 0 / 0 = NaN, as the reference's softmax over nothing.
//
// tests/cuda/host_sim.h compiles these kernels as host C++ (tests/test_cat_decode_cuda_sim.py); only what it
// emulates is used: __syncthreads, __shfl_xor_sync over whole warps, static shared memory, 1-D grids.
#pragma once

#include "fusedlab/cat_cuda_common.cuh"

namespace fusedlab {
namespace cat {
namespace cuda {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
// Rows each lane group has in flight per step (independent loads before the first shuffle).
constexpr int kUnroll = 2;
// Query heads per block: the registers of q and the accumulators grow with it (4 x E each per lane).
constexpr int kMaxHeadsPerBlock = 4;
// Split choice (not tuned on a GPU yet): enough blocks for a few per SM, each split at least this many keys.
constexpr int kTargetBlocksPerSm = 4;
constexpr int64_t kMinKeysPerSplit = 64;
constexpr int kMaxSplits = 64;
// Every K/V/q row and lane offset is read with 16-byte vectors: the glue passes 16-byte aligned bases.
constexpr int kAlignBytes = 16;

// How a row of D elements of T is spread over a warp.
template <typename T, int D>
struct RowLayout {
  static constexpr int kVec = kAlignBytes / static_cast<int>(sizeof(T));  // elements per 16-byte load
  static constexpr int E = kVec * 32 >= D ? kVec : D / 32;                 // elements per lane
  static constexpr int LPR = D / E;                                        // lanes per row
  static constexpr int RPW = 32 / LPR;                                     // rows per warp instruction
  static constexpr int kGroups = kWarps * RPW;                             // lane groups per block
  static_assert(D % E == 0 && LPR >= 1 && LPR <= 32 && (LPR & (LPR - 1)) == 0,
                "the head dim must split into a power-of-two number of lanes per row");
  static_assert(D % 32 == 0, "the combine kernel gives every lane D / 32 dims");
};

template <int Bytes>
struct RawVec;
template <>
struct RawVec<16> {
  using type = uint4;
};
template <>
struct RawVec<8> {
  using type = uint2;
};
template <>
struct RawVec<4> {
  using type = uint32_t;
};

// E consecutive elements at p (aligned to their byte size, or to 16 bytes when larger) as fp32.
template <typename T, int E>
__device__ FL_INLINE void load_f32(const T* p, float (&out)[E]) {
  constexpr int kBytes = E * static_cast<int>(sizeof(T));
#if defined(__CUDA_ARCH__)
  constexpr int kChunk = kBytes < kAlignBytes ? kBytes : kAlignBytes;
  using V = typename RawVec<kChunk>::type;
  V raw[kBytes / kChunk];
FL_UNROLL
  for (int c = 0; c < kBytes / kChunk; ++c) raw[c] = reinterpret_cast<const V*>(p)[c];
  const T* x = reinterpret_cast<const T*>(raw);
#else
  T x[E];
  std::memcpy(x, p, kBytes);
#endif
FL_UNROLL
  for (int e = 0; e < E; ++e) out[e] = Elem<T>::load(x[e]);
}

// Sum over the LANES consecutive lanes of a lane group (LANES a power of two dividing 32).
template <int LANES>
__device__ FL_INLINE float group_sum(float x) {
FL_UNROLL
  for (int o = LANES / 2; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// ------------------------------------------------------------------------------------------------ kernels

template <typename T>
struct DecodeParams {
  const T* q;              // [B, H, D]
  const T* kc;             // [B, Hkv, S, D]
  const T* vc;             // [B, Hkv, S, D]
  const T* k;              // [B, Hkv, R, D]
  const T* v;              // [B, Hkv, R, D]
  const int64_t* n_slots;  // [B], 0 <= n_slots[b] <= S
  const int64_t* n_raw;    // [B], 0 <= n_raw[b] <= R
  T* out;                  // [B, H, D]
  float* part_acc;         // [B, H, splits, D] unnormalized partial outputs (splits > 1 only)
  float* part_ml;          // [B, H, splits, 2] their running max (log2 units) and sum (splits > 1 only)
  int64_t B, S, R;
  int H, Hkv;
  int head_groups;  // ceil((H / Hkv) / HG) blocks per (b, kv head) and split
  int splits;
  float qk_scale;  // scale * log2(e): scores in log2 units, so exp2 replaces exp
};

// Block index = ((b * Hkv + hkv) * head_groups + head group) * splits + split.
template <typename T, int D, int HG>
__global__ void __launch_bounds__(kThreads) decode_split_kernel(const DecodeParams<T> p) {
  using Lay = RowLayout<T, D>;
  constexpr int E = Lay::E, LPR = Lay::LPR, RPW = Lay::RPW, kGroups = Lay::kGroups;
  const int tid = static_cast<int>(threadIdx.x);
  const int warp = tid / 32, lane = tid % 32;
  const int group = warp * RPW + lane / LPR;  // this thread's lane group: one row at a time
  const int col = (lane % LPR) * E;           // its first dim of the row

  int64_t x = blockIdx.x;
  const int split = static_cast<int>(x % p.splits);
  x /= p.splits;
  const int hg = static_cast<int>(x % p.head_groups);
  x /= p.head_groups;
  const int hkv = static_cast<int>(x % p.Hkv);
  const int64_t b = x / p.Hkv;
  const int G = p.H / p.Hkv;
  const int h0 = hkv * G + hg * HG;
  const int nh = G - hg * HG < HG ? G - hg * HG : HG;  // heads of this block that exist

  int64_t ns = p.n_slots[b], nr = p.n_raw[b];
  FL_KERNEL_ASSERT(ns >= 0 && ns <= p.S && nr >= 0 && nr <= p.R &&
                   "fusedlab.cat_decode: n_slots must lie in [0, S] and n_raw in [0, R]");
  ns = ns < 0 ? 0 : (ns > p.S ? p.S : ns);  // never read outside the cache, even with asserts compiled out
  nr = nr < 0 ? 0 : (nr > p.R ? p.R : nr);
  const int64_t n = ns + nr;
  const int64_t lo = n * split / p.splits, hi = n * (split + 1) / p.splits;

  float q[HG][E];
FL_UNROLL
  for (int i = 0; i < HG; ++i) {
    if (i < nh) {
      load_f32<T, E>(p.q + ((b * p.H + h0 + i) * D + col), q[i]);
FL_UNROLL
      for (int e = 0; e < E; ++e) q[i][e] *= p.qk_scale;
    } else {
FL_UNROLL
      for (int e = 0; e < E; ++e) q[i][e] = 0.0f;
    }
  }
  float m[HG], l[HG], acc[HG][E];
FL_UNROLL
  for (int i = 0; i < HG; ++i) {
    m[i] = -INFINITY;
    l[i] = 0.0f;
FL_UNROLL
    for (int e = 0; e < E; ++e) acc[i][e] = 0.0f;
  }

  const int64_t kv_head = b * p.Hkv + hkv;
  const T* kc = p.kc + kv_head * p.S * D + col;
  const T* vc = p.vc + kv_head * p.S * D + col;
  const T* kr = p.k + kv_head * p.R * D + col;
  const T* vr = p.v + kv_head * p.R * D + col;

  // lo and hi are the same for the whole block, so every lane runs every shuffle of every step
  for (int64_t s0 = lo; s0 < hi; s0 += kGroups * kUnroll) {
    float kf[kUnroll][E], vf[kUnroll][E];
    bool ok[kUnroll];
FL_UNROLL
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j = s0 + u * kGroups + group;  // neighbouring lane groups read neighbouring rows
      ok[u] = j < hi;
      if (ok[u]) {
        const bool slot = j < ns;
        const int64_t off = (slot ? j : j - ns) * D;
        load_f32<T, E>((slot ? kc : kr) + off, kf[u]);
        load_f32<T, E>((slot ? vc : vr) + off, vf[u]);
      } else {
FL_UNROLL
        for (int e = 0; e < E; ++e) kf[u][e] = vf[u][e] = 0.0f;
      }
    }
FL_UNROLL
    for (int i = 0; i < HG; ++i) {
      float s[kUnroll];
      float mx = m[i];
FL_UNROLL
      for (int u = 0; u < kUnroll; ++u) {
        float dot = 0.0f;
FL_UNROLL
        for (int e = 0; e < E; ++e) dot += q[i][e] * kf[u][e];
        dot = group_sum<LPR>(dot);
        s[u] = dot;
        if (ok[u] && dot > mx) mx = dot;
      }
      const float alpha = state_weight(m[i], mx);
      float pu[kUnroll];
      float psum = 0.0f;
FL_UNROLL
      for (int u = 0; u < kUnroll; ++u) {
        pu[u] = ok[u] ? exp2_f32(s[u] - mx) : 0.0f;
        psum += pu[u];
      }
      l[i] = l[i] * alpha + psum;
FL_UNROLL
      for (int e = 0; e < E; ++e) {
        float a = acc[i][e] * alpha;
FL_UNROLL
        for (int u = 0; u < kUnroll; ++u) a += pu[u] * vf[u][e];
        acc[i][e] = a;
      }
      m[i] = mx;
    }
  }

  // merge the lane groups of each warp (butterfly: afterwards every group holds the warp's state)
FL_UNROLL
  for (int o = LPR; o < 32; o *= 2) {
FL_UNROLL
    for (int i = 0; i < HG; ++i) {
      const float m2 = __shfl_xor_sync(0xffffffffu, m[i], o);
      const float l2 = __shfl_xor_sync(0xffffffffu, l[i], o);
      const float mx = m2 > m[i] ? m2 : m[i];
      const float w1 = state_weight(m[i], mx), w2 = state_weight(m2, mx);
      l[i] = l[i] * w1 + l2 * w2;
FL_UNROLL
      for (int e = 0; e < E; ++e) {
        const float a2 = __shfl_xor_sync(0xffffffffu, acc[i][e], o);
        acc[i][e] = acc[i][e] * w1 + a2 * w2;
      }
      m[i] = mx;
    }
  }

  // then the warps, through shared memory
  __shared__ float sh_acc[kWarps][HG][D];
  __shared__ float sh_m[kWarps][HG];
  __shared__ float sh_l[kWarps][HG];
  if (lane < LPR) {
FL_UNROLL
    for (int i = 0; i < HG; ++i) {
FL_UNROLL
      for (int e = 0; e < E; ++e) sh_acc[warp][i][col + e] = acc[i][e];
      if (lane == 0) {
        sh_m[warp][i] = m[i];
        sh_l[warp][i] = l[i];
      }
    }
  }
  __syncthreads();
  for (int w = tid; w < HG * D; w += kThreads) {  // consecutive threads, consecutive dims: coalesced stores
    const int i = w / D, e = w % D;
    if (i >= nh) continue;
    float mx = -INFINITY;
FL_UNROLL
    for (int wp = 0; wp < kWarps; ++wp) mx = sh_m[wp][i] > mx ? sh_m[wp][i] : mx;
    float num = 0.0f, den = 0.0f;
FL_UNROLL
    for (int wp = 0; wp < kWarps; ++wp) {
      const float a = state_weight(sh_m[wp][i], mx);
      num += a * sh_acc[wp][i][e];
      den += a * sh_l[wp][i];
    }
    const int64_t row = b * p.H + h0 + i;
    if (p.splits == 1) {
      p.out[row * D + e] = Elem<T>::store(num / den);
    } else {
      const int64_t part = row * p.splits + split;
      p.part_acc[part * D + e] = num;
      if (e == 0) {
        p.part_ml[2 * part] = mx;
        p.part_ml[2 * part + 1] = den;
      }
    }
  }
}

// One warp per output row (b, h): out = sum_s w_s acc_s / sum_s w_s l_s, w_s = exp2(m_s - max_s m_s).
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) decode_combine_kernel(const float* part_acc, const float* part_ml,
                                                                    T* out, int64_t rows, int splits) {
  constexpr int kPer = D / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + static_cast<int64_t>(threadIdx.x) / 32;
  if (row >= rows) return;  // whole warps only: the kernel has no barrier or shuffle
  const float* ml = part_ml + row * splits * 2;
  const float* acc = part_acc + row * splits * D;
  float mx = -INFINITY;
  for (int s = 0; s < splits; ++s) mx = ml[2 * s] > mx ? ml[2 * s] : mx;
  float num[kPer];
FL_UNROLL
  for (int c = 0; c < kPer; ++c) num[c] = 0.0f;
  float den = 0.0f;
  for (int s = 0; s < splits; ++s) {
    const float w = state_weight(ml[2 * s], mx);
    den += w * ml[2 * s + 1];
FL_UNROLL
    for (int c = 0; c < kPer; ++c) num[c] += w * acc[static_cast<int64_t>(s) * D + c * 32 + lane];
  }
FL_UNROLL
  for (int c = 0; c < kPer; ++c) out[row * D + c * 32 + lane] = Elem<T>::store(num[c] / den);
}

// ------------------------------------------------------------------------------------------------ launch plan

struct DecodePlan {
  int heads_per_block;     // HG: 1, 2 or 4
  int head_groups;         // blocks per (b, kv head) and split
  int splits;              // key shares per sequence
  int64_t blocks;          // of the split kernel
  int64_t combine_blocks;  // of the combine kernel (0 with one split)
};

// `splits` > 0 forces a split count (tests); otherwise enough blocks for kTargetBlocksPerSm per SM, with at
// least kMinKeysPerSplit of the cache's S + R key capacity per split (the fills are only known on the device).
inline DecodePlan plan_decode(int64_t B, int64_t H, int64_t Hkv, int64_t S, int64_t R, int sm_count,
                              int splits = 0) {
  DecodePlan plan;
  const int64_t G = Hkv > 0 ? H / Hkv : 0;
  plan.heads_per_block = G <= 1 ? 1 : (G == 2 ? 2 : kMaxHeadsPerBlock);
  plan.head_groups = static_cast<int>((G + plan.heads_per_block - 1) / plan.heads_per_block);
  const int64_t base = B * Hkv * plan.head_groups;
  if (splits <= 0) {
    int64_t want = base > 0 ? (static_cast<int64_t>(kTargetBlocksPerSm) * sm_count + base - 1) / base : 1;
    int64_t most = (S + R) / kMinKeysPerSplit;
    most = most < 1 ? 1 : (most > kMaxSplits ? kMaxSplits : most);
    splits = static_cast<int>(want < 1 ? 1 : (want > most ? most : want));
  }
  plan.splits = splits;
  plan.blocks = base * splits;
  plan.combine_blocks = splits > 1 ? (B * H + kWarps - 1) / kWarps : 0;
  return plan;
}

#if defined(__CUDACC__)

// The split kernel, then (splits > 1) the combine kernel, on `stream`; returns the first launch error.
template <typename T, int D>
cudaError_t launch_decode(const DecodeParams<T>& p, const DecodePlan& plan, cudaStream_t stream) {
  if (plan.blocks == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(plan.blocks));
  switch (plan.heads_per_block) {
    case 1: decode_split_kernel<T, D, 1><<<grid, kThreads, 0, stream>>>(p); break;
    case 2: decode_split_kernel<T, D, 2><<<grid, kThreads, 0, stream>>>(p); break;
    default: decode_split_kernel<T, D, kMaxHeadsPerBlock><<<grid, kThreads, 0, stream>>>(p); break;
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || plan.splits == 1) return err;
  decode_combine_kernel<T, D><<<dim3(static_cast<unsigned>(plan.combine_blocks)), kThreads, 0, stream>>>(
      p.part_acc, p.part_ml, p.out, p.B * p.H, p.splits);
  return cudaGetLastError();
}

#endif  // __CUDACC__

}  // namespace cuda
}  // namespace cat
}  // namespace fusedlab
