"""The Compress & Attend Transformer (CAT): ``CATConfig``, ``CATTransformer``.

A bidirectional compressor turns each chunk of l tokens into one vector; the decoder reads two streams, the
compressed slots F_0..F_K (F_0 a learned start / chunk-size conditioning slot, F_b the compression of chunk
b - 1) and the raw tokens, with ``fusedlab.ops.cat_attention``: a raw token sees F_0..F_b and the causal
prefix of its own chunk, F_c sees F_0..F_c. This is the reference's interleaved sequence
[F_0, x_0..x_{l-1}, F_1, ...] and mask, computed without interleaving (``fusedlab.reference.cat_model``
holds a port of the interleaved forward, the test oracle).

Fixed variant (one chunk size): F_b (b >= 1) predicts the first token of chunk b, token x_t predicts x_{t+1}
within its chunk, F_K predicts the token after the sequence. Adaptive variant (several chunk sizes, chosen
per call): each chunk's raw stream starts with a learned separator SEP, which predicts the chunk's first
token; F_0 is a per-chunk-size conditioning vector, the compressor sees a chunk-size token, and its output
projection, stored for the largest chunk size, is resized for smaller ones. Rotary positions restart in every
chunk (F at 0; tokens at 1.., or SEP at 1 and tokens at 2.. adaptive).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fusedlab.nn.cat import rotary
from fusedlab.ops.cat import cat_attention, cat_decode


@dataclass
class CATConfig:
    """Sizes of a CAT model. ``chunk_sizes``: one entry for the fixed variant, several (powers of two) for
    the adaptive one, which is trained on all of them and told the chunk size at each call."""

    vocab_size: int = 256
    dim: int = 128  #: decoder width D_d, also the compressed vector's size
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: Optional[int] = None
    compressor_dim: int = 64
    compressor_layers: int = 1
    compressor_heads: int = 2
    chunk_sizes: Sequence[int] = (8,)
    max_seq_len: int = 1024
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    qk_norm: bool = False
    multiple_of: int = 32  #: SwiGLU hidden width: 8/3 of the width, rounded up to this multiple
    backend: str = "auto"  #: the cat_attention backend
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.chunk_sizes = tuple(int(c) for c in self.chunk_sizes)
        if not self.chunk_sizes or any(c < 1 for c in self.chunk_sizes):
            raise ValueError(f"chunk_sizes must be a non-empty list of ints >= 1, got {self.chunk_sizes}")
        if self.adaptive and any(c & (c - 1) for c in self.chunk_sizes):
            raise ValueError(f"the adaptive variant takes powers of two as chunk_sizes, got {self.chunk_sizes}")
        heads_kv = self.n_kv_heads or self.n_heads
        if self.dim % self.n_heads or self.n_heads % heads_kv:
            raise ValueError(f"dim ({self.dim}) must divide into n_heads ({self.n_heads}), a multiple of "
                             f"n_kv_heads ({heads_kv})")
        if self.compressor_dim % self.compressor_heads:
            raise ValueError(f"compressor_dim ({self.compressor_dim}) must divide into compressor_heads "
                             f"({self.compressor_heads})")

    @property
    def adaptive(self) -> bool:
        return len(self.chunk_sizes) > 1

    @property
    def max_chunks(self) -> int:
        return -(-self.max_seq_len // min(self.chunk_sizes))


def chunk_size_for_step(config: CATConfig, step: int) -> int:
    """The training schedule of the reference: chunk sizes taken round-robin, one per micro-step."""
    return config.chunk_sizes[step % len(config.chunk_sizes)]


def _hidden(dim: int, multiple_of: int) -> int:
    h = int(8 * dim / 3)
    return -(-h // multiple_of) * multiple_of


class SwiGLU(nn.Module):
    def __init__(self, dim: int, multiple_of: int):
        super().__init__()
        hidden = _hidden(dim, multiple_of)
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class _Projections(nn.Module):
    """q, k, v projections into heads (with optional QK-norm) and the output projection."""

    def __init__(self, dim, n_heads, n_kv_heads, qk_norm, eps):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=eps) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=eps) if qk_norm else nn.Identity()

    def qkv(self, x, positions: Optional[torch.Tensor], base: float):
        """x [B, T, dim] -> q [B, H, T, hd], k, v [B, Hkv, T, hd]; rotary at ``positions`` when given."""
        B, T, _ = x.shape
        q = self.q_norm(self.wq(x).view(B, T, self.n_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if positions is not None:
            q, k = rotary(q, positions, base), rotary(k, positions, base)
        return q, k, v

    def out(self, o):
        B, H, T, hd = o.shape
        return self.wo(o.transpose(1, 2).reshape(B, T, H * hd))


class CompressorBlock(nn.Module):
    """Pre-norm bidirectional transformer block over one chunk's tokens."""

    def __init__(self, c: CATConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(c.compressor_dim, eps=c.norm_eps)
        self.attn = _Projections(c.compressor_dim, c.compressor_heads, c.compressor_heads, c.qk_norm, c.norm_eps)
        self.mlp_norm = nn.RMSNorm(c.compressor_dim, eps=c.norm_eps)
        self.mlp = SwiGLU(c.compressor_dim, c.multiple_of)
        self.rope_base = c.rope_base

    def forward(self, x):
        pos = torch.arange(x.shape[1], device=x.device)
        q, k, v = self.attn.qkv(self.attn_norm(x), pos, self.rope_base)
        x = x + self.attn.out(F.scaled_dot_product_attention(q, k, v))
        return x + self.mlp(self.mlp_norm(x))


class Compressor(nn.Module):
    """Chunks of l tokens -> one vector each: [special tokens, chunk tokens] through bidirectional blocks,
    the special tokens dropped, the l outputs flattened and projected to the decoder width."""

    def __init__(self, c: CATConfig):
        super().__init__()
        self.config = c
        self.wte = nn.Embedding(c.vocab_size, c.compressor_dim)
        self.pos_tokens = nn.Embedding(c.max_chunks + 1, c.compressor_dim)  # chunk-index tokens
        self.size_tokens = nn.Embedding(len(c.chunk_sizes), c.compressor_dim) if c.adaptive else None
        self.blocks = nn.ModuleList(CompressorBlock(c) for _ in range(c.compressor_layers))
        self.norm = nn.RMSNorm(c.compressor_dim, eps=c.norm_eps)
        self.proj = nn.Linear(max(c.chunk_sizes) * c.compressor_dim, c.dim, bias=False)

    def proj_weight(self, l: int) -> torch.Tensor:
        """The output projection for chunk size l: stored for the largest size, bilinearly resized over its
        flattened input axis for smaller ones (FlexiViT-style, as the reference does)."""
        w = self.proj.weight
        width = l * self.config.compressor_dim
        if width == w.shape[1]:
            return w
        return F.interpolate(w[None, None], size=(w.shape[0], width), mode="bilinear", align_corners=False)[0, 0]

    def forward(self, tokens: torch.Tensor, l: int, first_chunk: int = 0) -> torch.Tensor:
        """tokens [B, K * l] (whole chunks, the first at chunk index ``first_chunk``) -> [B, K, dim]."""
        c = self.config
        B, n = tokens.shape
        K = n // l
        x = self.wte(tokens.reshape(B * K, l))  # reshape: a sliced batch (tokens[:, :-1]) is not contiguous
        index = torch.arange(first_chunk, first_chunk + K, device=tokens.device)
        special = [self.pos_tokens(index).repeat(B, 1)[:, None]]
        if self.size_tokens is not None:
            idx = torch.full((B * K,), c.chunk_sizes.index(l), device=tokens.device)
            special.insert(0, self.size_tokens(idx)[:, None])
        x = torch.cat(special + [x], 1)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)[:, len(special):]
        return F.linear(x.reshape(B, K, l * c.compressor_dim), self.proj_weight(l))


