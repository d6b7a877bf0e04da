// C++ CPU kernels of the resample family: one pass per group, groups spread over threads with
// at::parallel_for. Numerics come from fusedlab/resample.h, shared with the CUDA kernels.
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Dispatch.h>
#include <ATen/EmptyTensor.h>
#include <ATen/core/DistributionsHelper.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/rand.h>
#include <c10/core/CPUAllocator.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>
#include <tuple>
#include <vector>

#include "fusedlab/checks.h"
#include "fusedlab/cpu_entry_points.h"
#include "fusedlab/cpu_math.h"
#include "fusedlab/resample.h"

namespace fusedlab {
namespace {

using namespace fusedlab::resample;

// Per-thread scratch, reused across the groups one thread handles.
struct Scratch {
  std::vector<double> w, cdf, points;
  std::vector<int32_t> count;  // grid path: points below each C_j
  std::vector<int32_t> mark;   // ancestor marks, see ancestors_from_counts
  std::vector<double> iota;
};

// ---- the passes over one group, each a loop the compiler vectorizes, in one clone per instruction set
// (picked at load time): built for baseline x86-64 they ran scalar, and the grid counts dominated.

// Eight-lane vectors (fusedlab/cpu_math.h): loops with a running maximum or a NaN select are not
// auto-vectorized without -ffinite-math-only, which -inf and NaN log-weights rule out.
using cpu::f32x8;
using cpu::f64x8;
using cpu::load8;
typedef int64_t i64x8 __attribute__((vector_size(64)));
typedef int32_t i32x8 __attribute__((vector_size(32)));

// w[j] <- x[j] in double; returns the maximum, NaN ignored (x > m is false for NaN). NaN stays in w, and
// exp_nonpositive maps it to 0, the weight of -inf, as clean_log_weight would.
template <typename scalar_t>
inline double load_max_body(const scalar_t* __restrict x, double* __restrict w, int64_t K) {
  f64x8 mx = {-INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY};
  int64_t j = 0;
  for (; j + 8 <= K; j += 8) {
    f64x8 v;
    load8(x + j, &v);
    std::memcpy(w + j, &v, sizeof v);
    mx = v > mx ? v : mx;
  }
  double m = -INFINITY;
  for (int l = 0; l < 8; ++l) m = mx[l] > m ? mx[l] : m;
  for (; j < K; ++j) {
    const double v = static_cast<double>(x[j]);
    w[j] = v;
    m = v > m ? v : m;
  }
  return m;
}
FL_TARGET_CLONES double load_max(const float* x, double* w, int64_t K) { return load_max_body(x, w, K); }
FL_TARGET_CLONES double load_max(const double* x, double* w, int64_t K) { return load_max_body(x, w, K); }

// w[j] <- exp(w[j] - m).
FL_TARGET_CLONES
void exp_shifted_generic(double* w, int64_t K, double m) {
  for (int64_t j = 0; j < K; ++j) w[j] = cpu::exp_nonpositive(w[j] - m);
}
#if defined(__x86_64__) && defined(__GNUC__)
// The same on AVX-512 CPUs, written with intrinsics: exp_nonpositive's reduction and polynomial, the
// rounding to an integer in one instruction and 2^n applied by one scalef (p 2^n rounded once, as the
// generic two-factor product rounds it; subnormal results included), the tail by masked loads and stores.
// About 20 instructions per eight weights against the generic clone's 35: the exponentials were a quarter
// of a resampling's time at K = 64 (a 2-core AVX-512 EPYC).
__attribute__((target("avx512f"), always_inline)) inline __m512d exp_nonpositive_avx512(__m512d x) {
  const __m512d floor_x = _mm512_set1_pd(cpu::kExpUnderflow), log2e = _mm512_set1_pd(cpu::kExpLog2e);
  const __m512d ln2_hi = _mm512_set1_pd(cpu::kExpLn2Hi), ln2_lo = _mm512_set1_pd(cpu::kExpLn2Lo);
  // in range: false for NaN and -inf (weight 0, as in exp_nonpositive) and below the underflow bound
  const __mmask8 ok = _mm512_cmp_pd_mask(x, floor_x, _CMP_GE_OQ);
  const __m512d xc = _mm512_maskz_mov_pd(ok, x);
  // (the zero-masking forms: the plain ones leave a "may be used uninitialized" warning in GCC 12's headers)
  const __m512d n = _mm512_maskz_roundscale_pd(__mmask8(0xFF), _mm512_mul_pd(xc, log2e),
                                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512d r = _mm512_fnmadd_pd(n, ln2_lo, _mm512_fnmadd_pd(n, ln2_hi, xc));
  __m512d p = _mm512_set1_pd(cpu::kExpTaylor[cpu::kExpDegree]);
  for (int k = cpu::kExpDegree - 1; k >= 0; --k) p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(cpu::kExpTaylor[k]));
  return _mm512_maskz_scalef_pd(ok, p, n);
}
__attribute__((target("avx512f"))) void exp_shifted_avx512(double* w, int64_t K, double m) {
  const __m512d shift = _mm512_set1_pd(m);
  for (int64_t j = 0; j < K; j += 8) {
    const __mmask8 lanes = K - j >= 8 ? __mmask8(0xFF) : __mmask8((1u << (K - j)) - 1);
    const __m512d x = _mm512_sub_pd(_mm512_maskz_loadu_pd(lanes, w + j), shift);
    _mm512_mask_storeu_pd(w + j, lanes, exp_nonpositive_avx512(x));
  }
}
void exp_shifted(double* w, int64_t K, double m) {
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  if (avx512) exp_shifted_avx512(w, K, m);
  else exp_shifted_generic(w, K, m);
}
#else
void exp_shifted(double* w, int64_t K, double m) { exp_shifted_generic(w, K, m); }
#endif

// cdf[j] = w[0] + ... + w[j]; returns the total and writes the sum of squares to *sum_sq. A sequential
// running sum is one dependent add per particle; here each block of eight takes its prefix sums in three
// shift-and-add steps, independent of the other blocks, and only the block's offset (the previous block's
// last value) is a dependent add. The shift-and-add order can put two neighbouring lanes an ulp out of
// order, so a running maximum over the block (three shift-and-max steps) restores the non-decreasing CDF
// the grid counts rely on; adding the offset keeps it (rounding is monotonic), and cdf[K - 1] is the
// returned total. Only the rounding differs from a sequential sum: a few ulps per block.
FL_TARGET_CLONES
double running_sum(const double* __restrict w, double* __restrict cdf, int64_t K, double* sum_sq) {
  const f64x8 zero = {0, 0, 0, 0, 0, 0, 0, 0};
  f64x8 sq = zero;
  double offset = 0.0;
  int64_t j = 0;
  for (; j + 8 <= K; j += 8) {
    f64x8 v;
    std::memcpy(&v, w + j, sizeof v);
    sq += v * v;
    v += FL_SHUFFLE(i64x8, zero, v, 0, 8, 9, 10, 11, 12, 13, 14);  // lane l: v[l - 1], 0 first
    v += FL_SHUFFLE(i64x8, zero, v, 0, 1, 8, 9, 10, 11, 12, 13);
    v += FL_SHUFFLE(i64x8, zero, v, 0, 1, 2, 3, 8, 9, 10, 11);
    f64x8 t = FL_SHUFFLE(i64x8, zero, v, 0, 8, 9, 10, 11, 12, 13, 14);  // values >= 0: 0 is neutral
    v = v > t ? v : t;
    t = FL_SHUFFLE(i64x8, zero, v, 0, 1, 8, 9, 10, 11, 12, 13);
    v = v > t ? v : t;
    t = FL_SHUFFLE(i64x8, zero, v, 0, 1, 2, 3, 8, 9, 10, 11);
    v = v > t ? v : t;
    v += offset;
    std::memcpy(cdf + j, &v, sizeof v);
    offset = v[7];
  }
  double sq_total = 0.0;
  for (int l = 0; l < 8; ++l) sq_total += sq[l];
  for (; j < K; ++j) {  // the tail, sequentially
    offset += w[j];
    sq_total += w[j] * w[j];
    cdf[j] = offset;
  }
  *sum_sq = sq_total;
  return offset;
}

// A group that is not resampled: ancestors i and the carried log-weights (NaN as -inf). `out` may be `x` (fk_step
// carries the log-weights over themselves), so the two are not declared __restrict.
template <typename scalar_t>
inline void carry_body(const scalar_t* x, scalar_t* out, int64_t* __restrict anc, int64_t K,
                       double log_total, double log_k) {
  for (int64_t j = 0; j < K; ++j) {
    anc[j] = j;
    out[j] = static_cast<scalar_t>(carried_log_weight(clean_log_weight(static_cast<double>(x[j])), log_total, log_k));
  }
}
FL_TARGET_CLONES void carry(const float* x, float* out, int64_t* anc, int64_t K, double log_total, double log_k) {
  carry_body(x, out, anc, K, log_total, log_k);
}
FL_TARGET_CLONES void carry(const double* x, double* out, int64_t* anc, int64_t K, double log_total, double log_k) {
  carry_body(x, out, anc, K, log_total, log_k);
}

// The CDF: cdf[j] / total below `last`, exactly 1 from `last` on.
FL_TARGET_CLONES
void normalize_cdf(double* cdf, int64_t last, int64_t K, double total) {
  for (int64_t j = 0; j < last; ++j) cdf[j] = cdf[j] / total;
  for (int64_t j = last; j < K; ++j) cdf[j] = 1.0;
}

// Grid points (i + u) / K as grid_point computes them, i read from a table so the loop vectorizes; one u
// for every point (systematic) or one per point (stratified).
FL_TARGET_CLONES
void grid_points(double* pts, const double* iota, const double* u, bool per_point, int64_t K) {
  const double kd = static_cast<double>(K);
  if (per_point) {
    for (int64_t i = 0; i < K; ++i) pts[i] = (iota[i] + u[i]) / kd;
  } else {
    const double u0 = u[0];
    for (int64_t i = 0; i < K; ++i) pts[i] = (iota[i] + u0) / kd;
  }
}

// count[j] = number of grid points below C_j = cdf[j] / total, for j < n: grid_count_below on int32 indices
// (the caller takes this path for K < 2^31 - 3), the CDF normalized on the fly and the floor taken as a
// truncation (0 <= C_j <= 1), so the loop vectorizes
// and the padded-point loads become gathers. GCC's generic tuning emulates gathers with scalar loads,
// slower here than the scalar loop; the AVX-512 version is tuned for a core with fast gathers instead.
__attribute__((always_inline)) inline void grid_counts_body(const double* __restrict cdf, double total, int64_t n,
                                                            int64_t K, const double* __restrict padded,
                                                            int32_t* __restrict count) {
  const double kd = static_cast<double>(K);
  const int32_t k32 = static_cast<int32_t>(K);
  for (int64_t j = 0; j < n; ++j) {
    const double c = cdf[j] / total;
    int32_t s = static_cast<int32_t>(c * kd);
    s = s > k32 ? k32 : s;
    count[j] = (s > 1 ? s - 1 : 0) + (padded[s] < c) + (padded[s + 1] < c) + (padded[s + 2] < c);
  }
}
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__APPLE__)
__attribute__((target("avx512f,tune=icelake-server"))) void grid_counts_avx512(
    const double* cdf, double total, int64_t n, int64_t K, const double* padded, int32_t* count) {
  grid_counts_body(cdf, total, n, K, padded, count);
}
__attribute__((target("avx2,tune=haswell"))) void grid_counts_avx2(
    const double* cdf, double total, int64_t n, int64_t K, const double* padded, int32_t* count) {
  grid_counts_body(cdf, total, n, K, padded, count);
}
void grid_counts(const double* cdf, double total, int64_t n, int64_t K, const double* padded, int32_t* count) {
  static const int level = __builtin_cpu_supports("avx512f") ? 2 : (__builtin_cpu_supports("avx2") ? 1 : 0);
  if (level == 2) grid_counts_avx512(cdf, total, n, K, padded, count);
  else if (level == 1) grid_counts_avx2(cdf, total, n, K, padded, count);
  else grid_counts_body(cdf, total, n, K, padded, count);
}
#else
void grid_counts(const double* cdf, double total, int64_t n, int64_t K, const double* padded, int32_t* count) {
  grid_counts_body(cdf, total, n, K, padded, count);
}
#endif

// Systematic resampling: every count in closed form, eight at a time and without a division. K times the
// point p_i = fl(fl(i + u) / K) lies within an ulp of K of i + u, so away from the boundary p_i < C_j is
// i < t with t = K C_j - u, and the count is #{i in [0, K): i < t} = ceil(t) clamped to [0, K]. Here
// K C_j is taken as cdf[j] * (K / total), within a few ulps of K of the quotient's. Where some t lies
// within K 2^-48 (far more than every rounding involved) of an integer, a point may sit on the boundary:
// returns false, and the caller counts with the points (grid_counts; equal or dyadic weights with u = 0
// get there, random weights practically never). Otherwise the counts are those grid_counts gives, bit for
// bit. Reads and writes whole blocks of eight: cdf and count must have room for n rounded up to eight (the
// counts past n are not meaningful).
FL_TARGET_CLONES
bool grid_counts_systematic(const double* __restrict cdf, double total, int64_t n, int64_t K, double u0,
                            int32_t* __restrict count) {
  const double kd = static_cast<double>(K), scale = kd * (1.0 / total), margin = kd * 0x1p-48;
  const double kMagic = 6755399441055744.0;  // 1.5 * 2^52: (t + kMagic) - kMagic rounds t to an integer
  // (comparisons take vector operands: GCC lowers a vector-scalar comparison lane by lane)
  const f64x8 one = {1, 1, 1, 1, 1, 1, 1, 1}, zerof = one - one, m2 = zerof + margin * margin, kv = zerof + kd;
  const i64x8 zero = {0, 0, 0, 0, 0, 0, 0, 0};
  i64x8 unsure = zero;
  for (int64_t j = 0; j < n; j += 8) {
    f64x8 cd;
    std::memcpy(&cd, cdf + j, sizeof cd);
    const f64x8 t = cd * scale - u0;
    const f64x8 r = (t + kMagic) - kMagic;  // the nearest integer
    const f64x8 d = t - r;
    unsure |= d * d <= m2;  // |d| <= margin
    f64x8 cnt = r + (d > zerof ? one : zerof);  // ceil(t)
    cnt = cnt > zerof ? cnt : zerof;
    cnt = cnt < kv ? cnt : kv;
    const i32x8 c32 = __builtin_convertvector(cnt, i32x8);
    std::memcpy(count + j, &c32, sizeof c32);
  }
  unsure |= FL_SHUFFLE(i64x8, unsure, unsure, 4, 5, 6, 7, 0, 1, 2, 3);  // any lane, in three folds
  unsure |= FL_SHUFFLE(i64x8, unsure, unsure, 2, 3, 0, 1, 6, 7, 4, 5);
  unsure |= FL_SHUFFLE(i64x8, unsure, unsure, 1, 0, 3, 2, 5, 4, 7, 6);
  return unsure[0] == 0;
}

// The ancestors from non-decreasing counts: anc[i] = #{j < last : count[j] <= i}, that is particle j < last
// for the points count[j - 1] .. count[j] - 1 and `last` for the rest. Marking slot count[j] with j + 1
// (later j overwrite) and taking a running maximum gives it with plain stores, no read-modify-write chain
// and no branch on the data. The marks are int32, sixteen to a vector: each vector load of the running
// maximum waits for the marks' stores to land (a load spanning several recent stores is not forwarded from
// them), and int32 marks take half as many loads as int64 ones. `mark` has room for K + 1.
typedef int32_t i32x16 __attribute__((vector_size(64)));
FL_TARGET_CLONES
void ancestors_from_counts(const int32_t* __restrict count, int64_t last, int64_t K, int32_t* __restrict mark,
                           int64_t* __restrict anc) {
  std::memset(mark, 0, (K + 1) * sizeof(int32_t));
  for (int64_t j = 0; j < last; ++j) {
    mark[count[j]] = static_cast<int32_t>(j + 1);
    // Scalar stores: vectorized, this loop becomes a scatter instruction, several times slower (AMD EPYC).
    __asm__ volatile("" ::: "memory");
  }
  const i32x16 zero = {};
  int32_t a = 0;
  int64_t i = 0;
  for (; i + 16 <= K; i += 16) {
    i32x16 v, t;
    std::memcpy(&v, mark + i, sizeof v);
    t = FL_SHUFFLE(i32x16, zero, v, 0, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30);
    v = v > t ? v : t;  // lane l: max over lanes l - 1 .. l, then l - 3 .. l, and so on
    t = FL_SHUFFLE(i32x16, zero, v, 0, 1, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29);
    v = v > t ? v : t;
    t = FL_SHUFFLE(i32x16, zero, v, 0, 1, 2, 3, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27);
    v = v > t ? v : t;
    t = FL_SHUFFLE(i32x16, zero, v, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);
    v = v > t ? v : t;
    const i32x16 carry = zero + a;
    v = v > carry ? v : carry;
    i32x8 half[2];
    std::memcpy(half, &v, sizeof v);
    const i64x8 lo = __builtin_convertvector(half[0], i64x8), hi = __builtin_convertvector(half[1], i64x8);
    std::memcpy(anc + i, &lo, sizeof lo);
    std::memcpy(anc + i + 8, &hi, sizeof hi);
    a = v[15];
  }
  for (; i < K; ++i) {
    a = mark[i] > a ? mark[i] : a;
    anc[i] = a;
  }
}

inline int64_t round_up8(int64_t n) { return (n + 7) / 8 * 8; }

// Resample one group of K log-weights. Writes K ancestors and K log-weights; returns the status bits.
template <typename scalar_t>
uint8_t resample_group(const scalar_t* x_in, const double* u, int32_t method, double ess_threshold, int64_t K,
                       int64_t* anc, scalar_t* lw_out, double* ess_out, double* log_norm_out, Scratch& s) {
  s.w.resize(K);
  s.cdf.resize(round_up8(K));  // whole blocks of eight for the grid counts
  const double m = load_max(x_in, s.w.data(), K);
  const bool degenerate = !std::isfinite(m);
  if (degenerate) std::fill(s.w.begin(), s.w.end(), 1.0);
  else exp_shifted(s.w.data(), K, m);
  // Running sums: the unnormalized CDF doubles as the sum of weights.
  double sw2 = 0.0;
  const double sw = running_sum(s.w.data(), s.cdf.data(), K, &sw2);
  const double e = degenerate ? 0.0 : ess(sw, sw2);
  *ess_out = e;
  *log_norm_out = degenerate ? -INFINITY : log_norm(m, sw, K);
  const bool res = degenerate || should_resample(e, ess_threshold, K);
  if (!res) {
    const double log_total = m + std::log(sw), log_k = std::log(static_cast<double>(K));
    carry(x_in, lw_out, anc, K, log_total, log_k);
    return 0;
  }
  for (int64_t j = 0; j < K; ++j) lw_out[j] = scalar_t(0);
  const uint8_t status = kResampled | (degenerate ? kDegenerate : 0);

  int64_t n_det = 0;  // residual: deterministic copies first
  const double* w = s.w.data();
  double total = sw;
  if (method == kResidual) {
    for (int64_t j = 0; j < K; ++j) {
      const double kw = static_cast<double>(K) * s.w[j] / sw;
      const double n = residual_copies(kw, K);
      for (int64_t c = 0; c < static_cast<int64_t>(n) && n_det < K; ++c) anc[n_det++] = j;
      s.w[j] = residual_weight(kw, n);
    }
    if (n_det == K) return status;
    total = 0.0;
    for (int64_t j = 0; j < K; ++j) total += s.w[j];
    double c = 0.0;
    for (int64_t j = 0; j < K; ++j) {
      c += w[j];
      s.cdf[j] = c;
    }
  }
  int64_t last = K - 1;
  while (last > 0 && !(w[last] > 0.0)) --last;

  const int64_t M = K - n_det;
  if (method == kSystematic || method == kStratified) {
    // Grid points: count the points below each C_j in closed form (C_j normalized as the counts are taken);
    // ancestor i = #{j < last : C_j <= p_i}.
    // The counts are non-decreasing in j (C_j is), which ancestors_from_counts relies on.
    const bool fits32 = K < INT32_MAX - 3;  // counts and the padded point indices in int32
    bool counted = false;
    if (method == kSystematic && fits32) {
      s.count.resize(round_up8(last));
      counted = grid_counts_systematic(s.cdf.data(), total, last, K, u[0], s.count.data());
    }
    if (!counted) {  // stratified, or a point that may sit on a boundary: compare with the points themselves
      s.points.resize(K + 3);
      s.points[0] = s.points[K + 1] = s.points[K + 2] = INFINITY;
      if (static_cast<int64_t>(s.iota.size()) < K) {
        s.iota.resize(K);
        for (int64_t i = 0; i < K; ++i) s.iota[i] = static_cast<double>(i);
      }
      grid_points(s.points.data() + 1, s.iota.data(), u, method == kStratified, K);
      if (fits32) {
        s.count.resize(last);
        grid_counts(s.cdf.data(), total, last, K, s.points.data(), s.count.data());
      } else {
        // K beyond int32: a sequential merge of the counts (a group of 2^31 particles is never small)
        int64_t j = 0, count_j = last > 0 ? grid_count_below(s.cdf[0] / total, K, s.points.data()) : 0;
        for (int64_t i = 0; i < K; ++i) {
          while (j < last && count_j <= i)
            if (++j < last) count_j = grid_count_below(s.cdf[j] / total, K, s.points.data());
          anc[i] = j;
        }
        return status;
      }
    }
    s.mark.resize(K + 1);
    ancestors_from_counts(s.count.data(), last, K, s.mark.data(), anc);
    return status;
  }
  normalize_cdf(s.cdf.data(), last, K, total);
  s.points.resize(M);
  std::copy(u, u + M, s.points.begin());  // multinomial and the residual remainder: sorted uniforms
  std::sort(s.points.begin(), s.points.end());
  merge_sorted_points(s.cdf.data(), last, s.points.data(), M, anc + n_det);
  return status;
}

// ---- systematic resampling of a small group (K = 8, 16, ..., 64) held in registers, on AVX-512 CPUs: the
// group stays in at most eight registers from the load to the counts (the generic passes store and reload it
// between passes, one call each), with the arithmetic of the generic passes' AVX-512 clones operation for
// operation (the running sum's block scheme, the fused multiply-adds GCC forms there, the closed-form counts),
// so ancestors, weights, ESS and log_norm are bit for bit those of resample_group. A degenerate group and
// counts that need the points themselves (grid_counts_systematic's boundary case) are handed back (-1): the
// caller then runs resample_group. Measured on a 2-core AVX-512 EPYC (float32, the op alone, one thread):
// [4096, 64] 0.69 against 0.80 ms, [16384, 16] 1.10 against 1.88 ms.
template <typename scalar_t>
using SmallSystematic = int (*)(const scalar_t*, double, double, int64_t*, scalar_t*, double*, double*);

#if defined(__x86_64__) && defined(__GNUC__)
#define FL_AVX512 __attribute__((target("avx512f")))
// GCC 12's headers pass an uninitialized vector as the unused source of the unmasked forms
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

FL_AVX512 inline __m512d load_block(const float* x) { return _mm512_cvtps_pd(_mm256_loadu_ps(x)); }
FL_AVX512 inline __m512d load_block(const double* x) { return _mm512_loadu_pd(x); }
FL_AVX512 inline void store_zero_block(float* y) { _mm256_storeu_ps(y, _mm256_setzero_ps()); }
FL_AVX512 inline void store_zero_block(double* y) { _mm512_storeu_pd(y, _mm512_setzero_pd()); }

// lane l <- v[l - S], zeros shifted in (running_sum's shuffles)
template <int S>
FL_AVX512 inline __m512d shift_up_pd(__m512d v) {
  return _mm512_castsi512_pd(_mm512_alignr_epi64(_mm512_castpd_si512(v), _mm512_setzero_si512(), 8 - S));
}

// sixteen int32 ancestors out as int64, the first `n` of them
FL_AVX512 inline void store_ancestors16(int64_t* anc, __m512i v, int64_t n) {
  _mm512_storeu_si512(anc, _mm512_cvtepi32_epi64(_mm512_castsi512_si256(v)));
  if (n > 8) _mm512_storeu_si512(anc + 8, _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(v, 1)));
}

