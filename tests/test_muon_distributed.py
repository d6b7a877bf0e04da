"""Distributed Muon: 2 gloo processes on the CPU end with exactly the parameters of one process."""
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

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


def _worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        params, grads = params_and_grads()
        calls = []
        real = fusedlab.optim.muon.newton_schulz

        def counting(G, *args, **kw):
            calls.append(G.shape[0])
            return real(G, *args, **kw)

        fusedlab.optim.muon.newton_schulz = counting  # count the matrices this rank orthogonalizes
        try:
            result = train(params, grads, process_group=dist.group.WORLD)
        finally:
            fusedlab.optim.muon.newton_schulz = real
        torch.save((result, sum(calls)), os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    # Results are saved: leave without tearing gloo down. Its teardown can abort a rank on a loaded machine
    # ("terminate called without an active exception") after all the work is done; a failure before this
    # point still fails the test (no result file, or a non-zero exit).
    os._exit(0)


@pytest.mark.timeout(120)
@pytest.mark.skipif(not dist.is_available() or sys.platform == "win32", reason="needs torch.distributed with gloo")
def test_two_gloo_ranks_match_one_process(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    params, grads = params_and_grads()
    single = train(params, grads)
    work = []
    for rank in range(2):
        got, matrices = torch.load(tmp_path / f"rank{rank}.pt")
        work.append(matrices)
        for a, b in zip(got, single):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # 5 matrices a step (3 of one shape, 2 single ones) over 3 steps: rank 0 takes 2 + 1 + 1, rank 1 takes
    # the rest; neither does all 5
    assert work == [12, 3], work
