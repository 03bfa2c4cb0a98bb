"""Quantize a model larger than memory: block by block, straight from its safetensors shards.

Memory holds the model's skeleton on the meta device (no weights), one block's weights while it
is quantized, and the calibration inputs of the current block (on disk with `offload`): about
one block plus its activations, whatever the depth.

1. The skeleton is built under accelerate's `init_empty_weights` (parameters on the meta
   device; buffers such as rotary frequencies real). With calibration, the weights outside the
   blocks (embeddings) are read, the first block's inputs captured by the model's own forward
   (as the in-memory path does), and those weights dropped again.
2. Per block: its weights are read from the shards that hold them; its layers' input
   statistics gathered over the cached inputs, and in the same forwards its float outputs
   (one-pass calibration); its layers built by `loquant.model.BlockBuilder` (so checkpoints,
   `--resume` and torchrun work as in memory), the block's file (quantized layers plus its
   norms) saved in the checkpoint; with `sequential`, its outputs computed again through the
   quantized layers. The block then goes back to the meta device.
3. The weights outside the blocks are copied to one last shard, the block files linked in as
   the other shards, and config.json, the shard index and the tokenizer written.

Every layer gets the same statistics, hence the same bytes, as `loquant.quantize` on the loaded
model gives (tests/test_streaming.py checks it).
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from loquant import distributed
from loquant.calibration import block_list, block_output, block_stats, capture_inputs, hidden_of, with_hidden
from loquant.checkpoint import Checkpoint, block_key, group_blocks
from loquant.errors import LoquantError
from loquant.layers import QuantLinear
from loquant.model import BlockBuilder, QuantConfig, check_finite, linear_weight, targets_of, update_quantization_config
from loquant.serialization import INDEX, WEIGHTS, digest, read_header, shard_name, write_config


class Shards:
    """The tensors of a safetensors checkpoint folder (one file, or shards named by an index),
    read on demand: each read opens the files it needs and closes them, so nothing stays mapped."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        index = folder / INDEX
        if index.is_file():
            try:
                self.weight_map = dict(json.loads(index.read_text())["weight_map"])
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as err:
                raise LoquantError(f"{index}: corrupt index ({err})") from None
        elif (folder / WEIGHTS).is_file():
            self.weight_map = dict.fromkeys(read_header(folder / WEIGHTS)[0], WEIGHTS)
        else:
            raise LoquantError(f"{folder}: no {WEIGHTS} or {INDEX}: --stream reads safetensors checkpoints")
        for file in sorted(set(self.weight_map.values())):
            header, _ = read_header(folder / file)  # missing or truncated shards fail here, before any work
            absent = [k for k, f in self.weight_map.items() if f == file and k not in header]
            if absent:
                raise LoquantError(f"{folder / file}: lacks {absent[0]}, which {INDEX} places there")

    def read(self, names: list[str], like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The named tensors, each cast to the dtype of `like[name]` (the model's)."""
        missing = [n for n in names if n not in self.weight_map]
        if missing:
            raise LoquantError(f"{self.folder}: the checkpoint has no tensor {missing[0]} "
                               "(--stream needs the model's own parameter names)")  # fmt: skip
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.weight_map[name], []).append(name)
        out = {}
        for file, keys in by_file.items():
            with safe_open(self.folder / file, framework="pt") as f:
                for key in keys:
                    t = f.get_tensor(key)
                    out[key] = t.to(like[key].dtype) if t.is_floating_point() else t
        return out


def skeleton(folder: Path) -> nn.Module:
    """The model of `folder`'s config.json with its parameters on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise LoquantError(f"{folder}: cannot read its config: {str(err).splitlines()[0]}") from None
    if getattr(config, "quantization_config", None) is not None:
        raise LoquantError(f"{folder} is already quantized: stream its float source")
    dtype = getattr(config, "dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    with init_empty_weights():  # parameters on meta, buffers real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


class BlockInputs:
    """The current block's inputs per calibration batch, (args, kwargs); with `folder`, the
    hidden states live there (one file per batch) and memory holds one batch at a time."""

    def __init__(self, calls: Iterable[tuple[tuple, dict]], folder: Path | None) -> None:
        self.calls, self.folder = [], folder
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
        for j, call in enumerate(calls):  # each batch goes to disk before the next is captured
            self.calls.append(call)
            if folder is not None:
                self.update(j, hidden_of(call))

    def __len__(self) -> int:
        return len(self.calls)

    def __iter__(self) -> Iterator[tuple[tuple, dict]]:
        for j, call in enumerate(self.calls):
            if self.folder is None:
                yield call
            else:
                yield with_hidden(call, load_file(self.folder / f"{j:05d}.safetensors")["hidden"])

    def propagate(self, block: nn.Module) -> None:
        """Each batch's hidden states replaced by the block's outputs."""
        with torch.inference_mode():
            for j, call in enumerate(self):
                self.update(j, block_output(block, call))

    def update(self, j: int, hidden: torch.Tensor) -> None:
        """Replace batch j's hidden states (by the block's output, once the block has read them)."""
        if self.folder is None:
            self.calls[j] = with_hidden(self.calls[j], hidden)
        else:
            save_file({"hidden": hidden.contiguous()}, self.folder / f"{j:05d}.safetensors")
            self.calls[j] = with_hidden(self.calls[j], None)


def _load_into(module: nn.Module, prefix: str, shards: Shards) -> dict[str, torch.Tensor]:
    """Read `module`'s state (its keys under `prefix`) from the shards into it; returns it."""
    like = {f"{prefix}{k}": t for k, t in module.state_dict().items()}
    state = shards.read(list(like), like)
    module.load_state_dict({k.removeprefix(prefix): t for k, t in state.items()}, assign=True)
    meta = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if meta:
        raise LoquantError(f"{prefix}{meta[0]} is not in the checkpoint: this architecture cannot be streamed")
    return state


