"""Resumable quantization: finished blocks kept in DIR.partial/ until the whole model is done.

    DIR.partial/settings.json        what the run was started with; a resume must match it
    DIR.partial/progress.json        {"blocks_done": n, "blocks": N}
    DIR.partial/blocks/NNNNN.safetensors   the finished QuantLinear layers of block n
    DIR.partial/blocks/NNNNN.json    their records, and every tensor's digest (kept beside the
                                     file: safetensors metadata of several keys is written in an
                                     order that changes between processes, and a streamed
                                     block file becomes a shard of the model as it is)

A block is the set of target layers that share a path up to their first numeric part
(`model.layers.3.`); layers outside any block form one last group. Each block file and
progress.json are written to a temporary name and renamed, so a kill at any moment leaves
either the old or the new state. Restored layers hold the same bytes as built ones, and
everything else a run computes is deterministic, so a resumed run saves the same files as
an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from loquant.errors import LoquantError
from loquant.layers import QuantLinear

# Fault injection for the tests: SIGKILL the process right after this block is saved.
KILL_AFTER_ENV = "LOQUANT_TEST_KILL_AFTER_BLOCK"


def block_key(name: str) -> str:
    """`model.layers.3.mlp.up_proj` -> `model.layers.3.`; "" for a layer in no block."""
    match = re.match(r"^((?:[^.]+\.)*?\d+\.)", name)
    return match.group(1) if match else ""


def group_blocks(names: list[str]) -> list[list[str]]:
    """Target names grouped by block, blocks in first-seen order, non-block layers last."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(block_key(name), []).append(name)
    tail = groups.pop("", None)
    return list(groups.values()) + ([tail] if tail else [])


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


class Checkpoint:
    """The DIR.partial folder of one `loquant quantize --out DIR` run."""

    def __init__(self, partial: str | os.PathLike, settings: dict) -> None:
        self.path = Path(partial)
        self.settings = settings
        self.blocks_done = self.blocks = 0
        if (self.path / "progress.json").is_file():
            try:
                saved = json.loads((self.path / "settings.json").read_text())
                progress = json.loads((self.path / "progress.json").read_text())
                self.blocks_done, self.blocks = int(progress["blocks_done"]), int(progress["blocks"])
            except (OSError, ValueError, KeyError) as err:
                raise LoquantError(f"{self.path}: unreadable partial run ({err}): pass --overwrite") from None
            if saved != settings:
                changed = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
                raise LoquantError(f"{self.path}: the partial run was started with other settings "
                                   f"({', '.join(changed)}): resume with the same command, or --overwrite")  # fmt: skip

    def restore(self, index: int, modules: dict[str, torch.nn.Module]) -> dict[str, QuantLinear] | None:
        """The saved layers of block `index` (None if it is not done yet)."""
        if index >= self.blocks_done:
            return None
        file, records = self.block_file(index), self.records(index)
        try:
            tensors = load_file(file)
        except Exception as err:  # safetensors raises several types for damaged files
            raise LoquantError(f"{file}: unreadable ({err}): remove {self.path} or pass --overwrite") from None
        layers = {}
        for name, rec in records.items():
            weight = modules[name].weight
            state = {k.removeprefix(f"{name}."): v for k, v in tensors.items() if k.startswith(f"{name}.")}
            layers[name] = QuantLinear.from_state(rec, state, weight.dtype, weight.device)
        return layers

    def records(self, index: int) -> dict[str, dict]:
        """The layer records of finished block `index`."""
        return self.block_info(index)["records"]

    def block_info(self, index: int) -> dict:
        """{"records": layer records, "digests": tensor digests} of finished block `index`."""
        file = self.block_file(index).with_suffix(".json")
        try:
            return json.loads(file.read_text())
        except (OSError, ValueError) as err:
            raise LoquantError(f"{file}: unreadable ({err}): pass --overwrite") from None

    def block_file(self, index: int) -> Path:
        return self.path / "blocks" / f"{index:05d}.safetensors"

    def save(self, index: int, total: int, layers: dict[str, QuantLinear],
             extra: dict[str, torch.Tensor] | None = None) -> None:  # fmt: skip
        """Keep block `index`'s layers (and `extra` tensors: a streamed block's other weights,
        so the file is that block's final shard, with every tensor's digest in its metadata)."""
        from loquant.model import layer_record
        from loquant.serialization import digest

        blocks = self.path / "blocks"
        blocks.mkdir(parents=True, exist_ok=True)
        if not (self.path / "settings.json").is_file():
            _write_json(self.path / "settings.json", self.settings)
        tensors = {f"{n}.{k}": v.detach().cpu().contiguous() for n, layer in layers.items()
                   for k, v in layer.state_dict().items()}  # fmt: skip
        tensors.update(extra or {})
        info = {"records": {n: layer_record(layer) for n, layer in layers.items()},
                "digests": {n: digest(t) for n, t in tensors.items()}}  # fmt: skip
        _write_json(self.block_file(index).with_suffix(".json"), info)
        tmp = blocks / f".{index:05d}.tmp"
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.replace(tmp, self.block_file(index))
        self.blocks_done, self.blocks = index + 1, total
        _write_json(self.path / "progress.json", {"blocks_done": self.blocks_done, "blocks": total})
        if os.environ.get(KILL_AFTER_ENV) == str(index):
            os.kill(os.getpid(), signal.SIGKILL)
