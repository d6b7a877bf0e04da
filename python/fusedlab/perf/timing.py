"""Wall-clock timing with synchronization, median and 20th/80th percentiles."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.benchmark import Timer


@dataclass
class Timing:
    median_ms: float
    q20_ms: float
    q80_ms: float

    def __str__(self):
        return f"{self.median_ms:.4f} ms"


def measure(fn, min_run_time: float = 0.2) -> Timing:
    """Time ``fn()`` (CUDA work is synchronized by torch's Timer); warm up once first."""
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    # torch's Timer runs single-threaded unless told otherwise
    m = Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(min_run_time=min_run_time)
    times = sorted(m.times)
    q = lambda p: times[min(len(times) - 1, int(p * len(times)))] * 1e3  # noqa: E731
    return Timing(m.median * 1e3, q(0.2), q(0.8))


def measure_interleaved(fns: dict, min_run_time: float = 0.2, rounds: int = 3) -> dict:
    """``measure`` each of ``fns`` (name -> callable) in ``rounds`` interleaved rounds; per name the median
    of the rounds' medians (and of their percentiles). A machine whose speed drifts during a run then moves
    every implementation alike instead of whichever happened to run in its slow phase."""
    runs = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            runs[name].append(measure(fn, min_run_time))
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return {name: Timing(med([t.median_ms for t in ts]), med([t.q20_ms for t in ts]), med([t.q80_ms for t in ts]))
            for name, ts in runs.items()}


def cuda_launches(fn) -> int:
    """How many CUDA kernels one call of ``fn()`` launches (read from the profiler; 0 without a GPU)."""
    if not torch.cuda.is_available():
        return 0
    fn()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def capture(fn, warmup=3):
    """``fn`` captured in a CUDA graph after a few warm-up calls on a side stream (allocator, lazy init), as
    torch.cuda.graph asks; returns the graph, whose replay re-runs every launch without host work."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph
