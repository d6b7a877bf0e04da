"""Distributed Symile: 2 gloo processes, each with half the rows, see the global batch's negatives."""
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fusedlab

N, D, M = 6, 8, 3  # 6 rows per rank, 12 in the global batch


def global_inputs():
    g = torch.Generator().manual_seed(0)
    reps = [torch.nn.functional.normalize(torch.randn(2 * N, D, generator=g, dtype=torch.float64), dim=1)
            for _ in range(M)]
    perms = torch.stack([torch.stack([torch.randperm(2 * N, generator=g) for _ in range(M - 1)]) for _ in range(M)])
    return reps, perms


def loss_and_grads(reps, strategy, perms, group=None):
    leaves = [r.clone().requires_grad_() for r in reps]
    scale = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
    loss_fn = fusedlab.symile.SymileLoss(strategy, process_group=group)
    loss = loss_fn(leaves, scale, permutations=perms if strategy == "n" else None)
    loss.backward()
    return loss.detach(), [r.grad for r in leaves], scale.grad


def _worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        reps, perms = global_inputs()
        mine = [r[rank * N: (rank + 1) * N] for r in reps]
        out = {s: loss_and_grads(mine, s, perms, dist.group.WORLD) for s in ("n", "n_squared")}
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
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
def test_two_gloo_ranks_see_the_global_batch(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    reps, perms = global_inputs()
    for strategy in ("n", "n_squared"):
        loss, grads, scale_grad = loss_and_grads(reps, strategy, perms)
        for rank in range(2):
            r_loss, r_grads, r_scale_grad = torch.load(tmp_path / f"rank{rank}.pt")[strategy]
            torch.testing.assert_close(r_loss, loss, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(r_scale_grad, scale_grad, rtol=1e-12, atol=1e-12)
            for g_rank, g_all in zip(r_grads, grads):  # world size x the global gradient of this rank's rows
                torch.testing.assert_close(g_rank, 2 * g_all[rank * N: (rank + 1) * N], rtol=1e-10, atol=1e-12)
