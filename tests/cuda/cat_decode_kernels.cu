// Compile check of the torch-free cat_decode kernels: instantiates every kernel the glue launches (and the
// launchers) so `nvcc -Xptxas -v` reports registers and spills of each. Never linked into the extension.
#include "fusedlab/cat_decode.cuh"

namespace fcd = fusedlab::cat::cuda;

#define FL_CAT_DECODE_KERNELS(T, D)                                                                         \
  template __global__ void fcd::decode_split_kernel<T, D, 1>(const fcd::DecodeParams<T>);                  \
  template __global__ void fcd::decode_split_kernel<T, D, 2>(const fcd::DecodeParams<T>);                  \
  template __global__ void fcd::decode_split_kernel<T, D, 4>(const fcd::DecodeParams<T>);                  \
  template __global__ void fcd::decode_combine_kernel<T, D>(const float*, const float*, T*, int64_t, int); \
  template cudaError_t fcd::launch_decode<T, D>(const fcd::DecodeParams<T>&, const fcd::DecodePlan&, cudaStream_t);
FL_CAT_DECODE_KERNELS(float, 64)
FL_CAT_DECODE_KERNELS(float, 128)
FL_CAT_DECODE_KERNELS(__half, 64)
FL_CAT_DECODE_KERNELS(__half, 128)
FL_CAT_DECODE_KERNELS(__nv_bfloat16, 64)
FL_CAT_DECODE_KERNELS(__nv_bfloat16, 128)
