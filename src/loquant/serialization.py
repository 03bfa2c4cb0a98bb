"""Save and load quantized models: config.json + model.safetensors + tokenizer, atomically.

A streamed run (loquant.streaming) writes its weights as shards instead, one per block, named
in model.safetensors.index.json as transformers does; every reader here takes either.

The folder is deterministic (same inputs, same bytes): config keys are sorted, safetensors
orders tensors itself, and nothing run-dependent is written. Each tensor's blake2b digest is
recorded in quantization_config["checksums"] (not in the safetensors metadata, whose key
order is not stable), so a corrupt or truncated file is named down to the tensor.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from loquant.errors import LoquantError
from loquant.layers import QuantLinear
from loquant.model import QUANT_METHOD, quant_layers, update_quantization_config

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


def shard_name(i: int, total: int) -> str:
    """transformers' shard names, counted from 1."""
    return f"model-{i:05d}-of-{total:05d}.safetensors"


def weight_files(path: Path) -> list[Path]:
    """A saved folder's safetensors files: model.safetensors, or the shards its index names."""
    index = path / INDEX
    if not index.is_file():
        return [path / WEIGHTS]
    try:
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as err:
        raise LoquantError(f"{index}: corrupt index ({err})") from None
    if not names or any(Path(n).name != n for n in names):
        raise LoquantError(f"{index}: the weight map must name shard files in the folder")
    return [path / n for n in names]


