// CPU kernels that the Python module (csrc/python_module.cpp) also binds directly, besides their registration
// as torch.ops.fusedlab ops: the same functions, reached without the dispatcher's boxed call from Python.
// (Torch-dependent: glue code only.)
#pragma once

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace fusedlab {

// One Feynman-Kac steering step (schema and semantics: fk_step in csrc/fusedlab.cpp).
std::tuple<at::Tensor, at::Tensor, at::Tensor> fk_step_cpu(
    at::Tensor& log_weights, const at::Tensor& rewards, at::Tensor& r_state, at::Tensor& applied, at::Tensor& log_norm,
    at::Tensor& ess_history, at::Tensor& resampled_history, int64_t row, const at::Tensor& state,
    const std::optional<at::Tensor>& uniforms_opt, std::optional<at::Generator> generator,
    c10::string_view potential, double lam, bool first, bool last, c10::string_view method, double ess_threshold,
    bool raise_degenerate);

// The same step for a caller that holds the only reference to `state` (state_owned): the latents are then
// moved in place and returned as `state` itself when no other tensor shares its storage or needs it for a
// gradient. fusedlab._C.fk_step binds it for FK's CPU loop, which checks its own reference count.
std::tuple<at::Tensor, at::Tensor, at::Tensor> fk_step_cpu_owning(
    at::Tensor& log_weights, const at::Tensor& rewards, at::Tensor& r_state, at::Tensor& applied, at::Tensor& log_norm,
    at::Tensor& ess_history, at::Tensor& resampled_history, int64_t row, const at::Tensor& state,
    const std::optional<at::Tensor>& uniforms_opt, std::optional<at::Generator> generator,
    c10::string_view potential, double lam, bool first, bool last, c10::string_view method, double ess_threshold,
    bool raise_degenerate, bool state_owned);

}  // namespace fusedlab