template <int NB, typename scalar_t>
FL_AVX512 int resample_systematic_registers(const scalar_t* x, double u0, double ess_threshold, int64_t* anc,
                                            scalar_t* lw_out, double* ess_out, double* log_norm_out) {
  constexpr int64_t K = 8 * NB;
  // load_max: NaN lanes leave the maximum as it was (vmaxpd returns its second operand on NaN)
  __m512d w[NB];
  __m512d mx = _mm512_set1_pd(-INFINITY);
  for (int b = 0; b < NB; ++b) {
    w[b] = load_block(x + 8 * b);
    mx = _mm512_max_pd(w[b], mx);
  }
  const double m = _mm512_reduce_max_pd(mx);
  if (!std::isfinite(m)) return -1;
  const __m512d shift = _mm512_set1_pd(m);
  for (int b = 0; b < NB; ++b) w[b] = exp_nonpositive_avx512(_mm512_sub_pd(w[b], shift));

  // running_sum: prefix sums within each block, made non-decreasing by a running maximum, plus the offset
  __m512d cdf[NB];
  __m512d sq = _mm512_setzero_pd(), offset = _mm512_setzero_pd();
  for (int b = 0; b < NB; ++b) {
    __m512d v = w[b];
    sq = _mm512_fmadd_pd(v, v, sq);
    v = _mm512_add_pd(v, shift_up_pd<1>(v));
    v = _mm512_add_pd(v, shift_up_pd<2>(v));
    v = _mm512_add_pd(v, shift_up_pd<4>(v));
    v = _mm512_max_pd(v, shift_up_pd<1>(v));  // vmaxpd: v > t ? v : t, as the generic select
    v = _mm512_max_pd(v, shift_up_pd<2>(v));
    v = _mm512_max_pd(v, shift_up_pd<4>(v));
    v = _mm512_add_pd(v, offset);
    cdf[b] = v;
    offset = _mm512_permutexvar_pd(_mm512_set1_epi64(7), v);
  }
  alignas(64) double sq_lanes[8];
  _mm512_store_pd(sq_lanes, sq);
  double sw2 = 0.0;
  for (int l = 0; l < 8; ++l) sw2 += sq_lanes[l];
  const double sw = _mm512_cvtsd_f64(offset);
  const double e = ess(sw, sw2);
  *ess_out = e;
  *log_norm_out = log_norm(m, sw, K);
  if (!should_resample(e, ess_threshold, K)) {
    carry(x, lw_out, anc, K, m + std::log(sw), std::log(static_cast<double>(K)));
    return 0;
  }

  // the last positive weight (m is finite, so the maximum's weight, 1, is one)
  int64_t last = 0;
  for (int b = NB - 1; b >= 0; --b) {
    const unsigned pos = _mm512_cmp_pd_mask(w[b], _mm512_setzero_pd(), _CMP_GT_OQ);
    if (pos) {
      last = 8 * b + 31 - __builtin_clz(pos);
      break;
    }
  }

  // grid_counts_systematic on the blocks that hold j < last
  const double kd = static_cast<double>(K), scale = kd * (1.0 / sw), margin = kd * 0x1p-48;
  const __m512d magic = _mm512_set1_pd(6755399441055744.0), one = _mm512_set1_pd(1.0), zero = _mm512_setzero_pd();
  const __m512d m2 = _mm512_set1_pd(margin * margin), kv = _mm512_set1_pd(kd), vscale = _mm512_set1_pd(scale);
  const __m512d vu = _mm512_set1_pd(u0);
  // the counts as int32: eight to a vector, in whole sixteens, for the search; in memory for the marks
  constexpr int kHalves = NB <= 2 ? 2 : 4;
  __m256i half[kHalves];
  for (int b = 0; b < kHalves; ++b) half[b] = _mm256_setzero_si256();
  alignas(64) int32_t count[NB > 4 ? 8 * NB : 1];
  __mmask8 unsure = 0;
  for (int b = 0; b < NB && 8 * b < last; ++b) {
    const __m512d t = _mm512_fmsub_pd(cdf[b], vscale, vu);
    const __m512d r = _mm512_sub_pd(_mm512_add_pd(t, magic), magic);
    const __m512d d = _mm512_sub_pd(t, r);
    unsure |= _mm512_cmp_pd_mask(_mm512_mul_pd(d, d), m2, _CMP_LE_OQ);
    __m512d cnt = _mm512_add_pd(r, _mm512_maskz_mov_pd(_mm512_cmp_pd_mask(d, zero, _CMP_GT_OQ), one));
    cnt = _mm512_min_pd(_mm512_max_pd(cnt, zero), kv);
    if constexpr (NB > 4)
      _mm256_store_si256(reinterpret_cast<__m256i*>(count + 8 * b), _mm512_cvttpd_epi32(cnt));
    else
      half[b] = _mm512_cvttpd_epi32(cnt);
  }
  if (unsure) return -1;  // before any write to lw_out, which may be x itself (fk_step)
  for (int b = 0; b < NB; ++b) store_zero_block(lw_out + 8 * b);
  if constexpr (NB > 4) {
    // ancestors_from_counts's marks (at K = 64 faster than the search below, whose table then takes two
    // permutes and a blend per lookup)
    alignas(64) int32_t mark[K + 1];
    ancestors_from_counts(count, last, K, mark, anc);
  } else {
    // ancestor i = #{j < last : count[j] <= i}, the number of entries <= i of a non-decreasing table (the
    // counts below last, then K + 1), found by a branch-free binary search in sixteen lanes at once: at K = 16
    // a third faster than the marks, which go through memory (stored, reloaded, stored, reloaded)
    constexpr int NQ = NB <= 2 ? 1 : 2;
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i last_v = _mm512_set1_epi32(static_cast<int32_t>(last)), above = _mm512_set1_epi32(K + 1);
    __m512i table[NQ];
    for (int q = 0; q < NQ; ++q) {
      const __m512i c = _mm512_inserti64x4(_mm512_castsi256_si512(half[2 * q]), half[2 * q + 1], 1);
      const __mmask16 dead = _mm512_cmpge_epi32_mask(_mm512_add_epi32(iota, _mm512_set1_epi32(16 * q)), last_v);
      table[q] = _mm512_mask_mov_epi32(c, dead, above);
    }
    for (int64_t i0 = 0; i0 < K; i0 += 16) {
      const __m512i i = _mm512_add_epi32(iota, _mm512_set1_epi32(static_cast<int32_t>(i0)));
      __m512i pos = _mm512_setzero_si512();
      for (int step = 8 * NQ; step >= 1; step /= 2) {
        const __m512i j = _mm512_add_epi32(pos, _mm512_set1_epi32(step - 1));
        __m512i v;
        if constexpr (NQ == 1) v = _mm512_permutexvar_epi32(j, table[0]);
        else v = _mm512_permutex2var_epi32(table[0], j, table[1]);
        pos = _mm512_mask_add_epi32(pos, _mm512_cmple_epi32_mask(v, i), pos, _mm512_set1_epi32(step));
      }
      store_ancestors16(anc + i0, pos, K - i0);
    }
  }
  return kResampled;
}

