// CUDA glue of the cat family: fusedlab::cat_decode, CAT's generation step. Argument checks shared with the
// CPU kernel (fusedlab/checks.h) plus the CUDA kernel's own limits, then the launch plan and the kernels of
// fusedlab/cat_decode.cuh on the current stream.
//
// The fills n_slots / n_raw stay on the device (reading them would sync every step): out-of-range values are
// caught by a device assert (CUDA_KERNEL_ASSERT, as in resample.cu) and clamped, so nothing outside the
// cache is ever read; the Python wrapper checks them on the host before calling.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <cstdint>

#define FL_KERNEL_ASSERT(cond) CUDA_KERNEL_ASSERT(cond)
#include "fusedlab/cat_decode.cuh"
#include "fusedlab/checks.h"
#include "fusedlab/cuda_glue.h"

namespace fusedlab {
namespace {

namespace fcd = fusedlab::cat::cuda;

// The kernels read rows with 16-byte vectors: a view whose data starts off that boundary is copied.
at::Tensor aligned_contiguous(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if (reinterpret_cast<uintptr_t>(c.data_ptr()) % fcd::kAlignBytes != 0) c = c.clone();
  return c;
}

template <typename T, int D>
void launch(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc, const at::Tensor& ns,
            const at::Tensor& k, const at::Tensor& v, const at::Tensor& nr, at::Tensor& out, double scale) {
  const int64_t B = q.size(0), H = q.size(1), Hkv = kc.size(1), S = kc.size(2), R = k.size(2);
  const fcd::DecodePlan plan = fcd::plan_decode(B, H, Hkv, S, R, sm_count(q.device().index()));
  FL_CHECK(plan.blocks < (int64_t(1) << 31), "fusedlab.cat_decode: ", plan.blocks,
           " blocks exceed the CUDA grid limit (B * Hkv = ", B * Hkv, " too large)");
  at::Tensor part_acc, part_ml;  // freed stream-ordered by the caching allocator
  if (plan.splits > 1) {
    part_acc = at::empty({B, H, plan.splits, D}, q.options().dtype(at::kFloat));
    part_ml = at::empty({B, H, plan.splits, 2}, q.options().dtype(at::kFloat));
  }
  fcd::DecodeParams<T> p;
  p.q = reinterpret_cast<const T*>(q.data_ptr());
  p.kc = reinterpret_cast<const T*>(kc.data_ptr());
  p.vc = reinterpret_cast<const T*>(vc.data_ptr());
  p.k = reinterpret_cast<const T*>(k.data_ptr());
  p.v = reinterpret_cast<const T*>(v.data_ptr());
  p.n_slots = ns.data_ptr<int64_t>();
  p.n_raw = nr.data_ptr<int64_t>();
  p.out = reinterpret_cast<T*>(out.data_ptr());
  p.part_acc = plan.splits > 1 ? part_acc.data_ptr<float>() : nullptr;
  p.part_ml = plan.splits > 1 ? part_ml.data_ptr<float>() : nullptr;
  p.B = B;
  p.S = S;
  p.R = R;
  p.H = static_cast<int>(H);
  p.Hkv = static_cast<int>(Hkv);
  p.head_groups = plan.head_groups;
  p.splits = plan.splits;
  p.qk_scale = static_cast<float>(scale * 1.4426950408889634);  // log2(e): the kernels use exp2
  const cudaError_t err = fcd::launch_decode<T, D>(p, plan, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_CHECK(err);
}

template <typename T>
void launch_dim(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc, const at::Tensor& ns,
                const at::Tensor& k, const at::Tensor& v, const at::Tensor& nr, at::Tensor& out, double scale) {
  if (q.size(2) == 64)
    launch<T, 64>(q, kc, vc, ns, k, v, nr, out, scale);
  else
    launch<T, 128>(q, kc, vc, ns, k, v, nr, out, scale);
}

at::Tensor cat_decode_cuda(const at::Tensor& q_in, const at::Tensor& kc_in, const at::Tensor& vc_in,
                           const at::Tensor& n_slots, const at::Tensor& k_in, const at::Tensor& v_in,
                           const at::Tensor& n_raw, double scale) {
  check_cat_decode_args(q_in, kc_in, vc_in, n_slots, k_in, v_in, n_raw, scale);
  check_cat_decode_cuda_limits(q_in, kc_in);
  const auto dt = q_in.scalar_type();
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = aligned_contiguous(q_in), kc = aligned_contiguous(kc_in), vc = aligned_contiguous(vc_in),
                   k = aligned_contiguous(k_in), v = aligned_contiguous(v_in);
  const at::Tensor ns = n_slots.to(at::kLong).contiguous(), nr = n_raw.to(at::kLong).contiguous();
  at::Tensor out = at::empty_like(q);  // contiguous: q is
  if (out.numel() == 0) return out;
  switch (dt) {
    case at::kFloat: launch_dim<float>(q, kc, vc, ns, k, v, nr, out, scale); break;
    case at::kHalf: launch_dim<__half>(q, kc, vc, ns, k, v, nr, out, scale); break;
    default: launch_dim<__nv_bfloat16>(q, kc, vc, ns, k, v, nr, out, scale); break;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedlab, CUDA, m) { m.impl("cat_decode", &cat_decode_cuda); }

}  // namespace fusedlab
