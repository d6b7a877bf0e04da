// Argument checks shared by the CPU and CUDA glue files. Every message names the argument, what was
// expected and what came. (Torch-dependent: glue code only, never device headers.)
#pragma once

#include <c10/util/Exception.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/any.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "fusedlab/message.h"
#include "fusedlab/resample.h"

namespace fusedlab {

inline int32_t parse_resample_method(const std::string& method) {
  for (int32_t i = 0; i < 4; ++i)
    if (method == resample::kMethodNames[i]) return i;
  FL_CHECK(false, "fusedlab.resample: method must be one of '", resample::kMethodNames[0], "', '",
           resample::kMethodNames[1], "', '", resample::kMethodNames[2], "', '", resample::kMethodNames[3],
           "', got '", method, "'");
}

inline void check_resample_log_weights(const at::Tensor& lw, double ess_threshold) {
  FL_CHECK(lw.dim() == 2, "fusedlab.resample: log_weights must be 2-D [B, K], got shape ", lw.sizes());
  FL_CHECK(lw.size(1) > 0, "fusedlab.resample: log_weights must have K >= 1 particles, got shape ", lw.sizes());
  FL_CHECK(lw.scalar_type() == at::kFloat || lw.scalar_type() == at::kDouble,
           "fusedlab.resample: log_weights must be float32 or float64, got ", lw.scalar_type());
  FL_CHECK(ess_threshold >= 0.0, "fusedlab.resample: ess_threshold must be >= 0, got ", ess_threshold);
}

inline void check_resample_uniforms(const at::Tensor& lw, const at::Tensor& u, int32_t method) {
  FL_CHECK(u.scalar_type() == at::kDouble, "fusedlab.resample: uniforms must be float64, got ",
           u.scalar_type());
  const int64_t need = method == resample::kSystematic ? 1 : lw.size(1);
  FL_CHECK(u.dim() == 2 && u.size(0) == lw.size(0) && u.size(1) == need,
           "fusedlab.resample: uniforms must have shape [", lw.size(0), ", ", need, "] for method '",
           resample::kMethodNames[method], "', got ", u.sizes());
  FL_CHECK(u.device() == lw.device(), "fusedlab.resample: uniforms must be on ", lw.device(), " like log_weights, got ",
           u.device());
  // On the CPU the values are checked too (the Python wrapper checks them on every device; a GPU check here
  // would synchronize): a NaN would break the sort of multinomial points, a 1.0 index past the CDF.
  if (u.device().is_cpu()) {
    const at::Tensor uc = u.contiguous();
    const double* p = uc.data_ptr<double>();
    for (int64_t i = 0, n = uc.numel(); i < n; ++i)
      FL_CHECK(p[i] >= 0.0 && p[i] < 1.0, "fusedlab.resample: uniforms must lie in [0, 1), found ", p[i]);
  }
}

// `anc` is the ancestors argument (gather) or the ancestors the op will compute (resample_gather, whose
// message then names log_weights as the reference shape).
inline void check_gather_args(const at::Tensor& state, const at::Tensor& anc, const char* op = "gather") {
  const bool fused = std::string(op) != "gather" && std::string(op) != "gather_";
  const char* like = fused ? "log_weights" : "ancestors";
  FL_CHECK(anc.dim() == 2, "fusedlab.", op, ": ancestors must be 2-D [B, K], got shape ", anc.sizes());
  FL_CHECK(anc.scalar_type() == at::kLong, "fusedlab.", op, ": ancestors must be int64, got ", anc.scalar_type());
  FL_CHECK(state.dim() >= 2 && state.size(0) == anc.size(0) && state.size(1) == anc.size(1),
           "fusedlab.", op, ": state must have shape [B, K, ...] = [", anc.size(0), ", ", anc.size(1),
           ", ...] like ", like, ", got ", state.sizes());
  FL_CHECK(state.device() == anc.device(), "fusedlab.", op, ": state must be on ", anc.device(), " like ", like,
           ", got ", state.device());
}

// newton_schulz and muon_step_: the iteration's arguments; `op` names the op in the messages.
inline void check_ns_args(at::ArrayRef<double> coefficients, double norm_scale, double eps, at::ScalarType dtype,
                          const char* op) {
  FL_CHECK(coefficients.size() % 3 == 0, "fusedlab.", op, ": coefficients must hold (a, b, c) per step, got ",
           coefficients.size(), " values");
  FL_CHECK(dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kFloat || dtype == at::kDouble, "fusedlab.",
           op, ": dtype must be bfloat16, float16, float32 or float64, got ", dtype);
  FL_CHECK(eps >= 0.0 && norm_scale > 0.0, "fusedlab.", op, ": need eps >= 0 and norm_scale > 0, got ", eps, " and ",
           norm_scale);
}

// newton_schulz's G, on every device.
inline void check_ns_input(const at::Tensor& G) {
  FL_CHECK(G.dim() >= 2, "fusedlab.newton_schulz: G must be [..., m, n] with at least 2 dims, got shape ",
           G.sizes());
  FL_CHECK(at::isFloatingType(G.scalar_type()), "fusedlab.newton_schulz: G must be floating point, got ",
           G.scalar_type());
}

// Bytes per particle of a state [B, K, ...] (0 when empty).
inline int64_t row_bytes_of(const at::Tensor& state, int64_t B, int64_t K) {
  return B > 0 && K > 0 ? state.numel() / (B * K) * static_cast<int64_t>(state.element_size()) : 0;
}

// One resample / resample_gather call as the CPU and CUDA glue both see it: arguments checked, inputs
// contiguous, outputs allocated on the inputs' device (an empty state_out when there is no state).
struct ResampleCall {
  int32_t method = 0;
  at::Tensor lw, u, anc, lw_out, ess, log_norm, status, st, st_out;  // u undefined: the op draws them
  int64_t row_bytes = 0;
  int64_t u_cols = 0;  // uniforms per group: 1 (systematic) or K

  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> outputs() const {
    return {lw_out, anc, ess, log_norm, status, st_out};
  }
};

inline ResampleCall prepare_resample(const at::Tensor& log_weights, const std::optional<at::Tensor>& uniforms,
                                     const std::string& method_name, double ess_threshold, const at::Tensor* state) {
  ResampleCall c;
  c.method = parse_resample_method(method_name);
  check_resample_log_weights(log_weights, ess_threshold);
  if (uniforms.has_value()) {
    check_resample_uniforms(log_weights, *uniforms, c.method);
    c.u = uniforms->contiguous();
  }
  c.lw = log_weights.contiguous();
  const int64_t B = c.lw.size(0), K = c.lw.size(1);
  c.u_cols = c.method == resample::kSystematic ? 1 : K;
  c.anc = at::empty({B, K}, c.lw.options().dtype(at::kLong));
  c.lw_out = at::empty_like(c.lw);
  c.ess = at::empty({B}, c.lw.options().dtype(at::kDouble));
  c.log_norm = at::empty({B}, c.lw.options().dtype(at::kDouble));
  c.status = at::empty({B, 2}, c.lw.options().dtype(at::kByte));  // flags: resampled, degenerate
  if (state != nullptr) {
    check_gather_args(*state, c.anc, "resample_gather");
    c.st = state->contiguous();
    c.st_out = at::empty_like(c.st);
    c.row_bytes = row_bytes_of(c.st, B, K);
  } else {
    c.st_out = at::empty({0}, c.lw.options());
  }
  return c;
}

// on_degenerate="raise" (python/fusedlab/ops/resample.py words it the same): a ValueError naming the first
// ten groups in `dead`, those left without a finite log-weight.
inline void raise_degenerate_groups(const std::vector<int64_t>& dead) {
  if (dead.empty()) return;
  std::string groups;
  for (size_t k = 0; k < std::min<size_t>(dead.size(), 10); ++k) groups += (k ? ", " : "") + std::to_string(dead[k]);
  if (dead.size() > 10) groups += ", ...";
  FL_CHECK_VALUE(false, "log_weights: group(s) ", groups, " have no finite log-weight (all -inf or NaN, or +inf); "
                 "pass on_degenerate='uniform' to resample them uniformly instead");
}

// The same from a resample op's status [B, 2] (flags resampled, degenerate) on any device; a CUDA status
// is read back only when some group is degenerate (one reduction and a synchronization otherwise).
inline void check_no_degenerate(const at::Tensor& status) {
  at::Tensor flags = status;
  if (!flags.is_cpu()) {
    if (!flags.select(1, 1).any().item<bool>()) return;
    flags = flags.cpu();
  }
  flags = flags.contiguous();
  const uint8_t* f = flags.data_ptr<uint8_t>();
  std::vector<int64_t> dead;
  for (int64_t b = 0; b < flags.size(0); ++b)
    if (f[2 * b + 1]) dead.push_back(b);
  raise_degenerate_groups(dead);
}

// cat_attention and its backward (CPU and CUDA): q [B, H, L, d]; k, v [B, Hkv, L, d]; kc, vc [B, Hkv, Nc, d]
// with Nc >= ceil(L / l); qc, when given, [B, H, Nc, d]; one floating dtype and device for all.
struct CatAttentionShapes {
  int64_t B, H, Hkv, G, L, Nc, d, l;
};

inline CatAttentionShapes check_cat_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                   const at::Tensor& kc, const at::Tensor& vc,
                                                   const c10::optional<at::Tensor>& qc, int64_t l, double scale,
                                                   const char* op) {
  FL_CHECK(std::isfinite(scale), "fusedlab.", op, ": scale must be a finite number, got ", scale);
  FL_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && kc.dim() == 4 && vc.dim() == 4,
           "fusedlab.", op, ": q, k, v, kc, vc must be 4-D [B, heads, length, head_dim], got q ", q.sizes(),
           ", k ", k.sizes(), ", kc ", kc.sizes());
  FL_CHECK(l >= 1, "fusedlab.", op, ": chunk_size must be >= 1, got ", l);
  const auto dt = q.scalar_type();
  for (const at::Tensor* t : {&k, &v, &kc, &vc})
    FL_CHECK(t->scalar_type() == dt && t->device() == q.device(), "fusedlab.", op,
             ": k, v, kc, vc must have q's dtype ", dt, " and device ", q.device(), ", got ", t->scalar_type(),
             " on ", t->device());
  FL_CHECK(at::isFloatingType(dt), "fusedlab.", op, ": q must be floating point, got ", dt);
  CatAttentionShapes s;
  s.B = q.size(0); s.H = q.size(1); s.L = q.size(2); s.d = q.size(3);
  s.Hkv = k.size(1); s.Nc = kc.size(2); s.l = l;
  FL_CHECK(s.Hkv >= 1 && s.H % s.Hkv == 0, "fusedlab.", op, ": q's heads (", s.H,
           ") must be a multiple of k's (", s.Hkv, ")");
  s.G = s.H / s.Hkv;
  FL_CHECK(k.sizes() == v.sizes() && k.size(0) == s.B && k.size(2) == s.L && k.size(3) == s.d, "fusedlab.", op,
           ": k and v must be [B, Hkv, L, d] matching q ", q.sizes(), ", got k ", k.sizes(), ", v ", v.sizes());
  FL_CHECK(kc.sizes() == vc.sizes() && kc.size(0) == s.B && kc.size(1) == s.Hkv && kc.size(3) == s.d,
           "fusedlab.", op, ": kc and vc must be [B, Hkv, Nc, d] matching k ", k.sizes(), ", got kc ", kc.sizes(),
           ", vc ", vc.sizes());
  FL_CHECK(s.Nc >= (s.L + l - 1) / l, "fusedlab.", op, ": kc needs Nc >= ceil(L / chunk_size) = ",
           (s.L + l - 1) / l, " slots, got ", s.Nc);
  if (qc.has_value()) {
    FL_CHECK(qc->scalar_type() == dt && qc->device() == q.device(), "fusedlab.", op,
             ": qc must have q's dtype ", dt, " and device ", q.device(), ", got ", qc->scalar_type(), " on ",
             qc->device());
    FL_CHECK(qc->dim() == 4 && qc->size(0) == s.B && qc->size(1) == s.H && qc->size(2) == s.Nc &&
                    qc->size(3) == s.d,
             "fusedlab.", op, ": qc must be [B, H, Nc, d] = [", s.B, ", ", s.H, ", ", s.Nc, ", ", s.d, "], got ",
             qc->sizes());
  }
  return s;
}

