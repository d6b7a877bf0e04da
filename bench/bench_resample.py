"""pytest-benchmark harness for resample + gather: fusedlab against the peers a user would otherwise write.

    python -m pytest bench/bench_resample.py --benchmark-json=bench/results/bench_cpu.json
    python -m pytest bench/bench_resample.py --benchmark-group-by=param:shape

On a GPU the timed functions synchronize, so wall-clock times include the kernels.
"""
import pytest
import torch

import fusedlab
from fusedlab.perf import resample as pr

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IMPLS = {
    **{f"fusedlab[{b}]": pr.ours(b) for b in (["cuda", "triton"] if DEVICE == "cuda" else ["cpu"])
       if b in fusedlab.backends()},
    **pr.PEERS,
}


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("shape", pr.SHAPES, ids=[f"{b}x{k}" for b, k in pr.SHAPES])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_resample_gather(benchmark, impl, shape):
    lw, state = pr.inputs(*shape, DEVICE)
    fn = IMPLS[impl]
    benchmark.group = f"resample+gather {shape[0]}x{shape[1]}x{pr.STATE_DIM} {DEVICE}"
    benchmark.extra_info.update(B=shape[0], K=shape[1], D=pr.STATE_DIM, device=DEVICE)

    def run():
        out = fn(lw, state)
        _sync()
        return out

    out = benchmark(run)
    assert out.shape == state.shape
