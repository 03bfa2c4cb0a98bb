"""Put adapters on a loquant model, save and reload them, and merge them into a 16-bit model.

Two adapter kinds:
- `lora`: PEFT's LoRA on every QuantLinear (optionally with IEC), saved as a PEFT adapter
  (adapter_config.json + adapter_model.safetensors) with IEC folded in.
- `wht`: QWHA's Walsh-Hadamard adapter, saved by loquant (wht_config.json +
  wht_model.safetensors: per layer the coefficient rows, columns and values). PEFT has no
  Walsh-Hadamard adapter type, so PEFT cannot load this one; loquant.load and merge can.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from loquant.adapters.lora import LoraQuantLinear, lora_config, lora_layers, peft_config
from loquant.adapters.loraquant import PackedLoraLinear
from loquant.adapters.wht import WHTAdapter
from loquant.errors import LoquantError
from loquant.layers import QuantLinear
from loquant.model import hf_model, quant_layers

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
WHT_CONFIG = "wht_config.json"
WHT_WEIGHTS = "wht_model.safetensors"


class WHTLinear(nn.Module):
    """A frozen QuantLinear plus a Walsh-Hadamard adapter: y = base(x) + fwht(x)·Fᵀ."""

    def __init__(self, base_layer: QuantLinear, adapter: WHTAdapter) -> None:
        super().__init__()
        self.base_layer, self.wht = base_layer, adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        return y + self.wht(x).to(y.dtype)

    def get_delta_weight(self) -> torch.Tensor:
        return self.wht.delta_weight().float()


@contextlib.contextmanager
def _quiet_peft():
    """PEFT warns about any layer type it does not know, even one registered through its custom module API."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unsupported layer type", category=UserWarning)
        yield


