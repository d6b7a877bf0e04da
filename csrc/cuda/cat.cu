// CUDA glue of the cat family: fusedlab::cat_attention and cat_attention_backward (the kernels of
// fusedlab/cat_attention.cuh) and fusedlab::cat_decode, CAT's generation step (fusedlab/cat_decode.cuh).
// Argument checks shared with the CPU kernels (fusedlab/checks.h) plus the CUDA kernels' own limits, then
// the launches on the current stream.
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
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#define FL_KERNEL_ASSERT(cond) CUDA_KERNEL_ASSERT(cond)
#include "fusedlab/cat_attention.cuh"
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

// ------------------------------------------------------------------------------------------ cat_attention

// The attention kernels' own limits (after check_cat_attention_args): positions and block counts in 32 bits.
void check_cat_attention_cuda_limits(const at::Tensor& q, const CatAttentionShapes& s, const char* op) {
  const auto dt = q.scalar_type();
  FL_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, "fusedlab.", op,
           ": the CUDA kernel takes float32, float16 or bfloat16, got ", dt,
           " (float64 runs on the CPU kernel or the reference)");
  FL_CHECK(s.d == 64 || s.d == 128, "fusedlab.", op, ": the CUDA kernel takes head dims 64 and 128, got ", s.d,
           " (the Triton kernel takes any up to 128)");
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max() / 2;
  FL_CHECK(s.L <= kMax && s.Nc <= kMax && s.l <= kMax && s.H <= kMax, "fusedlab.", op,
           ": the CUDA kernel takes L, Nc, chunk_size and heads up to ", kMax, ", got L = ", s.L, ", Nc = ", s.Nc,
           ", chunk_size = ", s.l, ", H = ", s.H);
  const int64_t tiles = (s.L + 15) / 16 + (s.Nc + 15) / 16;  // the most tiles per head (16-row tiles)
  FL_CHECK(s.B * s.H * tiles < (int64_t(1) << 31), "fusedlab.", op, ": ", s.B * s.H * tiles,
           " blocks exceed the CUDA grid limit (B * H too large for L and Nc)");
}

template <typename T>
fcd::AttnParams<T> attn_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& kc,
                               const at::Tensor& vc, const at::Tensor* qc, const CatAttentionShapes& s,
                               double scale) {
  fcd::AttnParams<T> p{};
  auto in = [](const at::Tensor& t) { return reinterpret_cast<const T*>(t.data_ptr()); };
  p.q = in(q);
  p.k = in(k);
  p.v = in(v);
  p.kc = in(kc);
  p.vc = in(vc);
  p.qc = qc != nullptr ? in(*qc) : nullptr;
  p.B = s.B;
  p.H = static_cast<int>(s.H);
  p.Hkv = static_cast<int>(s.Hkv);
  p.L = static_cast<int>(s.L);
  p.Nc = static_cast<int>(s.Nc);
  p.l = static_cast<int>(s.l);
  p.qk_scale = static_cast<float>(scale * 1.4426950408889634);  // log2(e): the kernels use exp2
  p.scale = static_cast<float>(scale);
  return p;
}

