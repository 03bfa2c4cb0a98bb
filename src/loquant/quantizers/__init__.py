"""Base quantizers beyond round-to-nearest: callables (W, fmt) -> stored tensors."""

from loquant.quantizers.gptq import gptq_quantize, gptq_quantizer
from loquant.quantizers.hqq import hqq_quantize

__all__ = ["gptq_quantize", "gptq_quantizer", "hqq_quantize"]