class DecoderBlock(nn.Module):
    """Pre-norm block over both streams: CAT attention, then a SwiGLU MLP on every position."""

    def __init__(self, c: CATConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(c.dim, eps=c.norm_eps)
        self.attn = _Projections(c.dim, c.n_heads, c.n_kv_heads or c.n_heads, c.qk_norm, c.norm_eps)
        self.mlp_norm = nn.RMSNorm(c.dim, eps=c.norm_eps)
        self.mlp = SwiGLU(c.dim, c.multiple_of)
        self.rope_base, self.backend = c.rope_base, c.backend

    def forward(self, x, f, raw_positions, block: int, capture: Optional[list] = None):
        """x [B, T, dim] raw stream (chunks of ``block``), f [B, Nc, dim] compressed stream. With
        ``capture``, appends this layer's (k, v, kc, vc) (a generation prefill)."""
        q, k, v = self.attn.qkv(self.attn_norm(x), raw_positions, self.rope_base)
        qc, kc, vc = self.attn.qkv(self.attn_norm(f), None, self.rope_base)  # slots sit at position 0
        if capture is not None:
            capture.append((k, v, kc, vc))
        o, oc = cat_attention(q, k, v, kc, vc, block, qc=qc, backend=self.backend)
        x = x + self.attn.out(o)
        f = f + self.attn.out(oc)
        return x + self.mlp(self.mlp_norm(x)), f + self.mlp(self.mlp_norm(f))

    def step(self, h, position: Optional[int], cache: "_LayerCache", as_slot: bool):
        """One new position of one stream (h [B, 1, dim]) against this layer's cache: a raw token
        (rotary at ``position``) or a compressed slot (position 0, sees the slots only). Its k, v join the
        cache first."""
        # a fill on the device, not torch.tensor([position], device=...): that copies from host memory and, on
        # a GPU, synchronizes with it once per layer and token
        pos = None if position is None else torch.full((1,), position, dtype=torch.int64, device=h.device)
        q, k, v = self.attn.qkv(self.attn_norm(h), pos, self.rope_base)
        if as_slot:
            cache.add_slot(k, v)
            n_raw = torch.zeros_like(cache.n_raw)
        else:
            cache.add_raw(k, v)
            n_raw = cache.n_raw
        o = cat_decode(q[:, :, 0], cache.kc, cache.vc, cache.n_slots, cache.k, cache.v, n_raw,
                       backend=_decode_backend(self.backend, h.device))
        h = h + self.attn.out(o[:, :, None])
        return h + self.mlp(self.mlp_norm(h))


def _decode_backend(backend: str, device: torch.device) -> str:
    """The model's cat_attention backend for cat_decode where it applies to the device ("cpu" names the C++
    kernel, which only takes CPU tensors; "auto" otherwise)."""
    return "auto" if backend == "cpu" and device.type != "cpu" else backend


class _LayerCache:
    """One decoder layer's generation cache: compressed slots [B, Hkv, S, hd] and the current chunk's raw
    keys [B, Hkv, block, hd], with their fill counts."""

    def __init__(self, B, Hkv, hd, slots, block, dtype, device):
        self.kc = torch.zeros(B, Hkv, slots, hd, dtype=dtype, device=device)
        self.vc = torch.zeros_like(self.kc)
        self.k = torch.zeros(B, Hkv, block, hd, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.n_slots = torch.zeros(B, dtype=torch.int64, device=device)
        self.n_raw = torch.zeros(B, dtype=torch.int64, device=device)
        self.filled_slots = self.filled_raw = 0

    def add_slot(self, k, v):
        i = self.filled_slots
        self.kc[:, :, i: i + k.shape[2]] = k
        self.vc[:, :, i: i + k.shape[2]] = v
        self.filled_slots += k.shape[2]
        self.n_slots.fill_(self.filled_slots)
        self.filled_raw = 0  # a new slot starts a new chunk
        self.n_raw.zero_()

    def add_raw(self, k, v):
        i = self.filled_raw
        self.k[:, :, i: i + k.shape[2]] = k
        self.v[:, :, i: i + k.shape[2]] = v
        self.filled_raw += k.shape[2]
        self.n_raw.fill_(self.filled_raw)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.kc, self.vc, self.k, self.v))