// The register path for this K, or null where it does not apply (K not in 8, 16, ..., 64, or no AVX-512).
template <typename scalar_t>
SmallSystematic<scalar_t> small_systematic_for(int64_t K) {
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  if (!avx512 || K % 8 != 0) return nullptr;
  switch (K / 8) {
    case 1: return resample_systematic_registers<1, scalar_t>;
    case 2: return resample_systematic_registers<2, scalar_t>;
    case 3: return resample_systematic_registers<3, scalar_t>;
    case 4: return resample_systematic_registers<4, scalar_t>;
    case 5: return resample_systematic_registers<5, scalar_t>;
    case 6: return resample_systematic_registers<6, scalar_t>;
    case 7: return resample_systematic_registers<7, scalar_t>;
    case 8: return resample_systematic_registers<8, scalar_t>;
    default: return nullptr;
  }
}
#pragma GCC diagnostic pop
#undef FL_AVX512
#else
template <typename scalar_t>
SmallSystematic<scalar_t> small_systematic_for(int64_t) { return nullptr; }
#endif

int64_t grain_for(int64_t work_per_item) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work_per_item)); }

// Copy rows of a group: dst[i] = src[anc[i]], rows of `row_bytes` bytes. Common small row sizes get a
// constant-size copy in whole vectors (one 64-byte load and store per row of 64 bytes in the AVX-512 clone):
// copied as a memcpy of 64 bytes the rows went as four 16-byte moves, and the gather ran at about 0.7x
// memcpy's rate (a 2-core AVX-512 EPYC, [4096, 64, 16] float32), as whole vectors at memcpy's rate.
template <int64_t kBytes>
FL_VEC_INLINE void gather_rows_fixed(const char* src, char* dst, const int64_t* anc, int64_t K) {
  constexpr int64_t kVec = kBytes < 64 ? kBytes : 64;
  typedef char Vec __attribute__((vector_size(kVec)));
  for (int64_t i = 0; i < K; ++i) {
    const char* s = src + anc[i] * kBytes;
    char* d = dst + i * kBytes;
    for (int64_t o = 0; o < kBytes; o += kVec) {
      Vec v;
      std::memcpy(&v, s + o, kVec);
      std::memcpy(d + o, &v, kVec);
    }
  }
}

