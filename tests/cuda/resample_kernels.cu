// Compile check of the torch-free resample kernels: instantiates every kernel template (and the launchers)
// so `nvcc -Xptxas -v` reports registers and spills of each. Never linked into the extension.
#include "fusedlab/resample_cuda.cuh"

namespace frc = fusedlab::resample::cuda;

#define FL_RESAMPLE_KERNELS(T, SHARED)                                                            \
  template __global__ void frc::resample_kernel<T, SHARED>(frc::ResampleParams<T>);              \
  template __global__ void frc::resample_gather_kernel<T, SHARED>(frc::ResampleParams<T>, frc::RowsParams);
FL_RESAMPLE_KERNELS(float, true)
FL_RESAMPLE_KERNELS(float, false)
FL_RESAMPLE_KERNELS(double, true)
FL_RESAMPLE_KERNELS(double, false)
// the small-group blocks (kSmallThreads), shared scratch only
template __global__ void frc::resample_kernel<float, true, frc::kSmallThreads>(frc::ResampleParams<float>);
template __global__ void frc::resample_kernel<double, true, frc::kSmallThreads>(frc::ResampleParams<double>);
template __global__ void frc::resample_gather_kernel<float, true, frc::kSmallThreads>(frc::ResampleParams<float>,
                                                                                      frc::RowsParams);
template __global__ void frc::resample_gather_kernel<double, true, frc::kSmallThreads>(frc::ResampleParams<double>,
                                                                                       frc::RowsParams);

#define FL_GATHER_KERNELS(V)                                                                                 \
  template __global__ void frc::gather_kernel<V, true>(const V*, V*, const int64_t*, int64_t, int, int64_t, int, \
                                                       frc::FastDivU32);                                     \
  template __global__ void frc::gather_kernel<V, false>(const V*, V*, const int64_t*, int64_t, int, int64_t, int, \
                                                        frc::FastDivU32);                                    \
  template __global__ void frc::gather_inplace_staged_kernel<V>(V*, const int64_t*, int64_t, int, int64_t, int);
FL_GATHER_KERNELS(uint4)
FL_GATHER_KERNELS(uint2)
FL_GATHER_KERNELS(uint32_t)
FL_GATHER_KERNELS(uint16_t)
FL_GATHER_KERNELS(uint8_t)

// The host launchers, so their launch code compiles too.
template cudaError_t frc::launch_resample<float>(const frc::ResampleParams<float>&, const frc::ResamplePlan&,
                                                 const frc::RowsParams*, cudaStream_t);
template cudaError_t frc::launch_resample<double>(const frc::ResampleParams<double>&, const frc::ResamplePlan&,
                                                  const frc::RowsParams*, cudaStream_t);
void (*fl_launch_gather)(const void*, void*, const int64_t*, int64_t, int, int64_t, int, cudaStream_t) =
    frc::launch_gather;
bool (*fl_launch_gather_inplace)(void*, const int64_t*, int64_t, int, int64_t, cudaStream_t) =
    frc::launch_gather_inplace_staged;