// cat_decode (CPU and CUDA): q [B, H, d]; kc, vc [B, Hkv, S, d]; k, v [B, Hkv, R, d]; n_slots, n_raw [B]
// integer fills, on q's device like every other tensor. The fills' values are checked where they live (the
// CPU kernel reads them; the CUDA kernel asserts on the device).
inline void check_cat_decode_args(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc,
                                  const at::Tensor& n_slots, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& n_raw, double scale) {
  const char* op = "fusedlab.cat_decode";
  FL_CHECK(q.dim() == 3, op, ": q must be 3-D [B, H, d], got shape ", q.sizes());
  FL_CHECK(kc.dim() == 4, op, ": kc must be 4-D [B, Hkv, S, d], got shape ", kc.sizes());
  FL_CHECK(vc.sizes() == kc.sizes(), op, ": vc must have kc's shape ", kc.sizes(), ", got ", vc.sizes());
  FL_CHECK(k.dim() == 4, op, ": k must be 4-D [B, Hkv, R, d], got shape ", k.sizes());
  FL_CHECK(v.sizes() == k.sizes(), op, ": v must have k's shape ", k.sizes(), ", got ", v.sizes());
  const int64_t B = q.size(0), H = q.size(1), d = q.size(2), Hkv = kc.size(1);
  FL_CHECK(kc.size(0) == B && kc.size(3) == d, op, ": kc must be [B, Hkv, S, d] = [", B, ", Hkv, S, ", d,
           "] to match q, got ", kc.sizes());
  FL_CHECK(k.size(0) == B && k.size(1) == Hkv && k.size(3) == d, op, ": k must be [B, Hkv, R, d] = [", B, ", ",
           Hkv, ", R, ", d, "] to match q and kc, got ", k.sizes());
  FL_CHECK(Hkv >= 1 && H % Hkv == 0, op, ": q's ", H, " heads must be a multiple of kc's ", Hkv,
           " kv heads (grouped-query attention)");
  FL_CHECK(at::isFloatingType(q.scalar_type()), op, ": q must be a floating-point tensor, got ", q.scalar_type());
  const std::pair<const char*, const at::Tensor*> data[] = {{"kc", &kc}, {"vc", &vc}, {"k", &k}, {"v", &v}};
  for (const auto& [name, t] : data) {
    FL_CHECK(t->scalar_type() == q.scalar_type(), op, ": ", name, " must have q's dtype ", q.scalar_type(),
             ", got ", t->scalar_type());
    FL_CHECK(t->device() == q.device(), op, ": ", name, " must be on ", q.device(), " like q, got ", t->device());
  }
  const std::pair<const char*, const at::Tensor*> fills[] = {{"n_slots", &n_slots}, {"n_raw", &n_raw}};
  for (const auto& [name, t] : fills) {
    FL_CHECK(t->dim() == 1 && t->size(0) == B, op, ": ", name, " must have shape [", B, "], got ", t->sizes());
    FL_CHECK(at::isIntegralType(t->scalar_type(), /*includeBool=*/false), op, ": ", name,
             " must be an integer tensor, got ", t->scalar_type());
    FL_CHECK(t->device() == q.device(), op, ": ", name, " must be on ", q.device(), " like q, got ", t->device());
  }
  FL_CHECK(std::isfinite(scale), op, ": scale must be a finite number, got ", scale);
}

// The CUDA decode kernel's own limits (after check_cat_decode_args).
inline void check_cat_decode_cuda_limits(const at::Tensor& q, const at::Tensor& kc) {
  const auto dt = q.scalar_type();
  FL_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
           "fusedlab.cat_decode: the CUDA kernel takes float32, float16 or bfloat16, got ", dt,
           " (float64 runs on the CPU kernel or the reference)");
  FL_CHECK(q.size(2) == 64 || q.size(2) == 128,
           "fusedlab.cat_decode: the CUDA kernel takes head dims 64 and 128, got ", q.size(2),
           " (the Triton kernel takes any up to 128)");
  FL_CHECK(q.size(1) <= INT32_MAX && kc.size(1) <= INT32_MAX,
           "fusedlab.cat_decode: head counts must fit in 32 bits");
}

}  // namespace fusedlab
