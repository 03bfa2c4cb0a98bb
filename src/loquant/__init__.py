"""loquant: low-bit LLM weights with 16-bit corrections."""

from loquant import hf_quantizer  # noqa: F401  (registers the transformers quantizer)
from loquant.errors import LoquantError
from loquant.formats import WeightFormat
from loquant.layers import QuantLinear
from loquant.model import QuantConfig, quantize
from loquant.serialization import load, save

__all__ = ["LoquantError", "QuantConfig", "QuantLinear", "WeightFormat", "load", "quantize", "save"]
__version__ = "0.1.0"
