"""Model surgery: one generic pass that swaps a model's linear layers for QuantLinear."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from loquant.errors import LoquantError
from loquant.formats import WeightFormat
from loquant.layers import QuantLinear

QUANT_METHOD = "loquant"
FORMAT_VERSION = 1

try:  # GPT-2 style layers store the weight as (in, out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a hard dependency
    Conv1D = ()


@dataclass
class QuantConfig:
    """What `quantize` does to a model.

    The default targets every linear layer inside the model's repeated blocks (a module path
    with a numeric index, e.g. `model.layers.3.mlp.up_proj`), which leaves embeddings, the
    output head and poolers in float. `include` / `exclude` are glob patterns on module names;
    `overrides` maps a pattern to format fields (later patterns win), e.g.
    `{"*.down_proj": {"bits": 8}}`.
    """

    format: str = "int"
    bits: int = 4
    group_size: int = 64
    double_quant: bool = False
    include: list[str] | None = None
    exclude: list[str] = field(default_factory=list)
    overrides: dict[str, dict] = field(default_factory=dict)
    source_model: str | None = None

    def __post_init__(self) -> None:
        self.base_format()  # validate early, before any layer is touched
        for pattern in self.overrides:
            self.format_for(pattern)

    def base_format(self) -> WeightFormat:
        return WeightFormat(self.format, self.bits, self.group_size, self.double_quant)

    def format_for(self, name: str) -> WeightFormat:
        fields = self.base_format().to_dict()
        for pattern, override in self.overrides.items():
            if fnmatch.fnmatchcase(name, pattern):
                fields.update(override)
        return WeightFormat.from_dict(fields)

    def selects(self, name: str) -> bool:
        if self.include is None:
            chosen = any(part.isdigit() for part in name.split("."))
        else:
            chosen = any(fnmatch.fnmatchcase(name, p) for p in self.include)
        return chosen and not any(fnmatch.fnmatchcase(name, p) for p in self.exclude)


def linear_weight(module: nn.Module) -> torch.Tensor | None:
    """The (out x in) weight of a linear-like module, or None for anything else."""
    if isinstance(module, nn.Linear):
        return module.weight
    if Conv1D and isinstance(module, Conv1D):
        return module.weight.t()
    return None


def quant_layers(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def layer_record(layer: QuantLinear) -> dict:
    return {
        **layer.fmt.to_dict(),
        "in_features": layer.in_features,
        "out_features": layer.out_features,
        "rank": layer.rank,
        "bias": layer.bias is not None,
    }


def update_quantization_config(model: nn.Module, source_model: str | None = None) -> dict:
    """Record every QuantLinear's format in model.config.quantization_config."""
    previous = getattr(model.config, "quantization_config", None)
    previous = previous if isinstance(previous, dict) and previous.get("quant_method") == QUANT_METHOD else {}
    qc = {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "source_model": source_model or previous.get("source_model"),
        "layers": {name: layer_record(m) for name, m in sorted(quant_layers(model).items())},
    }
    model.config.quantization_config = qc
    return qc


def source_name(model: nn.Module) -> str | None:
    return getattr(model, "loquant_source", None) or getattr(model, "name_or_path", None) or None


def quantize(model: nn.Module, config: QuantConfig | None = None, *, progress: bool = True) -> nn.Module:
    """Replace the targeted linear layers of `model` in place by QuantLinear; returns it.

    Every target is quantized before any is swapped in, so a bad weight leaves the model as it
    was.
    """
    config = config or QuantConfig()
    targets = []
    for name, module in model.named_modules():
        weight = linear_weight(module)
        if weight is None or not config.selects(name):
            continue
        if not torch.isfinite(weight).all():
            raise LoquantError(f"layer {name}: weight contains NaN or Inf")
        targets.append((name, module, weight, config.format_for(name)))
    if not targets:
        raise LoquantError("no linear layer matched: check include/exclude patterns")
    replacements = []
    for name, module, weight, fmt in tqdm(targets, desc="quantize", disable=not progress, unit="layer"):
        try:
            replacements.append((name, QuantLinear.from_weight(weight.detach(), module.bias, fmt)))
        except LoquantError as err:
            raise LoquantError(f"layer {name}: {err}") from None
    for name, layer in replacements:
        model.set_submodule(name, layer)
    update_quantization_config(model, config.source_model or source_name(model))
    return model
