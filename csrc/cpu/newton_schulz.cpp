// C++ CPU kernels of the newton_schulz family: the whole iteration in one op over a batch of same-shaped
// matrices, with the aX + BX and bA + cA^2 updates fused into baddbmm (one GEMM each, epilogue included);
// and Muon's step for a batch of same-shaped parameters around it, with its elementwise work fused into
// two passes before the iteration and one after. Semantics: python/fusedlab/reference/newton_schulz.py and
// python/fusedlab/optim/muon.py.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/baddbmm.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/linalg_vector_norm.h>
#include <ATen/ops/mm.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

#include "fusedlab/checks.h"
#include "fusedlab/cpu_math.h"

namespace fusedlab {
namespace {

using cpu::f32x8;
using cpu::f64x8;
using cpu::u16x8;
using cpu::u32x8;

// A CPU buffer for this op's own use, backed by transparent huge pages where the kernel offers them on request
// (madvise mode): fresh memory then faults once per 2 MB instead of once per 4 KB. Not resizable, so never
// handed to the caller.
at::Tensor empty_workspace(at::IntArrayRef sizes, const at::TensorOptions& opts) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr size_t kHuge = size_t(2) << 20;
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) * opts.dtype().itemsize();
  void* p = nullptr;
  if (bytes >= 4 * kHuge && posix_memalign(&p, kHuge, bytes) == 0) {
    madvise(p, bytes / kHuge * kHuge, MADV_HUGEPAGE);  // a hint: without huge pages this is plain memory
    return at::from_blob(p, sizes, [](void* q) { std::free(q); }, opts);
  }
#endif
  return at::empty(sizes, opts);
}

// The buffers of one batched iteration: the Gram matrices A, the polynomial P and the iterate the first step
// writes (the second alternates with the input X where that is the caller's own buffer).
struct IterationBuffers {
  at::Tensor A, P, Y;
};

// The bytes of Muon's buffers for a batch [count, m, n] (the prepared update X and the next iterate, then the
// Gram matrix and the polynomial, min(m, n) square), each 64-byte aligned.
int64_t align64(int64_t bytes) { return (bytes + 63) / 64 * 64; }
int64_t muon_workspace_bytes(int64_t count, int64_t m, int64_t n, int64_t elem) {
  const int64_t g = std::min(m, n);
  return 2 * align64(count * m * n * elem) + 2 * align64(count * g * g * elem);
}

// Whether this CPU multiplies bfloat16 in AMX tiles (CPUID leaf 7, EDX bit 22).
bool cpu_has_amx_bf16() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool amx = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    return __get_cpuid_count(7, 0, &a, &b, &c, &d) && ((d >> 22) & 1u);
  }();
  return amx;
#else
  return false;
#endif
}

// The symmetric products A = X X^T and P = b A + c A^2 are computed by row panels: panel i (rows r_i .. r_i+1
// of k) gets only its columns from r_i on, one GEMM each, and the blocks left of the diagonal are filled from
// their mirror images. That is (k + 1) / 2k of the FLOPs (9/16 at k = 8). Panels are paired (i with k - 1 - i:
// equal work) and the pairs of all matrices shared among the threads, each GEMM single-threaded. Measured on
// a 2-core AVX-512-BF16 CPU without AMX (bf16, batches of 768 x 768 and 768 x 3072): the panel products
// 1.4-1.6x faster than the full ones at k = 8 (the whole iteration about 1.25x), where 2-thread GEMMs on
// blocks this small kept little of the saving (at best 1.2x, often slower). Not for half types on AMX CPUs,
// where 2-thread block triangles measured slower than the full products (65 against 43 ms for 48 products at
// 768 x 768) and panels were not measured.
int64_t symmetric_panels(int64_t m, at::ScalarType dtype) {
  if ((dtype == at::kBFloat16 || dtype == at::kHalf) && cpu_has_amx_bf16()) return 1;
  // panels of at least 96 rows, and at least 4 of them: below either the panel GEMMs' lower efficiency ate
  // the saving (k = 2 at 256 x 256 measured no faster; k = 4 at 512 x 512 1.15x, at 384 x 1536 1.1x)
  constexpr int64_t kMinPanelRows = 96;
  const int64_t k = std::min<int64_t>(8, m / kMinPanelRows) / 2 * 2;
  return k < 4 ? 1 : k;
}

