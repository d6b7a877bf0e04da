"""Run a test body on several gloo processes on the CPU and collect what each rank returns."""
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

needs_gloo = pytest.mark.skipif(not dist.is_available() or sys.platform == "win32",
                                reason="needs torch.distributed with gloo")


def _rank(rank, world, out_dir, body):
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out_dir, 'init')}", rank=rank,
                            world_size=world)
    try:
        torch.save(body(rank, dist.group.WORLD), os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    # Results are saved: leave without tearing gloo down. Its teardown can abort a rank on a loaded machine
    # ("terminate called without an active exception") after all the work is done; a failure before this
    # point still fails the test (no result file, or a non-zero exit).
    os._exit(0)


def run_ranks(body, tmp_path, world=2):
    """``body(rank, group)`` on ``world`` processes (a module-level function, so it pickles); returns the
    list of what each rank returned."""
    mp.spawn(_rank, args=(world, str(tmp_path), body), nprocs=world, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
