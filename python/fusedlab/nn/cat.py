"""``CATAttention``: a drop-in causal self-attention layer with CAT's compress-and-attend pattern.

The layer variant of CAT: each chunk of ``chunk_size`` tokens is compressed by a learned linear map of the
chunk's flattened inputs into one vector; every token attends, in one softmax, to the compressed vectors of
all earlier chunks (plus a learned start slot) and to the causal prefix of its own chunk. Keys and values of
both streams come from the layer's own projections. Rotary positions restart in every chunk (token j of a
chunk at position j + 1; compressed slots at position 0, where the rotation is the identity), as in the
paper's decoder.

Per token the cost is at most ceil(L / l) + l keys instead of L, and a decoder cache holds ceil(L / l) + l
slots per layer.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from fusedlab.ops.cat import cat_attention


def rotary(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotate pairs (x[..., :d/2], x[..., d/2:]) of x [..., T, d] by angles positions * base^(-2i/d)."""
    d = x.shape[-1]
    half = d // 2
    work = torch.float64 if x.dtype == torch.float64 else torch.float32  # float64 models rotate exactly
    freqs = base ** (-torch.arange(half, device=x.device, dtype=work) * 2 / d)
    ang = positions.to(work)[:, None] * freqs[None, :]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    a, b = x[..., :half], x[..., half: 2 * half]
    out = torch.cat([a * cos - b * sin, a * sin + b * cos], -1)
    return torch.cat([out, x[..., 2 * half:]], -1) if d % 2 else out


class CATAttention(nn.Module):
    """Causal self-attention over [B, L, dim] with chunked compression (CAT's layer variant).

    Args:
        dim: model width (input and output).
        n_heads: query heads.
        chunk_size: tokens per chunk (l >= 1); L need not be a multiple of it.
        n_kv_heads: key/value heads (grouped-query attention), default n_heads.
        head_dim: default dim // n_heads.
        rope_base: rotary base for the per-chunk positions; None disables rotary embeddings.
        bias: biases in the projections.
        backend: the cat_attention backend ("auto": Triton on CUDA tensors, the C++ kernel on the CPU).

    Example:
        >>> import torch, fusedlab
        >>> layer = fusedlab.nn.CATAttention(dim=32, n_heads=4, chunk_size=8)
        >>> x = torch.randn(2, 20, 32)
        >>> y = layer(x)
        >>> y.shape
        torch.Size([2, 20, 32])
        >>> x2 = x.clone(); x2[:, 10:] += 1.0             # change tokens 10.. only
        >>> torch.allclose(layer(x2)[:, :10], y[:, :10])    # outputs 0..9 never see them
        True
    """

    def __init__(self, dim: int, n_heads: int, chunk_size: int, n_kv_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, rope_base: Optional[float] = 10000.0, bias: bool = False,
                 backend: str = "auto"):
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if dim < 1 or n_heads < 1 or n_kv_heads < 1:
            raise ValueError(f"dim, n_heads and n_kv_heads must be >= 1, got {dim}, {n_heads}, {n_kv_heads}")
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
        head_dim = dim // n_heads if head_dim is None else head_dim
        if head_dim < 1:
            raise ValueError(f"head_dim must be >= 1, got {head_dim} (dim {dim} over {n_heads} heads)")
        self.dim, self.n_heads, self.n_kv_heads, self.head_dim = dim, n_heads, n_kv_heads, head_dim
        self.chunk_size, self.rope_base, self.backend = chunk_size, rope_base, backend
        self.wq = nn.Linear(dim, n_heads * head_dim, bias=bias)
        self.wk = nn.Linear(dim, n_kv_heads * head_dim, bias=bias)
        self.wv = nn.Linear(dim, n_kv_heads * head_dim, bias=bias)
        self.wo = nn.Linear(n_heads * head_dim, dim, bias=bias)
        # the compressor: one chunk's flattened inputs -> one vector in the model width
        self.compress = nn.Linear(chunk_size * dim, dim, bias=bias)
        self.start = nn.Parameter(torch.randn(dim) / math.sqrt(dim))  # slot 0, seen by every chunk

    def compressed_slots(self, x: torch.Tensor) -> torch.Tensor:
        """[B, ceil(L / l), dim]: the start slot, then the compression of each full chunk but the last."""
        B, L, D = x.shape
        l = self.chunk_size
        n_chunks = -(-L // l)
        full = (n_chunks - 1) * l  # chunks 0 .. n_chunks - 2 are always full
        slots = [self.start.to(x.dtype).expand(B, 1, D)]
        if full:
            slots.append(self.compress(x[:, :full].reshape(B, n_chunks - 1, l * D)))
        return torch.cat(slots, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be [B, L, {self.dim}], got shape {tuple(x.shape)}")
        B, L, _ = x.shape
        heads = lambda t, n: t.view(B, t.shape[1], n, self.head_dim).transpose(1, 2)  # noqa: E731 (B may be 0)
        q = heads(self.wq(x), self.n_heads)
        k = heads(self.wk(x), self.n_kv_heads)
        v = heads(self.wv(x), self.n_kv_heads)
        f = self.compressed_slots(x)
        kc = heads(self.wk(f), self.n_kv_heads)
        vc = heads(self.wv(f), self.n_kv_heads)
        if self.rope_base is not None:
            pos = torch.arange(L, device=x.device) % self.chunk_size + 1
            q, k = rotary(q, pos, self.rope_base), rotary(k, pos, self.rope_base)
        o = cat_attention(q, k, v, kc, vc, self.chunk_size, backend=self.backend)
        return self.wo(o.transpose(1, 2).reshape(B, L, self.n_heads * self.head_dim))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, head_dim={self.head_dim}, "
                f"chunk_size={self.chunk_size}, rope_base={self.rope_base}")
