"""Build of fusedlab: `fusedlab._C` (op schemas + C++ CPU kernels) always, `fusedlab._C_cuda` (CUDA kernels)
when the installed torch has CUDA and nvcc is found.

Environment: FUSEDLAB_NO_CUDA=1 skips the CUDA extension; TORCH_CUDA_ARCH_LIST picks the GPU targets
(default "8.0;9.0a;9.0+PTX": sm_80, sm_90a, and PTX that newer GPUs compile); MAX_JOBS bounds parallel compile jobs; FUSEDLAB_DEBUG=1 keeps debug info.
"""
import glob
import os

from setuptools import setup

from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
INCLUDE = [os.path.join(ROOT, "csrc", "include")]
DEBUG = os.environ.get("FUSEDLAB_DEBUG") == "1"
# -fno-trapping-math: lets GCC if-convert (hence vectorize) loops with NaN tests; results are unchanged
# (nothing here reads floating-point exception flags).
CXX_FLAGS = ["-O3", "-fvisibility=hidden", "-fno-trapping-math"] + (["-g"] if DEBUG else ["-g0"])


def rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def want_cuda():
    if os.environ.get("FUSEDLAB_NO_CUDA") == "1":
        return False
    import torch

    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


# _C binds a few kernels with pybind11 and torch's Python types (csrc/python_module.cpp), so it is built for
# the running Python's full API; _C_cuda uses none of it and stays on the stable ABI.
ext_modules = [
    cpp_extension.CppExtension(
        "fusedlab._C",
        rel(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")) + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp"))),
        include_dirs=INCLUDE,
        extra_compile_args={"cxx": CXX_FLAGS + ["-fopenmp"]},
        extra_link_args=["-fopenmp"],
    )
]

if want_cuda():
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a;9.0+PTX")  # PTX of plain 9.0 runs on newer GPUs
    ext_modules.append(
        cpp_extension.CUDAExtension(
            "fusedlab._C_cuda",
            rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")) + glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp"))),
            include_dirs=INCLUDE,
            extra_compile_args={
                "cxx": CXX_FLAGS,
                "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"],
            },
            py_limited_api=True,
        )
    )

setup(
    package_dir={"fusedlab": "python/fusedlab", "fusedlab.triton_kernels": "triton_kernels"},
    packages=[
        "fusedlab",
        "fusedlab.nn",
        "fusedlab.ops",
        "fusedlab.optim",
        "fusedlab.perf",
        "fusedlab.reference",
        "fusedlab.smc",
        "fusedlab.triton_kernels",
    ],
    ext_modules=ext_modules,
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(no_python_abi_suffix=False)},
)
