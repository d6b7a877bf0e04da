// Host-only math helpers written so GCC/Clang auto-vectorize the loops that call them (no calls into libm,
// no branches): the CPU kernels compute their weights in float64, where a scalar libm exp per particle would
// dominate the run time. Torch-free; CUDA code uses the device's own exp.
#pragma once

#include <cstdint>
#include <cstring>

// One clone per x86 instruction set, picked at load time; elsewhere a plain function.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__APPLE__)
#define FL_TARGET_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FL_TARGET_CLONES
#endif

// For helpers that take or return vectors: inlined into each clone, so no vector crosses a call (whose ABI
// would differ between the clones).
#if defined(__GNUC__)
#define FL_VEC_INLINE inline __attribute__((always_inline))
#if !defined(__clang__)
// GCC warns once per file that a vector return "changes the ABI" without AVX; these never cross a call.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
#else
#define FL_VEC_INLINE inline
#endif

// Lanes of two vectors picked by constant indices (0..n-1 from a, n..2n-1 from b). Clang and GCC 12 have
// __builtin_shufflevector; older GCC only __builtin_shuffle, which takes the indices as a `mask_t` vector.
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define FL_SHUFFLE(mask_t, a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define FL_SHUFFLE(mask_t, a, b, ...) __builtin_shuffle(a, b, (mask_t){__VA_ARGS__})
#endif

namespace fusedlab {
namespace cpu {

// Eight-lane vectors (GCC/Clang vector extensions), for loops the auto-vectorizer leaves scalar.
typedef double f64x8 __attribute__((vector_size(64)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));

// Eight values into double lanes (through a pointer: a vector return value would change the ABI between the
// clones of FL_TARGET_CLONES).
inline void load8(const float* x, f64x8* out) {
  f32x8 v;
  std::memcpy(&v, x, sizeof v);
  *out = __builtin_convertvector(v, f64x8);
}
inline void load8(const double* x, f64x8* out) { std::memcpy(out, x, sizeof *out); }

// Round to the nearest integer (ties to even) for |t| < 2^51, with two adds the vectorizer can use on
// any x86-64 level (no roundpd, no float/int conversions).
inline double round_nearest(double t) {
  const double kMagic = 6755399441055744.0;  // 1.5 * 2^52
  return (t + kMagic) - kMagic;
}

// 2^k for an integer-valued k in [-1022, 1023], built from the exponent bits.
inline double exp2_int(double k) {
  const uint64_t bits = __builtin_bit_cast(uint64_t, (k + 1023.0) + 4503599627370496.0) - 0x4330000000000000ull;
  return __builtin_bit_cast(double, bits << 52);
}

// exp_nonpositive's constants, shared with the resample kernel's AVX-512 form of it: Cody-Waite's ln 2 in a
// high part exact in products with n and a low part, the underflow bound (exp(-745.2) is below half the
// smallest subnormal) and the Taylor coefficients 1/k!.
constexpr double kExpLog2e = 1.4426950408889634;
constexpr double kExpLn2Hi = 6.93147180369123816490e-01;
constexpr double kExpLn2Lo = 1.90821492927058770002e-10;
constexpr double kExpUnderflow = -745.2;
constexpr int kExpDegree = 12;
constexpr double kExpTaylor[kExpDegree + 1] = {1.0, 1.0, 1.0 / 2, 1.0 / 6, 1.0 / 24, 1.0 / 120, 1.0 / 720,
                                               1.0 / 5040, 1.0 / 40320, 1.0 / 362880, 1.0 / 3628800,
                                               1.0 / 39916800, 1.0 / 479001600};

// exp(x) for x <= 0 (max-shifted log-weights), x = -inf included (and NaN, which gives 0 as -inf does; the
// resample kernel relies on that), within 3 ulp of libm over the whole range,
// subnormal results included. Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, then a degree-12 Taylor
// polynomial (truncation error < 2e-17 relative), then 2^n applied as two normal factors.
inline double exp_nonpositive(double x) {
  const bool underflow = !(x >= kExpUnderflow);  // also catches -inf and NaN
  const double xc = underflow ? 0.0 : x;
  const double n = round_nearest(xc * kExpLog2e);
  const double r = (xc - n * kExpLn2Hi) - n * kExpLn2Lo;
  double p = kExpTaylor[kExpDegree];
  for (int k = kExpDegree - 1; k >= 0; --k) p = p * r + kExpTaylor[k];
  const double n1 = round_nearest(n * 0.5);  // n >= -1075: both halves stay >= -538
  const double y = p * exp2_int(n1) * exp2_int(n - n1);
  return underflow ? 0.0 : y;
}

}  // namespace cpu
}  // namespace fusedlab
