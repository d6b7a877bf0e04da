// Compile check of the torch-free symile kernels: instantiates every kernel the glue launches (and the
// launchers) so `nvcc -Xptxas -v` reports registers and spills of each. Never linked into the extension.
#include "fusedlab/symile_cuda.cuh"

namespace fsc = fusedlab::symile::cuda;

#define FL_SYMILE_KERNELS(T)                                                                              \
  template __global__ void fsc::symile_fwd_kernel<T>(const fsc::SymileParams<T>);                        \
  template __global__ void fsc::symile_bwd_kernel<T>(const fsc::SymileParams<T>);                        \
  template cudaError_t fsc::launch_symile_forward<T>(const fsc::SymileParams<T>&, int64_t, cudaStream_t); \
  template cudaError_t fsc::launch_symile_backward<T>(const fsc::SymileParams<T>&, int64_t, cudaStream_t); \
  template __global__ void fsc::mip_kernel<T>(const fsc::MipParams<T>);                                  \
  template cudaError_t fsc::launch_mip<T>(const fsc::MipParams<T>&, cudaStream_t);
FL_SYMILE_KERNELS(float)
FL_SYMILE_KERNELS(__half)
FL_SYMILE_KERNELS(__nv_bfloat16)
