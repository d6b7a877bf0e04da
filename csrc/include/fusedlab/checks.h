// Argument checks shared by the CPU and CUDA glue files. Every message names the argument, what was
// expected and what came. (Torch-dependent: glue code only, never device headers.)
#pragma once

#include <c10/util/Exception.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <string>
#include <tuple>

#include "fusedlab/resample.h"

namespace fusedlab {

inline int32_t parse_resample_method(const std::string& method) {
  for (int32_t i = 0; i < 4; ++i)
    if (method == resample::kMethodNames[i]) return i;
  TORCH_CHECK(false, "fusedlab.resample: method must be one of '", resample::kMethodNames[0], "', '",
              resample::kMethodNames[1], "', '", resample::kMethodNames[2], "', '", resample::kMethodNames[3],
              "', got '", method, "'");
}

inline void check_resample_args(const at::Tensor& lw, const at::Tensor& u, int32_t method,
                                double ess_threshold) {
  TORCH_CHECK(lw.dim() == 2, "fusedlab.resample: log_weights must be 2-D [B, K], got shape ", lw.sizes());
  TORCH_CHECK(lw.size(1) > 0, "fusedlab.resample: log_weights must have K >= 1 particles, got shape ", lw.sizes());
  TORCH_CHECK(lw.scalar_type() == at::kFloat || lw.scalar_type() == at::kDouble,
              "fusedlab.resample: log_weights must be float32 or float64, got ", lw.scalar_type());
  TORCH_CHECK(u.scalar_type() == at::kDouble, "fusedlab.resample: uniforms must be float64, got ",
              u.scalar_type());
  const int64_t need = method == resample::kSystematic ? 1 : lw.size(1);
  TORCH_CHECK(u.dim() == 2 && u.size(0) == lw.size(0) && u.size(1) == need,
              "fusedlab.resample: uniforms must have shape [", lw.size(0), ", ", need, "] for method '",
              resample::kMethodNames[method], "', got ", u.sizes());
  TORCH_CHECK(u.device() == lw.device(), "fusedlab.resample: uniforms must be on ", lw.device(), " like log_weights, got ",
              u.device());
  TORCH_CHECK(ess_threshold >= 0.0, "fusedlab.resample: ess_threshold must be >= 0, got ", ess_threshold);
}

// `anc` is the ancestors argument (gather) or the ancestors the op will compute (resample_gather, whose
// message then names log_weights as the reference shape).
inline void check_gather_args(const at::Tensor& state, const at::Tensor& anc, const char* op = "gather") {
  const bool fused = std::string(op) != "gather" && std::string(op) != "gather_";
  const char* like = fused ? "log_weights" : "ancestors";
  TORCH_CHECK(anc.dim() == 2, "fusedlab.", op, ": ancestors must be 2-D [B, K], got shape ", anc.sizes());
  TORCH_CHECK(anc.scalar_type() == at::kLong, "fusedlab.", op, ": ancestors must be int64, got ", anc.scalar_type());
  TORCH_CHECK(state.dim() >= 2 && state.size(0) == anc.size(0) && state.size(1) == anc.size(1),
              "fusedlab.", op, ": state must have shape [B, K, ...] = [", anc.size(0), ", ", anc.size(1),
              ", ...] like ", like, ", got ", state.sizes());
  TORCH_CHECK(state.device() == anc.device(), "fusedlab.", op, ": state must be on ", anc.device(), " like ", like,
              ", got ", state.device());
}

// Bytes per particle of a state [B, K, ...] (0 when empty).
inline int64_t row_bytes_of(const at::Tensor& state, int64_t B, int64_t K) {
  return B > 0 && K > 0 ? state.numel() / (B * K) * static_cast<int64_t>(state.element_size()) : 0;
}

// One resample / resample_gather call as the CPU and CUDA glue both see it: arguments checked, inputs
// contiguous, outputs allocated on the inputs' device (an empty state_out when there is no state).
struct ResampleCall {
  int32_t method = 0;
  at::Tensor lw, u, anc, lw_out, ess, log_norm, status, st, st_out;
  int64_t row_bytes = 0;

  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> outputs() const {
    return {lw_out, anc, ess, log_norm, status, st_out};
  }
};

// `lw_out`, when given, receives the carried log-weights instead of a fresh tensor: it may be the (contiguous)
// log_weights themselves, since each group reads all its inputs before writing.
inline ResampleCall prepare_resample(const at::Tensor& log_weights, const at::Tensor& uniforms,
                                     const std::string& method_name, double ess_threshold, const at::Tensor* state,
                                     const at::Tensor* lw_out = nullptr) {
  ResampleCall c;
  c.method = parse_resample_method(method_name);
  check_resample_args(log_weights, uniforms, c.method, ess_threshold);
  c.lw = log_weights.contiguous();
  c.u = uniforms.contiguous();
  const int64_t B = c.lw.size(0), K = c.lw.size(1);
  c.anc = at::empty({B, K}, c.lw.options().dtype(at::kLong));
  c.lw_out = lw_out != nullptr ? *lw_out : at::empty_like(c.lw);
  c.ess = at::empty({B}, c.lw.options().dtype(at::kDouble));
  c.log_norm = at::empty({B}, c.lw.options().dtype(at::kDouble));
  c.status = at::empty({B}, c.lw.options().dtype(at::kByte));
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

}  // namespace fusedlab