template <typename T>
T* out_ptr(at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

template <typename F>
void dispatch_attn(at::ScalarType dt, int64_t d, F&& f) {
  auto by_dim = [&](auto tag) {
    using T = decltype(tag);
    if (d == 64)
      f(T{}, std::integral_constant<int, 64>{});
    else
      f(T{}, std::integral_constant<int, 128>{});
  };
  switch (dt) {
    case at::kFloat: by_dim(float{}); break;
    case at::kHalf: by_dim(__half{}); break;
    default: by_dim(__nv_bfloat16{}); break;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cat_attention_cuda(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& kc_in,
    const at::Tensor& vc_in, const c10::optional<at::Tensor>& qc_in, int64_t chunk_size, double scale) {
  const CatAttentionShapes s = check_cat_attention_args(q_in, k_in, v_in, kc_in, vc_in, qc_in, chunk_size, scale,
                                                        "cat_attention");
  check_cat_attention_cuda_limits(q_in, s, "cat_attention");
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous(), kc = kc_in.contiguous(),
                   vc = vc_in.contiguous();
  const at::Tensor qc = qc_in.has_value() ? qc_in->contiguous() : at::Tensor();
  const int64_t Nq = qc_in.has_value() ? s.Nc : 0;
  at::Tensor o = at::empty_like(q), lse = at::empty({s.B, s.H, s.L}, q.options().dtype(at::kFloat));
  at::Tensor oc = at::empty({s.B, s.H, Nq, s.d}, q.options()), lse_c = at::empty({s.B, s.H, Nq}, lse.options());
  dispatch_attn(q.scalar_type(), s.d, [&](auto tag, auto dim) {
    using T = decltype(tag);
    fcd::AttnParams<T> p = attn_params<T>(q, k, v, kc, vc, qc_in.has_value() ? &qc : nullptr, s, scale);
    p.out_o = out_ptr<T>(o);
    p.out_oc = Nq ? out_ptr<T>(oc) : nullptr;
    p.lse = lse.data_ptr<float>();
    p.lse_c = Nq ? lse_c.data_ptr<float>() : nullptr;
    C10_CUDA_CHECK((fcd::launch_attn_forward<T, decltype(dim)::value>(p, c10::cuda::getCurrentCUDAStream())));
  });
  return {o, lse, oc, lse_c};
}

std::vector<at::Tensor> cat_attention_backward_cuda(
    const at::Tensor& do_in, const c10::optional<at::Tensor>& doc_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& kc_in, const at::Tensor& vc_in, const c10::optional<at::Tensor>& qc_in,
    const at::Tensor& o_in, const at::Tensor& lse_in, const at::Tensor& oc_in, const at::Tensor& lse_c_in,
    int64_t chunk_size, double scale) {
  const char* op = "cat_attention_backward";
  const CatAttentionShapes s = check_cat_attention_args(q_in, k_in, v_in, kc_in, vc_in, qc_in, chunk_size, scale,
                                                        op);
  check_cat_attention_cuda_limits(q_in, s, op);
  FL_CHECK(qc_in.has_value() == doc_in.has_value(), "fusedlab.cat_attention_backward: doc must be given "
           "exactly when qc is");
  FL_CHECK(do_in.sizes() == q_in.sizes() && o_in.sizes() == q_in.sizes(), "fusedlab.", op,
           ": grad_o and o must have q's shape ", q_in.sizes(), ", got ", do_in.sizes(), " and ", o_in.sizes());
  FL_CHECK(lse_in.dim() == 3 && lse_in.size(0) == s.B && lse_in.size(1) == s.H && lse_in.size(2) == s.L &&
               lse_in.scalar_type() == at::kFloat,
           "fusedlab.", op, ": lse must be float32 [B, H, L] = [", s.B, ", ", s.H, ", ", s.L, "], got ",
           lse_in.scalar_type(), " ", lse_in.sizes());
  for (const at::Tensor* t : {&do_in, &o_in, &lse_in, &oc_in, &lse_c_in})
    FL_CHECK(t->device() == q_in.device(), "fusedlab.", op, ": every tensor must be on ", q_in.device(),
             ", got one on ", t->device());
  const bool has_qc = qc_in.has_value();
  if (has_qc) {
    FL_CHECK(doc_in->sizes() == qc_in->sizes() && oc_in.sizes() == qc_in->sizes(), "fusedlab.", op,
             ": grad_oc and oc must have qc's shape ", qc_in->sizes(), ", got ", doc_in->sizes(), " and ",
             oc_in.sizes());
    FL_CHECK(doc_in->device() == q_in.device(), "fusedlab.", op, ": grad_oc must be on ", q_in.device());
    FL_CHECK(lse_c_in.dim() == 3 && lse_c_in.size(0) == s.B && lse_c_in.size(1) == s.H &&
                 lse_c_in.size(2) == s.Nc && lse_c_in.scalar_type() == at::kFloat,
             "fusedlab.", op, ": lse_c must be float32 [B, H, Nc] = [", s.B, ", ", s.H, ", ", s.Nc, "], got ",
             lse_c_in.scalar_type(), " ", lse_c_in.sizes());
  }
  const auto dt = q_in.scalar_type();
  for (const at::Tensor* t : {&do_in, &o_in})
    FL_CHECK(t->scalar_type() == dt, "fusedlab.", op, ": grad_o and o must have q's dtype ", dt, ", got ",
             t->scalar_type());
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous(), kc = kc_in.contiguous(),
                   vc = vc_in.contiguous(), o = o_in.contiguous(), d_o = do_in.to(dt).contiguous(),
                   lse = lse_in.contiguous();
  at::Tensor qc, oc, d_oc, lse_c;
  if (has_qc) {
    qc = qc_in->contiguous();
    oc = oc_in.to(dt).contiguous();
    d_oc = doc_in->to(dt).contiguous();
    lse_c = lse_c_in.contiguous();
  }
  // every row of every gradient is written by exactly one block
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v), dkc = at::empty_like(kc),
             dvc = at::empty_like(vc);
  at::Tensor dqc = has_qc ? at::empty_like(qc) : at::Tensor();
  at::Tensor delta = at::empty({s.B, s.H, s.L}, q.options().dtype(at::kFloat));
  at::Tensor delta_c = at::empty({s.B, s.H, has_qc ? s.Nc : 0}, delta.options());
  dispatch_attn(dt, s.d, [&](auto tag, auto dim) {
    using T = decltype(tag);
    fcd::AttnParams<T> p = attn_params<T>(q, k, v, kc, vc, has_qc ? &qc : nullptr, s, scale);
    p.o = reinterpret_cast<const T*>(o.data_ptr());
    p.d_o = reinterpret_cast<const T*>(d_o.data_ptr());
    p.lse = const_cast<float*>(lse.data_ptr<float>());  // read only by the backward's kernels
    p.out_o = out_ptr<T>(dq);
    p.dk = out_ptr<T>(dk);
    p.dv = out_ptr<T>(dv);
    p.dkc = out_ptr<T>(dkc);
    p.dvc = out_ptr<T>(dvc);
    p.delta = delta.data_ptr<float>();
    if (has_qc) {
      p.oc = reinterpret_cast<const T*>(oc.data_ptr());
      p.d_oc = reinterpret_cast<const T*>(d_oc.data_ptr());
      p.lse_c = const_cast<float*>(lse_c.data_ptr<float>());
      p.out_oc = out_ptr<T>(dqc);
      p.delta_c = delta_c.data_ptr<float>();
    }
    C10_CUDA_CHECK((fcd::launch_attn_backward<T, decltype(dim)::value>(p, c10::cuda::getCurrentCUDAStream())));
  });
  std::vector<at::Tensor> out = {dq, dk, dv, dkc, dvc};
  if (has_qc) out.push_back(dqc);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedlab, CUDA, m) {
  m.impl("cat_attention", &cat_attention_cuda);
  m.impl("cat_attention_backward", &cat_attention_backward_cuda);
  m.impl("cat_decode", &cat_decode_cuda);
}

}  // namespace fusedlab