// Fills square[r1:, r0:r1] with the transpose of square[r0:r1, r1:] (a contiguous [m, m] matrix), in tiles
// that stay in the L1 cache: ATen's strided copy of a transposed view took about 12% of a panel product.
template <typename W>
void mirror_tiles(W* a, int64_t m, int64_t r0, int64_t r1) {
  constexpr int64_t kTile = 32;
  for (int64_t c0 = r1; c0 < m; c0 += kTile)
    for (int64_t s0 = r0; s0 < r1; s0 += kTile) {
      const int64_t c1 = std::min(m, c0 + kTile), s1 = std::min(r1, s0 + kTile);
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t r = s0; r < s1; ++r) a[c * m + r] = a[r * m + c];
    }
}
void mirror_panel(const at::Tensor& square, int64_t r0, int64_t r1) {
  const int64_t m = square.size(0);
  TORCH_INTERNAL_ASSERT(square.is_contiguous() && square.size(1) == m);
  if (r1 >= m) return;
  void* p = square.data_ptr();
  switch (square.element_size()) {  // a bit copy: only the width matters
    case 2: return mirror_tiles(static_cast<uint16_t*>(p), m, r0, r1);
    case 4: return mirror_tiles(static_cast<uint32_t*>(p), m, r0, r1);
    default: return mirror_tiles(static_cast<uint64_t*>(p), m, r0, r1);
  }
}

// out[q] <- beta C[q] + alpha L[q] Rt[q] for each matrix q of the batch, where the product is known to be
// symmetric (X X^T: L = X, Rt = X^T; X^T X: L = X^T, Rt = X; A A with A symmetric), by row panels, mirrored.
// `C` may be undefined (then beta and alpha are ignored: the plain product).
void symmetric_product(const at::Tensor& out, const at::Tensor& L, const at::Tensor& Rt, const at::Tensor& C,
                       double beta, double alpha) {
  const int64_t bsz = out.size(0), m = out.size(1), k = symmetric_panels(m, out.scalar_type());
  auto edge = [&](int64_t i) { return i * m / k; };
  // one panel: rows [r0, r1) from column r0 on, then its part right of the diagonal block mirrored below it
  auto panel = [&](int64_t q, int64_t i) {
    const int64_t r0 = edge(i), r1 = edge(i + 1);
    at::Tensor o = out[q].narrow(0, r0, r1 - r0).narrow(1, r0, m - r0);
    const at::Tensor lhs = L[q].narrow(0, r0, r1 - r0), rhs = Rt[q].narrow(1, r0, m - r0);
    if (C.defined())
      at::addmm_out(o, C[q].narrow(0, r0, r1 - r0).narrow(1, r0, m - r0), lhs, rhs, beta, alpha);
    else
      at::mm_out(o, lhs, rhs);  // alpha is 1 here
    mirror_panel(out[q], r0, r1);
  };
  const int64_t pairs = (k + 1) / 2;
  at::parallel_for(0, bsz * pairs, 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t q = w / pairs, p = w % pairs;
      panel(q, p);
      if (k - 1 - p != p) panel(q, k - 1 - p);
    }
  });
}

