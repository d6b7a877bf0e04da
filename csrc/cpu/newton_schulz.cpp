// C++ CPU kernel of the newton_schulz family: the whole iteration in one op over a batch of same-shaped
// matrices, with the aX + BX and bA + cA^2 updates fused into baddbmm (one GEMM each, epilogue included).
// Semantics: python/fusedlab/reference/newton_schulz.py.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linalg_vector_norm.h>
#include <torch/library.h>

namespace fusedlab {
namespace {

at::Tensor newton_schulz_cpu(const at::Tensor& G, at::ArrayRef<double> coefficients, double norm_scale, double eps,
                             at::ScalarType dtype) {
  TORCH_CHECK(G.dim() >= 2, "fusedlab.newton_schulz: G must be [..., m, n] with at least 2 dims, got shape ",
              G.sizes());
  TORCH_CHECK(at::isFloatingType(G.scalar_type()), "fusedlab.newton_schulz: G must be floating point, got ",
              G.scalar_type());
  TORCH_CHECK(coefficients.size() % 3 == 0,
              "fusedlab.newton_schulz: coefficients must hold (a, b, c) per step, got ", coefficients.size(), " values");
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kFloat || dtype == at::kDouble,
              "fusedlab.newton_schulz: dtype must be bfloat16, float16, float32 or float64, got ", dtype);
  TORCH_CHECK(eps >= 0.0 && norm_scale > 0.0, "fusedlab.newton_schulz: need eps >= 0 and norm_scale > 0, got ", eps,
              " and ", norm_scale);
  const int64_t m = G.size(-2), n = G.size(-1);
  if (G.numel() == 0) return at::empty(G.sizes(), G.options().dtype(dtype));
  // Frobenius norm accumulated in float64 (one pass, no upcast copy): the squares of any float32 input
  // neither underflow nor overflow; clamped at eps as torch.optim.Muon does. Then one scale-and-cast pass.
  const at::ScalarType acc = dtype == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor g = G.reshape({-1, m, n});
  const at::Tensor norm = at::linalg_vector_norm(g, 2, at::IntArrayRef{-2, -1}, true, at::kDouble);
  const at::Tensor inv = norm.mul(norm_scale).clamp_min(eps).reciprocal().to(acc);
  at::Tensor X = g.to(acc).mul(inv).to(dtype);
  const bool tall = m > n;  // iterate on the wide orientation: the Gram matrix is min(m, n) square
  if (tall) X = X.transpose(1, 2);
  for (size_t s = 0; s + 2 < coefficients.size(); s += 3) {
    const double a = coefficients[s], b = coefficients[s + 1], c = coefficients[s + 2];
    const at::Tensor A = X.bmm(X.transpose(1, 2));
    const at::Tensor B = A.baddbmm(A, A, /*beta=*/b, /*alpha=*/c);
    X = X.baddbmm(B, X, /*beta=*/a, /*alpha=*/1.0);
  }
  if (tall) X = X.transpose(1, 2);
  return X.contiguous().view(G.sizes());
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedlab, CPU, m) { m.impl("newton_schulz", &newton_schulz_cpu); }

}  // namespace fusedlab
