// CUDA glue of the symile family: fusedlab::symile_n_squared and its backward on CUDA tensors. Argument checks
// and the finishing ATen steps shared with the CPU kernel (fusedlab/symile_glue.h), the CUDA kernels' own
// limits, then the kernels of fusedlab/symile_cuda.cuh on the current stream. The kernels write per-block
// partial (max, sum) pairs of each log-sum-exp; merging them is a few small ATen reductions over [blocks, N].
#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "fusedlab/cuda_glue.h"
#include "fusedlab/symile_cuda.cuh"
#include "fusedlab/symile_glue.h"

namespace fusedlab {
namespace {

namespace fsc = fusedlab::symile::cuda;

struct Call {
  int64_t M, N, d, U;
  fsc::SymilePlan plan;
};

Call check_cuda(at::TensorList reps, const at::Tensor& logit_scale, const char* op) {
  check_symile_args(reps, logit_scale, op);
  Call c;
  c.M = static_cast<int64_t>(reps.size());
  c.N = reps[0].size(0);
  c.d = reps[0].size(1);
  const auto dt = reps[0].scalar_type();
  FL_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, "fusedlab.", op,
           ": the CUDA kernel takes float32, float16 or bfloat16 reps, got ", dt,
           " (float64 runs on the CPU kernel or the reference)");
  FL_CHECK(c.M <= fsc::kMaxModalities, "fusedlab.", op, ": the CUDA kernel takes at most ", fsc::kMaxModalities,
           " modalities, got ", c.M);
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  c.U = 1;
  for (int64_t m = 2; m < c.M; ++m) {
    FL_CHECK(c.U <= kMax / c.N, "fusedlab.", op, ": the CUDA kernel takes at most 2^31 tuples N^(M-2), got N = ",
             c.N, " with M = ", c.M);
    c.U *= c.N;
  }
  FL_CHECK(c.N <= kMax && c.d <= kMax, "fusedlab.", op, ": N and d must be below 2^31, got ", c.N, " and ", c.d);
  c.plan = fsc::plan_symile(c.N, c.U, sm_count(reps[0].device().index()));
  FL_CHECK(c.plan.blocks < (int64_t(1) << 31), "fusedlab.", op, ": ", c.plan.blocks,
           " blocks exceed the CUDA grid limit");
  return c;
}

template <typename T>
fsc::SymileParams<T> params(const std::vector<at::Tensor>& r, const at::Tensor& scale, const Call& c) {
  fsc::SymileParams<T> p{};
  for (int64_t m = 0; m < c.M; ++m) p.r[m] = reinterpret_cast<const T*>(r[m].data_ptr());
  p.scale = scale.data_ptr<float>();
  p.M = static_cast<int>(c.M);
  p.N = static_cast<int>(c.N);
  p.d = static_cast<int>(c.d);
  p.U = static_cast<int>(c.U);
  p.u_chunk = c.plan.u_chunk;
  p.row_groups = c.plan.row_groups;
  p.tiles_per_group = c.plan.tiles_per_group;
  return p;
}

template <typename F>
void dispatch(at::ScalarType dt, F&& f) {
  switch (dt) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(__half{}); break;
    default: f(__nv_bfloat16{}); break;
  }
}

// Log-sum-exp over the rows of [rows, n, 2] (max, sum of exp(S - max)) pairs.
at::Tensor merge_pairs(const at::Tensor& pairs) {
  const at::Tensor lse = pairs.select(-1, 0).add(pairs.select(-1, 1).log());
  return lse.logsumexp(0);
}

std::tuple<at::Tensor, at::Tensor> symile_n_squared_cuda(at::TensorList reps, const at::Tensor& logit_scale,
                                                         int64_t chunk) {
  const char* op = "symile_n_squared";
  FL_CHECK(chunk >= 0, "fusedlab.", op, ": chunk must be >= 0, got ", chunk);  // the CUDA plan ignores it
  const Call c = check_cuda(reps, logit_scale, op);
  const c10::cuda::CUDAGuard guard(reps[0].device());
  std::vector<at::Tensor> r;
  for (const at::Tensor& x : reps) r.push_back(x.contiguous());
  const at::Tensor scale = logit_scale.to(reps[0].device(), at::kFloat).reshape({1}).contiguous();
  const auto f32 = r[0].options().dtype(at::kFloat);
  const at::Tensor row = at::empty({c.plan.chunks, c.N, 2}, f32), col = at::empty({c.plan.blocks, c.N, 2}, f32),
                   tup = at::empty({c.plan.row_groups, c.U, 2}, f32);
  dispatch(r[0].scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    fsc::SymileParams<T> p = params<T>(r, scale, c);
    p.row_part = reinterpret_cast<float2*>(row.data_ptr<float>());
    p.col_part = reinterpret_cast<float2*>(col.data_ptr<float>());
    p.tuple_part = reinterpret_cast<float2*>(tup.data_ptr<float>());
    C10_CUDA_CHECK(fsc::launch_symile_forward<T>(p, c.plan.blocks, c10::cuda::getCurrentCUDAStream()));
  });
  std::vector<at::Tensor> r32;
  for (const at::Tensor& x : r) r32.push_back(x.to(at::kFloat));
  const at::Tensor tuple_lse = c.M > 2 ? merge_pairs(tup) : at::empty({0}, f32);
  return symile_finish_forward(r32, scale.reshape({}), merge_pairs(row), merge_pairs(col), tuple_lse,
                               reps[0].scalar_type());
}

