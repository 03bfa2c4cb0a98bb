"""Number formats: quantize / dequantize / pack, pure tensor functions (CPU and GPU)."""

from loquant.formats.bitpack import pack, packed_nbytes, unpack
from loquant.formats.codec import dequantize_weight, fake_quantize, quantize_weight
from loquant.formats.normalfloat import nf_codebook
from loquant.formats.spec import FORMAT_BITS, WeightFormat

__all__ = [
    "FORMAT_BITS",
    "WeightFormat",
    "dequantize_weight",
    "fake_quantize",
    "nf_codebook",
    "pack",
    "packed_nbytes",
    "quantize_weight",
    "unpack",
]
