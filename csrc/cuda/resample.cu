// CUDA glue of the resample family: argument checks (same messages as the CPU kernels), allocation and
// launches on the current stream. The kernels and launch plans live in fusedlab/resample_cuda.cuh.
//
// Out-of-range ancestors passed to gather / gather_ are caught on the device (CUDA_KERNEL_ASSERT, as in
// torch's index kernels: the error surfaces at the next synchronizing call and leaves the context unusable)
// rather than by a host check, which would need a device-to-host copy and a sync on every call.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/ops/_assert_async.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <mutex>
#include <optional>
#include <string>
#include <tuple>

#define FL_KERNEL_ASSERT(cond) CUDA_KERNEL_ASSERT(cond)
#include "fusedlab/checks.h"
#include "fusedlab/cuda_glue.h"
#include "fusedlab/resample_cuda.cuh"

namespace fusedlab {
namespace {

using namespace fusedlab::resample;
namespace rc = fusedlab::resample::cuda;

void check_group_size(int64_t K, const char* op) {
  FL_CHECK(K <= rc::kMaxK, "fusedlab.", op, ": the CUDA kernels take at most 2^30 particles per group, got K = ",
           K);
}


// Reserves this call's share of the generator's Philox stream (the device's default generator when none) and
// describes it to the kernel: values outside CUDA graph capture, the graph's seed and offset slots inside it.
PhiloxArgs philox_args(const std::optional<at::Generator>& generator, int64_t uniforms_per_group,
                       const at::Device& device) {
  auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(generator,
                                                                  at::cuda::detail::getDefaultCUDAGenerator());
  // (under graph capture the kernel reads the generator's seed and offset slots: they must be this device's)
  // (a generator made as torch.Generator("cuda") has no index; like torch's ops, it is taken on log_weights'
  // device, the current one under the caller's device guard)
  const at::Device gen_device = gen->device();
  const bool same_device =
      gen_device.type() == device.type() && (!gen_device.has_index() || gen_device.index() == device.index());
  FL_CHECK(same_device, "fusedlab.resample: generator must be on ", device, " like log_weights, got ", gen_device);
  at::PhiloxCudaState st;
  {
    const std::lock_guard<std::mutex> lock(gen->mutex_);
    st = gen->philox_cuda_state(philox_increment(uniforms_per_group));
  }
  PhiloxArgs a;
  a.captured = st.captured_;
  if (st.captured_) {
    a.seed_ptr = st.seed_.ptr;
    a.offset_ptr = st.offset_.ptr;
    a.offset_intragraph = st.offset_intragraph_;
  } else {
    a.seed = st.seed_.val;
    a.offset = st.offset_.val;
  }
  return a;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> resample_impl(
    const at::Tensor& log_weights, const std::optional<at::Tensor>& uniforms, const std::string& method_name,
    double ess_threshold, const at::Tensor* state, const std::optional<at::Generator>& generator) {
  const c10::cuda::CUDAGuard guard(log_weights.device());
  const ResampleCall c = prepare_resample(log_weights, uniforms, method_name, ess_threshold, state);
  check_group_size(c.lw.size(1), "resample");
  const at::Tensor &lw = c.lw, &u = c.u, &anc = c.anc, &lw_out = c.lw_out, &ess_t = c.ess, &ln_t = c.log_norm,
                   &status = c.status, &st = c.st, &st_out = c.st_out;
  const int32_t method = c.method;
  const int64_t B = lw.size(0), K = lw.size(1), row_bytes = c.row_bytes;
  if (B == 0) return c.outputs();
  // without uniforms the kernel draws them (one launch instead of torch.rand's and its own)
  const PhiloxArgs rng = u.defined() ? PhiloxArgs{} : philox_args(generator, c.u_cols, lw.device());

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int sms = sm_count(lw.device().index());
  const rc::ResamplePlan plan = rc::plan_resample(B, K, method, sms);
  at::Tensor ws_cdf, ws_count;  // freed stream-ordered by the caching allocator
  if (!plan.shared) {
    ws_cdf = at::empty({plan.grid, K}, lw.options().dtype(at::kDouble));
    if (plan.counts) ws_count = at::empty({plan.grid, K}, lw.options().dtype(at::kInt));
  }
  const bool copy_state = row_bytes > 0;
  const bool fused = copy_state && rc::use_fused_gather(B, K, row_bytes, sms);
  AT_DISPATCH_FLOATING_TYPES(lw.scalar_type(), "fusedlab_resample_cuda", [&] {
    rc::ResampleParams<scalar_t> p;
    p.lw = lw.data_ptr<scalar_t>();
    p.u = u.defined() ? u.data_ptr<double>() : nullptr;
    p.rng = rng;
    p.lw_out = lw_out.data_ptr<scalar_t>();
    p.anc = anc.data_ptr<int64_t>();
    p.ess = ess_t.data_ptr<double>();
    p.log_norm = ln_t.data_ptr<double>();
    p.status = status.data_ptr<uint8_t>();
    p.ws_cdf = plan.shared ? nullptr : ws_cdf.data_ptr<double>();
    p.ws_count = plan.shared || !plan.counts ? nullptr : ws_count.data_ptr<int>();
    p.B = B;
    p.K = static_cast<int>(K);
    p.u_cols = static_cast<int>(c.u_cols);
    p.method = method;
    p.ess_threshold = ess_threshold;
    rc::RowsParams g{};
    if (fused) {
      const rc::RowsPlan r = rc::plan_rows(st.data_ptr(), st_out.data_ptr(), row_bytes);
      g = rc::RowsParams{st.data_ptr(), st_out.data_ptr(), r.row_vecs, r.vec_bytes, r.log2_lanes};
    }
    C10_CUDA_CHECK(rc::launch_resample<scalar_t>(p, plan, fused ? &g : nullptr, stream));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (copy_state && !fused) {
    rc::launch_gather(st.data_ptr(), st_out.data_ptr(), anc.data_ptr<int64_t>(), B, static_cast<int>(K), row_bytes,
                      sms, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return c.outputs();
}

// raise_degenerate: the status read back and a ValueError naming the dead groups; while the stream is being
// captured into a CUDA graph, where a read-back is not allowed, a device-side assertion instead (what the
// Python wrapper itself does there).
void check_no_degenerate_cuda(const at::Tensor& status) {
  const c10::cuda::CUDAGuard guard(status.device());
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None) {
    at::_assert_async(status.select(1, 1).eq(0).all(), "fusedlab.resample: a group has no finite log-weight");
    return;
  }
  check_no_degenerate(status);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> resample_cuda(
    const at::Tensor& log_weights, const std::optional<at::Tensor>& uniforms, c10::string_view method,
    double ess_threshold, std::optional<at::Generator> generator, bool raise_degenerate) {
  auto r = resample_impl(log_weights, uniforms, std::string(method), ess_threshold, nullptr, generator);
  if (raise_degenerate) check_no_degenerate_cuda(std::get<4>(r));
  return {std::get<0>(r), std::get<1>(r), std::get<2>(r), std::get<3>(r), std::get<4>(r)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> resample_gather_cuda(
    const at::Tensor& log_weights, const std::optional<at::Tensor>& uniforms, c10::string_view method,
    double ess_threshold, const at::Tensor& state, std::optional<at::Generator> generator, bool raise_degenerate) {
  auto r = resample_impl(log_weights, uniforms, std::string(method), ess_threshold, &state, generator);
  if (raise_degenerate) check_no_degenerate_cuda(std::get<4>(r));
  return r;
}

at::Tensor gather_cuda(const at::Tensor& state, const at::Tensor& ancestors) {
  check_gather_args(state, ancestors);
  check_group_size(ancestors.size(1), "gather");
  const c10::cuda::CUDAGuard guard(state.device());
  const at::Tensor st = state.contiguous();
  const at::Tensor anc = ancestors.contiguous();
  auto out = at::empty_like(st);
  const int64_t B = anc.size(0), K = anc.size(1);
  if (st.numel() == 0) return out;
  rc::launch_gather(st.data_ptr(), out.data_ptr(), anc.data_ptr<int64_t>(), B, static_cast<int>(K),
                    row_bytes_of(st, B, K), sm_count(st.device().index()), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// In place: a group that fits in shared memory is staged there (no extra global memory); larger groups are
// gathered into a temporary and copied back, since rows may be both read and overwritten.
void gather_inplace_cuda(at::Tensor& state, const at::Tensor& ancestors) {
  check_gather_args(state, ancestors, "gather_");
  FL_CHECK(state.is_contiguous(), "fusedlab.gather_: state must be contiguous for the in-place form");
  check_group_size(ancestors.size(1), "gather_");
  const c10::cuda::CUDAGuard guard(state.device());
  const at::Tensor anc = ancestors.contiguous();
  const int64_t B = anc.size(0), K = anc.size(1);
  if (state.numel() == 0) return;
  const int64_t row_bytes = row_bytes_of(state, B, K);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (rc::launch_gather_inplace_staged(state.data_ptr(), anc.data_ptr<int64_t>(), B, static_cast<int>(K), row_bytes,
                                       stream)) {
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  at::Tensor tmp = at::empty_like(state);
  rc::launch_gather(state.data_ptr(), tmp.data_ptr(), anc.data_ptr<int64_t>(), B, static_cast<int>(K), row_bytes,
                    sm_count(state.device().index()), stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  C10_CUDA_CHECK(cudaMemcpyAsync(state.data_ptr(), tmp.data_ptr(), static_cast<size_t>(B * K * row_bytes),
                                 cudaMemcpyDeviceToDevice, stream));
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedlab, CUDA, m) {
  m.impl("resample", &resample_cuda);
  m.impl("resample_gather", &resample_gather_cuda);
  m.impl("gather", &gather_cuda);
  m.impl("gather_", &gather_inplace_cuda);
}

}  // namespace fusedlab