class CATTransformer(nn.Module):
    """The CAT language model. ``forward(tokens, chunk_size)`` returns logits [B, L, vocab] where position t
    predicts token t + 1 (as a dense causal LM's would), for any L up to ``max_seq_len``.

    Example:
        >>> import torch, fusedlab
        >>> cfg = fusedlab.nn.CATConfig(vocab_size=50, dim=32, n_heads=2, compressor_dim=16,
        ...                             compressor_heads=2, chunk_sizes=(4, 8), max_seq_len=64)
        >>> model = fusedlab.nn.CATTransformer(cfg)
        >>> tokens = torch.randint(0, 50, (2, 30))
        >>> model(tokens, chunk_size=4).shape
        torch.Size([2, 30, 50])
        >>> loss = model.loss(tokens, chunk_size=8)   # next-token cross-entropy, any trained chunk size
    """

    def __init__(self, config: CATConfig):
        super().__init__()
        c = self.config = config
        self.compressor = Compressor(c)
        self.wte = nn.Embedding(c.vocab_size, c.dim)
        # F_0: one start slot (fixed), or one per chunk size (adaptive: the chunk-size conditioning)
        self.start = nn.Parameter(torch.randn(len(c.chunk_sizes), c.dim) * 0.02)
        self.sep = nn.Parameter(torch.randn(c.dim) * 0.02) if c.adaptive else None
        self.blocks = nn.ModuleList(DecoderBlock(c) for _ in range(c.n_layers))
        self.norm = nn.RMSNorm(c.dim, eps=c.norm_eps)
        self.lm_head = nn.Linear(c.dim, c.vocab_size, bias=False)
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def _chunk_size(self, chunk_size):
        """The chunk size of a call: one of config.chunk_sizes, the largest when None."""
        c = self.config
        if chunk_size is None:
            return max(c.chunk_sizes)
        if isinstance(chunk_size, bool) or not hasattr(chunk_size, "__index__") or \
                operator.index(chunk_size) not in c.chunk_sizes:
            raise ValueError(f"chunk_size must be one of the trained sizes {c.chunk_sizes}, got {chunk_size!r}")
        return operator.index(chunk_size)

    def compressed_stream(self, tokens: torch.Tensor, l: int) -> torch.Tensor:
        """[B, K + 1, dim]: F_0 (start / conditioning) and the compression of every chunk (the last one
        zero-padded when L is not a multiple of l: no raw token sees it then)."""
        B, L = tokens.shape
        K = -(-L // l)
        padded = F.pad(tokens, (0, K * l - L)) if K * l != L else tokens
        f = self.compressor(padded, l)
        start = self.start[self.config.chunk_sizes.index(l)].to(f.dtype).expand(B, 1, -1)
        return torch.cat([start, f], 1)

    def raw_stream(self, tokens: torch.Tensor, l: int):
        """Embedded raw stream, its chunk length (l, or l + 1 with SEP first) and rotary positions, and the
        index in it of the position whose output predicts each next token."""
        B, L = tokens.shape
        x = self.wte(tokens)
        t = torch.arange(L, device=tokens.device)
        if not self.config.adaptive:
            return x, l, t % l + 1
        K = -(-L // l)
        block = l + 1
        n = K * block + 1  # every chunk gets its SEP, plus the final SEP after F_K
        stream = x.new_empty(B, n, x.shape[-1])
        sep_idx = torch.arange(K + 1, device=tokens.device) * block
        tok_idx = (t // l) * block + 1 + t % l
        stream[:, sep_idx] = self.sep.to(x.dtype)
        stream[:, tok_idx] = x
        if K * l != L:  # a partial last chunk: the stream ends with its last token (no final SEP)
            n = (K - 1) * block + 1 + (L - (K - 1) * l)
            stream = stream[:, :n]
        positions = torch.arange(n, device=tokens.device) % block + 1
        return stream, block, positions

    def _predicting_rows(self, L: int, l: int, device):
        """For each t, (stream, row) whose output predicts token t + 1: 0 = raw, 1 = compressed."""
        t = torch.arange(L, device=device)
        nxt = t + 1
        starts = nxt % l == 0
        if self.config.adaptive:
            raw_row = torch.where(starts, (nxt // l) * (l + 1), (t // l) * (l + 1) + 1 + t % l)
            return torch.zeros_like(starts), raw_row
        return starts, torch.where(starts, nxt // l, t)

    def hidden(self, tokens: torch.Tensor, chunk_size: Optional[int] = None):
        """Final-norm hidden states of both streams and the chunk size used."""
        l = self._chunk_size(chunk_size)
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [B, L], got shape {tuple(tokens.shape)}")
        if tokens.shape[1] > self.config.max_seq_len:
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds max_seq_len {self.config.max_seq_len}")
        f = self.compressed_stream(tokens, l)
        x, block, pos = self.raw_stream(tokens, l)
        for blk in self.blocks:
            x, f = blk(x, f, pos, block)
        return self.norm(x), self.norm(f), l

    def forward(self, tokens: torch.Tensor, chunk_size: Optional[int] = None) -> torch.Tensor:
        """Next-token logits [B, L, vocab] of tokens [B, L] at ``chunk_size`` (one of config.chunk_sizes; None:
        the largest; an adaptive model is trained on each, e.g. with chunk_size_for_step)."""
        x, f, l = self.hidden(tokens, chunk_size)
        return self._logits_from(x, f, tokens.shape[1], l)

    def loss(self, tokens: torch.Tensor, chunk_size: Optional[int] = None) -> torch.Tensor:
        """Mean next-token cross-entropy over positions 0..L-2 (L >= 2), at ``chunk_size`` as in forward."""
        if tokens.dim() != 2 or tokens.shape[1] < 2:
            raise ValueError(f"loss needs tokens [B, L] with L >= 2 (a next token to predict), got shape "
                             f"{tuple(tokens.shape)}")
        logits = self(tokens, chunk_size)[:, :-1]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))

    # ------------------------------------------------------------------------------------------ generation

    def cache_slots(self, L: int, chunk_size: Optional[int] = None) -> int:
        """Key/value slots per layer a generation cache holds for L tokens: ceil(L / l) + 1 compressed slots
        plus one chunk of raw keys (l, or l + 1 with the separator), against L for a dense decoder."""
        l = self._chunk_size(chunk_size)
        return -(-L // l) + 1 + l + (1 if self.config.adaptive else 0)

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int, chunk_size: Optional[int] = None,
                 temperature: float = 0.0, top_k: Optional[int] = None,
                 generator: Optional[torch.Generator] = None, return_stats: bool = False):
        """Continue ``prompt`` [B, P] (P >= 1) by ``max_new_tokens`` tokens with a compressed cache.

        The prompt runs as one parallel forward that fills each layer's cache with the compressed slots of
        its complete chunks and the raw keys of its current chunk. Then each new token attends to that cache
        (``fusedlab.ops.cat_decode``); when a chunk completes it is compressed once, and its slot runs through
        the decoder to join every layer's cache. ``temperature`` 0 is greedy (equal, token for token, to
        recomputing the full forward at every step); otherwise sampling from softmax(logits / temperature),
        restricted to the ``top_k`` most likely tokens when given, with ``generator``.

        Returns the tokens [B, P + max_new_tokens], and with ``return_stats`` a dict with the cache's bytes
        and slots per layer and those of a dense decoder's cache at the final length.
        """
        c = self.config
        l = self._chunk_size(chunk_size)
        if prompt.dim() != 2 or prompt.shape[1] < 1:
            raise ValueError(f"prompt must be [B, P] with P >= 1, got shape {tuple(prompt.shape)}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        total = prompt.shape[1] + max_new_tokens
        if total > c.max_seq_len:
            raise ValueError(f"prompt + max_new_tokens = {total} exceeds max_seq_len {c.max_seq_len}")
        if not temperature >= 0 or (top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)
                                                          or top_k < 1)):
            raise ValueError(f"temperature must be >= 0 and top_k an int >= 1, got {temperature!r}, {top_k!r}")
        B, P = prompt.shape
        block = l + 1 if c.adaptive else l
        dtype = self.wte.weight.dtype
        hkv, hd = c.n_kv_heads or c.n_heads, c.dim // c.n_heads
        caches = [_LayerCache(B, hkv, hd, -(-total // l) + 1, block, dtype, prompt.device) for _ in self.blocks]

        # prefill: one parallel forward, keeping each layer's keys of the complete chunks' slots and of the
        # current chunk's raw positions
        captured = []
        f = self.compressed_stream(prompt, l)
        x, _, pos = self.raw_stream(prompt, l)
        for blk in self.blocks:
            layer = []
            x, f = blk(x, f, pos, block, capture=layer)
            captured.append(layer[0])
        b = P // l  # the chunk the next token belongs to; slots F_0..F_b are complete
        raw_start = b * block
        for cache, (k, v, kc, vc) in zip(caches, captured):
            cache.add_slot(kc[:, :, : b + 1], vc[:, :, : b + 1])
            if k.shape[2] > raw_start:
                cache.add_raw(k[:, :, raw_start:], v[:, :, raw_start:])
        # only the last prompt position's logits: all P of them would hold P x vocab floats for nothing
        logits = self.lm_head(self._predicting_hidden(self.norm(x), self.norm(f), P, l)[:, -1])

        out = [prompt]
        n = P
        for _ in range(max_new_tokens):
            nxt = self._pick(logits, temperature, top_k, generator)
            out.append(nxt[:, None].to(prompt.dtype))
            n += 1
            if n == total:
                break
            if n % l:  # a token inside its chunk: one raw step
                h = self.wte(nxt)[:, None]
                pos_in_block = (n - 1) % l + (2 if c.adaptive else 1)
                for blk, cache in zip(self.blocks, caches):
                    h = blk.step(h, pos_in_block, cache, as_slot=False)
                logits = self.lm_head(self.norm(h))[:, 0]
                continue
            # the chunk is complete. Its last token's output and key are never used (nothing after it in its
            # chunk), so it takes no decoder step: the chunk is compressed once and its slot runs through the
            # decoder into every layer's cache. The slot's output predicts the next token (fixed variant),
            # or the next chunk's separator is fed and predicts it (adaptive variant).
            g = self.compressor(torch.cat(out, 1)[:, n - l: n], l, first_chunk=n // l - 1)
            for blk, cache in zip(self.blocks, caches):
                g = blk.step(g, None, cache, as_slot=True)
            h = g
            if c.adaptive:
                h = self.sep.to(dtype).expand(B, 1, -1)
                for blk, cache in zip(self.blocks, caches):
                    h = blk.step(h, 1, cache, as_slot=False)
            logits = self.lm_head(self.norm(h))[:, 0]
        tokens = torch.cat(out, 1)
        if not return_stats:
            return tokens
        slots = caches[0].kc.shape[2] + block
        per_slot = 2 * B * hkv * hd * self.wte.weight.element_size() * len(caches)  # k and v, every layer
        stats = dict(cache_bytes=sum(cache.nbytes() for cache in caches), cache_slots_per_layer=slots,
                     dense_slots_per_layer=total, dense_cache_bytes=per_slot * total)
        return tokens, stats

    def _logits_from(self, x, f, L, l):
        return self.lm_head(self._predicting_hidden(x, f, L, l))

    def _predicting_hidden(self, x, f, L, l):
        """[B, L, dim]: the hidden state that predicts each of the L tokens (a raw position's or a slot's)."""
        from_f, rows = self._predicting_rows(L, l, x.device)
        # under CPU autocast the two streams can come out in different dtypes (the compressed one from an
        # autocast linear, the raw one with the float32 embedding added)
        h = x.new_empty(x.shape[0], L, x.shape[2], dtype=torch.promote_types(x.dtype, f.dtype))
        h[:, from_f] = f[:, rows[from_f]].to(h.dtype)
        h[:, ~from_f] = x[:, rows[~from_f]].to(h.dtype)
        return h

    @staticmethod
    def _pick(logits, temperature, top_k, generator):
        if temperature == 0:
            return logits.argmax(-1)
        logits = logits.float() / temperature
        if top_k is not None:
            kth = logits.topk(min(top_k, logits.shape[-1]), -1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, -float("inf"))
        return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)[:, 0]
