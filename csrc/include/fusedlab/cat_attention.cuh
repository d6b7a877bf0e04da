// CUDA kernels of CAT's compress-attend attention, fusedlab::cat_attention and its backward. Semantics:
// python/fusedlab/reference/cat.py. Raw query t (chunk b = t / l) sees the compressed slots 0..b and the raw
// keys b*l..t, in one softmax; compressed query c sees slots 0..c. Torch-free: csrc/cuda/cat.cu checks the
// arguments, allocates and calls the launchers at the bottom.
//
// Flash-style, fp32 on CUDA cores (no tensor-core path yet):
// * forward: one block per (b, query head, tile of BM queries of one stream). The tile's key range is known
//   from its first and last query: slots [0, slot_end) then raw keys [first query's chunk start, last query],
//   streamed in tiles of BN keys through shared memory with an online softmax, so a block touches only the
//   keys its queries can see (about l + L / l per query, against L / 2 for dense causal attention).
//   Writes o and the log-sum-exp (natural log, fp32).
// * backward, two launches: the dq kernel (same blocks and key ranges as the forward) also writes
//   delta = rowsum(dO * O) for every query; the dkv kernel takes one block per (b, kv head, tile of BM keys
//   of one stream) and walks the queries that see them (every query head of the kv head's group): a raw
//   key tile's own chunks, or for a slot tile every raw query from its first slot's chunk on plus the
//   compressed queries from that slot on. No atomics: every gradient row is written by one block.
// A product tile is spread over 128 threads as 16 row groups x 8 column lanes: thread (ti, tj) owns rows
// ti + 16 r and columns tj + 8 c of the score tile and columns tj + 8 e of its rows' accumulators, so a
// row's statistics stay in one thread and its 8 column lanes (one warp) meet through xor shuffles.
//
// tests/cuda/host_sim.h runs these kernels as host C++ (tests/test_cat_attention_cuda_sim.py); only what it
// emulates is used: __syncthreads, __shfl_xor_sync over whole warps, static shared memory, 1-D grids.
#pragma once

#include "fusedlab/cat_cuda_common.cuh"