FL_TARGET_CLONES
void gather_group(const char* src, char* dst, const int64_t* anc, int64_t K, int64_t row_bytes) {
  switch (row_bytes) {
    case 1: return gather_rows_fixed<1>(src, dst, anc, K);
    case 2: return gather_rows_fixed<2>(src, dst, anc, K);
    case 4: return gather_rows_fixed<4>(src, dst, anc, K);
    case 8: return gather_rows_fixed<8>(src, dst, anc, K);
    case 16: return gather_rows_fixed<16>(src, dst, anc, K);
    case 32: return gather_rows_fixed<32>(src, dst, anc, K);
    case 64: return gather_rows_fixed<64>(src, dst, anc, K);
    case 128: return gather_rows_fixed<128>(src, dst, anc, K);
    case 256: return gather_rows_fixed<256>(src, dst, anc, K);
    default:
      for (int64_t i = 0; i < K; ++i) std::memcpy(dst + i * row_bytes, src + anc[i] * row_bytes, row_bytes);
  }
}

// Rows of a whole number of 64-byte lines into a 64-byte aligned destination, written with non-temporal
// stores: a destination line is then written without first being read (a plain store reads each line it
// misses), a third less memory traffic. Only for outputs well past the caches (kStreamBytes), where those
// reads are misses and the result would not stay cached anyway: [4096, 64, 16] float32 (16 MiB) on a 2-core
// AVX-512 EPYC, one thread, 0.74 ms streamed against 1.16 ms with 64-byte plain stores (memcpy: 0.85-1.4).
constexpr int64_t kStreamBytes = int64_t(8) << 20;
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx512f"))) void gather_lines_streamed(const char* src, char* dst, const int64_t* anc,
                                                               int64_t K, int64_t row_bytes) {
  for (int64_t i = 0; i < K; ++i)
    for (int64_t o = 0; o < row_bytes; o += 64)
      _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + i * row_bytes + o),
                          _mm512_loadu_si512(src + anc[i] * row_bytes + o));
}
bool can_stream(const char* dst, int64_t row_bytes, int64_t total_bytes) {
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  return avx512 && total_bytes >= kStreamBytes && row_bytes % 64 == 0 && reinterpret_cast<uintptr_t>(dst) % 64 == 0;
}
void stream_fence() { _mm_sfence(); }  // the streamed lines visible before the threads join
#else
void gather_lines_streamed(const char*, char*, const int64_t*, int64_t, int64_t) {}
bool can_stream(const char*, int64_t, int64_t) { return false; }
void stream_fence() {}
#endif

