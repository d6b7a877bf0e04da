// The Python module fusedlab._C. Importing it loads this library, whose TORCH_LIBRARY blocks (csrc/fusedlab.cpp)
// and TORCH_LIBRARY_IMPL blocks (csrc/cpu) register the op schemas and CPU kernels under torch.ops.fusedlab.
//
// It also binds a few CPU kernels directly, for Python loops that call them once per step right after a
// model's forward: there, with every cache cold, a call through torch.ops (the dispatcher's boxed path:
// arguments parsed against the schema into a stack, then unboxed) took 50-160 us before the kernel started,
// a direct binding about 30 us. These take the same arguments as the op and run the same function; the ops
// remain the public entry points (torch.compile, opcheck, other devices). fusedlab._C.resample instead calls
// its op through the dispatcher, unboxed, so that it serves every device.
#include <torch/csrc/utils/pybind.h>

#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>
#include <tuple>

#include "fusedlab/cpu_entry_points.h"

namespace py = pybind11;

namespace {

// The op's exception types as the dispatcher's Python path raises them (ValueError for c10::ValueError, ...),
// without the C++ backtrace.
template <typename F>
auto translating_errors(F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const c10::ValueError& e) {
    throw py::value_error(e.what_without_backtrace());
  } catch (const c10::TypeError& e) {
    throw py::type_error(e.what_without_backtrace());
  } catch (const c10::IndexError& e) {
    throw py::index_error(e.what_without_backtrace());
  } catch (const c10::Error& e) {
    throw std::runtime_error(e.what_without_backtrace());
  }
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fusedlab's op schemas and C++ CPU kernels (torch.ops.fusedlab), and direct bindings of a few of them";
  m.def(
      "fk_step",
      [](at::Tensor& log_weights, const at::Tensor& rewards, at::Tensor& r_state, at::Tensor& applied,
         at::Tensor& log_norm, at::Tensor& ess_history, at::Tensor& resampled_history, int64_t row,
         const at::Tensor& state, const std::optional<at::Tensor>& uniforms, std::optional<at::Generator> generator,
         const std::string& potential, double lam, bool first, bool last, const std::string& method,
         double ess_threshold, bool raise_degenerate, bool state_owned) {
        return translating_errors([&] {
          return fusedlab::fk_step_cpu_owning(log_weights, rewards, r_state, applied, log_norm, ess_history,
                                              resampled_history, row, state, uniforms, std::move(generator),
                                              potential, lam, first, last, method, ess_threshold, raise_degenerate,
                                              state_owned);
        });
      },
      "torch.ops.fusedlab.fk_step on CPU tensors (same arguments, same function), called directly; with "
      "state_owned (the caller holds the only reference to state) the latents may be moved in place and state "
      "returned.",
      py::arg("log_weights"), py::arg("rewards"), py::arg("r_state"), py::arg("applied"), py::arg("log_norm"),
      py::arg("ess_history"), py::arg("resampled_history"), py::arg("row"), py::arg("state"), py::arg("uniforms"),
      py::arg("generator"), py::arg("potential"), py::arg("lam"), py::arg("first"), py::arg("last"),
      py::arg("method"), py::arg("ess_threshold"), py::arg("raise_degenerate"), py::arg("state_owned") = false,
      py::call_guard<py::gil_scoped_release>());
  // resample / resample_gather for fusedlab.smc.resample's eager calls that need no gradient, where the boxed
  // call from Python and the Python views of the flags cost as much as a small batch's kernel ([1, 1024] on the
  // CPU: 17 us a call in all): the op by an unboxed call below autograd, which the dispatcher routes to the
  // device's kernel (the CUDA ones live in fusedlab._C_cuda). Returned as ResampleResult's fields in its order:
  // (ancestors, log_weights_out, ess, log_norm, resampled, degenerate, state_out or None), the flags as bool
  // views of the op's status.
  m.def(
      "resample",
      [](const at::Tensor& log_weights, const std::optional<at::Tensor>& uniforms, const std::string& method,
         double ess_threshold, const std::optional<at::Tensor>& state, std::optional<at::Generator> generator,
         bool raise_degenerate) {
        return translating_errors([&] {
          using Out5 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
          using Out6 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
          static const auto resample = c10::Dispatcher::singleton().findSchemaOrThrow("fusedlab::resample", "").typed<
              Out5(const at::Tensor&, const std::optional<at::Tensor>&, c10::string_view, double,
                   std::optional<at::Generator>, bool)>();
          static const auto resample_gather =
              c10::Dispatcher::singleton().findSchemaOrThrow("fusedlab::resample_gather", "").typed<
                  Out6(const at::Tensor&, const std::optional<at::Tensor>&, c10::string_view, double,
                       const at::Tensor&, std::optional<at::Generator>, bool)>();
          const at::AutoDispatchBelowAutograd below_autograd;
          at::Tensor lw_out, anc, ess, log_norm, status;
          std::optional<at::Tensor> state_out;
          if (state.has_value()) {
            at::Tensor st;
            std::tie(lw_out, anc, ess, log_norm, status, st) = resample_gather.call(
                log_weights, uniforms, method, ess_threshold, *state, std::move(generator), raise_degenerate);
            state_out = std::move(st);
          } else {
            std::tie(lw_out, anc, ess, log_norm, status) =
                resample.call(log_weights, uniforms, method, ess_threshold, std::move(generator), raise_degenerate);
          }
          const at::Tensor flags = status.view(at::kBool);
          return std::make_tuple(anc, lw_out, ess, log_norm, flags.select(1, 0), flags.select(1, 1), state_out);
        });
      },
      "torch.ops.fusedlab.resample (state None) or resample_gather called below autograd without the boxed "
      "call; returns resample's fields in ResampleResult's order.",
      py::arg("log_weights"), py::arg("uniforms"), py::arg("method"), py::arg("ess_threshold"), py::arg("state"),
      py::arg("generator"), py::arg("raise_degenerate"), py::call_guard<py::gil_scoped_release>());
}
