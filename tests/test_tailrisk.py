"""Tail-risk estimation on a first-order Markov "LM" whose harmful-event probability is exact by dynamic
programming: the event is that token 3 appears among the first L generated tokens."""
import math

import pytest
import torch

import fusedlab
from fusedlab import tailrisk

V, HARM = 4, 3


def markov(eps):
    """Transition log-probs [V, V]: from tokens 0-2 the harmful token 3 has probability eps."""
    g = torch.Generator().manual_seed(0)
    P = torch.rand(V, V, generator=g, dtype=torch.float64) + 0.5
    P[:, HARM] = 0
    P = P / P.sum(-1, keepdim=True) * (1 - eps)
    P[:, HARM] = eps
    return P.log()


def exact_probability(logP, start, L):
    P = logP.exp()
    v = torch.zeros(V, dtype=torch.float64)
    v[start] = 1.0
    safe = P[:HARM, :HARM]
    v = v[:HARM]
    for _ in range(L):
        v = v @ safe
    return 1.0 - v.sum().item()


def lm(logP):
    return lambda toks: logP[toks[:, -1]]


def harm(toks):
    return (toks[:, 1:] == HARM).any(-1).double()


def proposal(logP, boost=4.0):
    bias = torch.zeros(V, dtype=torch.float64)
    bias[HARM] = boost
    return tailrisk.LogitBiasProposal(lm(logP), bias)


def test_unbiased_and_interval_coverage():
    """200 seeded runs at P about 0.01: the estimates average to the truth (within 4.5 standard errors of
    that average) and the 95% CLT interval covers the truth in 88-99.5% of runs: for any true coverage
    between 0.94 and 0.95 (the CLT interval is a little narrow at N = 400) a binomial(200, .) count outside
    [176, 199] has probability below 1e-3. Fixed seeds make the run repeatable."""
    logP, L = markov(1e-3), 10
    truth = exact_probability(logP, 0, L)
    ests, covered = [], 0
    for seed in range(200):
        e = tailrisk.estimate_tail_probability(lm(logP), proposal(logP), harm, torch.tensor([0]), 400, L,
                                               n_bootstrap=50, generator=torch.Generator().manual_seed(seed))
        ests.append(e.estimate)
        covered += e.ci[0] <= truth <= e.ci[1]
    ests = torch.tensor(ests)
    assert abs(ests.mean().item() - truth) < 4.5 * ests.std().item() / math.sqrt(len(ests)), (ests.mean(), truth)
    assert 176 <= covered <= 199, covered


@pytest.mark.parametrize("method", ["is", "smc"])
def test_rare_event_relative_error(method):
    """P about 1e-4: with 500 samples importance sampling's median relative error over 50 seeds is under
    20% (measured about 5%, so the bound is four times the typical value; seeds fixed), while plain Monte
    Carlo with 500 samples sees no event in most runs (P(no event) = 0.95 per run)."""
    logP, L = markov(1e-5), 10
    truth = exact_probability(logP, 0, L)
    assert 5e-5 < truth < 2e-4
    errs, mc_zero = [], 0
    for seed in range(50):
        g = torch.Generator().manual_seed(seed)
        e = tailrisk.estimate_tail_probability(lm(logP), proposal(logP, 9.0), harm, torch.tensor([0]), 500, L,
                                               method=method, n_bootstrap=20, generator=g)
        errs.append(abs(e.estimate - truth) / truth)
        mc = tailrisk.estimate_tail_probability(lm(logP), None, harm, torch.tensor([0]), 500, L, method="mc",
                                                n_bootstrap=20, generator=g)
        mc_zero += mc.estimate == 0
    assert torch.tensor(errs).median() < 0.2, sorted(errs)
    assert mc_zero > 25


def test_snis_and_switch_and_eos():
    logP, L = markov(1e-2), 6
    truth = exact_probability(logP, 0, L)
    g = torch.Generator().manual_seed(3)
    e = tailrisk.estimate_tail_probability(lm(logP), proposal(logP), harm, torch.tensor([0]), 4000, L,
                                           method="snis", generator=g)
    assert abs(e.estimate - truth) < 5 * e.stderr + 1e-3
    # switching to p after 2 tokens keeps the estimator unbiased (the weights only cover the proposal part)
    e = tailrisk.estimate_tail_probability(lm(logP), proposal(logP), harm, torch.tensor([0]), 4000, L, switch=2,
                                           generator=g)
    assert abs(e.estimate - truth) < 5 * e.stderr
    # after an EOS token the sequence pads with it and the weights stop changing; with EOS = the harmful
    # token the event probability is unchanged, so the estimate must still match it
    for method in ("is", "smc"):
        e = tailrisk.estimate_tail_probability(lm(logP), proposal(logP), harm, torch.tensor([0]), 4000, L,
                                               method=method, eos_token_id=HARM, generator=g)
        assert abs(e.estimate - truth) < 5 * e.stderr + 2e-3, (method, e.estimate, truth)
    after = e.tokens[:, 1:]
    first = (after == HARM).float().argmax(-1)
    hit = (after == HARM).any(-1)
    for row, f in zip(after[hit][:20], first[hit][:20]):
        assert (row[f:] == HARM).all()


