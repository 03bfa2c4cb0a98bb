"""transformers integration: `AutoModelForCausalLM.from_pretrained(loquant_dir)` after `import loquant`.

loquant registers its quantization config and an HfQuantizer under the method name "loquant"
(transformers' `register_quantization_config` / `register_quantizer`). Before the weights load,
the quantizer swaps every layer recorded in quantization_config["layers"] for an empty
QuantLinear of the recorded format; transformers then fills the packed buffers, scales and
corrections from model.safetensors (each keeps its stored dtype: the placeholders' buffers set
it). `save_pretrained` writes the same tensors and config back. Quantizing goes through
`loquant.quantize` (it needs calibration for most corrections), so this path only loads.
"""

from __future__ import annotations

import copy

from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from loquant.layers import QuantLinear
from loquant.model import QUANT_METHOD


@register_quantization_config(QUANT_METHOD)
class LoquantConfig(QuantizationConfigMixin):
    """quantization_config of a loquant folder: per-layer formats, recipe, source, checksums."""

    def __init__(self, layers: dict | None = None, **kwargs) -> None:
        self.quant_method = QUANT_METHOD
        self.layers = layers or {}
        for key, value in kwargs.items():
            setattr(self, key, value)

    def to_dict(self) -> dict:
        return copy.deepcopy(self.__dict__)


@register_quantizer(QUANT_METHOD)
class LoquantHfQuantizer(HfQuantizer):
    """Loads loquant folders (pre-quantized); quantize with `loquant quantize` or `loquant.quantize`."""

    def validate_environment(self, *args, **kwargs) -> None:
        if not self.pre_quantized:
            raise ValueError("loquant quantizes with `loquant quantize` / `loquant.quantize`, not from_pretrained")

    def _process_model_before_weight_loading(self, model, **kwargs):
        dtype = kwargs.get("dtype") or model.dtype
        for name, rec in self.quantization_config.layers.items():
            device = model.get_submodule(name).weight.device
            model.set_submodule(name, QuantLinear.from_record(rec, dtype, device=device))
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        model.loquant_source = getattr(self.quantization_config, "source_model", None)
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True  # adapters on top, through PEFT (loquant.adapters.lora)
