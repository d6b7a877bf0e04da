"""Distributed Muon: 2 gloo processes on the CPU end with exactly the parameters of one process."""
import pytest
import torch
from gloo_ranks import needs_gloo, run_ranks

import fusedlab

SHAPES = [(32, 16)] * 3 + [(16, 48), (24, 24)]  # 3 of one shape: split unevenly over 2 ranks


def params_and_grads(steps=3):
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]
    grads = [[torch.randn(s, generator=g) for s in SHAPES] for _ in range(steps)]
    return params, grads


def train(params, grads, process_group=None):
    opt = fusedlab.optim.Muon(params, lr=0.05, ns_dtype=torch.float32, process_group=process_group)
    for gs in grads:
        for p, x in zip(params, gs):
            p.grad = x.clone()
        opt.step()
    return [p.detach() for p in params]


def _rank_body(rank, group):
    params, grads = params_and_grads()
    calls = []
    real = fusedlab.optim.muon.newton_schulz

    def counting(G, *args, **kw):
        calls.append(G.shape[0])
        return real(G, *args, **kw)

    fusedlab.optim.muon.newton_schulz = counting  # count the matrices this rank orthogonalizes
    try:
        result = train(params, grads, process_group=group)
    finally:
        fusedlab.optim.muon.newton_schulz = real
    return result, sum(calls)


@pytest.mark.timeout(120)
@needs_gloo
def test_two_gloo_ranks_match_one_process(tmp_path):
    ranks = run_ranks(_rank_body, tmp_path)
    params, grads = params_and_grads()
    single = train(params, grads)
    work = []
    for rank in range(2):
        got, matrices = ranks[rank]
        work.append(matrices)
        for a, b in zip(got, single):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # 5 matrices a step (3 of one shape, 2 single ones) over 3 steps: rank 0 takes 2 + 1 + 1, rank 1 takes
    # the rest; neither does all 5
    assert work == [12, 3], work


def train_with_a_frozen_matrix(params, grads, process_group=None):
    """As train, with weight decay, and parameter 1 never given a gradient (a frozen or unused weight)."""
    opt = fusedlab.optim.Muon(params, lr=0.05, weight_decay=0.1, ns_dtype=torch.float32, process_group=process_group)
    for gs in grads:
        for i, (p, x) in enumerate(zip(params, gs)):
            p.grad = None if i == 1 else x.clone()
        opt.step()
    return [p.detach() for p in params], any(p is params[1] for p in opt.state)


def _frozen_rank_body(rank, group):
    params, grads = params_and_grads()
    return train_with_a_frozen_matrix(params, grads, process_group=group)


@pytest.mark.timeout(120)
@needs_gloo
def test_a_parameter_without_gradient_is_left_alone_as_in_one_process(tmp_path):
    """It still rides in the sharded batch (every rank makes the same collective calls) but, as in one
    process, gets no momentum buffer, no decay and no update."""
    ranks = run_ranks(_frozen_rank_body, tmp_path)
    params, grads = params_and_grads()
    start = params[1].detach().clone()
    single, has_state = train_with_a_frozen_matrix(params, grads)
    assert not has_state and torch.equal(single[1], start)
    for rank in range(2):
        got, has_state = ranks[rank]
        assert not has_state and torch.equal(got[1], start)
        for a, b in zip(got, single):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
