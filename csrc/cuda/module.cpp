// The Python module of the CUDA kernels: importing fusedlab._C_cuda loads the library, whose
// TORCH_LIBRARY_IMPL(fusedlab, CUDA, ...) blocks (one glue file per family) register the CUDA kernels.
#include <Python.h>

PyMODINIT_FUNC PyInit__C_cuda(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
