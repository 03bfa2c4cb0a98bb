"""Several processes (`torchrun --nproc-per-node N -m loquant quantize ...`): each builds a share
of every block's layers, then all exchange them, so every rank holds the whole quantized model
and rank 0 alone writes the folder (the same bytes as one process: building is deterministic
and the exchange moves tensors as they are). NCCL on GPUs, gloo on CPU."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from loquant.errors import LoquantError
from loquant.layers import QuantLinear

T = TypeVar("T")
_OWNED = False  # init_from_env created the process group, so close() ends it


def init_from_env() -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1); False for one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    global _OWNED
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    _OWNED = True
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True


def world() -> tuple[int, int]:
    """(rank, size); (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def mine(items: list) -> list:
    """This rank's share of a list (every size-th item)."""
    rank, size = world()
    return items[rank::size]


def share(built: list[tuple[str, QuantLinear]] | LoquantError, order: list[str],
          modules: dict[str, nn.Module]) -> list[tuple[str, QuantLinear]]:  # fmt: skip
    """All ranks' built layers, in `order`; an error on any rank is raised on every rank."""
    from loquant.model import layer_record

    if world()[1] == 1:
        if isinstance(built, LoquantError):
            raise built
        return built
    if isinstance(built, LoquantError):
        payload = str(built)
    else:
        payload = {n: (layer_record(q), {k: v.detach().cpu() for k, v in q.state_dict().items()}) for n, q in built}
    gathered: list = [None] * world()[1]
    dist.all_gather_object(gathered, payload)
    errors = [g for g in gathered if isinstance(g, str)]
    if errors:
        raise LoquantError(errors[0])
    layers = {}
    for part in gathered:
        for name, (record, state) in part.items():
            weight = modules[name].weight
            layers[name] = QuantLinear.from_state(record, state, weight.dtype, weight.device)
    return [(n, layers[n]) for n in order]


def rank0(fn: Callable[[], T]) -> T | None:
    """fn() on rank 0 alone (writing the output); the other ranks wait for it and fail with its
    error, so no rank is left waiting on one that failed. Returns fn's result on rank 0."""
    rank, size = world()
    result, error = None, None
    if rank == 0:
        try:
            result = fn()
        except BaseException as err:
            error = err
    if size > 1:
        status = [None if error is None else f"rank 0 failed: {error}"]
        dist.broadcast_object_list(status, src=0)
        if rank != 0 and status[0] is not None:
            raise LoquantError(status[0])
    if error is not None:
        raise error
    return result


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def close() -> None:
    """End the process group init_from_env created, before the interpreter exits: left to
    finalization, gloo's worker threads can free tensors after Python is gone, and the process
    aborts (SIGABRT, seen in CI). A group the caller made is theirs to end."""
    global _OWNED
    if _OWNED and dist.is_initialized():
        dist.destroy_process_group()
    _OWNED = False
