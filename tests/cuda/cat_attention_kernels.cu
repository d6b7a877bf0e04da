// Compile check of the torch-free cat_attention kernels: instantiates every kernel the glue launches (and the
// launchers) so `nvcc -Xptxas -v` reports registers and spills of each. Never linked into the extension.
#include "fusedlab/cat_attention.cuh"

namespace fca = fusedlab::cat::cuda;

#define FL_CAT_ATTENTION_KERNELS(T, D)                                                             \
  template __global__ void fca::attn_fwd_kernel<T, D>(const fca::AttnParams<T>);                  \
  template __global__ void fca::attn_bwd_dq_kernel<T, D>(const fca::AttnParams<T>);               \
  template __global__ void fca::attn_bwd_dkv_kernel<T, D>(const fca::AttnParams<T>);              \
  template cudaError_t fca::launch_attn_forward<T, D>(const fca::AttnParams<T>&, cudaStream_t);   \
  template cudaError_t fca::launch_attn_backward<T, D>(const fca::AttnParams<T>&, cudaStream_t);
FL_CAT_ATTENTION_KERNELS(float, 64)
FL_CAT_ATTENTION_KERNELS(float, 128)
FL_CAT_ATTENTION_KERNELS(__half, 64)
FL_CAT_ATTENTION_KERNELS(__half, 128)
FL_CAT_ATTENTION_KERNELS(__nv_bfloat16, 64)
FL_CAT_ATTENTION_KERNELS(__nv_bfloat16, 128)
