"""Plain PyTorch ports of each op family's algorithm: readable, float64-capable, the test oracle."""
from fusedlab.reference import cat, newton_schulz, resample, symile  # noqa: F401