// The groups [b0, b1) of a gather from src into dst (distinct buffers), streamed where that pays.
void gather_groups(const char* src, char* dst, const int64_t* anc, int64_t b0, int64_t b1, int64_t K,
                   int64_t row_bytes, bool stream) {
  for (int64_t b = b0; b < b1; ++b) {
    if (stream)
      gather_lines_streamed(src + b * K * row_bytes, dst + b * K * row_bytes, anc + b * K, K, row_bytes);
    else
      gather_group(src + b * K * row_bytes, dst + b * K * row_bytes, anc + b * K, K, row_bytes);
  }
  if (stream) stream_fence();
}

// The same move in place (`g` holds the group's K rows, `tmp` is scratch). Ancestors sorted within the group,
// as every scheme but residual gives them: the rows with anc[i] > i first, in increasing i, then those with
// anc[i] < i in decreasing i, and no row is overwritten before the rows copied from it (for anc[i] > i no
// later row reads row i, since anc[j] >= anc[i] > i; for anc[i] < i every row reading row i comes after it,
// already done). Otherwise the group goes through `tmp`.
void gather_group_inplace(char* g, const int64_t* anc, int64_t K, int64_t row_bytes, std::vector<char>& tmp) {
  bool sorted = true;
  for (int64_t i = 1; i < K && sorted; ++i) sorted = anc[i - 1] <= anc[i];
  if (!sorted) {
    tmp.assign(g, g + K * row_bytes);
    gather_group(tmp.data(), g, anc, K, row_bytes);
    return;
  }
  for (int64_t i = 0; i < K; ++i)
    if (anc[i] > i) std::memcpy(g + i * row_bytes, g + anc[i] * row_bytes, row_bytes);
  for (int64_t i = K - 1; i >= 0; --i)
    if (anc[i] < i) std::memcpy(g + i * row_bytes, g + anc[i] * row_bytes, row_bytes);
}

