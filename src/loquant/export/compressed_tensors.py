"""Export to compressed-tensors `pack-quantized` (vLLM's W4A16 / W8A16) plus a PEFT LoRA adapter.

    OUT/config.json          the model's config with a compressed-tensors quantization_config
    OUT/model.safetensors    per quantized layer `weight_packed` (int32), `weight_scale` (fp16,
                             out x groups), `weight_shape` (int64 [out, in]), its bias; every
                             other tensor (embeddings, norms, lm_head, float layers) in `dtype`
    OUT/tokenizer files
    OUT/adapter/             the low-rank correction (or a fine-tuned LoRA adapter) as a PEFT
                             LoRA: adapter_config.json + adapter_model.safetensors (fp16)

The format is written by hand (no compressed-tensors import): 32/b codes per int32, code i of
a word in bits [b*i, b*(i+1)), each code stored as the signed value + 2^(b-1), which is
loquant's `int-sym` code exactly (vLLM: uint4b8 / uint8b128). compressed-tensors dequantizes
as (code - 2^(b-1)) * scale in the scale's dtype; with the fp16 scales loquant stores, that
is bit for bit loquant's dequantization rounded to fp16 (both round the exact product once).

Only `int-sym` 4- and 8-bit layers without double quantization map onto the format; the
group size must divide the layer's input width (or be -1). Layers of several schemes get one
config group each, with explicit layer names as targets; layers vLLM fuses (q/k/v, gate/up)
must share one scheme.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from loquant.adapters.attach import original_types
from loquant.errors import LoquantError
from loquant.formats.codec import unpack_codes
from loquant.layers import QuantLinear
from loquant.model import hf_model, quant_layers
from loquant.serialization import WEIGHTS, atomic_dir, ensure_writable, read_config

QUANT_METHOD = "compressed-tensors"
FORMAT = "pack-quantized"
BITS = (4, 8)
ADAPTER_DIR = "adapter"
ADAPTER_DTYPE = torch.float16
# Sibling layers vLLM runs as one fused matmul (qkv_proj, gate_up_proj): one scheme for all.
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
ALTERNATIVES = "export with `--to merged` (a 16-bit model), or re-quantize with `--format int-sym --bits 4` (or 8)"


def scheme_of(name: str, rec: dict) -> tuple[int, str, int | None]:
    """(bits, strategy, group size) of a saved layer record, or a LoquantError naming why not."""
    what = f"layer {name} ({rec['format']} {rec['bits']}-bit"
    what += ", double_quant" * bool(rec.get("double_quant")) + ", icq" * bool(rec.get("icq")) + ")"
    if rec["format"] != "int-sym" or rec["bits"] not in BITS or rec.get("double_quant") or rec.get("icq"):
        raise LoquantError(
            f"{what}: compressed-tensors pack-quantized holds symmetric int4/int8 with 16-bit scales "
            f"only; {ALTERNATIVES}"
        )
    in_f, group = rec["in_features"], rec["group_size"]
    if in_f % (32 // rec["bits"]):
        raise LoquantError(f"layer {name}: input width {in_f} is not a multiple of {32 // rec['bits']}; {ALTERNATIVES}")
    if group == -1 or group > in_f:  # one group per row: per channel
        return rec["bits"], "channel", None
    if in_f % group:
        raise LoquantError(
            f"layer {name}: group size {group} does not divide the input width {in_f} "
            f"(compressed-tensors has no short last group); {ALTERNATIVES} and a group size dividing it"
        )
    return rec["bits"], "group", group


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(out, in) codes in [0, 2^bits) -> (out, in*bits/32) int32, code i of a word at bits [b*i, b*i+b)."""
    per_word = 32 // bits
    runs = codes.to(torch.int64).view(codes.shape[0], -1, per_word)
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    words = (runs << shifts).sum(dim=2)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def weights_args(bits: int, strategy: str, group: int | None) -> dict:
    return {"num_bits": bits, "type": "int", "symmetric": True, "strategy": strategy, "group_size": group,
            "dynamic": False, "actorder": None, "block_structure": None}  # fmt: skip