def test_support_mismatch_and_bad_input():
    logP = markov(1e-2)
    bias = torch.zeros(V, dtype=torch.float64)
    bias[0] = -math.inf  # the proposal can never emit token 0, which the target can
    bad = tailrisk.LogitBiasProposal(lm(logP), bias)
    with pytest.raises(ValueError, match="log q = -inf"):
        tailrisk.estimate_tail_probability(lm(logP), bad, harm, torch.tensor([1]), 10, 3, mixture=1.0)
    with pytest.raises(ValueError, match="method"):
        tailrisk.estimate_tail_probability(lm(logP), None, harm, torch.tensor([1]), 10, 3, method="cem")
    with pytest.raises(ValueError, match="needs a proposal"):
        tailrisk.estimate_tail_probability(lm(logP), None, harm, torch.tensor([1]), 10, 3)
    with pytest.raises(ValueError, match="mixture"):
        tailrisk.estimate_tail_probability(lm(logP), bad, harm, torch.tensor([1]), 10, 3, mixture=1.5)


def test_zero_weights_stop_tokens_and_bootstrap_options():
    """Every sample weighted 0 (the proposal only emits a token the target cannot): "is" and "smc" estimate 0,
    "snis" refuses; the support check skips rows that already stopped; several stop ids; no bootstrap."""
    logP = markov(1e-2).clone()
    logP[:, 2] = -math.inf  # the target never emits token 2
    bias = torch.zeros(V, dtype=torch.float64)
    bias[2] = 40.0  # ... the proposal does with probability 1 - 1e-17 (keeping the target's support)
    only2 = lambda toks: torch.log_softmax(bias.expand(toks.shape[0], V), -1)  # noqa: E731
    for method in ("is", "smc"):
        e = tailrisk.estimate_tail_probability(lm(logP), only2, harm, torch.tensor([0]), 8, 3, method=method,
                                               mixture=1.0, generator=torch.Generator().manual_seed(1))
        assert e.estimate == 0.0 and e.ess == 0.0 and torch.all(e.log_weights == -math.inf)
    with pytest.raises(ValueError, match="every sample has weight 0"):
        tailrisk.estimate_tail_probability(lm(logP), only2, harm, torch.tensor([0]), 8, 3, method="snis",
                                           mixture=1.0, generator=torch.Generator().manual_seed(1))
    # q = 0 only right after the stop token 0, where every row's next token is forced: no false alarm
    q = lambda toks: torch.where((toks[:, -1:] == 0) & (torch.arange(V) == 1), -math.inf, logP[toks[:, -1]])  # noqa: E731
    q_norm = lambda toks: torch.log_softmax(q(toks), -1)  # noqa: E731
    start = torch.tensor([1])
    e = tailrisk.estimate_tail_probability(lm(logP), q_norm, harm, start, 50, 4, mixture=1.0, eos_token_id=0,
                                           n_bootstrap=0, generator=torch.Generator().manual_seed(2))
    assert all(math.isnan(v) for v in e.ci_bootstrap) and math.isfinite(e.estimate)
    # several stop ids: after either one, the row only pads with the first
    e = tailrisk.estimate_tail_probability(lm(logP), proposal(logP), harm, torch.tensor([0]), 200, 6,
                                           eos_token_id=[HARM, 1], generator=torch.Generator().manual_seed(3))
    after = e.tokens[:, 1:]
    for row in after:
        stops = ((row == HARM) | (row == 1)).nonzero()
        if len(stops):
            assert (row[stops[0, 0] + 1:] == HARM).all()
    for bad, pattern in ((dict(confidence=1.5), "confidence"), (dict(n_bootstrap=-1), "n_bootstrap"),
                         (dict(eos_token_id=[]), "eos_token_id")):
        with pytest.raises(ValueError, match=pattern):
            tailrisk.estimate_tail_probability(lm(logP), proposal(logP), harm, torch.tensor([0]), 8, 2, **bad)


def test_ess_from_log_weights():
    """Weights far below float64's range still give their ESS (two equal weights: 2)."""
    assert abs(tailrisk._kish_ess(torch.tensor([-1000.0, -1000.0], dtype=torch.float64)) - 2.0) < 1e-12
    assert abs(tailrisk._kish_ess(torch.tensor([800.0, 800.0 + math.log(3)], dtype=torch.float64)) - 1.6) < 1e-12
    assert tailrisk._kish_ess(torch.full((3,), -math.inf, dtype=torch.float64)) == 0.0


def test_hf_gpt2_adapters():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=2, n_head=2)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    target = tailrisk.HFCausalLM(model)
    direction = torch.randn(16)
    steer = tailrisk.ActivationSteeringProposal(model, model.transformer.h, direction, alpha=4.0)
    toks = torch.tensor([[1, 2, 3]])
    lp, lq = target(toks), steer(toks)
    assert lp.shape == (1, 50) and torch.allclose(lp.exp().sum(), torch.tensor(1.0), atol=1e-5)
    assert not torch.allclose(lp, lq)  # the hooks changed the distribution
    assert torch.allclose(target(toks), lp)  # and were removed afterwards
    e = tailrisk.estimate_tail_probability(target, steer, lambda t: (t[:, 3:] == 7).any(-1).double(),
                                           torch.tensor([1, 2, 3]), 64, 4, generator=torch.Generator().manual_seed(0))
    assert math.isfinite(e.estimate) and e.weights.shape == (64,)