def quantize_streaming(
    source: str | os.PathLike,
    out: Path,
    config: QuantConfig,
    checkpoint: Checkpoint,
    *,
    calib: torch.Tensor | None = None,
    tokenizer=None,
    offload: Path | None = None,
    batch_size: int = 4,
    progress: bool = True,
) -> nn.Module:
    """Quantize the safetensors model in folder `source` into folder `out` (a new folder: the
    caller moves it into place), block by block. Returns the skeleton (meta tensors) with the
    quantization config and `loquant_timings` filled in."""
    if config.method == "rilq" or config.fisher:
        what = "rilq trains every correction against the whole model" if config.method == "rilq" else (
            "--fisher backpropagates through the whole model")  # fmt: skip
        raise LoquantError(f"--stream quantizes one block at a time, but {what}: run without --stream")
    if config.needs_calibration and calib is None:
        raise LoquantError(f"method {config.method} needs calibration windows (calib=...)")
    source = Path(source)
    shards = Shards(source)
    model = skeleton(source)
    targets = targets_of(model, config, check_values=False)
    groups = group_blocks([t[0] for t in targets])
    prefix, blocks = block_list(model, [n for g in groups for n in g if block_key(n)])
    index_of = {f"{prefix}.{j}.": j for j in range(len(blocks))}
    tail = [] if block_key(groups[-1][0]) else groups[-1]
    if any(block_key(g[0]) not in index_of for g in groups if g is not tail):
        raise LoquantError("--stream needs every quantized layer inside one list of blocks (or outside all)")
    if tail and config.needs_calibration:
        raise LoquantError(f"--stream calibrates block by block: {tail[0]} is outside the blocks; exclude it")
    # Formats only: a list holding the modules would keep every loaded block's weights alive.
    fmt_of = {name: fmt for name, _, _, fmt in targets}
    total_layers = len(targets)
    del targets
    dtype = next(iter(model.parameters())).dtype
    timings = {"calibration_s": 0.0, "fisher_s": 0.0, "decomposition_s": 0.0}
    builder = BlockBuilder(config, None, checkpoint, len(groups), timings)
    model_state = model.state_dict()

    inputs = None
    if config.needs_calibration:  # the first block's inputs, from the model's own forward
        start = time.perf_counter()
        outside = [k for k in model_state if not k.startswith(f"{prefix}.")]
        # a tied alias missing from the checkpoint (lm_head) stays on meta: the capture never reaches it
        present = [k for k in outside if k in shards.weight_map]
        model.load_state_dict(shards.read(present, model_state), strict=False, assign=True)
        inputs = BlockInputs(capture_inputs(model, calib, blocks[0], batch_size), offload)
        for name in outside:  # the embeddings are not needed again
            set_module_tensor_to_device(model, name, "meta")
        timings["calibration_s"] += time.perf_counter() - start

    group_at = {index_of[block_key(g[0])]: (i, g) for i, g in enumerate(groups) if g is not tail}
    with tqdm(total=total_layers, desc="quantize", disable=not progress, unit="layer") as bar:
        for j, block in enumerate(blocks):
            if j not in group_at:  # no target inside: with calibration it still feeds the next blocks
                if inputs is not None and j < max(group_at):
                    _load_into(block, f"{prefix}.{j}.", shards)
                    inputs.propagate(block)
                    block.to("meta")
                    _release_freed_memory()
                continue
            i, group = group_at[j]
            if i < checkpoint.blocks_done and inputs is None:  # nothing to recompute: its shard is on disk
                for name, rec in checkpoint.records(i).items():
                    model.set_submodule(name, QuantLinear.from_record(rec, dtype, device="meta"))
                bar.update(len(group))
                continue
            state = _load_into(block, f"{prefix}.{j}.", shards)
            mine = {n: model.get_submodule(n) for n in group}
            loaded = [(n, m, linear_weight(m).detach(), fmt_of[n]) for n, m in mine.items()]
            for name, _, w, _ in loaded:
                check_finite(name, w)
            stats = None
            if inputs is not None:
                start = time.perf_counter()
                one_pass = not config.sequential
                stats = block_stats(block, mine, inputs, inputs.update if one_pass else None)
                timings["calibration_s"] += time.perf_counter() - start
            extra = {k: t for k, t in state.items() if not any(k.startswith(f"{n}.") for n in group)}
            built = builder.block(i, loaded, stats if config.needs_stats else None, bar, extra)
            for name, layer in built:
                model.set_submodule(name, layer)
            if inputs is not None and config.sequential:  # the next block reads the quantized outputs
                start = time.perf_counter()
                inputs.propagate(block)
                timings["calibration_s"] += time.perf_counter() - start
            block.to("meta")
            del state, extra, built, stats, loaded, mine, w
            _release_freed_memory()
        if tail:
            _tail(model, {n: fmt_of[n] for n in tail}, len(groups) - 1, builder, shards, model_state, bar)

    recipe = config.record()
    update_quantization_config(model, config.source_model or str(source), recipe)
    # under torchrun every rank streams, rank 0 writes
    distributed.rank0(lambda: _write(model, out, shards, checkpoint, groups, model_state, tokenizer))
    model.loquant_timings = timings
    return model


