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


def _normal_quantile(confidence: float) -> float:
    return math.sqrt(2.0) * torch.erfinv(torch.tensor(confidence, dtype=torch.float64)).item()


def _bootstrap(values: torch.Tensor, weights: Optional[torch.Tensor], confidence: float, n: int,
               generator: Optional[torch.Generator]):
    N = values.shape[0]
    idx = torch.randint(0, N, (n, N), generator=generator)
    if weights is None:
        stats = values[idx].mean(-1)
    else:
        w = weights[idx]
        stats = (w * values[idx]).sum(-1) / w.sum(-1).clamp_min(1e-300)
    lo, hi = torch.quantile(stats, torch.tensor([(1 - confidence) / 2, (1 + confidence) / 2], dtype=stats.dtype))
    return lo.item(), hi.item()


class LogitBiasProposal:
    """q = softmax(log p + bias): a target's next-token distribution with a per-token logit bias [V]."""

    def __init__(self, target: Callable, bias: torch.Tensor):
        self.target, self.bias = target, bias

    def __call__(self, tokens):
        return torch.log_softmax(self.target(tokens).double() + self.bias.to(torch.float64), -1)


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
        try:
            logits = self.model(input_ids=tokens).logits[:, -1]
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
                              eos_token_id: Optional[int] = None, ess_threshold: float = 0.5,
                              confidence: float = 0.95, n_bootstrap: int = 1000,
                              generator: Optional[torch.Generator] = None) -> TailRiskEstimate:
    """Estimate P(harm) (or E[harm score]) of the target's continuations of one prompt.

    Args:
        target, proposal: next-token log-prob callables (proposal unused for "mc").
        harm: ``harm(tokens [N, L]) -> [N]`` scores in [0, 1] (or booleans).
        prompts: [t0] token ids (one prompt) or [1, t0].
        n_samples: N continuations, sampled in one batch.
        max_new_tokens: continuation length (after an ``eos_token_id`` the sequence only pads with it).
        mixture: b, the proposal's share of the defensive mixture b q + (1 - b) p (b < 1 keeps p's support).
        switch: token index from which the proposal is p itself (None: never).
        ess_threshold: for "smc", resample when the ESS falls below this fraction of N.
        confidence: of both intervals. generator: all randomness.

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
    prompts = torch.as_tensor(prompts)
    if prompts.dim() == 2 and prompts.shape[0] == 1:
        prompts = prompts[0]
    if prompts.dim() != 1 or prompts.dtype.is_floating_point:
        raise ValueError(f"prompts must be one prompt of token ids, shape [t0] or [1, t0], got {tuple(prompts.shape)}")
    N = n_samples
    tokens = prompts.unsqueeze(0).expand(N, -1).clone()
    dev = prompts.device
    done = torch.zeros(N, dtype=torch.bool, device=dev)
    log_w = torch.zeros(N, dtype=torch.float64, device=dev)
    log_z = 0.0  # smc: accumulated log mean weight
    use_q = method != "mc"
    log_b, log_1mb = (math.log(mixture) if mixture > 0 else -math.inf), (math.log1p(-mixture) if mixture < 1 else -math.inf)
    for t in range(max_new_tokens):
        lp = target(tokens).to(torch.float64)
        if use_q and (switch is None or t < switch) and mixture > 0:
            lq = proposal(tokens).to(torch.float64)
            if mixture == 1.0:
                bad = torch.isinf(lq) & (lq < 0) & (lp > -math.inf)
                if bool(bad.any()):
                    raise ValueError("proposal: log q = -inf for a token the target can emit (p > 0) while "
                                     "mixture = 1: importance weights would be biased; use mixture < 1")
            lmix = torch.logaddexp(log_b + lq, log_1mb + lp)
            use_prop = torch.rand(N, generator=generator, dtype=torch.float64).to(dev) < mixture
            probs = torch.where(use_prop.unsqueeze(-1), lq, lp).exp()
        else:
            lmix, probs = lp, lp.exp()
        nxt = torch.multinomial(probs.float().clamp_min(0), 1, generator=generator).squeeze(-1)
        if eos_token_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
        inc = (lp - lmix).gather(1, nxt.unsqueeze(-1)).squeeze(-1)
        log_w = log_w + torch.where(done, torch.zeros_like(inc), inc)
        tokens = torch.cat([tokens, nxt.unsqueeze(-1)], -1)
        if eos_token_id is not None:
            done = done | (nxt == eos_token_id)
        if method == "smc" and t < max_new_tokens - 1:
            r = resample(log_w.unsqueeze(0), "systematic", ess_threshold, generator=generator)
            log_z += r.log_norm.item()
            log_w = r.log_weights[0]
            if bool(r.resampled[0]):
                anc = r.ancestors
                tokens = gather(tokens.unsqueeze(0), anc)[0]
                done = gather(done.unsqueeze(0), anc)[0]
    scores = torch.as_tensor(harm(tokens)).to(torch.float64)
    if scores.shape != (N,):
        raise ValueError(f"harm must return one score per sample, shape [{N}], got {tuple(scores.shape)}")
    z = _normal_quantile(confidence)
    if method == "snis":
        w = torch.softmax(log_w, 0) * N
        est = (w * scores).sum().item() / N
        var = ((w * (scores - est)) ** 2).mean().item()  # delta method
        weights, boot_w, vals = w, w, scores
    else:
        w = torch.exp(log_w + log_z)
        vals = w * scores
        est = vals.mean().item()
        var = vals.var().item()
        weights, boot_w = w, None
    se = math.sqrt(var / N)
    ess = (w.sum() ** 2 / (w * w).sum()).item() if w.sum() > 0 else 0.0
    ci_b = _bootstrap(vals, boot_w, confidence, n_bootstrap, generator)
    return TailRiskEstimate(est, se, (est - z * se, est + z * se), ci_b, ess, weights, scores, tokens)
