"""Timing and comparison harness shared by ``python -m fusedlab demo|bench``, bench/ and the GPU check.

Each op family has a module here with its peers (what a user would otherwise write), its benchmark
shapes and a correctness check against the reference; timings of ours and the peers come from the same
process and are reported as ratios.
"""
from fusedlab.perf.timing import Timing, measure

__all__ = ["Timing", "measure"]
