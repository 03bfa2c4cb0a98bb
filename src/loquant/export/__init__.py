"""Write loquant models in formats other tools load (see compressed_tensors.py)."""

from loquant.export.compressed_tensors import export_compressed_tensors

__all__ = ["export_compressed_tensors"]