namespace fusedlab {
namespace cat {
namespace cuda {

constexpr int kAttnThreads = 128;
constexpr int kRowGroups = 16;  // ti = tid / 8
constexpr int kColLanes = 8;    // tj = tid % 8: a row's 8 lanes are consecutive, in one warp

// Tile sizes per head dim: shared memory (fp32 tiles) stays under the 48 KB of static shared memory.
template <int D>
struct AttnTile;
template <>
struct AttnTile<64> {
  static constexpr int BM = 32, BN = 32;
};
template <>
struct AttnTile<128> {
  static constexpr int BM = 16, BN = 16;
};

template <typename T>
struct AttnParams {
  const T* q;   // [B, H, L, D]
  const T* k;   // [B, Hkv, L, D]
  const T* v;   // [B, Hkv, L, D]
  const T* kc;  // [B, Hkv, Nc, D]
  const T* vc;  // [B, Hkv, Nc, D]
  const T* qc;  // [B, H, Nc, D] or null
  const T* o;   // [B, H, L, D]: forward output (backward)
  const T* oc;  // [B, H, Nc, D] (backward, with qc)
  const T* d_o;   // [B, H, L, D]: gradient of o (backward)
  const T* d_oc;  // [B, H, Nc, D] (backward, with qc)
  T* out_o;       // forward: o; backward: dq
  T* out_oc;      // forward: oc; backward: dqc (with qc)
  T* dk;          // [B, Hkv, L, D] (backward)
  T* dv;
  T* dkc;  // [B, Hkv, Nc, D] (backward)
  T* dvc;
  float* lse;      // [B, H, L]: written by the forward, read by the backward
  float* lse_c;    // [B, H, Nc] (with qc)
  float* delta;    // [B, H, L]: rowsum(dO * O), written by the dq kernel, read by the dkv kernel
  float* delta_c;  // [B, H, Nc] (with qc)
  int64_t B;
  int H, Hkv, L, Nc, l;
  float qk_scale;  // scale * log2(e): scores in log2 units, so exp2 replaces exp
  float scale;     // the score scale itself (the backward's dq and dk)
};

FL_HD FL_INLINE int imin(int a, int b) { return a < b ? a : b; }
FL_HD FL_INLINE int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }
FL_HD FL_INLINE int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Does query i (raw, or compressed when comp_query) see key j (raw, or a compressed slot)?
FL_HD FL_INLINE bool cat_visible(bool comp_query, bool raw_key, int i, int j, int l) {
  if (comp_query) return !raw_key && j <= i;
  return raw_key ? (j <= i && j >= (i / l) * l) : j <= i / l;
}

// Query tiles per (b, head): the raw stream's, then the compressed stream's (none without qc).
template <int D>
FL_HD FL_INLINE int query_tiles(int L, int Nc, bool has_qc) {
  constexpr int BM = AttnTile<D>::BM;
  return ceil_div(L, BM) + (has_qc ? ceil_div(Nc, BM) : 0);
}

// Key tiles per (b, kv head) of the dkv kernel: the raw keys', then the slots'.
template <int D>
FL_HD FL_INLINE int key_tiles(int L, int Nc) {
  constexpr int BM = AttnTile<D>::BM;
  return ceil_div(L, BM) + ceil_div(Nc, BM);
}

// Rows [r0, r1) of a row-major [*, D] matrix into dst[ROWS][D + 1] as fp32; rows past r1 are zero. The
// padding column keeps the column lanes' reads of different rows on different banks.
template <typename T, int D, int ROWS>
__device__ FL_INLINE void load_rows(float* dst, const T* src, int r0, int r1) {
  for (int idx = static_cast<int>(threadIdx.x); idx < ROWS * D; idx += kAttnThreads) {
    const int r = idx / D, c = idx % D;
    dst[r * (D + 1) + c] = r0 + r < r1 ? Elem<T>::load(src[static_cast<int64_t>(r0 + r) * D + c]) : 0.0f;
  }
}

// s[r][c] = <a[ti + 16 r], b[tj + 8 c]> over D, a and b padded [*, D + 1] tiles in shared memory.
template <int D, int RM, int RN>
__device__ FL_INLINE void tile_dots(const float* a, const float* b, int ti, int tj, float (&s)[RM][RN]) {
FL_UNROLL
  for (int r = 0; r < RM; ++r)
FL_UNROLL
    for (int c = 0; c < RN; ++c) s[r][c] = 0.0f;
  for (int d = 0; d < D; ++d) {
    float x[RM], y[RN];
FL_UNROLL
    for (int r = 0; r < RM; ++r) x[r] = a[(ti + kRowGroups * r) * (D + 1) + d];
FL_UNROLL
    for (int c = 0; c < RN; ++c) y[c] = b[(tj + kColLanes * c) * (D + 1) + d];
FL_UNROLL
    for (int r = 0; r < RM; ++r)
FL_UNROLL
      for (int c = 0; c < RN; ++c) s[r][c] += x[r] * y[c];
  }
}

// acc[r][e] += sum_j w[ti + 16 r][j] * m[j][tj + 8 e] over the N columns of w ([*, N + 1]) and rows of m.
template <int D, int N, int RM>
__device__ FL_INLINE void tile_accumulate(const float* w, const float* m, int ti, int tj, float (&acc)[RM][D / 8]) {
  for (int j = 0; j < N; ++j) {
    float x[RM];
FL_UNROLL
    for (int r = 0; r < RM; ++r) x[r] = w[(ti + kRowGroups * r) * (N + 1) + j];
FL_UNROLL
    for (int e = 0; e < D / 8; ++e) {
      const float y = m[j * (D + 1) + tj + kColLanes * e];
FL_UNROLL
      for (int r = 0; r < RM; ++r) acc[r][e] += x[r] * y;
    }
  }
}

// Max and sum over a row's 8 column lanes.
__device__ FL_INLINE float lanes_max(float x) {
FL_UNROLL
  for (int o = 1; o < kColLanes; o *= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ FL_INLINE float lanes_sum(float x) {
FL_UNROLL
  for (int o = 1; o < kColLanes; o *= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// What a query tile block works on: block index = (b * H + h) * query_tiles + tile.
struct QueryTile {
  int64_t bh, b, kvh;  // (b, h) flat, batch, (b, kv head) flat
  bool comp;           // compressed queries
  int q0, q1;          // queries [q0, q1) of the stream
  int slot_end;        // slots [0, slot_end) seen by some query of the tile
  int raw0, raw1;      // raw keys [raw0, raw1) seen by some query of the tile (empty for compressed queries)
};

template <int D, typename T>
__device__ FL_INLINE QueryTile query_tile(const AttnParams<T>& p) {
  constexpr int BM = AttnTile<D>::BM;
  const int tiles = query_tiles<D>(p.L, p.Nc, p.qc != nullptr), raw_tiles = ceil_div(p.L, BM);
  const int64_t blk = static_cast<int64_t>(blockIdx.x);
  QueryTile t;
  t.bh = blk / tiles;
  const int tile = static_cast<int>(blk % tiles);
  t.b = t.bh / p.H;
  t.kvh = t.b * p.Hkv + static_cast<int>(t.bh % p.H) / (p.H / p.Hkv);
  t.comp = tile >= raw_tiles;
  t.q0 = (t.comp ? tile - raw_tiles : tile) * BM;
  t.q1 = imin(t.q0 + BM, t.comp ? p.Nc : p.L);
  t.slot_end = t.comp ? t.q1 : imin(p.Nc, (t.q1 - 1) / p.l + 1);
  t.raw0 = t.comp ? 0 : (t.q0 / p.l) * p.l;
  t.raw1 = t.comp ? 0 : t.q1;
  return t;
}

// The kv head's two key streams.
template <typename T>
struct KeyStreams {
  const T *kc, *vc, *k, *v;
};

template <int D, typename T>
__device__ FL_INLINE KeyStreams<T> key_streams(const AttnParams<T>& p, const QueryTile& t) {
  return KeyStreams<T>{p.kc + t.kvh * p.Nc * D, p.vc + t.kvh * p.Nc * D, p.k + t.kvh * p.L * D,
                       p.v + t.kvh * p.L * D};
}

// Key tile kt of a query tile's range (slot tiles first, then raw-key tiles) into sk, sv: which stream and
// which keys [k0, k1). Starts with a barrier (the previous tile's shared tiles are read) and ends with one.
struct KeyTile {
  bool raw;
  int k0, k1;
};

template <typename T, int D, int BN>
__device__ FL_INLINE KeyTile load_key_tile(const KeyStreams<T>& ks, const QueryTile& t, int kt, int slot_tiles,
                                           float* sk, float* sv) {
  KeyTile kt_;
  kt_.raw = kt >= slot_tiles;
  kt_.k0 = kt_.raw ? t.raw0 + (kt - slot_tiles) * BN : kt * BN;
  kt_.k1 = imin(kt_.k0 + BN, kt_.raw ? t.raw1 : t.slot_end);
  __syncthreads();
  load_rows<T, D, BN>(sk, kt_.raw ? ks.k : ks.kc, kt_.k0, kt_.k1);
  load_rows<T, D, BN>(sv, kt_.raw ? ks.v : ks.vc, kt_.k0, kt_.k1);
  __syncthreads();
  return kt_;
}

// Forward. Block index = (b * H + h) * query_tiles + tile.
template <typename T, int D>
__global__ void __launch_bounds__(kAttnThreads) attn_fwd_kernel(const AttnParams<T> p) {
  constexpr int BM = AttnTile<D>::BM, BN = AttnTile<D>::BN, RM = BM / kRowGroups, RN = BN / kColLanes;
  static_assert(BM % kRowGroups == 0 && BN % kColLanes == 0 && D % kColLanes == 0, "tile shapes");
  __shared__ float sq[BM * (D + 1)];
  __shared__ float sk[BN * (D + 1)];
  __shared__ float sv[BN * (D + 1)];
  __shared__ float sp[BM * (BN + 1)];
  const int tid = static_cast<int>(threadIdx.x), ti = tid / kColLanes, tj = tid % kColLanes;
  const QueryTile t = query_tile<D>(p);
  const int nq = t.comp ? p.Nc : p.L;
  load_rows<T, D, BM>(sq, (t.comp ? p.qc : p.q) + t.bh * nq * D, t.q0, t.q1);
  const KeyStreams<T> ks = key_streams<D>(p, t);

  float m[RM], sum[RM], acc[RM][D / 8];
FL_UNROLL
  for (int r = 0; r < RM; ++r) {
    m[r] = -INFINITY;
    sum[r] = 0.0f;
FL_UNROLL
    for (int e = 0; e < D / 8; ++e) acc[r][e] = 0.0f;
  }
  const int slot_tiles = ceil_div(t.slot_end, BN), n_tiles = slot_tiles + ceil_div(t.raw1 - t.raw0, BN);
  for (int kt = 0; kt < n_tiles; ++kt) {
    const KeyTile key = load_key_tile<T, D, BN>(ks, t, kt, slot_tiles, sk, sv);  // sp is free again too
    const bool raw = key.raw;
    const int k0 = key.k0, k1 = key.k1;
    float s[RM][RN];
    tile_dots<D, RM, RN>(sq, sk, ti, tj, s);
FL_UNROLL
    for (int r = 0; r < RM; ++r) {
      const int i = t.q0 + ti + kRowGroups * r;
      float mx = -INFINITY;
FL_UNROLL
      for (int c = 0; c < RN; ++c) {
        const int j = k0 + tj + kColLanes * c;
        s[r][c] = i < t.q1 && j < k1 && cat_visible(t.comp, raw, i, j, p.l) ? s[r][c] * p.qk_scale : -INFINITY;
        mx = fmaxf(mx, s[r][c]);
      }
      const float m_new = fmaxf(m[r], lanes_max(mx));
      const float alpha = state_weight(m[r], m_new), base = m_new == -INFINITY ? 0.0f : m_new;
      float rs = 0.0f;
FL_UNROLL
      for (int c = 0; c < RN; ++c) {
        const float pc = exp2_f32(s[r][c] - base);  // exp2(-inf) = 0: masked keys weigh nothing
        sp[(ti + kRowGroups * r) * (BN + 1) + tj + kColLanes * c] = pc;
        rs += pc;
      }
      sum[r] = sum[r] * alpha + lanes_sum(rs);
      m[r] = m_new;
FL_UNROLL
      for (int e = 0; e < D / 8; ++e) acc[r][e] *= alpha;
    }
    __syncthreads();
    tile_accumulate<D, BN, RM>(sp, sv, ti, tj, acc);
  }
  T* out = t.comp ? p.out_oc : p.out_o;
  float* lse = t.comp ? p.lse_c : p.lse;
FL_UNROLL
  for (int r = 0; r < RM; ++r) {
    const int i = t.q0 + ti + kRowGroups * r;
    if (i >= t.q1) continue;
    const float inv = 1.0f / sum[r];  // every query sees at least one key (slot 0)
    const int64_t row = t.bh * nq + i;
FL_UNROLL
    for (int e = 0; e < D / 8; ++e) out[row * D + tj + kColLanes * e] = Elem<T>::store(acc[r][e] * inv);
    if (tj == 0) lse[row] = (m[r] + log2_f32(sum[r])) * 0.6931471805599453f;  // log2 units to natural
  }
}

// Backward, first launch: dq (dqc) and delta. Same blocks and key ranges as the forward.
template <typename T, int D>
__global__ void __launch_bounds__(kAttnThreads) attn_bwd_dq_kernel(const AttnParams<T> p) {
  constexpr int BM = AttnTile<D>::BM, BN = AttnTile<D>::BN, RM = BM / kRowGroups, RN = BN / kColLanes;
  __shared__ float sq[BM * (D + 1)];
  __shared__ float sdo[BM * (D + 1)];
  __shared__ float sk[BN * (D + 1)];
  __shared__ float sv[BN * (D + 1)];
  __shared__ float sds[BM * (BN + 1)];
  const int tid = static_cast<int>(threadIdx.x), ti = tid / kColLanes, tj = tid % kColLanes;
  const QueryTile t = query_tile<D>(p);
  const int nq = t.comp ? p.Nc : p.L;
  const int64_t rows0 = t.bh * nq;
  load_rows<T, D, BM>(sq, (t.comp ? p.qc : p.q) + rows0 * D, t.q0, t.q1);
  load_rows<T, D, BM>(sdo, (t.comp ? p.d_oc : p.d_o) + rows0 * D, t.q0, t.q1);
  const T* o = (t.comp ? p.oc : p.o) + rows0 * D;
  const float* lse = (t.comp ? p.lse_c : p.lse) + rows0;
  float* delta = (t.comp ? p.delta_c : p.delta) + rows0;
  const KeyStreams<T> ks = key_streams<D>(p, t);
  __syncthreads();

  // each row's log-sum-exp (log2 units) and delta = <dO, O>
  float lse2[RM], dlt[RM], acc[RM][D / 8];
FL_UNROLL
  for (int r = 0; r < RM; ++r) {
    const int il = ti + kRowGroups * r, i = t.q0 + il;
    float part = 0.0f;
    if (i < t.q1)
FL_UNROLL
      for (int e = 0; e < D / 8; ++e) {
        const int c = tj + kColLanes * e;
        part += sdo[il * (D + 1) + c] * Elem<T>::load(o[static_cast<int64_t>(i) * D + c]);
      }
    dlt[r] = lanes_sum(part);
    lse2[r] = i < t.q1 ? lse[i] * 1.4426950408889634f : 0.0f;
    if (i < t.q1 && tj == 0) delta[i] = dlt[r];
FL_UNROLL
    for (int e = 0; e < D / 8; ++e) acc[r][e] = 0.0f;
  }
  const int slot_tiles = ceil_div(t.slot_end, BN), n_tiles = slot_tiles + ceil_div(t.raw1 - t.raw0, BN);
  for (int kt = 0; kt < n_tiles; ++kt) {
    const KeyTile key = load_key_tile<T, D, BN>(ks, t, kt, slot_tiles, sk, sv);  // sds is free again too
    const bool raw = key.raw;
    const int k0 = key.k0, k1 = key.k1;
    float s[RM][RN], dp[RM][RN];
    tile_dots<D, RM, RN>(sq, sk, ti, tj, s);
    tile_dots<D, RM, RN>(sdo, sv, ti, tj, dp);
FL_UNROLL
    for (int r = 0; r < RM; ++r) {
      const int i = t.q0 + ti + kRowGroups * r;
FL_UNROLL
      for (int c = 0; c < RN; ++c) {
        const int j = k0 + tj + kColLanes * c;
        const bool seen = i < t.q1 && j < k1 && cat_visible(t.comp, raw, i, j, p.l);
        const float pr = seen ? exp2_f32(s[r][c] * p.qk_scale - lse2[r]) : 0.0f;
        sds[(ti + kRowGroups * r) * (BN + 1) + tj + kColLanes * c] = pr * (dp[r][c] - dlt[r]);
      }
    }
    __syncthreads();
    tile_accumulate<D, BN, RM>(sds, sk, ti, tj, acc);
  }
  T* dq = (t.comp ? p.out_oc : p.out_o) + rows0 * D;
FL_UNROLL
  for (int r = 0; r < RM; ++r) {
    const int i = t.q0 + ti + kRowGroups * r;
    if (i >= t.q1) continue;
FL_UNROLL
    for (int e = 0; e < D / 8; ++e)
      dq[static_cast<int64_t>(i) * D + tj + kColLanes * e] = Elem<T>::store(acc[r][e] * p.scale);
  }
}

// Backward, second launch: dk, dv (raw key tiles) and dkc, dvc (slot tiles). Block index =
// (b * Hkv + kv head) * key_tiles + tile; the block walks every query head of the kv head's group.
template <typename T, int D>
__global__ void __launch_bounds__(kAttnThreads) attn_bwd_dkv_kernel(const AttnParams<T> p) {
  // keys are the tile's rows (BM of them), queries its columns (BN per step)
  constexpr int BM = AttnTile<D>::BM, BN = AttnTile<D>::BN, RM = BM / kRowGroups, RN = BN / kColLanes;
  __shared__ float sk[BM * (D + 1)];
  __shared__ float sv[BM * (D + 1)];
  __shared__ float sq[BN * (D + 1)];
  __shared__ float sdo[BN * (D + 1)];
  __shared__ float sp[BM * (BN + 1)];
  __shared__ float sds[BM * (BN + 1)];
  __shared__ float slse[BN];
  __shared__ float sdelta[BN];
  const int tid = static_cast<int>(threadIdx.x), ti = tid / kColLanes, tj = tid % kColLanes;
  const int tiles = key_tiles<D>(p.L, p.Nc), raw_tiles = ceil_div(p.L, BM);
  const int64_t blk = static_cast<int64_t>(blockIdx.x), kvh = blk / tiles, b = kvh / p.Hkv;
  const int tile = static_cast<int>(blk % tiles);
  const bool raw = tile < raw_tiles;
  const int j0 = (raw ? tile : tile - raw_tiles) * BM, j1 = imin(j0 + BM, raw ? p.L : p.Nc);
  const int64_t key_rows0 = kvh * (raw ? p.L : p.Nc);
  load_rows<T, D, BM>(sk, (raw ? p.k : p.kc) + key_rows0 * D, j0, j1);
  load_rows<T, D, BM>(sv, (raw ? p.v : p.vc) + key_rows0 * D, j0, j1);

  // the queries that see some key of the tile, per stream: [begin, end)
  const int raw_q0 = raw ? j0 : static_cast<int>(min_i64(p.L, static_cast<int64_t>(j0) * p.l));  // chunk j0 on
  const int raw_q1 = raw ? imin(p.L, ((j1 - 1) / p.l + 1) * p.l) : p.L;
  const bool comp_q = !raw && p.qc != nullptr;
  const int G = p.H / p.Hkv;

  float dk[RM][D / 8], dv[RM][D / 8];
FL_UNROLL
  for (int r = 0; r < RM; ++r)
FL_UNROLL
    for (int e = 0; e < D / 8; ++e) dk[r][e] = dv[r][e] = 0.0f;
  const int raw_steps = ceil_div(raw_q1 - raw_q0, BN), comp_steps = comp_q ? ceil_div(p.Nc - j0, BN) : 0;
  for (int g = 0; g < G; ++g) {
    const int64_t bh = b * p.H + (kvh % p.Hkv) * G + g;
    for (int step = 0; step < raw_steps + comp_steps; ++step) {
      const bool cq = step >= raw_steps;  // compressed queries
      const int i0 = cq ? j0 + (step - raw_steps) * BN : raw_q0 + step * BN;
      const int i1 = imin(i0 + BN, cq ? p.Nc : raw_q1);
      const int64_t rows0 = bh * (cq ? p.Nc : p.L);
      __syncthreads();  // the previous step's sq, sdo, sp, sds are read
      load_rows<T, D, BN>(sq, (cq ? p.qc : p.q) + rows0 * D, i0, i1);
      load_rows<T, D, BN>(sdo, (cq ? p.d_oc : p.d_o) + rows0 * D, i0, i1);
      if (tid < BN) {
        const bool in = i0 + tid < i1;
        slse[tid] = in ? (cq ? p.lse_c : p.lse)[rows0 + i0 + tid] * 1.4426950408889634f : 0.0f;
        sdelta[tid] = in ? (cq ? p.delta_c : p.delta)[rows0 + i0 + tid] : 0.0f;
      }
      __syncthreads();
      float s[RM][RN], dpt[RM][RN];
      tile_dots<D, RM, RN>(sk, sq, ti, tj, s);
      tile_dots<D, RM, RN>(sv, sdo, ti, tj, dpt);
FL_UNROLL
      for (int r = 0; r < RM; ++r) {
        const int j = j0 + ti + kRowGroups * r;
FL_UNROLL
        for (int c = 0; c < RN; ++c) {
          const int ic = tj + kColLanes * c, i = i0 + ic;
          const bool seen = j < j1 && i < i1 && cat_visible(cq, raw, i, j, p.l);
          const float pr = seen ? exp2_f32(s[r][c] * p.qk_scale - slse[ic]) : 0.0f;
          const int at = (ti + kRowGroups * r) * (BN + 1) + ic;
          sp[at] = pr;
          sds[at] = pr * (dpt[r][c] - sdelta[ic]);
        }
      }
      __syncthreads();
      tile_accumulate<D, BN, RM>(sp, sdo, ti, tj, dv);
      tile_accumulate<D, BN, RM>(sds, sq, ti, tj, dk);
    }
  }
  T* dk_out = (raw ? p.dk : p.dkc) + key_rows0 * D;
  T* dv_out = (raw ? p.dv : p.dvc) + key_rows0 * D;
FL_UNROLL
  for (int r = 0; r < RM; ++r) {
    const int j = j0 + ti + kRowGroups * r;
    if (j >= j1) continue;
FL_UNROLL
    for (int e = 0; e < D / 8; ++e) {
      const int64_t at = static_cast<int64_t>(j) * D + tj + kColLanes * e;
      dk_out[at] = Elem<T>::store(dk[r][e] * p.scale);
      dv_out[at] = Elem<T>::store(dv[r][e]);
    }
  }
}

// ------------------------------------------------------------------------------------------------ launchers

#if defined(__CUDACC__)
template <typename T, int D>
cudaError_t launch_attn_forward(const AttnParams<T>& p, cudaStream_t stream) {
  const int64_t blocks = p.B * p.H * query_tiles<D>(p.L, p.Nc, p.qc != nullptr);
  if (blocks == 0) return cudaSuccess;
  attn_fwd_kernel<T, D><<<static_cast<unsigned>(blocks), kAttnThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t launch_attn_backward(const AttnParams<T>& p, cudaStream_t stream) {
  const int64_t q_blocks = p.B * p.H * query_tiles<D>(p.L, p.Nc, p.qc != nullptr);
  const int64_t k_blocks = p.B * p.Hkv * key_tiles<D>(p.L, p.Nc);
  if (q_blocks > 0) {
    attn_bwd_dq_kernel<T, D><<<static_cast<unsigned>(q_blocks), kAttnThreads, 0, stream>>>(p);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (k_blocks > 0) attn_bwd_dkv_kernel<T, D><<<static_cast<unsigned>(k_blocks), kAttnThreads, 0, stream>>>(p);
  return cudaGetLastError();
}
#endif

}  // namespace cuda
}  // namespace cat
}  // namespace fusedlab
