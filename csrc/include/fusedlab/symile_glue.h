// Shared by the CPU and CUDA glue of the symile family (torch-dependent: glue code only): the argument
// checks of the "n_squared" ops, the loss from every anchor's log-sum-exps, and the gradients from the
// kernels' unscaled sums U_m (csrc/cpu/symile.cpp, csrc/include/fusedlab/symile_cuda.cuh).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones.h>

#include <cstdint>
#include <tuple>
#include <vector>

#include "fusedlab/message.h"

namespace fusedlab {

// reps: M >= 2 tensors [N, d] of one floating dtype and device, N >= 1; logit_scale: one floating element.
inline void check_symile_args(at::TensorList reps, const at::Tensor& logit_scale, const char* op) {
  FL_CHECK(reps.size() >= 2, "fusedlab.", op, ": reps must hold at least 2 modalities, got ", reps.size());
  const at::Tensor& r0 = reps[0];
  for (size_t m = 0; m < reps.size(); ++m) {
    const at::Tensor& r = reps[m];
    FL_CHECK(r.dim() == 2, "fusedlab.", op, ": reps[", m, "] must be 2-D [N, d], got shape ", r.sizes());
    FL_CHECK(at::isFloatingType(r.scalar_type()), "fusedlab.", op, ": reps[", m,
             "] must be floating point, got ", r.scalar_type());
    FL_CHECK(r.scalar_type() == r0.scalar_type(), "fusedlab.", op, ": reps[", m, "] must have dtype ",
             r0.scalar_type(), " like reps[0], got ", r.scalar_type());
    FL_CHECK(r.device() == r0.device(), "fusedlab.", op, ": reps[", m, "] must be on ", r0.device(),
             " like reps[0], got ", r.device());
    FL_CHECK(r.sizes() == r0.sizes(), "fusedlab.", op, ": reps[", m, "] must have shape [N, d] = ", r0.sizes(),
             " like reps[0], got ", r.sizes());
  }
  FL_CHECK(r0.size(0) >= 1, "fusedlab.", op, ": reps must have N >= 1 rows, got shape ", r0.sizes());
  FL_CHECK(logit_scale.numel() == 1, "fusedlab.", op, ": logit_scale must be a scalar (one element), got shape ",
           logit_scale.sizes());
  FL_CHECK(at::isFloatingType(logit_scale.scalar_type()), "fusedlab.", op,
           ": logit_scale must be floating point, got ", logit_scale.scalar_type());
}

// mip: candidates [C, d]; queries, at least one, each [B, d] or [d] with the candidates' dtype and device (one B
// across the 2-D ones). Returns B (1 when every query is 1-D).
inline int64_t check_mip_args(const at::Tensor& candidates, at::TensorList queries) {
  FL_CHECK(candidates.dim() == 2, "fusedlab.mip: candidates must be 2-D [C, d], got shape ", candidates.sizes());
  FL_CHECK(at::isFloatingType(candidates.scalar_type()), "fusedlab.mip: candidates must be floating point, got ",
           candidates.scalar_type());
  FL_CHECK(!queries.empty(), "fusedlab.mip: queries must hold at least one tensor");
  const int64_t d = candidates.size(1);
  int64_t B = -1;
  for (size_t m = 0; m < queries.size(); ++m) {
    const at::Tensor& q = queries[m];
    FL_CHECK((q.dim() == 1 || q.dim() == 2) && q.size(-1) == d, "fusedlab.mip: queries[", m, "] must be [B, ", d,
             "] or [", d, "] like candidates [C, d], got shape ", q.sizes());
    FL_CHECK(q.scalar_type() == candidates.scalar_type() && q.device() == candidates.device(), "fusedlab.mip: queries[",
             m, "] must have the candidates' dtype ", candidates.scalar_type(), " and device ", candidates.device(),
             ", got ", q.scalar_type(), " on ", q.device());
    if (q.dim() == 2) {
      FL_CHECK(B < 0 || q.size(0) == B, "fusedlab.mip: queries[", m, "] must have B = ", B,
               " rows like the other 2-D queries, got ", q.size(0));
      B = q.size(0);
    }
  }
  return B < 0 ? 1 : B;
}

// The backward's lse and grad arguments.
inline void check_symile_backward_args(const at::Tensor& grad, const at::Tensor& lse, int64_t M, int64_t N) {
  FL_CHECK(lse.dim() == 2 && lse.size(0) == M && lse.size(1) == N,
           "fusedlab.symile_n_squared_backward: lse must have shape [M, N] = [", M, ", ", N, "], got ", lse.sizes());
  FL_CHECK(grad.numel() == 1, "fusedlab.symile_n_squared_backward: grad must be a scalar, got shape ",
           grad.sizes());
}

// The loss and the [M, N] log-sum-exps of every anchor from those of anchors 0 and 1 (lse0, lse1 [N]) and
// the per-tuple log-sum-exps over (i, j) (tuple_lse [N^(M-2)], the last outer modality fastest), all in
// the accumulation dtype of r (the modalities, converted) and s (the 0-dim logit scale).
inline std::tuple<at::Tensor, at::Tensor> symile_finish_forward(const std::vector<at::Tensor>& r, const at::Tensor& s,
                                                                const at::Tensor& lse0, const at::Tensor& lse1,
                                                                const at::Tensor& tuple_lse,
                                                                at::ScalarType out_dtype) {
  const int64_t M = static_cast<int64_t>(r.size()), N = r[0].size(0);
  at::Tensor lse = at::empty({M, N}, r[0].options());
  lse.select(0, 0).copy_(lse0);
  lse.select(0, 1).copy_(lse1);
  if (M > 2) {
    // an outer anchor's log-sum-exp: over the tuples that hold its row, each already reduced over (i, j)
    const at::Tensor t = tuple_lse.view(std::vector<int64_t>(M - 2, N));
    for (int64_t m = 2; m < M; ++m) {
      std::vector<int64_t> dims;
      for (int64_t k = 0; k < M - 2; ++k)
        if (k != m - 2) dims.push_back(k);
      lse.select(0, m).copy_(dims.empty() ? t : t.logsumexp(dims));
    }
  }
  at::Tensor positive = r[0];
  for (int64_t m = 1; m < M; ++m) positive = positive.mul(r[m]);
  const at::Tensor loss = lse.sum().div(static_cast<double>(M * N)).sub(positive.sum().mul(s).div(N));
  return {loss.to(out_dtype), lse};
}

// The gradients from the kernels' sums U_m = sum over the logit entries holding row n of modality m of
// E * prod_{o != m} r_o (E = sum_a exp(S - lse_a), dL/dS = g (E / (M N) - D / N), D the aligned tuples):
// dL/dr_m = s (g / (M N) U_m - g / N prod_{o != m} r_o), and dL/ds = <r_0, dL/dr_0> / s since S is linear in
// r_0. U, r and s in the accumulation dtype; the results in the dtypes of reps and logit_scale.
inline std::tuple<std::vector<at::Tensor>, at::Tensor> symile_finish_backward(
    const std::vector<at::Tensor>& U, const std::vector<at::Tensor>& r, const at::Tensor& s, const at::Tensor& grad,
    at::TensorList reps, const at::Tensor& logit_scale) {
  const int64_t M = static_cast<int64_t>(r.size()), N = r[0].size(0);
  const auto opts = r[0].options();
  const at::Tensor g = grad.to(opts.dtype()).reshape({});
  const at::Tensor c = g.div(static_cast<double>(M * N)), gd = g.div(static_cast<double>(N));
  // the aligned tuple's term: U_m[n] -= g / N prod_{o != m} r_o[n], from prefix and suffix products
  std::vector<at::Tensor> prefix(M + 1), suffix(M + 1);
  prefix[0] = at::ones(r[0].sizes(), opts);
  suffix[M] = prefix[0];
  for (int64_t m = 0; m < M; ++m) prefix[m + 1] = prefix[m].mul(r[m]);
  for (int64_t m = M - 1; m >= 0; --m) suffix[m] = suffix[m + 1].mul(r[m]);
  std::vector<at::Tensor> grads;
  at::Tensor grad_scale;
  for (int64_t m = 0; m < M; ++m) {
    const at::Tensor Um = U[m].to(opts.dtype()).mul(c).sub(prefix[m].mul(suffix[m + 1]).mul(gd));
    if (m == 0) grad_scale = r[0].mul(Um).sum();
    grads.push_back(Um.mul(s).to(reps[m].scalar_type()));
  }
  return {grads, grad_scale.to(logit_scale.scalar_type()).view(logit_scale.sizes())};
}

}  // namespace fusedlab