// The iteration on a normalized batch X [b, m, n], into buffers
// made once per call or `given` by the caller: a fresh tensor per product meant fresh pages each time, a page
// fault per 4 KB (417,000 in one Muon step over GPT-2 small's matrices; 121,000 with per-call buffers, none
// with the optimizer's workspace). `own_x`: X is this call's own contiguous buffer, so the iterates may
// overwrite it. `out_to_caller`: the result may be returned to the caller, so the iterates' buffers are
// ordinary tensors. A tall batch (m > n) is iterated in its own layout, on the small Gram matrix X^T X and
// multiplied on the right (X <- aX + X (bA + cA^2), the same iterate transposed), so no pass transposes it.
at::Tensor iterate(const at::Tensor& X, at::ArrayRef<double> coefficients, bool own_x, bool out_to_caller,
                   const IterationBuffers* given = nullptr) {
  const int64_t steps = static_cast<int64_t>(coefficients.size() / 3);
  if (steps == 0) return X;
  const int64_t bsz = X.size(0), m = X.size(1), n = X.size(2);
  const bool tall = m > n;
  const int64_t g = tall ? n : m;  // the Gram matrix's side
  const auto opts = X.options();
  auto iterate_buffer = [&] {
    return out_to_caller ? at::empty({bsz, m, n}, opts) : empty_workspace({bsz, m, n}, opts);
  };
  at::Tensor A = given ? given->A : empty_workspace({bsz, g, g}, opts);
  at::Tensor P = given ? given->P : empty_workspace({bsz, g, g}, opts);
  // the iterates alternate between two buffers; step s reads the previous iterate and writes buffer s % 2
  at::Tensor bufs[2] = {given ? given->Y : iterate_buffer(),
                        steps < 2 ? at::Tensor() : own_x ? X : iterate_buffer()};
  const bool panels = symmetric_panels(g, X.scalar_type()) > 1;
  at::Tensor cur = X;
  for (int64_t s = 0; s < steps; ++s) {
    const double a = coefficients[3 * s], b = coefficients[3 * s + 1], c = coefficients[3 * s + 2];
    at::Tensor& out = bufs[s % 2];
    // A = X X^T, or X^T X when tall
    const at::Tensor lhs = tall ? cur.transpose(1, 2) : cur, rhs = tall ? cur : cur.transpose(1, 2);
    if (panels) {
      symmetric_product(A, lhs, rhs, at::Tensor(), 0.0, 1.0);
      symmetric_product(P, A, A, A, b, c);  // b A + c A^2 (A = A^T)
    } else {
      at::bmm_out(A, lhs, rhs);
      at::baddbmm_out(P, A, A, A, /*beta=*/b, /*alpha=*/c);
    }
    if (tall)
      at::baddbmm_out(out, cur, cur, P, /*beta=*/a, /*alpha=*/1.0);  // a X + X (b A + c A^2)
    else
      at::baddbmm_out(out, cur, P, cur, /*beta=*/a, /*alpha=*/1.0);  // a X + (b A + c A^2) X
    cur = out;
  }
  return cur;
}

// float -> bfloat16 rounded to nearest even, NaN to 0x7FC0 (c10::BFloat16's conversion), eight at a time.
FL_VEC_INLINE void store8(c10::BFloat16* out, f32x8 v) {
  u32x8 bits;
  std::memcpy(&bits, &v, sizeof bits);
  u32x8 r = (bits + (((bits >> 16) & 1u) + 0x7FFFu)) >> 16;
  const u32x8 nan = {0x7FC0, 0x7FC0, 0x7FC0, 0x7FC0, 0x7FC0, 0x7FC0, 0x7FC0, 0x7FC0};
  r = v != v ? nan : r;
  const u16x8 h = __builtin_convertvector(r, u16x8);
  std::memcpy(out, &h, sizeof h);
}
FL_VEC_INLINE void store8(float* out, f32x8 v) { std::memcpy(out, &v, sizeof v); }
template <typename T>
FL_VEC_INLINE void store8(T* out, f32x8 v) {
  for (int k = 0; k < 8; ++k) out[k] = static_cast<T>(v[k]);
}
FL_VEC_INLINE f32x8 load8_f32(const c10::BFloat16* x) {
  u16x8 h;
  std::memcpy(&h, x, sizeof h);
  const u32x8 bits = __builtin_convertvector(h, u32x8) << 16;
  f32x8 v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}
FL_VEC_INLINE f32x8 load8_f32(const float* x) {
  f32x8 v;
  std::memcpy(&v, x, sizeof v);
  return v;
}
template <typename T>
FL_VEC_INLINE f32x8 load8_f32(const T* x) {
  f32x8 v;
  for (int k = 0; k < 8; ++k) v[k] = static_cast<float>(x[k]);
  return v;
}

