"""A port of the CAT reference's interleaved-sequence decoder forward: the test oracle of
``fusedlab.nn.CATTransformer``.

The reference lays the compressed slots and the tokens out as one sequence and runs ordinary masked
attention over it: fixed variant [F_0, x_0..x_{l-1}, F_1, ..., F_{K-1}, x.., F_K] in blocks of l + 1;
adaptive variant [F_b, SEP, x_{b,0..l-1}] per chunk, ending [F_K, SEP], in blocks of l + 2. The mask is
allowed(q, k) = (q // blk == k // blk or k % blk == 0) and k <= q; rotary positions are the index within the
block. This port runs the model's own weights (and its compressor, which both layouts share) over that
sequence with a dense boolean mask, and reads the logits where the reference reads them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def interleaved_mask(n: int, blk: int, device=None) -> torch.Tensor:
    i = torch.arange(n, device=device)
    same = (i[:, None] // blk) == (i[None, :] // blk)
    return (same | (i[None, :] % blk == 0)) & (i[None, :] <= i[:, None])


def interleaved_logits(model, tokens: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Logits [B, L, vocab] (position t predicts token t + 1) of ``model`` computed the reference's way.
    L must be a multiple of chunk_size, as the reference requires."""
    c = model.config
    l = chunk_size
    B, L = tokens.shape
    if L % l:
        raise ValueError(f"the reference needs L ({L}) to be a multiple of the chunk size ({l})")
    K = L // l
    f = model.compressed_stream(tokens, l)  # [B, K + 1, D]: F_0..F_K
    x = model.wte(tokens).view(B, K, l, -1)
    if c.adaptive:
        blk = l + 2
        sep = model.sep.to(x.dtype).expand(B, K, 1, -1)
        body = torch.cat([f[:, :K, None], sep, x], 2).reshape(B, K * blk, -1)
        seq = torch.cat([body, f[:, K:], model.sep.to(x.dtype).expand(B, 1, -1)], 1)
    else:
        blk = l + 1
        body = torch.cat([f[:, :K, None], x], 2).reshape(B, K * blk, -1)
        seq = torch.cat([body, f[:, K:]], 1)
    n = seq.shape[1]
    positions = torch.arange(n, device=tokens.device) % blk
    mask = interleaved_mask(n, blk, tokens.device)
    h = seq
    for block in model.blocks:
        q, k, v = block.attn.qkv(block.attn_norm(h), positions, block.rope_base)
        g = q.shape[1] // k.shape[1]
        o = F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), attn_mask=mask)
        h = h + block.attn.out(o)
        h = h + block.mlp(block.mlp_norm(h))
    h = model.norm(h)
    t = torch.arange(L, device=tokens.device)
    starts = (t + 1) % l == 0
    if c.adaptive:  # SEP_b predicts the first token of chunk b; F outputs are never read
        rows = torch.where(starts, ((t + 1) // l) * blk + 1, (t // l) * blk + 2 + t % l)
    else:  # F_b predicts the first token of chunk b
        rows = torch.where(starts, ((t + 1) // l) * blk, (t // l) * blk + 1 + t % l)
    return model.lm_head(h[:, rows])