def freeze_base(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def take_corrections(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Remove every QuantLinear's correction and return it as {name: (A, B)}, float32."""
    taken = {}
    for name, layer in quant_layers(model).items():
        if layer.A is not None:
            taken[name] = (layer.A.detach().float(), layer.B.detach().float())
        layer.set_correction(None, None)
    return taken


def add_lora(
    model: nn.Module,
    rank: int,
    *,
    alpha: float | None = None,
    init: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    iec: bool = False,
    dropout: float = 0.0,
):
    """Wrap the model in PEFT with LoRA on every QuantLinear; returns the PeftModel.

    alpha defaults to the rank (scaling 1), so a correction B·A starts as lora_B = B exactly:
    the initial model equals the corrected one bit for bit. `init` maps layer names to
    (A, B) pairs of that rank; without it PEFT's QLoRA start (B = 0) is used.
    """
    from peft import get_peft_model

    names = sorted(quant_layers(model))
    if not names:
        raise LoquantError("the model has no quantized layer")
    if init is not None and set(init) != set(names):
        missing = sorted(set(names) - set(init))[:3]
        raise LoquantError(f"the correction covers {len(init)} of {len(names)} layers (missing e.g. {missing})")
    alpha = float(rank if alpha is None else alpha)
    freeze_base(model)
    config = lora_config(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=names, bias="none", task_type="CAUSAL_LM"
    )
    with _quiet_peft():
        peft_model = get_peft_model(model, config)
    for name, layer in lora_layers(peft_model).items():
        short = name.removeprefix("base_model.model.")
        if init is not None:
            A, B = init[short]
            if A.shape[0] != rank:
                raise LoquantError(f"layer {short}: correction rank {A.shape[0]} is not the adapter rank {rank}")
            layer.lora_A["default"].weight.data.copy_(A)
            layer.lora_B["default"].weight.data.copy_(B / layer.scaling["default"])
        if iec:
            layer.enable_iec()
    return peft_model


def add_wht(model: nn.Module, supports: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> nn.Module:
    """Replace every QuantLinear by a WHTLinear with the given (rows, cols, values); in place."""
    layers = quant_layers(model)
    if set(supports) != set(layers):
        raise LoquantError(f"the Walsh-Hadamard supports cover {len(supports)} of {len(layers)} layers")
    freeze_base(model)
    for name, layer in layers.items():
        rows, cols, values = supports[name]
        adapter = WHTAdapter(layer.in_features, layer.out_features, rows, cols, values)
        model.set_submodule(name, WHTLinear(layer, adapter.to(layer.qweight.device)))
    return model


def wht_layers(model: nn.Module) -> dict[str, WHTLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, WHTLinear)}


def adapter_kind(model: nn.Module) -> str | None:
    if lora_layers(model):
        return "lora"
    if wht_layers(model):
        return "wht"
    return None


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Everything a checkpoint needs to rebuild the adapter: trainable tensors and WHT supports."""
    state = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    for name, layer in wht_layers(model).items():
        state[f"{name}.wht.rows"] = layer.wht.rows.cpu().clone()
        state[f"{name}.wht.cols"] = layer.wht.cols.cpu().clone()
    return state


def save_adapter(model: nn.Module, out_dir: str | os.PathLike) -> Path:
    """Write the adapter of a model from add_lora / add_wht into `out_dir` (created)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kind = adapter_kind(model)
    if kind == "lora":
        config = model.peft_config["default"]
        tensors = {}
        for name, layer in lora_layers(model).items():
            A, B = layer.lora_pair("default")
            tensors[f"{name}.lora_A.weight"] = A.detach().float().cpu().contiguous()
            tensors[f"{name}.lora_B.weight"] = B.detach().float().cpu().contiguous()
        save_file(tensors, out / PEFT_WEIGHTS, metadata={"format": "pt"})
        config.save_pretrained(str(out))
    elif kind == "wht":
        layers = wht_layers(model)
        tensors, record = {}, {}
        for name, layer in sorted(layers.items()):
            for part in ("rows", "cols", "values"):
                tensors[f"{name}.{part}"] = getattr(layer.wht, part).detach().cpu().contiguous()
            record[name] = {"in_features": layer.wht.in_features, "out_features": layer.wht.out_features,
                            "params": layer.wht.num_params}  # fmt: skip
        save_file(tensors, out / WHT_WEIGHTS, metadata={"format": "pt"})
        total = sum(r["params"] for r in record.values())
        (out / WHT_CONFIG).write_text(
            json.dumps({"adapter": "wht", "params": total, "layers": record}, indent=2, sort_keys=True) + "\n"
        )
    else:
        raise LoquantError("the model has no adapter to save")
    return out


def load_adapter(base: nn.Module, adapter_dir: str | os.PathLike) -> nn.Module:
    """Attach a saved adapter to a loquant base (loaded with adapter=False)."""
    from loquant.serialization import read_header

    path = Path(adapter_dir)
    if (path / PEFT_CONFIG).is_file():
        from peft import PeftModel

        read_header(path / PEFT_WEIGHTS)  # missing, truncated or corrupt: a clear error before PEFT reads it
        freeze_base(base)
        try:
            with _quiet_peft():
                return PeftModel.from_pretrained(base, str(path), config=peft_config(path))
        except (ValueError, RuntimeError, OSError, SafetensorError) as err:
            raise LoquantError(f"{path}: cannot load the PEFT adapter: {str(err).splitlines()[0]}") from None
    if (path / WHT_CONFIG).is_file():
        read_header(path / WHT_WEIGHTS)
        try:
            tensors = load_file(path / WHT_WEIGHTS)
        except Exception as err:  # safetensors raises several types for bad files
            raise LoquantError(f"{path / WHT_WEIGHTS}: unreadable: {err}") from None
        names = {k.rsplit(".", 1)[0] for k in tensors}
        supports = {n: (tensors[f"{n}.rows"], tensors[f"{n}.cols"], tensors[f"{n}.values"]) for n in names}
        return add_wht(base, supports)
    raise LoquantError(f"{path}: no adapter ({PEFT_CONFIG} or {WHT_CONFIG})")


def original_types(model: nn.Module, names: list[str]) -> dict[str, type]:
    """Which layer class (Linear or GPT-2's Conv1D) the architecture has at each name; built on meta."""
    with torch.device("meta"):
        skeleton = getattr(transformers, type(model).__name__)._from_config(model.config)
    return {n: type(skeleton.get_submodule(n)) for n in names}


@torch.no_grad()
def merge(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """A plain transformers model with W = deq(W) + correction + adapter, in `dtype`.

    Works on a loquant model with a LoRA (PEFT), WHT or LoRAQuant adapter, or none (then the saved
    low-rank correction is folded). The result has no loquant layer and no quantization_config.
    """
    hf = hf_model(model)
    wrapped = {n: m for n, m in hf.named_modules() if isinstance(m, (LoraQuantLinear, WHTLinear, PackedLoraLinear))}
    inner = {f"{n}.base_layer" for n in wrapped}
    plain = {n: m for n, m in quant_layers(hf).items() if n not in inner}
    merged = {}
    for name, module in {**wrapped, **plain}.items():
        base = getattr(module, "base_layer", module)
        W = base.dequantize(torch.float32)
        if base.A is not None:
            W += base.B.float() @ base.A.float()
        if isinstance(module, LoraQuantLinear):
            W += module.get_delta_weight("default").to(W)
        elif isinstance(module, (WHTLinear, PackedLoraLinear)):
            W += module.get_delta_weight().to(W)
        merged[name] = (W, base.bias)
    if not merged:
        raise LoquantError("nothing to merge: the model has no quantized layer")
    types = original_types(hf, list(merged))
    for name, (W, bias) in merged.items():
        if types[name] is Conv1D:
            layer = Conv1D(W.shape[0], W.shape[1])
            layer.weight.data = W.t().contiguous()
        else:
            layer = nn.Linear(W.shape[1], W.shape[0], bias=bias is not None)
            layer.weight.data = W
        if bias is not None:
            layer.bias.data = bias.detach().float().clone()
        hf.set_submodule(name, layer.to(W.device))
    hf = hf.to(dtype)
    if hasattr(hf.config, "quantization_config"):
        del hf.config.quantization_config
    hf.config.dtype = dtype
    for p in hf.parameters():
        p.requires_grad_(False)
    return hf.eval()