def digest(t: torch.Tensor) -> str:
    data = t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without aliases (tied weights are stored once, under the first name)."""
    seen, out = set(), {}
    for name, t in model.state_dict().items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.dtype)
        if key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().cpu().contiguous()
    return out


def ensure_writable(out: Path, overwrite: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise LoquantError(f"output {out} exists and is not empty: pass --overwrite to replace it")


@contextlib.contextmanager
def atomic_dir(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `out` by rename, else vanishes."""
    out = Path(out)
    ensure_writable(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield tmp
        for f in tmp.rglob("*"):  # some writers create 0600 files; a saved model is for sharing
            f.chmod(0o755 if f.is_dir() else 0o644)
        tmp.chmod(0o755)
        if out.exists():
            ensure_writable(out, overwrite)
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save(
    model: nn.Module,
    out_dir: str | os.PathLike,
    tokenizer=None,
    *,
    overwrite: bool = False,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write a quantized model (and its tokenizer, and any extra text files) to `out_dir`, atomically."""
    if not quant_layers(model):
        raise LoquantError("the model has no quantized layer: call loquant.quantize first")
    out = Path(out_dir)
    update_quantization_config(model)
    tensors = _unique_state_dict(model)
    with atomic_dir(out, overwrite) as tmp:
        write_config(model, {name: digest(t) for name, t in tensors.items()}, tmp)
        save_file(tensors, tmp / WEIGHTS, metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return out


def write_config(model: nn.Module, checksums: dict[str, str], folder: Path) -> None:
    """config.json: the model's config with its quantization_config and tensor checksums."""
    config = model.config.to_dict()
    config["architectures"] = [type(model).__name__]
    config["dtype"] = str(_float_dtype(model)).removeprefix("torch.")
    config["quantization_config"]["checksums"] = dict(sorted(checksums.items()))
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's float parameters (embeddings, norms), not its corrections."""
    for name, p in model.named_parameters():
        if p.is_floating_point() and not name.endswith((".A", ".B")):
            return p.dtype
    return torch.float32


def read_config(path: Path) -> dict:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise LoquantError(f"{path}: no config.json, not a saved model")
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LoquantError(f"{cfg_path}: corrupt JSON: {err}") from None
    qc = config.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        raise LoquantError(f"{cfg_path}: not a loquant model (no loquant quantization_config)")
    return config


def read_header(file: Path) -> tuple[dict, dict]:
    """(tensor entries, metadata) of a safetensors file, checking that every tensor is whole."""
    if not file.is_file():
        raise LoquantError(f"{file}: missing")
    size = file.stat().st_size
    with open(file, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise LoquantError(f"{file}: truncated, no safetensors header")
        (n,) = struct.unpack("<Q", raw_len)
        if n > size - 8:
            raise LoquantError(f"{file}: truncated inside the header ({size} bytes, header needs {n + 8})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise LoquantError(f"{file}: corrupt safetensors header: {err}") from None
    metadata = header.pop("__metadata__", {}) or {}
    data_size = size - 8 - n
    for name, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][1]):
        end = entry["data_offsets"][1]
        if end > data_size:
            raise LoquantError(f"{file}: truncated: tensor {name} ends at data byte {end}, the file holds {data_size}")
    return header, metadata


def tensor_nbytes(path: str | os.PathLike) -> dict[str, int]:
    nbytes = {}
    for file in weight_files(Path(path)):
        header, _ = read_header(file)
        nbytes.update({name: e["data_offsets"][1] - e["data_offsets"][0] for name, e in header.items()})
    return nbytes


def build_skeleton(config: dict) -> nn.Module:
    """An unquantized model of the saved architecture with QuantLinear placeholders."""
    cfg = dict(config)
    qc = {k: v for k, v in cfg.pop("quantization_config").items() if k != "checksums"}
    arch = (cfg.get("architectures") or ["AutoModelForCausalLM"])[0]
    cls = getattr(transformers, arch, None)
    if cls is None:
        raise LoquantError(f"unknown architecture {arch} (transformers {transformers.__version__})")
    dtype = getattr(torch, cfg.get("dtype") or "float32")
    hf_config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    model = cls._from_config(hf_config, dtype=dtype)
    for name, rec in qc["layers"].items():
        model.set_submodule(name, QuantLinear.from_record(rec, dtype))
    model.config.quantization_config = qc
    model.loquant_source = qc.get("source_model")
    return model.eval()


def load(path: str | os.PathLike, *, adapter: bool = True) -> nn.Module:
    """Rebuild a model saved by `save`, on CPU, with outputs identical to the saved one.

    A `loquant finetune` folder loads as its base plus the trained adapter (a PeftModel for
    LoRA), a `loquant compress-adapter --base` folder as its base plus the packed adapter;
    adapter=False gives the base alone, e.g. to attach the adapter through PEFT.
    """
    path = Path(path)
    if not path.is_dir():
        raise LoquantError(f"{path}: no such model folder")
    config = read_config(path)
    state_file = path / "finetune.json"
    if adapter and state_file.is_file():
        try:
            status = json.loads(state_file.read_text()).get("status")
        except json.JSONDecodeError:
            status = "unreadable"
        if status != "done":
            raise LoquantError(
                f"{path}: an unfinished fine-tuning run ({status}): finish it with `loquant finetune ... --resume`"
            )
    files = weight_files(path)
    for file in files:
        read_header(file)
    model = build_skeleton(config)
    expected = model.state_dict()
    checksums = config["quantization_config"].get("checksums", {})
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            part = load_file(file)
        except SafetensorError as err:
            raise LoquantError(f"{file}: unreadable: {err}") from None
        for name, t in part.items():
            if name not in expected or name in tensors:
                raise LoquantError(f"{file}: unexpected tensor {name}")
            want = expected[name]
            if t.shape != want.shape or t.dtype != want.dtype:
                raise LoquantError(
                    f"{file}: tensor {name} is {t.dtype} {tuple(t.shape)}, "
                    f"the config implies {want.dtype} {tuple(want.shape)}"
                )
            if name in checksums and digest(t) != checksums[name]:
                raise LoquantError(f"{file}: tensor {name} is corrupt (checksum mismatch)")
        tensors.update(part)
    # Keys absent from the files must be aliases (tied weights) of keys present in them.
    storage = {n: t.untyped_storage().data_ptr() for n, t in expected.items()}
    present = {storage[n] for n in tensors}
    for name in expected:
        if name not in tensors and storage[name] not in present:
            raise LoquantError(f"{path}: missing tensor {name}")
    model.load_state_dict(tensors, strict=False)
    if adapter and (path / "adapter").is_dir():
        from loquant.adapters.attach import load_adapter

        model = load_adapter(model, path / "adapter").eval()
    elif adapter and (path / "loquant_adapter.json").is_file():  # `loquant compress-adapter --base`
        from loquant.adapters.loraquant import attach

        model = attach(model, path).eval()
    return model