// The newton_schulz op's normalization of a contiguous batch in two passes: per matrix the sum of squares in
// float64 (eight lanes, lane k taking the elements e with e % 8 = k, partial sums of fixed chunks added in
// a fixed order: the result does not depend on the thread count), then x = cast(g * inv) with inv =
// 1 / max(norm * scale, eps) rounded to float32, as the ATen expression it replaces computed it (that took
// about 10% of the op at 48 x 768 x 768: a float64 norm, an upcast, a scaled copy and a cast).
template <typename T>
FL_VEC_INLINE double sum_squares_body(const T* x, int64_t n) {
  f64x8 acc = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t e = 0;
  for (; e + 8 <= n; e += 8) {
    const f64x8 v = __builtin_convertvector(load8_f32(x + e), f64x8);
    acc += v * v;
  }
  for (; e < n; ++e) {
    const double v = static_cast<float>(x[e]);
    acc[e & 7] += v * v;
  }
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}
template <typename Tin, typename Tout>
FL_VEC_INLINE void scale_cast_body(const Tin* g, float inv, Tout* x, int64_t n) {
  int64_t e = 0;
  for (; e + 8 <= n; e += 8) store8(x + e, load8_f32(g + e) * inv);
  for (; e < n; ++e) x[e] = static_cast<Tout>(static_cast<float>(g[e]) * inv);
}
#define FL_NS_SUM_SQUARES(T) \
  FL_TARGET_CLONES double sum_squares(const T* x, int64_t n) { return sum_squares_body(x, n); }
#define FL_NS_SCALE_CAST(Tin, Tout)                                          \
  FL_TARGET_CLONES void scale_cast(const Tin* g, float inv, Tout* x, int64_t n) { \
    scale_cast_body(g, inv, x, n);                                           \
  }
FL_NS_SUM_SQUARES(float)
FL_NS_SUM_SQUARES(c10::BFloat16)
FL_NS_SUM_SQUARES(c10::Half)
#define FL_NS_SCALE_CAST_TO(Tin) \
  FL_NS_SCALE_CAST(Tin, float)   \
  FL_NS_SCALE_CAST(Tin, c10::BFloat16) FL_NS_SCALE_CAST(Tin, c10::Half)
FL_NS_SCALE_CAST_TO(float)
FL_NS_SCALE_CAST_TO(c10::BFloat16)
FL_NS_SCALE_CAST_TO(c10::Half)
#undef FL_NS_SCALE_CAST_TO
#undef FL_NS_SCALE_CAST
#undef FL_NS_SUM_SQUARES

template <typename Tin, typename Tout>
void normalize_typed(const at::Tensor& g, double norm_scale, double eps, at::Tensor& X) {
  constexpr int64_t kChunk = int64_t(1) << 16;  // elements per work item
  const int64_t count = g.size(0), size = g.size(1) * g.size(2), chunks = (size + kChunk - 1) / kChunk;
  const Tin* src = g.data_ptr<Tin>();
  Tout* dst = X.data_ptr<Tout>();
  auto span = [&](int64_t w, int64_t& begin, int64_t& len) {
    begin = (w / chunks) * size + (w % chunks) * kChunk;
    len = std::min(kChunk, size - (w % chunks) * kChunk);
  };
  std::vector<double> partial(count * chunks);
  at::parallel_for(0, count * chunks, 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0, begin, len; w < w1; ++w) {
      span(w, begin, len);
      partial[w] = sum_squares(src + begin, len);
    }
  });
  std::vector<float> inv(count);
  for (int64_t i = 0; i < count; ++i) {
    double ss = 0.0;
    for (int64_t c = 0; c < chunks; ++c) ss += partial[i * chunks + c];
    inv[i] = static_cast<float>(1.0 / std::max(std::sqrt(ss) * norm_scale, eps));
  }
  at::parallel_for(0, count * chunks, 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0, begin, len; w < w1; ++w) {
      span(w, begin, len);
      scale_cast(src + begin, inv[w / chunks], dst + begin, len);
    }
  });
}