// Whether a[0..n) all lie in [0, K): one branch-free pass the compiler vectorizes (unsigned: a negative
// index compares as huge).
FL_TARGET_CLONES
bool ancestors_in_range(const int64_t* a, int64_t n, int64_t K) {
  uint64_t worst = 0;
  for (int64_t i = 0; i < n; ++i) worst = std::max(worst, static_cast<uint64_t>(a[i]));
  return worst < static_cast<uint64_t>(K);
}

// Every ancestor in [0, K), checked before the move: by all threads at once (a serial pass was a seventh of
// a [4096, 64, 16] gather's time), and only on a failure once more in order, for the first offender.
void check_ancestor_range(const at::Tensor& anc) {
  const int64_t K = anc.size(1);
  const int64_t* a = anc.data_ptr<int64_t>();
  const int64_t n = anc.numel();
  std::atomic<bool> ok{true};
  at::parallel_for(0, n, 65536, [&](int64_t i0, int64_t i1) {
    if (!ancestors_in_range(a + i0, i1 - i0, K)) ok = false;
  });
  if (ok) return;
  for (int64_t i = 0; i < n; ++i)
    FL_CHECK(a[i] >= 0 && a[i] < K, "fusedlab.gather: ancestors must lie in [0, ", K, "), found ", a[i],
                " at flat index ", i);
}

// The B groups of one call, spread over threads: resampled, then (when dst is given) their states moved, in
// place when dst is src.
// `flags` [B, 2] receives 0/1 bytes, resampled and degenerate, which the wrapper views as bool. Raw
// pointers, so that fk_step can run it on its own buffers without allocating tensors.
template <typename scalar_t>
void resample_groups(const scalar_t* x, const double* u, int64_t U, int32_t method, double ess_threshold, int64_t B,
                     int64_t K, int64_t* anc, scalar_t* lw_out, double* ess_out, double* log_norm_out,
                     uint8_t* flags, const char* src, char* dst, int64_t row_bytes) {
  const bool stream = dst && dst != src && can_stream(dst, row_bytes, B * K * row_bytes);
  const SmallSystematic<scalar_t> small = method == kSystematic ? small_systematic_for<scalar_t>(K) : nullptr;
  at::parallel_for(0, B, grain_for(K * 8 + row_bytes / 8), [&](int64_t b0, int64_t b1) {
    Scratch s;
    for (int64_t b = b0; b < b1; ++b) {
      const int fast = small ? small(x + b * K, u[b * U], ess_threshold, anc + b * K, lw_out + b * K, ess_out + b,
                                     log_norm_out + b)
                             : -1;
      const uint8_t bits = fast >= 0 ? static_cast<uint8_t>(fast)
                                     : resample_group<scalar_t>(x + b * K, u + b * U, method, ess_threshold, K,
                                                                anc + b * K, lw_out + b * K, ess_out + b,
                                                                log_norm_out + b, s);
      flags[2 * b] = (bits & kResampled) != 0;
      flags[2 * b + 1] = (bits & kDegenerate) != 0;
      // streamed, each group's state moves right after its resampling (0.99 against 1.16 ms at [4096, 64,
      // 16]: the streamed lines evict nothing)
      if (stream) gather_lines_streamed(src + b * K * row_bytes, dst + b * K * row_bytes, anc + b * K, K, row_bytes);
    }
    if (stream) return stream_fence();
    // Otherwise the same thread then moves its groups' states: interleaving plain copies with the resampling
    // per group measured slower (the copy evicts the next group's inputs).
    std::vector<char> tmp;
    if (!dst) return;  // no state to move (src is null too: this is not the in-place move)
    if (dst == src)
      for (int64_t b = b0; b < b1; ++b) gather_group_inplace(dst + b * K * row_bytes, anc + b * K, K, row_bytes, tmp);
    else
      gather_groups(src, dst, anc, b0, b1, K, row_bytes, false);
  });
}

