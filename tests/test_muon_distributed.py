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