// Only for float32, bfloat16 and float16 inputs and results (float64 takes the ATen expression).
template <typename Tin>
void normalize_from(const at::Tensor& g, double norm_scale, double eps, at::Tensor& X) {
  switch (X.scalar_type()) {
    case at::kFloat: return normalize_typed<Tin, float>(g, norm_scale, eps, X);
    case at::kBFloat16: return normalize_typed<Tin, c10::BFloat16>(g, norm_scale, eps, X);
    default: return normalize_typed<Tin, c10::Half>(g, norm_scale, eps, X);
  }
}
at::Tensor normalize_fused(const at::Tensor& g, double norm_scale, double eps, at::ScalarType dtype) {
  at::Tensor X = at::empty(g.sizes(), g.options().dtype(dtype));
  switch (g.scalar_type()) {
    case at::kFloat: normalize_from<float>(g, norm_scale, eps, X); break;
    case at::kBFloat16: normalize_from<c10::BFloat16>(g, norm_scale, eps, X); break;
    default: normalize_from<c10::Half>(g, norm_scale, eps, X); break;
  }
  return X;
}

at::Tensor newton_schulz_cpu(const at::Tensor& G, at::ArrayRef<double> coefficients, double norm_scale, double eps,
                             at::ScalarType dtype) {
  check_ns_input(G);
  check_ns_args(coefficients, norm_scale, eps, dtype, "newton_schulz");
  const int64_t m = G.size(-2), n = G.size(-1);
  if (G.numel() == 0) return at::empty(G.sizes(), G.options().dtype(dtype));
  // Frobenius norm accumulated in float64: the squares of any float32 input neither underflow nor overflow;
  // clamped at eps as torch.optim.Muon does. Then one scale-and-cast pass. Contiguous half and float32
  // batches take the C++ passes; float64 and strided ones, and eps below float32's range, this expression.
  const at::ScalarType acc = dtype == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor g = G.reshape({-1, m, n});
  const auto half_or_float = [](at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; };
  if (g.is_contiguous() && half_or_float(g.scalar_type()) && half_or_float(dtype) && eps >= 1e-30)
    return iterate(normalize_fused(g, norm_scale, eps, dtype), coefficients, true, true).view(G.sizes());
  const at::Tensor norm = at::linalg_vector_norm(g, 2, at::IntArrayRef{-2, -1}, true, at::kDouble);
  // 1 / max(norm, eps) passes float32's range only when eps < ~3e-39 (subnormal inputs): then the scaling runs
  // in float64, where it stays finite
  const bool wide = acc == at::kFloat && eps < 1e-30;
  const at::Tensor inv = norm.mul(norm_scale).clamp_min(eps).reciprocal().to(wide ? at::kDouble : acc);
  at::Tensor X = g.to(wide ? at::kDouble : acc).mul(inv).to(dtype);
  X = iterate(X, coefficients, /*own_x=*/true, /*out_to_caller=*/true);  // X: this call's buffer
  return X.view(G.sizes());
}

// ---- Muon's step for a batch of same-shaped float32 parameters (python/fusedlab/optim/muon.py, Muon._step_group).
// torch.optim.Muon makes about eight passes over memory per parameter around the iteration (two lerps, the
// stack, the norm, the scale, the cast, the decay, the add); here: pass 1 updates the momentum buffer and sums
// the squares of the update, pass 2 recomputes the update and writes it scaled, cast and in the wide
// orientation into the batch, and after the iteration one pass applies decay and update to the parameter.

// torch's lerp: self + w (end - self) for |w| < 0.5, else end - (end - self)(1 - w). The weight is the same
// for a whole pass, so which formula applies is decided once per pass (kSmall), outside the loops: with the
// choice inside, GCC left the passes scalar (about 9 GB/s; 25-35 GB/s is this kind of machine's bandwidth).
template <bool kSmall, typename V>
FL_VEC_INLINE V lerp(V self, V end, float w) {
  return kSmall ? self + w * (end - self) : end - (end - self) * (1.0f - w);
}

constexpr int64_t kRowBlock = 32;  // rows per work item: the unit of parallel work

struct MuonBatch {
  int64_t count, rows, cols, blocks;  // matrices, their [rows, cols] shape, row blocks per matrix
};

