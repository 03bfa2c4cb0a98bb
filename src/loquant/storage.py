"""Bits per weight, measured from the stored tensors' real byte counts."""

from __future__ import annotations

import torch

from loquant.errors import LoquantError
from loquant.formats import WeightFormat
from loquant.layers import QuantLinear
from loquant.model import hf_model, quant_layers

CORRECTION_TENSORS = ("A", "B")


def storage_report(layers: dict[str, dict], nbytes: dict[str, int]) -> dict:
    """Per-layer and total storage of the quantized layers.

    layers: quantization_config["layers"]; nbytes: tensor name -> stored bytes (from a
    state dict or a safetensors header). Base = packed codes + per-group parameters;
    correction = the 16-bit A, B. Biases stay in float and are not counted.
    """
    rows = []
    for name, rec in layers.items():
        fmt = WeightFormat.from_record(rec)
        stored = [f"{name}.{t}" for t in fmt.layout(rec["out_features"], rec["in_features"])]
        missing = [t for t in stored if t not in nbytes]
        if missing:
            raise LoquantError(f"missing tensor {missing[0]}")
        base = sum(nbytes[t] for t in stored)
        corr = sum(nbytes.get(f"{name}.{t}", 0) for t in CORRECTION_TENSORS)
        weights = rec["out_features"] * rec["in_features"]
        rows.append(
            {
                "name": name,
                "format": fmt.describe(),
                "bits": fmt.bits,
                "group_size": fmt.group_size,
                "rank": rec.get("rank", 0),
                "weights": weights,
                "base_bytes": base,
                "correction_bytes": corr,
                "bytes": base + corr,
                "bits_per_weight": 8 * (base + corr) / weights,
            }
        )
    weights = sum(r["weights"] for r in rows)
    base = sum(r["base_bytes"] for r in rows)
    total = sum(r["bytes"] for r in rows)
    return {
        "layers": rows,
        "weights": weights,
        "bytes": total,
        "base_bytes": base,
        "bits_per_weight": 8 * total / weights if weights else 0.0,
        "base_bits_per_weight": 8 * base / weights if weights else 0.0,
    }


def memory_bytes(module) -> int:
    """Bytes of every tensor the module holds (parameters and buffers), shared storage once."""
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        key = (t.device, t.untyped_storage().data_ptr())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def model_bits_per_weight(model: torch.nn.Module) -> float:
    """Measured bits per weight of the quantized layers, counting their corrections and any
    trained adapter (at the dtype it is kept in); for a float model, its dtype's bits."""
    hf = hf_model(model)
    layers = quant_layers(hf)
    if not layers:
        weight = next(m.weight for m in hf.modules() if isinstance(m, torch.nn.Linear))
        return float(torch.finfo(weight.dtype).bits)
    nbytes = weights = 0
    for layer in layers.values():
        tensors = [*layer.packed().values(), *(t for t in (layer.A, layer.B) if t is not None)]
        nbytes += sum(t.nbytes for t in tensors)
        weights += layer.in_features * layer.out_features
    inner = {id(t) for layer in layers.values() for t in [*layer.parameters(), *layer.buffers()]}
    for module in hf.modules():
        if hasattr(module, "base_layer") and isinstance(module.base_layer, QuantLinear):  # an adapter wrapper
            own = [*module.parameters(), *module.buffers()]
            nbytes += sum(t.nbytes for t in own if id(t) not in inner)
    return 8 * nbytes / weights