def quantization_config(groups: dict[tuple, list[str]], ignore: list[str]) -> dict:
    """compressed-tensors' config: one group targeting every Linear, or one per scheme by layer name."""
    config_groups = {}
    for i, (key, names) in enumerate(sorted(groups.items(), key=lambda kv: kv[1][0])):
        config_groups[f"group_{i}"] = {
            "targets": ["Linear"] if len(groups) == 1 else sorted(names),
            "weights": weights_args(*key),
            "input_activations": None,
            "output_activations": None,
        }
    return {
        "quant_method": QUANT_METHOD,
        "format": FORMAT,
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
    }


def _check_fused(schemes: dict[str, tuple], linear: set[str]) -> None:
    """vLLM runs q/k/v (and gate/up) as one matmul: they must all be float or share one scheme."""
    for name in sorted(linear):
        parent, _, short = name.rpartition(".")
        for fused in FUSED:
            if short != fused[0]:
                continue
            siblings = [f"{parent}.{s}" for s in fused if f"{parent}.{s}" in linear]
            if len({schemes.get(s, "float") for s in siblings}) > 1:
                raise LoquantError(
                    f"layers {', '.join(siblings)} have different formats; vLLM fuses them and needs one "
                    "scheme: re-quantize them alike (int-sym, same bits and group size), or `--to merged`"
                )