// The lerp weights of a pass and which formula each takes: momentum lerp(buf, g, 1 - mu), the Nesterov
// update lerp(g, buf, mu).
struct MuonLerps {
  float w_buf, w_nesterov;
  bool small_buf, small_nesterov, nesterov;
  // 1 - mu rounded once from double, as torch computes the weight it passes to lerp
  MuonLerps(double mu, bool nest)
      : w_buf(static_cast<float>(1.0 - mu)), w_nesterov(static_cast<float>(mu)), small_buf(std::abs(1.0 - mu) < 0.5),
        small_nesterov(std::abs(mu) < 0.5), nesterov(nest) {}
};

// F<kSmallBuf, kNesterov, kSmallNesterov>::run(args...) for the pass's formulas.
template <template <bool, bool, bool> class F, typename... Args>
FL_VEC_INLINE auto with_lerps(const MuonLerps& l, Args&&... args) {
  if (!l.nesterov)
    return l.small_buf ? F<true, false, false>::run(args...) : F<false, false, false>::run(args...);
  if (l.small_buf)
    return l.small_nesterov ? F<true, true, true>::run(args...) : F<true, true, false>::run(args...);
  return l.small_nesterov ? F<false, true, true>::run(args...) : F<false, true, false>::run(args...);
}

// The update of eight elements: buf's new value (written back when kWrite) and the Nesterov update or buf.
template <bool kSmallBuf, bool kNesterov, bool kSmallNesterov, bool kWrite>
FL_VEC_INLINE f32x8 update8(const float* g, float* buf, const MuonLerps& l) {
  f32x8 gv, bv;
  std::memcpy(&gv, g, sizeof gv);
  std::memcpy(&bv, buf, sizeof bv);
  if (kWrite) {
    bv = lerp<kSmallBuf>(bv, gv, l.w_buf);
    std::memcpy(buf, &bv, sizeof bv);
  }
  return kNesterov ? lerp<kSmallNesterov>(gv, bv, l.w_nesterov) : bv;
}
template <bool kSmallBuf, bool kNesterov, bool kSmallNesterov, bool kWrite>
FL_VEC_INLINE float update1(const float* g, float* buf, const MuonLerps& l) {
  float b = *buf;
  if (kWrite) *buf = b = lerp<kSmallBuf>(b, *g, l.w_buf);
  return kNesterov ? lerp<kSmallNesterov>(*g, b, l.w_nesterov) : b;
}

// Pass 1 over n elements: the momentum update in place and the sum of squares of the update, kept in eight
// float64 lanes (lane k takes the elements e with e % 8 = k: a fixed order whatever the vector width).
template <bool kSmallBuf, bool kNesterov, bool kSmallNesterov>
struct MomentumPass {
  static FL_VEC_INLINE double run(const float* g, float* buf, int64_t n, const MuonLerps& l) {
    f64x8 acc = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t e = 0;
    for (; e + 8 <= n; e += 8) {
      const f64x8 u = __builtin_convertvector((update8<kSmallBuf, kNesterov, kSmallNesterov, true>(g + e, buf + e, l)),
                                              f64x8);
      acc += u * u;
    }
    for (; e < n; ++e) {
      const double u = update1<kSmallBuf, kNesterov, kSmallNesterov, true>(g + e, buf + e, l);
      acc[e & 7] += u * u;
    }
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  }
};
FL_TARGET_CLONES
double momentum_pass(const float* g, float* buf, int64_t n, const MuonLerps& l) {
  return with_lerps<MomentumPass>(l, g, buf, n, l);
}

// Pass 2 over rows [r0, r1) of one matrix: x = cast(u * inv), in the parameter's own layout.
template <bool kSmallBuf, bool kNesterov, bool kSmallNesterov>
struct ScaledPass {
  template <typename T>
  static FL_VEC_INLINE int run(const float* g, float* buf, const MuonLerps& l, float inv, T* x, const MuonBatch& s,
                               int64_t r0, int64_t r1) {
    int64_t e = r0 * s.cols;
    const int64_t end = r1 * s.cols;
    for (; e + 8 <= end; e += 8)
      store8(x + e, update8<kSmallBuf, kNesterov, kSmallNesterov, false>(g + e, buf + e, l) * inv);
    for (; e < end; ++e)
      x[e] = static_cast<T>(update1<kSmallBuf, kNesterov, kSmallNesterov, false>(g + e, buf + e, l) * inv);
    return 0;
  }
};

