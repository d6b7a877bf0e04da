"""Distributed Symile: 2 gloo processes, each with half the rows, see the global batch's negatives."""
import pytest
import torch
from gloo_ranks import needs_gloo, run_ranks

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


def _rank_body(rank, group):
    reps, perms = global_inputs()
    mine = [r[rank * N: (rank + 1) * N] for r in reps]
    return {s: loss_and_grads(mine, s, perms, group) for s in ("n", "n_squared")}


@pytest.mark.timeout(120)
@needs_gloo
def test_two_gloo_ranks_see_the_global_batch(tmp_path):
    ranks = run_ranks(_rank_body, tmp_path)
    reps, perms = global_inputs()
    for strategy in ("n", "n_squared"):
        loss, grads, scale_grad = loss_and_grads(reps, strategy, perms)
        for rank in range(2):
            r_loss, r_grads, r_scale_grad = ranks[rank][strategy]
            torch.testing.assert_close(r_loss, loss, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(r_scale_grad, scale_grad, rtol=1e-12, atol=1e-12)
            for g_rank, g_all in zip(r_grads, grads):  # world size x the global gradient of this rank's rows
                torch.testing.assert_close(g_rank, 2 * g_all[rank * N: (rank + 1) * N], rtol=1e-10, atol=1e-12)