std::tuple<std::vector<at::Tensor>, at::Tensor> symile_n_squared_backward_cuda(const at::Tensor& grad,
                                                                              at::TensorList reps,
                                                                              const at::Tensor& logit_scale,
                                                                              const at::Tensor& lse, int64_t chunk) {
  const char* op = "symile_n_squared_backward";
  FL_CHECK(chunk >= 0, "fusedlab.", op, ": chunk must be >= 0, got ", chunk);
  const Call c = check_cuda(reps, logit_scale, op);
  check_symile_backward_args(grad, lse, c.M, c.N);
  // the gradient sums are fp32 atomics: their order, and so the last bits, vary from run to run
  at::globalContext().alertNotDeterministic("fusedlab.symile_n_squared_backward (CUDA kernel; the 'n_squared' "
                                            "loss runs deterministically on backend='reference' or the CPU)");
  const c10::cuda::CUDAGuard guard(reps[0].device());
  std::vector<at::Tensor> r;
  for (const at::Tensor& x : reps) r.push_back(x.contiguous());
  const at::Tensor scale = logit_scale.to(reps[0].device(), at::kFloat).reshape({1}).contiguous();
  const at::Tensor L = lse.to(r[0].device(), at::kFloat).contiguous();
  std::vector<at::Tensor> U;
  for (int64_t m = 0; m < c.M; ++m) U.push_back(at::zeros({c.N, c.d}, r[0].options().dtype(at::kFloat)));
  dispatch(r[0].scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    fsc::SymileParams<T> p = params<T>(r, scale, c);
    p.lse = L.data_ptr<float>();
    for (int64_t m = 0; m < c.M; ++m) p.grad_sum[m] = U[m].data_ptr<float>();
    C10_CUDA_CHECK(fsc::launch_symile_backward<T>(p, c.plan.blocks, c10::cuda::getCurrentCUDAStream()));
  });
  std::vector<at::Tensor> r32;
  for (const at::Tensor& x : r) r32.push_back(x.to(at::kFloat));
  return symile_finish_backward(U, r32, scale.reshape({}), grad, reps, logit_scale);
}

at::Tensor mip_cuda(const at::Tensor& candidates, at::TensorList queries_in) {
  const int64_t B = check_mip_args(candidates, queries_in);
  const auto dt = candidates.scalar_type();
  FL_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
           "fusedlab.mip: the CUDA kernel takes float32, float16 or bfloat16, got ", dt,
           " (float64 runs on the CPU kernel or the reference)");
  const int64_t C = candidates.size(0), d = candidates.size(1);
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  FL_CHECK(B <= kMax && C <= kMax && d <= kMax && B * C < (int64_t(1) << 62), "fusedlab.mip: B, C and d must be "
           "below 2^31, got ", B, ", ", C, ", ", d);
  FL_CHECK(fsc::mip_blocks(B, C) < (int64_t(1) << 31), "fusedlab.mip: B * C too large for the CUDA grid");
  const c10::cuda::CUDAGuard guard(candidates.device());
  // more queries than the kernel takes: the first ones multiplied together first
  std::vector<at::Tensor> queries(queries_in.begin(), queries_in.end());
  while (static_cast<int64_t>(queries.size()) > fsc::kMaxQueries) {
    queries[1] = queries[0].mul(queries[1]);
    queries.erase(queries.begin());
  }
  for (at::Tensor& q : queries) q = q.contiguous();
  const at::Tensor cand = candidates.contiguous();
  at::Tensor out = at::empty({B, C}, cand.options());
  dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    fsc::MipParams<T> p{};
    p.cand = reinterpret_cast<const T*>(cand.data_ptr());
    for (size_t m = 0; m < queries.size(); ++m) {
      p.queries[m] = reinterpret_cast<const T*>(queries[m].data_ptr());
      p.q_stride[m] = queries[m].dim() == 2 ? d : 0;
    }
    p.out = reinterpret_cast<T*>(out.data_ptr());
    p.nq = static_cast<int>(queries.size());
    p.B = static_cast<int>(B);
    p.C = static_cast<int>(C);
    p.d = static_cast<int>(d);
    C10_CUDA_CHECK(fsc::launch_mip<T>(p, c10::cuda::getCurrentCUDAStream()));
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedlab, CUDA, m) {
  m.impl("mip", &mip_cuda);
  m.impl("symile_n_squared", &symile_n_squared_cuda);
  m.impl("symile_n_squared_backward", &symile_n_squared_backward_cuda);
}

}  // namespace fusedlab
