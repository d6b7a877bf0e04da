"""Host-side helpers shared by the Triton modules: device checks, (optionally NaN-poisoned) outputs, and the
integer helpers of launch planning."""
from __future__ import annotations

import os

import torch


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for integers. triton.cdiv is the same, but as a constexpr function its host-side call costs
    about 6 us of Python: a CAT forward+backward plans with fifteen of them."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n, for n >= 1 (triton.next_power_of_2 with plain Python, as ``cdiv``)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def check_device(t: torch.Tensor, name: str) -> None:
    """Triton kernels run on CUDA tensors, or on CPU tensors under the interpreter (TRITON_INTERPRET=1)."""
    if t.is_cuda:
        return
    if t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return
    raise ValueError(f"{name} must be a CUDA tensor for the Triton backend (or a CPU tensor with "
                     f"TRITON_INTERPRET=1), got a tensor on {t.device}")


def empty(shape, dtype, device, poison: bool) -> torch.Tensor:
    """An output buffer; with ``poison`` (tests) it starts as NaN or all-ones bits, so a slot a kernel fails
    to write fails the comparison instead of passing by luck."""
    if not poison:
        return torch.empty(shape, dtype=dtype, device=device)
    if dtype.is_floating_point or dtype.is_complex:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    if dtype == torch.bool:
        return torch.ones(shape, dtype=dtype, device=device)
    return torch.full(shape, -1 if dtype.is_signed else 0xFF, dtype=dtype, device=device)