// After the iteration, rows [r0, r1): p <- p (1 - lr wd) - step_lr o, as p.mul_ then p.add_(o, alpha=...).
template <typename T>
FL_VEC_INLINE void apply_update_body(float* p, const T* o, float decay, float step, const MuonBatch& s, int64_t r0,
                                     int64_t r1) {
  int64_t e = r0 * s.cols;
  const int64_t end = r1 * s.cols;
  for (; e + 8 <= end; e += 8) {
    f32x8 pv;
    std::memcpy(&pv, p + e, sizeof pv);
    pv = pv * decay + step * load8_f32(o + e);
    std::memcpy(p + e, &pv, sizeof pv);
  }
  for (; e < end; ++e) p[e] = p[e] * decay + step * static_cast<float>(o[e]);
}

#define FL_MUON_PASSES(T)                                                                                        \
  FL_TARGET_CLONES void write_scaled(const float* g, float* buf, const MuonLerps& l, float inv, T* x,             \
                                     const MuonBatch& s, int64_t r0, int64_t r1) {                               \
    with_lerps<ScaledPass>(l, g, buf, l, inv, x, s, r0, r1);                                                     \
  }                                                                                                              \
  FL_TARGET_CLONES void apply_update(float* p, const T* o, float decay, float step, const MuonBatch& s,           \
                                     int64_t r0, int64_t r1) {                                                   \
    apply_update_body<T>(p, o, decay, step, s, r0, r1);                                                          \
  }
FL_MUON_PASSES(c10::BFloat16)
FL_MUON_PASSES(c10::Half)
FL_MUON_PASSES(float)
FL_MUON_PASSES(double)
#undef FL_MUON_PASSES