def _lora_pairs(hf: nn.Module, layers: dict[str, QuantLinear]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (A, B) float32 with W = deq(W) + B·A: the correction and any LoRA adapter,
    stacked along the rank (exact), LoRA scaling folded into B."""
    from loquant.adapters.lora import LoraQuantLinear

    pairs = {}
    for name, layer in layers.items():
        parts = []
        if layer.A is not None:
            parts.append((layer.A.detach().float(), layer.B.detach().float()))
        wrapper = hf.get_submodule(name)
        if isinstance(wrapper, LoraQuantLinear):
            for adapter in wrapper.active_adapters:
                A, B = wrapper.lora_pair(adapter)
                parts.append((A.detach().float(), B.detach().float() * wrapper.scaling[adapter]))
        if parts:
            pairs[name] = (torch.cat([a for a, _ in parts]), torch.cat([b for _, b in parts], dim=1))
    return pairs


def _target_modules(names: list[str], linear: set[str]) -> list[str]:
    """Short names (q_proj, ...) when they select exactly `names` among the model's linear layers."""
    shorts = {n.rpartition(".")[2] for n in names}
    if {n for n in linear if n.rpartition(".")[2] in shorts} == set(names):
        return sorted(shorts)
    return sorted(names)


def write_adapter(out: Path, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], linear: set[str]) -> int:
    """A PEFT LoRA adapter (lora_alpha = r: scaling 1) holding `pairs`, ranks zero-padded to the largest."""
    rank = max(A.shape[0] for A, _ in pairs.values())
    tensors = {}
    for name, (A, B) in sorted(pairs.items()):
        pad = rank - A.shape[0]
        A = torch.cat([A, A.new_zeros(pad, A.shape[1])])
        B = torch.cat([B, B.new_zeros(B.shape[0], pad)], dim=1)
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.to(ADAPTER_DTYPE).contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.to(ADAPTER_DTYPE).contiguous()
    # PEFT's LoraConfig fields that matter, the rest left to each reader's defaults (older PEFT and
    # vLLM do not know every field today's PEFT writes).
    record = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank, "lora_dropout": 0.0,
              "target_modules": _target_modules(list(pairs), linear), "bias": "none", "fan_in_fan_out": False,
              "use_rslora": False, "use_dora": False, "modules_to_save": None, "base_model_name_or_path": None,
              "inference_mode": True}  # fmt: skip
    out.mkdir()
    (out / "adapter_config.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    return rank


def export_compressed_tensors(
    src: str | os.PathLike, out: str | os.PathLike, *, dtype: torch.dtype = torch.bfloat16, overwrite: bool = False
) -> dict:
    """Write the loquant folder `src` to `out` (see the module docstring); returns a summary."""
    from transformers import AutoTokenizer

    from loquant.adapters.attach import WHT_CONFIG
    from loquant.serialization import load

    src, out = Path(src), Path(out)
    if dtype not in (torch.bfloat16, torch.float16):
        raise LoquantError(f"compressed-tensors models run in float16 or bfloat16, not {dtype}")
    records = read_config(src)["quantization_config"]["layers"]
    schemes = {name: scheme_of(name, rec) for name, rec in sorted(records.items())}
    if (src / ADAPTER_DIR / WHT_CONFIG).is_file():
        raise LoquantError(
            f"{src / ADAPTER_DIR}: a Walsh-Hadamard (wht) adapter has no PEFT LoRA form for vLLM: "
            "export with `--to merged` (it folds the adapter into 16-bit weights)"
        )
    ensure_writable(out, overwrite)
    model = load(src)
    hf = hf_model(model)
    layers = {n.removesuffix(".base_layer"): m for n, m in quant_layers(hf).items()}
    types = original_types(hf, list(layers))
    if any(t is not nn.Linear for t in types.values()):
        odd = next(n for n, t in types.items() if t is not nn.Linear)
        raise LoquantError(f"layer {odd} is a {types[odd].__name__}, not nn.Linear: compressed-tensors targets "
                           "Linear layers; export with `--to merged`")  # fmt: skip
    inside = tuple(f"{n}." for n in layers)
    linear = {n for n, m in hf.named_modules() if isinstance(m, nn.Linear) and not n.startswith(inside)}
    linear |= set(layers)
    _check_fused({n: schemes[n] for n in layers}, linear)
    groups: dict[tuple, list[str]] = {}
    for name in layers:
        groups.setdefault(schemes[name], []).append(name)

    tensors, seen = {}, set()
    for key, t in hf.state_dict().items():
        if key.startswith(inside):
            continue
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.dtype)
        if ptr in seen:  # a tied weight (lm_head = embed_tokens) is stored once, as transformers does
            continue
        seen.add(ptr)
        tensors[key] = (t.to(dtype) if t.is_floating_point() else t).detach().cpu().contiguous()
    for name, layer in layers.items():
        shape = (layer.out_features, layer.in_features)
        codes = unpack_codes(layer.packed(), layer.fmt, shape)
        tensors[f"{name}.weight_packed"] = pack_int32(codes.cpu(), layer.fmt.bits)
        tensors[f"{name}.weight_scale"] = layer.scales.detach().cpu().to(torch.float16).contiguous()
        tensors[f"{name}.weight_shape"] = torch.tensor(shape, dtype=torch.int64)
        if layer.bias is not None:
            tensors[f"{name}.bias"] = layer.bias.detach().cpu().to(dtype).contiguous()

    ignore = sorted(linear - set(layers))
    config = hf.config.to_dict()
    config["quantization_config"] = quantization_config(groups, ignore)
    config["architectures"] = [type(hf).__name__]
    config["dtype"] = str(dtype).removeprefix("torch.")
    pairs = _lora_pairs(hf, layers)
    tokenizer = AutoTokenizer.from_pretrained(src)
    rank = 0
    with atomic_dir(out, overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(tensors, tmp / WEIGHTS, metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        if pairs:
            rank = write_adapter(tmp / ADAPTER_DIR, pairs, linear)
    return {
        "layers": len(layers),
        "schemes": [f"{'W4A16' if b == 4 else 'W8A16'} {s}{'' if g is None else f' g{g}'}" for b, s, g in groups],
        "ignore": ignore,
        "adapter_rank": rank,
        "adapter_layers": len(pairs),
    }
