// CUDA glue of the newton_schulz family: argument checks (the CPU kernel's messages), allocation, and the
// iteration on cuBLAS through ATen's batched GEMMs over the whole batch: A = X X^T by bmm, B = b A + c A^2 and
// X = a X + B X by baddbmm (the epilogues in beta/alpha), in the wide orientation. The prologue (norm, scale,
// cast, orientation: two passes over G) and the epilogue's transposed copy are the kernels of
// fusedlab/newton_schulz_cuda.cuh. Semantics and arithmetic: the CPU kernel's (csrc/cpu/newton_schulz.cpp).
//
// float32 products follow torch's matmul precision setting (IEEE float32 by default; TF32 after
// torch.backends.cuda.matmul.allow_tf32 = True), bf16/fp16 products torch's reduced-precision-reduction
// settings, as for torch.optim.Muon's own products.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/baddbmm.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "fusedlab/checks.h"
#include "fusedlab/cuda_glue.h"
#include "fusedlab/newton_schulz_cuda.cuh"

namespace fusedlab {
namespace {

namespace nc = fusedlab::newton_schulz::cuda;

// ATen's element types -> the header's storage types (same layout).
template <typename T>
struct Storage {
  using type = T;
};
template <>
struct Storage<at::BFloat16> {
  using type = nc::bf16_t;
};
template <>
struct Storage<at::Half> {
  using type = nc::fp16_t;
};

at::Tensor newton_schulz_cuda(const at::Tensor& G, at::ArrayRef<double> coefficients, double norm_scale, double eps,
                              at::ScalarType dtype) {
  check_ns_input(G);
  check_ns_args(coefficients, norm_scale, eps, dtype, "newton_schulz");
  const int64_t m = G.size(-2), n = G.size(-1);
  const at::TensorOptions opts = G.options().dtype(dtype);
  if (G.numel() == 0) return at::empty(G.sizes(), opts);
  const c10::cuda::CUDAGuard guard(G.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int sms = sm_count(G.device().index());

  // The prologue's source: G's matrices as they lie (copied once if strided), or their transposes when G is
  // the .mT view of a contiguous batch, which the transposed write then reads without a copy.
  at::Tensor src = G.reshape({-1, m, n});
  bool src_transposed = false;
  if (!src.is_contiguous()) {
    if (src.transpose(1, 2).is_contiguous()) {
      src = src.transpose(1, 2);
      src_transposed = true;
    } else {
      src = src.contiguous();
    }
  }
  const int64_t batch = src.size(0);
  FL_CHECK(batch <= nc::kMaxGrid, "fusedlab.newton_schulz: the CUDA kernel takes at most 2^31 - 1 matrices, got ",
           batch);
  const int64_t steps = static_cast<int64_t>(coefficients.size() / 3);
  const bool tall = m > n;  // iterate on the wide orientation: the Gram matrix is min(m, n) square
  // The prologue writes the wide orientation when there are steps, else G's own layout (the result).
  const bool write_transposed = steps > 0 && tall;
  const nc::ProloguePlan plan =
      nc::plan_prologue(batch, src.size(1), src.size(2), write_transposed != src_transposed, sms);
  at::Tensor X = steps > 0 ? at::empty({batch, std::min(m, n), std::max(m, n)}, opts) : at::empty(G.sizes(), opts);
  at::Tensor partials = at::empty({batch * plan.chunks}, G.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(), "fusedlab_newton_schulz_prologue", [&] {
    using TIn = typename Storage<scalar_t>::type;
    const TIn* s = reinterpret_cast<const TIn*>(src.const_data_ptr<scalar_t>());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "fusedlab_newton_schulz_prologue_out", [&] {
      using TOut = typename Storage<scalar_t>::type;
      nc::launch_prologue<TIn, TOut>(s, reinterpret_cast<TOut*>(X.mutable_data_ptr<scalar_t>()),
                                     partials.mutable_data_ptr<double>(), plan, norm_scale, eps, stream);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (steps == 0) return X;

  for (int64_t k = 0; k < steps; ++k) {
    const double a = coefficients[3 * k], b = coefficients[3 * k + 1], c = coefficients[3 * k + 2];
    const at::Tensor A = at::bmm(X, X.transpose(1, 2));
    const at::Tensor B = at::baddbmm(A, A, A, /*beta=*/b, /*alpha=*/c);
    if (k + 1 < steps || !tall) {
      X = at::baddbmm(X, B, X, /*beta=*/a, /*alpha=*/1.0);
      continue;
    }
    // The last step of a tall input lands in G's layout: (a X + B X)^T = a X^T + X^T B^T, accumulated in place
    // onto X^T. The transposed copy stands in for the copy of X that baddbmm makes for its beta term anyway,
    // so the transpose back costs no extra pass.
    at::Tensor out = at::empty({batch, m, n}, opts);
    nc::launch_transpose(X.const_data_ptr(), out.mutable_data_ptr(), batch, X.size(1), X.size(2),
                         static_cast<int>(X.element_size()), sms, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    out.baddbmm_(X.transpose(1, 2), B.transpose(1, 2), /*beta=*/a, /*alpha=*/1.0);
    X = out;
  }
  return X.view(G.sizes());
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedlab, CUDA, m) {
  m.impl("newton_schulz", &newton_schulz_cuda);
}

}  // namespace fusedlab