def _release_freed_memory() -> None:
    """Hand the freed heap back to the OS (glibc keeps it otherwise, and the resident size
    would creep up block after block although nothing is alive); elsewhere a no-op."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _tail(model, formats: dict, i, builder, shards, like, bar) -> None:
    """Layers outside the blocks (data-free methods only): read, built, checkpointed."""
    if i < builder.checkpoint.blocks_done:
        for name, rec in builder.checkpoint.records(i).items():
            model.set_submodule(name, QuantLinear.from_record(rec, like[f"{name}.weight"].dtype, device="meta"))
        bar.update(len(formats))
        return
    loaded = []
    for name, fmt in formats.items():
        module = model.get_submodule(name)
        _load_into(module, f"{name}.", shards)
        check_finite(name, linear_weight(module))
        loaded.append((name, module, linear_weight(module).detach(), fmt))
    for name, layer in builder.block(i, loaded, None, bar):
        model.set_submodule(name, layer.to("meta"))


def _write(model, out: Path, shards: Shards, checkpoint: Checkpoint, groups, like, tokenizer) -> None:
    """The finished folder: block files linked in as shards, the rest as the last shard."""
    if out.exists():
        shutil.rmtree(out)  # an earlier attempt at this step, cut short
    out.mkdir(parents=True)
    total = len(groups) + 1
    weight_map, checksums, size = {}, {}, 0
    quantized = {n for g in groups for n in g}
    for i in range(len(groups)):
        file, name = checkpoint.block_file(i), shard_name(i + 1, total)
        try:
            os.link(file, out / name)  # the block files stay until the folder is complete
        except OSError:
            shutil.copyfile(file, out / name)
        header, _ = read_header(out / name)
        checksums.update(checkpoint.block_info(i)["digests"])
        for key, entry in header.items():
            weight_map[key] = name
            size += entry["data_offsets"][1] - entry["data_offsets"][0]
    rest_names = [k for k in shards.weight_map if k not in weight_map
                  and k.rpartition(".")[0] not in quantized]  # fmt: skip
    rest = shards.read(rest_names, like)
    name = shard_name(total, total)
    save_file(rest, out / name, metadata={"format": "pt"})
    for key, t in rest.items():
        weight_map[key] = name
        checksums[key] = digest(t)
        size += t.numel() * t.element_size()
    index = {"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    write_config(model, checksums, out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
