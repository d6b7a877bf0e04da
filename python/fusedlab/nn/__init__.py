"""Drop-in layers and models built on fusedlab's ops."""
from fusedlab.nn.cat import CATAttention
from fusedlab.nn.cat_model import CATConfig, CATTransformer, chunk_size_for_step

__all__ = ["CATAttention", "CATConfig", "CATTransformer", "chunk_size_for_step"]
