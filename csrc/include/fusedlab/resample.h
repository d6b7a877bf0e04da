// Batched particle resampling: the per-group numerics every backend shares. Torch-free, so the same
// functions compile into the CPU extension (and are unit-tested there) and into the CUDA kernels.
//
// Semantics (the reference is python/fusedlab/reference/resample.py):
//   weights w_j = exp(x_j - max x) in double, NaN log-weights count as -inf; a group is degenerate when
//   max x is not finite; CDF C_j = cumsum(w)/S with C_j = 1 from the last positive weight on;
//   ancestor of point p = first j with C_j > p, clamped to the last positive weight.
#pragma once

#include <cmath>
#include <cstdint>

#include "fusedlab/macros.h"

namespace fusedlab {
namespace resample {

enum Method : int32_t { kMultinomial = 0, kStratified = 1, kSystematic = 2, kResidual = 3 };

enum Status : uint8_t { kResampled = 1, kDegenerate = 2 };

// Method names in the order of the enum; the op takes the name and maps it here.
constexpr const char* kMethodNames[4] = {"multinomial", "stratified", "systematic", "residual"};

// NaN log-weights count as -inf (a dead particle), as in most SMC libraries.
FL_HD FL_INLINE double clean_log_weight(double x) { return x != x ? -INFINITY : x; }

// A threshold >= 1 always resamples (ESS <= K always, but ESS == K exactly for equal weights), 0 never.
FL_HD FL_INLINE bool should_resample(double ess, double ess_threshold, int64_t K) {
  return ess_threshold >= 1.0 || ess < ess_threshold * static_cast<double>(K);
}

// log mean weight of a group, the factor an unbiased SMC normalizing-constant estimate multiplies in.
FL_HD FL_INLINE double log_norm(double max_lw, double sum_w, int64_t K) {
  return max_lw + log(sum_w) - log(static_cast<double>(K));
}

// Effective sample size from the sums of the max-shifted weights and of their squares.
FL_HD FL_INLINE double ess(double sum_w, double sum_w2) { return sum_w * sum_w / sum_w2; }

// Carried log-weight: normalized so the group's weights keep mean 1 (x - logsumexp(x) + log K), with
// log_total = max + log(sum of shifted weights) and log_k = log K computed once per group.
FL_HD FL_INLINE double carried_log_weight(double x, double log_total, double log_k) { return x - log_total + log_k; }

// Residual resampling's deterministic copies of a particle with kw = K w / S: floor(kw), taken up to the next
// whole number when kw lies within kResidualSnap * K below it, since rounding puts a K w / S that is exactly
// a whole number (weights in whole ratios) a few ulps either side of it, and the floor would lose a copy
// residual resampling guarantees. The residual weight is then max(kw - n, 0). Every backend uses this rule.
constexpr double kResidualSnap = 1e-13;
FL_HD FL_INLINE double residual_copies(double kw, int64_t K) {
  return floor(kw + kResidualSnap * static_cast<double>(K));
}
FL_HD FL_INLINE double residual_weight(double kw, double n) { return kw > n ? kw - n : 0.0; }

// Systematic and stratified points: (i + u) / K.
FL_HD FL_INLINE double grid_point(int64_t i, double u, int64_t K) {
  return (static_cast<double>(i) + u) / static_cast<double>(K);
}

// Number of grid points p_i = (i + u_i) / K (systematic or stratified, u_i in [0, 1)) strictly below c.
// p_i lies in [i/K, (i+1)/K), so the count is floor(K c) up to one rounding step either way: points up to
// s - 2 are below c, points from s + 2 on are not, and the three around s = floor(K c) are compared exactly.
// `padded` holds the K points at [1, K], with +inf at 0, K + 1 and K + 2, so no index needs a bound check.
// Equal to comparing c with every point, in constant time and without a data-dependent branch.
FL_HD FL_INLINE int64_t grid_count_below(double c, int64_t K, const double* padded) {
  double est = floor(c * static_cast<double>(K));
  est = est < 0.0 ? 0.0 : (est > static_cast<double>(K) ? static_cast<double>(K) : est);
  const int64_t s = static_cast<int64_t>(est);
  return (s > 1 ? s - 1 : 0) + (padded[s] < c) + (padded[s + 1] < c) + (padded[s + 2] < c);
}

// First j in [0, last] with cdf[j] > p, by binary search; `last` is the last positive weight, whose CDF
// value is exactly 1, so every p in [0, 1) finds an index and p >= 1 clamps to `last`.
FL_HD FL_INLINE int64_t search_cdf(const double* cdf, int64_t last, double p) {
  int64_t lo = 0, hi = last;  // answer in [lo, hi]
  while (lo < hi) {
    int64_t mid = lo + (hi - lo) / 2;
    if (cdf[mid] > p) hi = mid; else lo = mid + 1;
  }
  return lo;
}

// Host-side sequential form for sorted points: the O(K + M) merge. Writes out[0..M) and returns nothing.
// `points` must be non-decreasing; `cdf` as for search_cdf.
FL_HD FL_INLINE void merge_sorted_points(const double* cdf, int64_t last, const double* points, int64_t M,
                                         int64_t* out) {
  int64_t j = 0;
  for (int64_t i = 0; i < M; ++i) {
    while (j < last && !(cdf[j] > points[i])) ++j;
    out[i] = j;
  }
}

}  // namespace resample
}  // namespace fusedlab