void muon_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList bufs, double momentum, bool nesterov,
                   at::ArrayRef<double> coefficients, double norm_scale, double eps, at::ScalarType dtype, double lr,
                   double weight_decay, double step_lr, const std::optional<at::Tensor>& workspace) {
  check_ns_args(coefficients, norm_scale, eps, dtype, "muon_step_");
  FL_CHECK(dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kFloat,
           "fusedlab.muon_step_: dtype must be bfloat16, float16 or float32, got ", dtype);
  const int64_t count = static_cast<int64_t>(params.size());
  FL_CHECK(count >= 1 && grads.size() == params.size() && bufs.size() == params.size(),
           "fusedlab.muon_step_: params, grads and bufs must be lists of one length >= 1, got ", params.size(), ", ",
           grads.size(), " and ", bufs.size());
  const at::Tensor& p0 = params[0];
  FL_CHECK(p0.dim() >= 2, "fusedlab.muon_step_: params must have at least 2 dims, got shape ", p0.sizes());
  for (int64_t i = 0; i < count; ++i)
    for (const at::Tensor* t : {&params[i], &grads[i], &bufs[i]}) {
      FL_CHECK(t->scalar_type() == at::kFloat && t->device().is_cpu() && t->is_contiguous() &&
                      t->sizes() == p0.sizes(),
               "fusedlab.muon_step_: params, grads and bufs must be contiguous float32 CPU tensors of one shape ",
               p0.sizes(), ", got ", t->scalar_type(), " ", t->sizes(), t->is_contiguous() ? "" : " (strided)");
    }
  if (workspace.has_value())
    FL_CHECK(workspace->scalar_type() == at::kByte && workspace->dim() == 1 && workspace->device().is_cpu() &&
                 workspace->is_contiguous(),
             "fusedlab.muon_step_: workspace must be a contiguous 1-D uint8 CPU tensor, got ",
             workspace->scalar_type(), " ", workspace->sizes(), " on ", workspace->device());
  MuonBatch s;
  s.count = count;
  s.rows = p0.size(0);
  s.cols = p0.numel() / std::max<int64_t>(1, s.rows);
  s.blocks = (s.rows + kRowBlock - 1) / kRowBlock;
  if (p0.numel() == 0) return;
  const MuonLerps lerps(momentum, nesterov);
  const int64_t items = count * s.blocks;

  // pass 1: buf <- lerp(buf, g, 1 - mu); partial sums of the update's squares per row block, in float64
  std::vector<double> partial(items, 0.0);
  at::parallel_for(0, items, 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t i = w / s.blocks, r0 = (w % s.blocks) * kRowBlock, r1 = std::min(s.rows, r0 + kRowBlock);
      partial[w] = momentum_pass(grads[i].data_ptr<float>() + r0 * s.cols, bufs[i].data_ptr<float>() + r0 * s.cols,
                                 (r1 - r0) * s.cols, lerps);
    }
  });
  // per matrix 1 / max(norm * scale, eps) in float64 then float32, as the newton_schulz op computes it; the
  // partial sums are added in a fixed order, so the result does not depend on the thread count
  std::vector<float> inv(count);
  for (int64_t i = 0; i < count; ++i) {
    double ss = 0.0;
    for (int64_t b = 0; b < s.blocks; ++b) ss += partial[i * s.blocks + b];
    inv[i] = static_cast<float>(1.0 / std::max(std::sqrt(ss) * norm_scale, eps));
  }

  // pass 2: the scaled update, cast, in the parameter's layout (the iteration takes tall batches as they are)
  const int64_t m = s.rows, n = s.cols, g = std::min(m, n);
  const auto opts = p0.options().dtype(dtype);
  at::Tensor X;
  IterationBuffers given;
  if (workspace.has_value()) {
    // the caller's buffer, kept between steps: no fresh pages (and their faults and zeroing) per step
    at::Tensor ws = *workspace;
    const int64_t es = c10::elementSize(dtype), xb = align64(count * m * n * es), ab = align64(count * g * g * es);
    if (ws.numel() < muon_workspace_bytes(count, m, n, es))
      ws.set_(empty_workspace({muon_workspace_bytes(count, m, n, es)}, ws.options()));
    auto carve = [&](int64_t offset, int64_t bytes, at::IntArrayRef shape) {
      return ws.narrow(0, offset, bytes).view(dtype).view(shape);
    };
    X = carve(0, count * m * n * es, {count, m, n});
    given.Y = carve(xb, count * m * n * es, {count, m, n});
    given.A = carve(2 * xb, count * g * g * es, {count, g, g});
    given.P = carve(2 * xb + ab, count * g * g * es, {count, g, g});
  } else {
    X = empty_workspace({count, m, n}, opts);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "fusedlab_muon_prepare", [&] {
    scalar_t* x = X.data_ptr<scalar_t>();
    at::parallel_for(0, items, 1, [&](int64_t w0, int64_t w1) {
      for (int64_t w = w0; w < w1; ++w) {
        const int64_t i = w / s.blocks, r0 = (w % s.blocks) * kRowBlock, r1 = std::min(s.rows, r0 + kRowBlock);
        write_scaled(grads[i].data_ptr<float>(), bufs[i].data_ptr<float>(), lerps, inv[i], x + i * m * n, s, r0,
                     r1);
      }
    });
  });

  const at::Tensor O = iterate(X, coefficients, /*own_x=*/true, /*out_to_caller=*/false,
                               workspace.has_value() ? &given : nullptr);

  // after: p <- p (1 - lr wd) - step_lr O
  const float decay = static_cast<float>(1.0 - lr * weight_decay), step = static_cast<float>(-step_lr);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "fusedlab_muon_apply", [&] {
    const scalar_t* o = O.data_ptr<scalar_t>();
    at::parallel_for(0, items, 1, [&](int64_t w0, int64_t w1) {
      for (int64_t w = w0; w < w1; ++w) {
        const int64_t i = w / s.blocks, r0 = (w % s.blocks) * kRowBlock, r1 = std::min(s.rows, r0 + kRowBlock);
        apply_update(params[i].data_ptr<float>(), o + i * m * n, decay, step, s, r0, r1);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedlab, CPU, m) {
  m.impl("newton_schulz", &newton_schulz_cpu);
  m.impl("muon_step_", &muon_step_cpu);
}

}  // namespace fusedlab