// U[0, 1) doubles from the generator (the default CPU generator when none): the values
// torch.rand(..., dtype=torch.float64, generator=) draws, one random64() each, under the generator's lock.
std::vector<double> draw_uniforms(const std::optional<at::Generator>& generator, int64_t count) {
  auto* g = at::get_generator_or_default<at::CPUGeneratorImpl>(generator, at::detail::getDefaultCPUGenerator());
  const std::lock_guard<std::mutex> lock(g->mutex_);
  const at::uniform_real_distribution<double> uniform(0.0, 1.0);
  std::vector<double> u(count);
  for (double& x : u) x = uniform(g);
  return u;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> resample_impl(
    const at::Tensor& log_weights, const std::optional<at::Tensor>& uniforms, const std::string& method_name,
    double ess_threshold, const at::Tensor* state, const std::optional<at::Generator>& generator) {
  const ResampleCall c = prepare_resample(log_weights, uniforms, method_name, ess_threshold, state);
  const at::Tensor& lw = c.lw;
  const int64_t B = lw.size(0), K = lw.size(1);
  std::vector<double> drawn;  // without uniforms: torch.rand's values, drawn here (no dispatch of their own)
  if (!c.u.defined()) drawn = draw_uniforms(generator, B * c.u_cols);
  const double* u = c.u.defined() ? c.u.data_ptr<double>() : drawn.data();
  AT_DISPATCH_FLOATING_TYPES(lw.scalar_type(), "fusedlab_resample_cpu", [&] {
    resample_groups<scalar_t>(lw.data_ptr<scalar_t>(), u, c.u_cols, c.method, ess_threshold,
                              B, K, c.anc.data_ptr<int64_t>(), c.lw_out.data_ptr<scalar_t>(), c.ess.data_ptr<double>(),
                              c.log_norm.data_ptr<double>(), c.status.data_ptr<uint8_t>(),
                              state ? static_cast<const char*>(c.st.data_ptr()) : nullptr,
                              state ? static_cast<char*>(c.st_out.data_ptr()) : nullptr, c.row_bytes);
  });
  return c.outputs();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> resample_cpu(
    const at::Tensor& log_weights, const std::optional<at::Tensor>& uniforms, c10::string_view method,
    double ess_threshold, std::optional<at::Generator> generator, bool raise_degenerate) {
  auto r = resample_impl(log_weights, uniforms, std::string(method), ess_threshold, nullptr, generator);
  if (raise_degenerate) check_no_degenerate(std::get<4>(r));
  return {std::get<0>(r), std::get<1>(r), std::get<2>(r), std::get<3>(r), std::get<4>(r)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> resample_gather_cpu(
    const at::Tensor& log_weights, const std::optional<at::Tensor>& uniforms, c10::string_view method,
    double ess_threshold, const at::Tensor& state, std::optional<at::Generator> generator, bool raise_degenerate) {
  auto r = resample_impl(log_weights, uniforms, std::string(method), ess_threshold, &state, generator);
  if (raise_degenerate) check_no_degenerate(std::get<4>(r));
  return r;
}

at::Tensor gather_cpu(const at::Tensor& state, const at::Tensor& ancestors) {
  check_gather_args(state, ancestors);
  const at::Tensor st = state.contiguous();
  const at::Tensor anc = ancestors.contiguous();
  check_ancestor_range(anc);
  auto out = at::empty_like(st);
  const int64_t B = anc.size(0), K = anc.size(1);
  if (st.numel() == 0) return out;
  const int64_t row_bytes = row_bytes_of(st, B, K);
  const char* src = static_cast<const char*>(st.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  const int64_t* a = anc.data_ptr<int64_t>();
  const bool stream = can_stream(dst, row_bytes, B * K * row_bytes);
  at::parallel_for(0, B, grain_for(K * row_bytes / 8 + 1), [&](int64_t b0, int64_t b1) {
    gather_groups(src, dst, a, b0, b1, K, row_bytes, stream);
  });
  return out;
}

// In place: each group is gathered into a per-thread buffer of one group and copied back, so the extra
// memory is one group's state, not the whole tensor.
void gather_inplace_cpu(at::Tensor& state, const at::Tensor& ancestors) {
  check_gather_args(state, ancestors, "gather_");
  FL_CHECK(state.is_contiguous(), "fusedlab.gather_: state must be contiguous for the in-place form");
  const at::Tensor anc = ancestors.contiguous();
  check_ancestor_range(anc);
  const int64_t B = anc.size(0), K = anc.size(1);
  if (state.numel() == 0) return;
  const int64_t row_bytes = row_bytes_of(state, B, K);
  char* base = static_cast<char*>(state.data_ptr());
  const int64_t* a = anc.data_ptr<int64_t>();
  at::parallel_for(0, B, grain_for(K * row_bytes / 8 + 1), [&](int64_t b0, int64_t b1) {
    std::vector<char> buf(K * row_bytes);
    for (int64_t b = b0; b < b1; ++b) {
      gather_group(base + b * K * row_bytes, buf.data(), a + b * K, K, row_bytes);
      std::memcpy(base + b * K * row_bytes, buf.data(), K * row_bytes);
    }
  });
}

// ---- one Feynman-Kac steering step (python/fusedlab/smc/fk.py, FKSteering.run, is the semantics): the
// potential from this step's rewards, the log-weight update, resampling with the latents moved, and the
// per-particle reward bookkeeping moved by the same ancestors, in one call and one pass per particle.

enum Potential : int32_t { kDiff = 0, kMax = 1, kAdd = 2, kRt = 3 };

int32_t parse_potential(c10::string_view name) {
  if (name == "diff") return kDiff;
  if (name == "max") return kMax;
  if (name == "add") return kAdd;
  FL_CHECK(name == "rt", "fusedlab.fk_step: potential must be one of diff, max, add, rt, got ", std::string(name));
  return kRt;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> fk_step_cpu_owning(
    at::Tensor& log_weights, const at::Tensor& rewards, at::Tensor& r_state, at::Tensor& applied, at::Tensor& log_norm,
    at::Tensor& ess_history, at::Tensor& resampled_history, int64_t row, const at::Tensor& state,
    const std::optional<at::Tensor>& uniforms_opt, std::optional<at::Generator> generator,
    c10::string_view potential, double lam, bool first, bool last, c10::string_view method, double ess_threshold,
    bool raise_degenerate, bool state_owned) {
  const int32_t pot = parse_potential(potential);
  FL_CHECK(log_weights.dim() == 2 && log_weights.scalar_type() == at::kDouble && log_weights.is_contiguous(),
           "fusedlab.fk_step: log_weights must be contiguous [B, K] float64");
  const int64_t B = log_weights.size(0), K = log_weights.size(1), n = B * K;
  for (const at::Tensor* t : {&r_state, &applied})
    FL_CHECK(t->dim() == 1 && t->numel() == n && t->scalar_type() == at::kDouble && t->is_contiguous(),
             "fusedlab.fk_step: r_state and applied must be contiguous float64 of B * K = ", n, " elements");
  // rewards come as the reward function returns them (float32 or float64): read in double here rather than
  // converted by a separate op
  FL_CHECK(rewards.dim() == 1 && rewards.numel() == n &&
                  (rewards.scalar_type() == at::kDouble || rewards.scalar_type() == at::kFloat),
           "fusedlab.fk_step: rewards must be float32 or float64 of B * K = ", n, " elements");
  FL_CHECK(log_norm.dim() == 1 && log_norm.numel() == B && log_norm.scalar_type() == at::kDouble &&
                  log_norm.is_contiguous(),
           "fusedlab.fk_step: log_norm must be contiguous float64 of B = ", B, " elements");
  FL_CHECK(ess_history.dim() == 2 && ess_history.size(1) == B && ess_history.scalar_type() == at::kDouble &&
                  ess_history.is_contiguous() && resampled_history.sizes() == ess_history.sizes() &&
                  resampled_history.scalar_type() == at::kBool && resampled_history.is_contiguous(),
           "fusedlab.fk_step: ess_history and resampled_history must be contiguous [S, B = ", B,
           "] float64 and bool, got ", ess_history.sizes(), " ", ess_history.scalar_type(), " and ",
           resampled_history.sizes(), " ", resampled_history.scalar_type());
  FL_CHECK(row >= 0 && row < ess_history.size(0), "fusedlab.fk_step: row must lie in [0, ", ess_history.size(0),
           "), got ", row);
  FL_CHECK(state.dim() >= 1 && state.size(0) == n, "fusedlab.fk_step: state must have B * K = ", n,
           " rows, got shape ", state.sizes());
  // the direct binding (fusedlab._C.fk_step) skips the dispatcher, which would have sent other devices elsewhere
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{
           &log_weights, &rewards, &r_state, &applied, &log_norm, &ess_history, &resampled_history, &state})
    FL_CHECK(t->device().is_cpu() && t->layout() == at::kStrided,
             "fusedlab.fk_step: every tensor must be a dense CPU tensor, got one on ", t->device().str());
  // the latents move as raw bytes, which a quantized tensor's values are not
  FL_CHECK(!state.is_quantized(), "fusedlab.fk_step: state must not be quantized; call dequantize() first");
  // every check before the bookkeeping is touched; the uniforms, when not given, drawn from the generator
  const int32_t m = parse_resample_method(std::string(method));
  check_resample_log_weights(log_weights, ess_threshold);
  const int64_t U = m == kSystematic ? 1 : K;
  at::Tensor u_given;
  std::vector<double> u_drawn;
  if (uniforms_opt.has_value()) {
    check_resample_uniforms(log_weights, *uniforms_opt, m);
    u_given = uniforms_opt->contiguous();
  } else {
    u_drawn = draw_uniforms(generator, B * U);
  }
  const double* u = u_given.defined() ? u_given.data_ptr<double>() : u_drawn.data();
  // read through their stride (a reward function's output is often a column of a larger tensor): a copy to
  // make them contiguous would be one more dispatched call, and right after the model's forward every such
  // call starts from cold caches
  const bool r_double = rewards.scalar_type() == at::kDouble;
  const int64_t r_stride = rewards.stride(0);
  const double* r64 = r_double ? rewards.data_ptr<double>() : nullptr;
  const float* r32 = r_double ? nullptr : rewards.data_ptr<float>();
  const double inf = std::numeric_limits<double>::infinity();
  auto reward = [&](int64_t i) {
    const double r = r_double ? r64[i * r_stride] : static_cast<double>(r32[i * r_stride]);
    return std::isnan(r) ? -inf : r;  // NaN reward: a dead particle
  };
  {  // the potential, in place: r_state and applied updated, the log-weights advanced
    double* rs = r_state.data_ptr<double>();
    double* ap = applied.data_ptr<double>();
    double* w = log_weights.data_ptr<double>();
    for (int64_t i = 0; i < n; ++i) {
      const double ri = reward(i);
      double g, st = rs[i];
      switch (pot) {
        case kDiff: g = lam * (ri - st); st = ri; break;
        case kMax: st = first ? ri : std::max(st, ri); g = lam * st; break;
        case kAdd: st = st + ri; g = lam * st; break;
        default: g = lam * ri;
      }
      if (last && pot != kDiff) g = lam * ri - ap[i];  // the product of potentials becomes exp(lam r(x))
      if (std::isnan(g) || ri == -inf) g = -inf;      // dead whatever the potential and the sign of lam
      else if (g == inf) g = std::numeric_limits<double>::max();  // as torch.nan_to_num: the largest finite
      rs[i] = st;
      if (pot != kDiff) ap[i] += g;  // "diff" telescopes: its final step reads no applied potentials
      w[i] += g;
    }
  }
  // The latents in the FK layout [B*K, ...]: contiguous, they are already the groups' rows. A lazily conjugated
  // or negated view is materialized first, since the rows move as raw bytes (checked before calling: each
  // dispatched call costs tens of microseconds right after the model's forward).
  at::Tensor resolved = state;
  if (resolved.is_conj()) resolved = resolved.resolve_conj();
  if (resolved.is_neg()) resolved = resolved.resolve_neg();
  const at::Tensor st = resolved.contiguous();
  const int64_t row_bytes = n > 0 ? st.numel() / n * static_cast<int64_t>(st.element_size()) : 0;
  // Outputs straight from the CPU allocator (after the model's forward every dispatched call starts from
  // cold caches, so a step is cheaper the fewer it makes), the step's internal results in plain buffers.
  at::Tensor anc = at::detail::empty_cpu({B, K}, at::kLong);
  // The latents are moved in place, with no new buffer and only the rows that change copied, where nothing
  // else can see them: in the copy made above for non-contiguous or lazy views, or in the caller's tensor when the
  // caller holds its only reference (state_owned), no other tensor shares its storage (a view, x0 taken from
  // it), nothing needs it for a gradient, and torch's CPU allocator owns its memory (not numpy's, a DLPack
  // producer's, shared or pinned memory).
  const bool inplace =
      !st.is_same(state) || (state_owned && !state.requires_grad() && state.storage().use_count() == 1 &&
                             state.storage().allocator() == c10::GetCPUAllocator());
  at::Tensor st_out = inplace ? st : at::Tensor(at::detail::empty_cpu(st.sizes(), st.scalar_type()));
  // an in-place move is a write: anything that saved this tensor's version (autograd) must see it (an inference
  // tensor has no version counter, and nothing can save it for a gradient)
  if (inplace && st.is_same(state) && !state.is_inference()) state.unsafeGetTensorImpl()->bump_version();
  at::Tensor r_out = at::detail::empty_cpu({last ? n : 0}, at::kDouble);
  std::vector<double> step_ln(B);
  std::vector<uint8_t> flags(2 * B);  // per group: resampled, degenerate
  int64_t* a = anc.data_ptr<int64_t>();
  // carried log-weights written over the inputs (each group reads all of its own before writing)
  double* w = log_weights.data_ptr<double>();
  double* ess = ess_history.data_ptr<double>() + row * B;
  resample_groups<double>(w, u, U, m, ess_threshold, B, K, a, w, ess, step_ln.data(), flags.data(),
                          static_cast<const char*>(st.data_ptr()), static_cast<char*>(st_out.data_ptr()), row_bytes);
  if (raise_degenerate) {  // fusedlab.smc.resample's on_degenerate="raise"
    std::vector<int64_t> dead;
    for (int64_t b = 0; b < B; ++b)
      if (flags[2 * b + 1]) dead.push_back(b);
    raise_degenerate_groups(dead);
  }
  {  // the run's log-normalizer and "was this group resampled" for the trace
    double* ln = log_norm.data_ptr<double>();
    bool* o = resampled_history.data_ptr<bool>() + row * B;
    for (int64_t b = 0; b < B; ++b) {
      ln[b] += step_ln[b];
      o[b] = flags[2 * b] != 0;
    }
  }
  // r_state and applied reordered by the ancestors in place (the identity where a group was not resampled),
  // and at the last step the rewards moved with them (an empty tensor before)
  {
    double* rs = r_state.data_ptr<double>();
    double* ap = applied.data_ptr<double>();
    double* ro = last ? r_out.data_ptr<double>() : nullptr;
    std::vector<double> tmp(2 * K);
    for (int64_t b = 0; b < B; ++b) {
      if (!flags[2 * b]) {
        if (ro)
          for (int64_t i = 0; i < K; ++i) ro[b * K + i] = reward(b * K + i);
        continue;
      }
      std::copy(rs + b * K, rs + (b + 1) * K, tmp.begin());
      if (pot != kDiff) std::copy(ap + b * K, ap + (b + 1) * K, tmp.begin() + K);
      for (int64_t i = 0; i < K; ++i) {
        const int64_t src = a[b * K + i];
        rs[b * K + i] = tmp[src];
        if (pot != kDiff) ap[b * K + i] = tmp[K + src];
        if (ro) ro[b * K + i] = reward(b * K + src);
      }
      // a group whose particles all died, resampled uniformly (raise_degenerate off), starts over: no
      // potential applied and no reward history, whose -inf would cancel the final correction ("max" starts
      // from the next reward itself)
      if (flags[2 * b + 1] && !last)
        for (int64_t i = 0; i < K; ++i) {
          rs[b * K + i] = pot == kMax ? -inf : 0.0;
          ap[b * K + i] = 0.0;
        }
    }
  }
  return {anc, st_out, r_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fk_step_cpu(
    at::Tensor& log_weights, const at::Tensor& rewards, at::Tensor& r_state, at::Tensor& applied, at::Tensor& log_norm,
    at::Tensor& ess_history, at::Tensor& resampled_history, int64_t row, const at::Tensor& state,
    const std::optional<at::Tensor>& uniforms_opt, std::optional<at::Generator> generator,
    c10::string_view potential, double lam, bool first, bool last, c10::string_view method, double ess_threshold,
    bool raise_degenerate) {
  // the op never writes its state argument (its schema says so)
  return fk_step_cpu_owning(log_weights, rewards, r_state, applied, log_norm, ess_history, resampled_history, row,
                            state, uniforms_opt, std::move(generator), potential, lam, first, last, method,
                            ess_threshold, raise_degenerate, /*state_owned=*/false);
}

TORCH_LIBRARY_IMPL(fusedlab, CPU, m) {
  m.impl("fk_step", &fk_step_cpu);
  m.impl("resample", &resample_cpu);
  m.impl("resample_gather", &resample_gather_cpu);
  m.impl("gather", &gather_cpu);
  m.impl("gather_", &gather_inplace_cpu);
}

}  // namespace fusedlab
