// Compile check of the torch-free newton_schulz kernels: instantiates every kernel template the glue launches
// (and the launchers) so `nvcc -Xptxas -v` reports registers and spills of each. Never linked into the extension.
#include "fusedlab/newton_schulz_cuda.cuh"

namespace fnc = fusedlab::newton_schulz::cuda;

#define FL_NS_SCALE(TIN, TOUT)                                                                                    \
  template void fnc::launch_prologue<TIN, TOUT>(const TIN*, TOUT*, double*, const fnc::ProloguePlan&, double, \
                                                double, cudaStream_t);
#define FL_NS_SCALE_FROM(TIN) \
  FL_NS_SCALE(TIN, fnc::bf16_t) FL_NS_SCALE(TIN, fnc::fp16_t) FL_NS_SCALE(TIN, float) FL_NS_SCALE(TIN, double)
FL_NS_SCALE_FROM(fnc::bf16_t)
FL_NS_SCALE_FROM(fnc::fp16_t)
FL_NS_SCALE_FROM(float)
FL_NS_SCALE_FROM(double)

void (*fl_launch_transpose)(const void*, void*, int64_t, int64_t, int64_t, int, int, cudaStream_t) =
    fnc::launch_transpose;
