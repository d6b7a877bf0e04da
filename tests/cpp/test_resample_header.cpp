// Host-side unit test of the torch-free numerics in fusedlab/resample.h, the same functions the CUDA kernels
// call on the device: binary search and merge against brute force, on random CDFs with zero-weight runs.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "fusedlab/cpu_math.h"
#include "fusedlab/resample.h"

using namespace fusedlab::resample;

static int failures = 0;
#define CHECK(cond, ...)                 \
  do {                                   \
    if (!(cond)) {                       \
      std::printf("FAIL %s: ", #cond);   \
      std::printf(__VA_ARGS__);          \
      std::printf("\n");                 \
      ++failures;                        \
    }                                    \
  } while (0)

int main() {
  std::mt19937_64 rng(12345);
  std::uniform_real_distribution<double> unif(0.0, 1.0);
  for (int trial = 0; trial < 2000; ++trial) {
    const int64_t K = 1 + rng() % 70;
    std::vector<double> w(K), cdf(K);
    int64_t last = -1;
    for (int64_t j = 0; j < K; ++j) {
      w[j] = unif(rng) < 0.3 ? 0.0 : unif(rng);
      if (w[j] > 0) last = j;
    }
    if (last < 0) { w[K - 1] = 1.0; last = K - 1; }
    double c = 0, s = 0;
    for (double x : w) s += x;
    for (int64_t j = 0; j < K; ++j) { c += w[j]; cdf[j] = j >= last ? 1.0 : c / s; }
    std::vector<double> pts(K);
    for (int64_t i = 0; i < K; ++i) pts[i] = grid_point(i, trial % 7 == 0 ? 0.0 : unif(rng), K);
    std::vector<double> padded(K + 3, INFINITY);
    for (int64_t i = 0; i < K; ++i) padded[i + 1] = pts[i];
    for (int64_t j = 0; j < K; ++j) {
      int64_t below = 0;
      for (int64_t i = 0; i < K; ++i) below += pts[i] < cdf[j];
      CHECK(grid_count_below(cdf[j], K, padded.data()) == below, "grid count K=%ld j=%ld", (long)K, (long)j);
    }
    std::vector<int64_t> merged(K);
    merge_sorted_points(cdf.data(), last, pts.data(), K, merged.data());
    for (int64_t i = 0; i < K; ++i) {
      int64_t brute = last;
      for (int64_t j = 0; j <= last; ++j) if (cdf[j] > pts[i]) { brute = j; break; }
      const int64_t bs = search_cdf(cdf.data(), last, pts[i]);
      CHECK(bs == brute, "search K=%ld i=%ld got %ld want %ld", (long)K, (long)i, (long)bs, (long)brute);
      CHECK(merged[i] == brute, "merge K=%ld i=%ld got %ld want %ld", (long)K, (long)i, (long)merged[i], (long)brute);
      CHECK(w[brute] > 0, "zero-weight particle %ld chosen", (long)brute);
    }
    CHECK(search_cdf(cdf.data(), last, 1.0) == last, "p = 1 clamps to the last positive weight");
  }
  CHECK(should_resample(4.0, 1.0, 4) && !should_resample(4.0, 0.99, 4) && !should_resample(0.5, 0.0, 4),
        "threshold semantics");
  CHECK(std::isinf(clean_log_weight(NAN)) && clean_log_weight(NAN) < 0, "NaN counts as -inf");
  CHECK(std::fabs(carried_log_weight(0.5, std::log(2.0), std::log(4.0)) - (0.5 - std::log(2.0) + std::log(4.0))) < 1e-15,
        "carried");
  for (double x = -746.0; x <= 0.0; x += 0.37) {
    const double a = fusedlab::cpu::exp_nonpositive(x), b = std::exp(x);
    CHECK(std::fabs(a - b) <= 4 * (std::nextafter(b, INFINITY) - b) || (b < 1e-300 && std::fabs(a - b) < 1e-320),
          "exp(%g): %.17g vs %.17g", x, a, b);
  }
  CHECK(fusedlab::cpu::exp_nonpositive(-INFINITY) == 0.0 && fusedlab::cpu::exp_nonpositive(0.0) == 1.0, "exp ends");
  std::printf("%s (%d failures)\n", failures ? "FAILED" : "ok", failures);
  return failures ? 1 : 0;
}
