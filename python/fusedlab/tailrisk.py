"""Tail-risk estimation for language models: the probability (or expected harm score) that a target LM's
sampled continuation is harmful, by sequential importance sampling with an "unsafe" proposal.

Models are callables ``lm(tokens [N, t]) -> next-token log-probs [N, V]`` (``HFCausalLM`` wraps a Hugging
Face causal LM; ``LogitBiasProposal`` and ``ActivationSteeringProposal`` build proposals from a target).
Per token, up to the switch index, the proposal is the defensive mixture b q + (1 - b) p (sampled by first
drawing the component), afterwards p itself; the log-weight accumulates log p - log q_mix in float32 or
wider. ``harm(tokens [N, L]) -> scores [N]`` (1/0 for an event, or a graded score).

Estimators (``method=``): "mc" (plain Monte Carlo from p), "is" (unbiased importance sampling: mean of
w s), "snis" (self-normalized: sum w s / sum w), "smc" (importance sampling that resamples the particles
with fusedlab.smc.resample when their ESS drops, keeping the log-normalizer whose exponential is unbiased).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from fusedlab.ops.resample import gather, resample

METHODS = ("mc", "is", "snis", "smc")

__all__ = ["METHODS", "ActivationSteeringProposal", "HFCausalLM", "LogitBiasProposal", "TailRiskEstimate",
           "estimate_tail_probability"]


@dataclass
class TailRiskEstimate:
    estimate: float  #: the estimated probability / expected harm score
    stderr: float  #: its standard error (CLT; delta method for snis; for smc it ignores the correlation
    #: resampling introduces between particles, so it is optimistic)
    ci: tuple  #: (low, high) CLT interval at the requested confidence
    ci_bootstrap: tuple  #: (low, high) percentile bootstrap interval
    ess: float  #: effective sample size of the final weights
    weights: torch.Tensor  #: [N] importance weights (1 for mc; for smc including the normalizer)
    scores: torch.Tensor  #: [N] harm scores of the samples
    tokens: torch.Tensor  #: [N, prompt + new tokens] the samples
    log_weights: Optional[torch.Tensor] = None  #: [N] log of ``weights`` (exact where the weights underflow)


def _normal_quantile(confidence: float) -> float:
    return math.sqrt(2.0) * torch.erfinv(torch.tensor(confidence, dtype=torch.float64)).item()


#: resampled index rows drawn at once by the bootstrap (bounds its memory whatever N and n_bootstrap)
_BOOTSTRAP_CHUNK_ELEMS = 1 << 22


def _bootstrap(values: torch.Tensor, weights: Optional[torch.Tensor], confidence: float, n: int,
               generator: Optional[torch.Generator]):
    """Percentile bootstrap interval of the mean (or of the weighted mean), on the values' device; (nan, nan)
    for n = 0."""
    if n == 0:
        return math.nan, math.nan
    N, dev = values.shape[0], values.device
    rows = max(1, _BOOTSTRAP_CHUNK_ELEMS // N)
    stats = []
    for start in range(0, n, rows):
        idx = torch.randint(0, N, (min(rows, n - start), N), generator=generator, device=dev)
        if weights is None:
            stats.append(values[idx].mean(-1))
        else:
            w = weights[idx]
            stats.append((w * values[idx]).sum(-1) / w.sum(-1).clamp_min(1e-300))
    stats = torch.cat(stats)
    levels = torch.tensor([(1 - confidence) / 2, (1 + confidence) / 2], dtype=stats.dtype, device=dev)
    lo, hi = torch.quantile(stats, levels)
    return lo.item(), hi.item()


def _kish_ess(log_w: torch.Tensor) -> float:
    """(sum w)^2 / sum w^2 from log-weights (no underflow or overflow); 0 when every weight is 0."""
    if not bool(torch.isfinite(log_w).any()):
        return 0.0
    return math.exp(2 * torch.logsumexp(log_w, 0).item() - torch.logsumexp(2 * log_w, 0).item())


class LogitBiasProposal:
    """q = softmax(log p + bias): a target's next-token distribution with a per-token logit bias [V]."""

    def __init__(self, target: Callable, bias: torch.Tensor):
        self.target, self.bias = target, bias

    def __call__(self, tokens):
        lp = self.target(tokens).double()
        return torch.log_softmax(lp + self.bias.to(lp.device, torch.float64), -1)


class HFCausalLM:
    """A Hugging Face causal LM as ``lm(tokens [N, t]) -> next-token log-probs [N, V]`` (float32 or wider).

    Recomputes the prefix each call (simple and exact; fine for the short continuations tail-risk studies
    sample). ``hooks`` are (module, forward_hook) pairs active during the call (activation steering).
    """

    def __init__(self, model, hooks: Sequence = ()):
        self.model, self.hooks = model, list(hooks)

    @torch.no_grad()
    def __call__(self, tokens):
        handles = [m.register_forward_hook(h) for m, h in self.hooks]
        device = next(self.model.parameters()).device
        try:
            logits = self.model(input_ids=tokens.to(device)).logits[:, -1]
        finally:
            for h in handles:
                h.remove()
        return torch.log_softmax(logits.float(), -1)


