"""Drop-in layers built on fusedlab's ops."""
from fusedlab.nn.cat import CATAttention

__all__ = ["CATAttention"]
