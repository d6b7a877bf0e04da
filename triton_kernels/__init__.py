"""Triton kernels of fusedlab, installed as the subpackage ``fusedlab.triton_kernels``.

One module per op family; each is reached through the op wrappers in ``fusedlab.ops`` (backend="triton").
"""
