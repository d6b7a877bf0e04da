// Argument checks shared by the CPU and CUDA glue files. Every message names the argument, what was
// expected and what came. (Torch-dependent: glue code only, never device headers.)
#pragma once

#include <c10/util/Exception.h>
#include <ATen/core/Tensor.h>

#include <string>

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

}  // namespace fusedlab