class ActivationSteeringProposal(HFCausalLM):
    """A proposal from the target model itself with its residual stream steered at the given blocks.

    mode "add": h <- h + alpha d; mode "ablate": h <- h - alpha (h . d) d, with d the unit direction
    (partial removal of, e.g., a refusal direction). ``blocks`` are the modules whose output is the residual
    stream (for GPT-2: ``model.transformer.h``).
    """

    def __init__(self, model, blocks, direction: torch.Tensor, alpha: float = 1.0, mode: str = "add"):
        if mode not in ("add", "ablate"):
            raise ValueError(f"mode must be 'add' or 'ablate', got {mode!r}")
        d = direction / direction.norm()

        def hook(module, inputs, output):
            h = output[0] if isinstance(output, tuple) else output
            dd = d.to(h)  # the model's dtype and device
            h = h + alpha * dd if mode == "add" else h - alpha * (h @ dd).unsqueeze(-1) * dd
            return (h, *output[1:]) if isinstance(output, tuple) else h

        super().__init__(model, [(b, hook) for b in blocks])


def estimate_tail_probability(target: Callable, proposal: Optional[Callable], harm: Callable,
                              prompts: torch.Tensor, n_samples: int, max_new_tokens: int, *,
                              method: str = "is", mixture: float = 0.5, switch: Optional[int] = None,
                              eos_token_id=None, ess_threshold: float = 0.5,
                              confidence: float = 0.95, n_bootstrap: int = 1000,
                              generator: Optional[torch.Generator] = None) -> TailRiskEstimate:
    """Estimate P(harm) (or E[harm score]) of the target's continuations of one prompt.

    Args:
        target, proposal: next-token log-prob callables (proposal unused for "mc").
        harm: ``harm(tokens [N, L]) -> [N]`` scores in [0, 1] (or booleans).
        prompts: [t0] token ids (one prompt) or [1, t0].
        n_samples: N continuations, sampled in one batch.
        max_new_tokens: continuation length.
        eos_token_id: a stop token id or several (chat models stop on more than one); after one the sequence
            only pads with the first.
        mixture: b, the proposal's share of the defensive mixture b q + (1 - b) p (b < 1 keeps p's support).
        switch: token index from which the proposal is p itself (None: never).
        ess_threshold: for "smc", resample when the ESS falls below this fraction of N.
        confidence: of both intervals, in (0, 1). n_bootstrap: bootstrap resamples (0: no bootstrap
            interval, (nan, nan)).
        generator: all randomness; on the prompt's device (a CUDA generator for CUDA prompts). Models may
            live on another device: their log-probs and the harm scores are moved to the prompt's.

    A proposal that puts all its mass (mixture = 1) on tokens the target cannot emit gives weight 0 to every
    sample: "is" and "smc" then return the estimate 0 (a valid draw of an unbiased estimator), "snis" raises.

    Example (a two-token "LM" whose second token is rare):
        >>> import torch, fusedlab
        >>> p = torch.log(torch.tensor([0.999, 0.001], dtype=torch.float64))
        >>> target = lambda toks: p.expand(toks.shape[0], 2)
        >>> proposal = fusedlab.tailrisk.LogitBiasProposal(target, torch.tensor([0.0, 6.0]))
        >>> harm = lambda toks: (toks[:, -1] == 1).double()
        >>> est = fusedlab.tailrisk.estimate_tail_probability(target, proposal, harm, torch.tensor([0]), 2000, 1,
        ...                                                   generator=torch.Generator().manual_seed(0))
        >>> abs(est.estimate - 0.001) < 3 * est.stderr
        True
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method != "mc" and proposal is None:
        raise ValueError(f"method={method!r} needs a proposal")
    if not 0.0 <= mixture <= 1.0:
        raise ValueError(f"mixture must lie in [0, 1], got {mixture!r}")
    if not isinstance(n_samples, int) or n_samples < 2:
        raise ValueError(f"n_samples must be an int >= 2, got {n_samples!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if not (isinstance(confidence, (int, float)) and 0 < confidence < 1):
        raise ValueError(f"confidence must lie in (0, 1), got {confidence!r}")
    if isinstance(n_bootstrap, bool) or not isinstance(n_bootstrap, int) or n_bootstrap < 0:
        raise ValueError(f"n_bootstrap must be an int >= 0, got {n_bootstrap!r}")
    eos = None
    if eos_token_id is not None:
        eos = torch.as_tensor(eos_token_id).reshape(-1)
        if eos.numel() == 0 or eos.dtype.is_floating_point:
            raise ValueError(f"eos_token_id must be a token id or a sequence of them, got {eos_token_id!r}")
    prompts = torch.as_tensor(prompts)
    if prompts.dim() == 2 and prompts.shape[0] == 1:
        prompts = prompts[0]
    if prompts.dim() != 1 or prompts.dtype.is_floating_point:
        raise ValueError(f"prompts must be one prompt of token ids, shape [t0] or [1, t0], got {tuple(prompts.shape)}")
    N = n_samples
    tokens = prompts.unsqueeze(0).expand(N, -1).clone()
    dev = prompts.device
    if eos is not None:
        eos = eos.to(dev, tokens.dtype)
    done = torch.zeros(N, dtype=torch.bool, device=dev)
    log_w = torch.zeros(N, dtype=torch.float64, device=dev)
    log_z = 0.0  # smc: accumulated log mean weight
    use_q = method != "mc"
    log_b, log_1mb = (math.log(mixture) if mixture > 0 else -math.inf), (math.log1p(-mixture) if mixture < 1 else -math.inf)
    for t in range(max_new_tokens):
        lp = target(tokens).to(dev, torch.float64)
        if use_q and (switch is None or t < switch) and mixture > 0:
            lq = proposal(tokens).to(dev, torch.float64)
            if mixture == 1.0:  # rows that already stopped have a forced next token and no weight
                bad = torch.isinf(lq) & (lq < 0) & (lp > -math.inf) & ~done.unsqueeze(-1)
                if bool(bad.any()):
                    raise ValueError("proposal: log q = -inf for a token the target can emit (p > 0) while "
                                     "mixture = 1: importance weights would be biased; use mixture < 1")
            use_prop = torch.rand(N, generator=generator, dtype=torch.float64, device=dev) < mixture
            probs = torch.where(use_prop.unsqueeze(-1), lq, lp).exp()
        else:
            lq, probs = None, lp.exp()
        # float64 draws: float32 sampling on a GPU under-samples tokens below ~1e-7 of the top one, which the
        # weights (exact float64 densities) would not correct
        nxt = torch.multinomial(probs.clamp_min(0), 1, generator=generator).squeeze(-1)
        if eos is not None:
            nxt = torch.where(done, eos[0].expand_as(nxt), nxt)
        if lq is not None:  # log p - log(b q + (1 - b) p), at the drawn token only (not the whole vocabulary)
            tok = nxt.unsqueeze(-1)
            lp_t, lq_t = lp.gather(1, tok).squeeze(-1), lq.gather(1, tok).squeeze(-1)
            inc = lp_t - torch.logaddexp(log_b + lq_t, log_1mb + lp_t)
            log_w = log_w + torch.where(done, torch.zeros_like(inc), inc)
        tokens = torch.cat([tokens, nxt.unsqueeze(-1)], -1)
        if eos is not None:
            done = done | torch.isin(nxt, eos)
        if method == "smc" and t < max_new_tokens - 1 and log_z > -math.inf:
            # every weight 0 (the proposal drew only tokens the target cannot emit): the normalizer is 0 and
            # so is the estimate; the particles are kept as they are
            r = resample(log_w.unsqueeze(0), "systematic", ess_threshold, generator=generator,
                         on_degenerate="uniform")
            if bool(r.degenerate[0]):
                log_z = -math.inf
                continue
            log_z += r.log_norm.item()
            log_w = r.log_weights[0]
            if bool(r.resampled[0]):
                anc = r.ancestors
                tokens = gather(tokens.unsqueeze(0), anc)[0]
                done = gather(done.unsqueeze(0), anc)[0]
    # checked once, here, rather than over the whole vocabulary at every step: a NaN log-prob at a drawn token
    # shows up in the weights
    if bool(torch.isnan(log_w).any()):
        raise ValueError("target or proposal returned NaN log-probs (overflowing half-precision logits?)")
    scores = torch.as_tensor(harm(tokens)).to(dev, torch.float64)
    if scores.shape != (N,):
        raise ValueError(f"harm must return one score per sample, shape [{N}], got {tuple(scores.shape)}")
    z = _normal_quantile(confidence)
    if method == "snis":
        if not bool(torch.isfinite(log_w).any()):
            raise ValueError("snis: every sample has weight 0 (the proposal drew only tokens the target cannot "
                             "emit): the self-normalized estimate is undefined; use mixture < 1 or method='is'")
        w = torch.softmax(log_w, 0) * N
        est = (w * scores).sum().item() / N
        var = ((w * (scores - est)) ** 2).mean().item()  # delta method
        weights, boot_w, vals, log_weights = w, w, scores, log_w
    else:
        log_weights = log_w + log_z
        w = torch.exp(log_weights)
        vals = w * scores
        est = vals.mean().item()
        var = vals.var().item()
        weights, boot_w = w, None
    se = math.sqrt(var / N)
    ess = _kish_ess(log_weights)
    ci_b = _bootstrap(vals, boot_w, confidence, n_bootstrap, generator)
    return TailRiskEstimate(est, se, (est - z * se, est + z * se), ci_b, ess, weights, scores, tokens, log_weights)
