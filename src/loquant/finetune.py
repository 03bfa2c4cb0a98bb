"""Fine-tuning on a quantized base: LoRA from a correction or from zero (+IEC), or QWHA; or
quantization-aware training that ends in a plain quantized model (PEQA, L4Q, LR-QAT: qat.py).

The base stays packed and frozen; only the adapter trains. `prepare` is the Python entry (its
model works with transformers' Trainer); `run` is the `loquant finetune` command's loop, which
writes an output folder that is itself a model:

    OUT/config.json, model.safetensors, tokenizer   the base (its correction moved into the adapter)
    OUT/finetune.json                               settings, status, log and final measurements
    OUT/adapter/                                    the final adapter (PEFT LoRA, or loquant's WHT)
    OUT/checkpoints/step-NNNNNN/                    resume points (adapter state, optimizer, step)

A QAT run (`mode` peqa, l4q or lr-qat) ends by merging: OUT becomes the plain quantized model
(integer codes, fp16 scales, no adapter) plus finetune.json; there is no adapter/ folder.

Batches are drawn from seeded random offsets that depend only on (seed, step), so a resumed
run sees exactly the batches an uninterrupted one would.

Data-parallel (`accelerate launch --num_processes N -m loquant finetune ...`, or torchrun): each
rank trains on its share of every step's batch (the global batch stays --batch-size), the
trainable parameters' gradients are averaged by torch DDP, the loss and held-out perplexity are
reduced across ranks, and rank 0 alone writes OUT. The frozen base (packed buffers, embeddings)
is loaded by every rank from the same file and never communicated. FSDP and DeepSpeed are refused.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from loquant import distributed
from loquant.adapters.attach import add_lora, add_wht, save_adapter, take_corrections, trainable_state
from loquant.data import calib_windows, eval_windows, load_text, tokenize
from loquant.errors import LoquantError
from loquant.evaluate import perplexity
from loquant.model import hf_model, linear_weight, quant_layers
from loquant.qat import MODES as QAT_MODES
from loquant.serialization import atomic_dir, ensure_writable, save

STATE_FILE = "finetune.json"
ADAPTER_DIR = "adapter"
CHECKPOINTS_DIR = "checkpoints"
KEEP_CHECKPOINTS = 2


@dataclass
class FinetuneConfig:
    """What `loquant finetune` does; the CLI flags map one to one.

    adapter: `lora` or `wht` (QWHA). rank: LoRA rank (default: the base's correction rank,
    else 16); for `wht`, `params` is the total number of trainable coefficients (default: what
    LoRA at `rank` trains, layer by layer). init (LoRA): `correction` (default when the base has
    one: its A and B become the adapter's start) or `zero` (QLoRA; the base's correction is
    dropped). iec: IR-QLoRA's elastic connection. eval_data: held-out text (default: sotu-val
    for sotu-calib, else the last 5% of the training tokens).

    mode: `adapter` (the above) or a QAT mode (qat.MODES). lr is then the LoRA learning rate
    (l4q 2e-4, lr-qat 1e-3 by default: its B·A is in grid units) or, for peqa, the scales'
    (2e-5); scale_lr (default 2e-5) is the step sizes' in l4q and lr-qat; phi_dtype is
    LR-QAT's storage of W/s0 (int8 fixed point or bf16). lr defaults to 2e-4 for adapters.
    """

    data: str = "sotu-calib"
    eval_data: str | None = None
    steps: int = 200
    lr: float | None = None
    mode: str = "adapter"
    scale_lr: float | None = None
    phi_dtype: str = "int8"
    batch_size: int = 8
    seq_len: int = 512
    adapter: str = "lora"
    rank: int | None = None
    params: int | None = None
    init: str | None = None
    iec: bool = False
    lora_alpha: float | None = None
    dropout: float = 0.0
    warmup_steps: int | None = None
    eval_every: int = 0
    eval_windows: int = 8
    save_every: int = 100
    calib_samples: int = 64
    calib_seq_len: int = 512
    damping: float = 1e-8
    seed: int = 0
    gradient_checkpointing: bool = False
    bf16: bool | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("adapter", *QAT_MODES):
            raise LoquantError(f"unknown mode {self.mode!r}: choose adapter, {', '.join(QAT_MODES)}")
        if self.mode != "adapter" and (self.adapter != "lora" or self.iec or self.init is not None):
            raise LoquantError(f"--adapter, --iec and --init are adapter options: --mode {self.mode} leaves no adapter")
        if self.scale_lr is not None and self.mode not in ("l4q", "lr-qat"):
            raise LoquantError("--scale-lr is the step sizes' learning rate in l4q and lr-qat (peqa: --lr)")
        if self.adapter not in ("lora", "wht"):
            raise LoquantError(f"unknown adapter {self.adapter!r}: choose lora or wht")
        if self.init not in (None, "correction", "zero", "qwha"):
            raise LoquantError(f"unknown init {self.init!r}: choose correction or zero")
        if self.adapter == "wht" and (self.iec or self.init not in (None, "qwha")):
            raise LoquantError("--iec and --init are LoRA options; the wht adapter starts from QWHA's init")
        if self.adapter == "lora" and self.init == "qwha":
            raise LoquantError("init qwha is the wht adapter's")
        for name in ("steps", "batch_size", "save_every", "eval_windows", "calib_samples"):
            if getattr(self, name) < 1:
                raise LoquantError(f"{name} must be at least 1, got {getattr(self, name)}")
        rates = [v for v in (self.lr, self.scale_lr) if v is not None]
        if self.seq_len < 2 or self.eval_every < 0 or any(not v > 0 for v in rates):
            raise LoquantError("need seq_len >= 2, learning rates > 0 and eval_every >= 0")
        if (self.rank is not None and self.rank < 1) or (self.params is not None and self.params < 1):
            raise LoquantError("rank and params must be positive")

    @classmethod
    def from_dict(cls, d: dict) -> FinetuneConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def read_corpus(data: str) -> str:
    """A built-in split, a .txt file, or a .jsonl file whose lines carry a "text" field."""
    if not data.endswith(".jsonl"):
        return load_text(data)
    path = Path(data)
    if not path.is_file():
        raise LoquantError(f"data not found: {data}")
    texts = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise LoquantError(f"{data}:{i}: not JSON: {err}") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise LoquantError(f'{data}:{i}: expected an object with a "text" string')
        texts.append(record["text"])
    if not texts:
        raise LoquantError(f"{data}: no records")
    return "\n\n".join(texts)


def split_data(config: FinetuneConfig, tokenizer) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(training ids, held-out windows, description of the held-out text)."""
    ids = tokenize(tokenizer, read_corpus(config.data))
    if config.eval_data is not None:
        if config.eval_data == config.data:
            raise LoquantError("the held-out text is the training text: pick another --eval-data")
        held, name = tokenize(tokenizer, read_corpus(config.eval_data)), config.eval_data
    elif config.data == "sotu-calib":
        held, name = tokenize(tokenizer, load_text("sotu-val")), "sotu-val"
    else:
        cut = int(ids.numel() * 0.95)
        ids, held, name = ids[:cut], ids[cut:], f"last 5% of {config.data}"
    if ids.numel() < config.seq_len + 1:
        raise LoquantError(f"the training text has {ids.numel()} tokens, fewer than one window of {config.seq_len}")
    windows = min(config.eval_windows, held.numel() // config.seq_len)
    if windows < 1:
        raise LoquantError(f"the held-out text ({name}) has {held.numel()} tokens, less than one window")
    return ids, eval_windows(held, config.seq_len, windows), name


def batch_at(ids: torch.Tensor, step: int, config: FinetuneConfig) -> torch.Tensor:
    """The training batch of a step: a function of (seed, step) only, so resuming replays it."""
    gen = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
    starts = torch.randint(0, ids.numel() - config.seq_len + 1, (config.batch_size,), generator=gen)
    return torch.stack([ids[s : s + config.seq_len] for s in starts.tolist()])


def load_base(path: str | os.PathLike):
    """(quantized base without its correction, tokenizer, the removed corrections)."""
    from transformers import AutoTokenizer

    from loquant.serialization import load

    model = load(path, adapter=False)
    corrections = take_corrections(model)
    return model, AutoTokenizer.from_pretrained(path), corrections


def resolve(config: FinetuneConfig, corrections: dict) -> FinetuneConfig:
    """Fill the defaults that depend on the base and mode (rank, init, lr) and check the combination."""
    if config.mode != "adapter":
        if corrections:
            raise LoquantError(f"--mode {config.mode} trains a plain quantized base and ends with one: "
                               "quantize without --rank")  # fmt: skip
        lr = config.lr or {"peqa": 2e-5, "l4q": 2e-4, "lr-qat": 1e-3}[config.mode]
        scale_lr = config.scale_lr or (2e-5 if config.mode != "peqa" else None)
        return FinetuneConfig.from_dict({**asdict(config), "rank": config.rank or 16, "lr": lr, "scale_lr": scale_lr})
    base_rank = next(iter(corrections.values()))[0].shape[0] if corrections else 0
    if config.adapter == "wht":
        init = "qwha"
    else:
        init = config.init or ("correction" if corrections else "zero")
    if init == "correction" and not corrections:
        raise LoquantError("the base has no correction to start from: use --init zero, or quantize with --rank")
    rank = config.rank or base_rank or 16
    if init == "correction" and config.rank is not None and rank != base_rank:
        raise LoquantError(f"--init correction starts from the base's rank-{base_rank} correction: "
                           f"give --rank {base_rank} or --init zero")  # fmt: skip
    return FinetuneConfig.from_dict({**asdict(config), "rank": rank, "init": init, "lr": config.lr or 2e-4})


def qwha_supports(model: nn.Module, config: FinetuneConfig, calib: torch.Tensor, device, progress=True) -> dict:
    """QWHA's initialization for every quantized layer: coefficients of the error W - deq(W)
    chosen and refined against the float model's input statistics on `calib`."""
    from loquant.adapters.wht import qwha_init
    from loquant.calibration import collect
    from loquant.sources import load_model

    source = model.config.quantization_config.get("source_model")
    if not source:
        raise LoquantError("the wht adapter needs the float weights, and the base records no source_model")
    float_model, _ = load_model(source)
    float_model.to(device)
    layers = quant_layers(model)
    float_layers = {n: float_model.get_submodule(n) for n in layers}
    stats = collect(float_model, calib, float_layers, progress=progress)
    total = sum(m.in_features + m.out_features for m in layers.values())
    budget = config.params if config.params is not None else config.rank * total
    supports = {}
    for name, layer in tqdm(layers.items(), desc="qwha init", disable=not progress, unit="layer"):
        W = linear_weight(float_layers[name]).detach().float().to(device)
        E = W - layer.dequantize(torch.float32).to(device)
        share = round(budget * (layer.in_features + layer.out_features) / total)
        supports[name] = qwha_init(E, stats[name].R.to(device), max(1, min(share, E.numel())), config.damping)
    del float_model
    return supports


def float_weights(model: nn.Module, device) -> dict[str, torch.Tensor]:
    """The float (out x in) weight of every quantized layer, from the source model DIR records."""
    from loquant.sources import load_model

    source = model.config.quantization_config.get("source_model")
    if not source:
        raise LoquantError("this mode starts from the float weights, and the base records no source_model")
    float_model, _ = load_model(source)
    weights = {}
    for name in quant_layers(model):
        try:
            weights[name] = linear_weight(float_model.get_submodule(name)).detach().to(device)
        except AttributeError:
            raise LoquantError(f"the source model {source} has no layer {name}") from None
    return weights


def from_source(model: nn.Module, config: FinetuneConfig, calib=None, device="cpu", progress=True):
    """What the float source gives the configured start: L4Q's and LR-QAT's float weights, or
    QWHA's supports; None when the start needs no source. `run` gets it before writing OUT, so a
    missing or unreadable source leaves nothing behind."""
    from loquant.qat import FLOAT_MODES

    if config.mode in FLOAT_MODES:
        return float_weights(model, device)
    if config.mode == "adapter" and config.adapter == "wht":
        if calib is None:
            raise LoquantError("QWHA's initialization needs calibration windows")
        return qwha_supports(model, config, calib, device, progress)
    return None


def attach(model: nn.Module, corrections: dict, config: FinetuneConfig, calib=None, device="cpu", progress=True,
           sourced=None):  # fmt: skip
    """Put the configured adapter (or QAT layers) on a base from load_base (config already resolved).
    `sourced`: from_source's result, when already computed."""
    if sourced is None:
        sourced = from_source(model, config, calib, device, progress)
    if config.mode != "adapter":
        from loquant import qat

        weight_dtype = torch.bfloat16 if _bf16(config, device) else torch.float32
        return qat.attach(model, config.mode, sourced, rank=config.rank, alpha=config.lora_alpha,
                          phi_dtype=config.phi_dtype, weight_dtype=weight_dtype, seed=config.seed)  # fmt: skip
    if config.adapter == "lora":
        init = corrections if config.init == "correction" else None
        return add_lora(model, config.rank, alpha=config.lora_alpha, init=init, iec=config.iec, dropout=config.dropout)
    return add_wht(model, sourced)


def prepare(path: str | os.PathLike, config: FinetuneConfig | None = None, *, device: str | None = None,
            progress: bool = True):  # fmt: skip
    """(trainable model, tokenizer) for a saved loquant model: the Python entry.

    The base stays packed and frozen, only the adapter requires grad; the model is a
    transformers model (a PeftModel for LoRA) that `transformers.Trainer` trains as is.
    Gradient checkpointing follows config.gradient_checkpointing.
    """
    config = config or FinetuneConfig()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer, corrections = load_base(path)
    config = resolve(config, corrections)
    model.to(device)
    calib = None
    if config.adapter == "wht":
        ids = tokenize(tokenizer, read_corpus(config.data))
        calib = calib_windows(ids, config.calib_seq_len, config.calib_samples, config.seed)
    model = attach(model, corrections, config, calib, device, progress)
    if config.gradient_checkpointing:
        enable_checkpointing(model)
    return model, tokenizer


def _bf16(config: FinetuneConfig, device) -> bool:
    return config.bf16 if config.bf16 is not None else torch.device(device).type == "cuda"


def optimizer_for(model: nn.Module, config: FinetuneConfig) -> torch.optim.Optimizer:
    """AdamW over the trainables; l4q's and lr-qat's step sizes in their own group at scale_lr."""
    from loquant.qat import scale_parameters

    params = [p for p in model.parameters() if p.requires_grad]
    scales = {id(p) for p in scale_parameters(model)} if config.mode in ("l4q", "lr-qat") else set()
    groups = [{"params": [p for p in params if id(p) not in scales], "lr": config.lr}]
    if scales:
        groups.append({"params": [p for p in params if id(p) in scales], "lr": config.scale_lr})
    return torch.optim.AdamW(groups, weight_decay=0.0)


def enable_checkpointing(model: nn.Module) -> None:
    hf = hf_model(model)
    hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    hf.config.use_cache = False


def _write_state(out: Path, state: dict) -> None:
    tmp = out / f".{STATE_FILE}.tmp"
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out / STATE_FILE)


def read_state(out: Path) -> dict | None:
    path = Path(out) / STATE_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise LoquantError(f"{path}: corrupt: {err}") from None


def _checkpoints(out: Path) -> list[Path]:
    return sorted((out / CHECKPOINTS_DIR).glob("step-*"))


def _save_checkpoint(out: Path, model, optimizer, scheduler, step: int, log: list) -> None:
    with atomic_dir(out / CHECKPOINTS_DIR / f"step-{step:06d}") as tmp:
        save_file(trainable_state(model), tmp / "adapter_state.safetensors")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, "log": log}) + "\n")
    for old in _checkpoints(out)[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old)


def _peak_memory(device) -> tuple[str, int]:
    if torch.device(device).type == "cuda":
        label, value = "peak GPU memory allocated", torch.cuda.max_memory_allocated()
    else:
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
        label, value = "peak process RSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    size = distributed.world()[1]
    if size == 1:
        return label, value
    peak = torch.tensor([value], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
    return f"{label} (largest of {size} ranks)", int(peak.item())


def _check_launcher() -> None:
    """Refuse the launches this loop does not run as asked, before anything is loaded.

    accelerate's settings reach the processes as environment variables; the loop reads only
    torchrun's (WORLD_SIZE, RANK, LOCAL_RANK), so anything else would be silently ignored."""
    env = os.environ
    if env.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        raise LoquantError("FSDP is not supported by loquant finetune: the base is packed integer buffers that "
                           "FSDP cannot shard, and only the small adapter trains. Use data parallelism: "
                           "accelerate launch --num_processes N -m loquant finetune ...")  # fmt: skip
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true"):
        raise LoquantError("DeepSpeed is not supported by loquant finetune: "
                           "use accelerate launch --num_processes N -m loquant finetune ...")  # fmt: skip
    if env.get("ACCELERATE_MIXED_PRECISION", "no") != "no":
        raise LoquantError(f"accelerate's --mixed_precision {env['ACCELERATE_MIXED_PRECISION']} is not used by "
                           "loquant finetune: leave it at no and pass --bf16 / --no-bf16 to loquant")  # fmt: skip
    mpi = max(int(env.get(k, "1")) for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE"))
    cpu_several = env.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true") and "MASTER_ADDR" in env
    if "WORLD_SIZE" not in env and (mpi > 1 or cpu_several):
        raise LoquantError("this launch would run independent processes: `accelerate launch --cpu --num_processes N` "
                           "starts one process (several only through mpirun, which loquant does not join). "
                           "On CPU use `accelerate launch --multi_gpu --num_processes N` (gloo when there is no "
                           "CUDA) or torchrun")  # fmt: skip


def _data_parallel(model: nn.Module, device) -> nn.Module:
    """torch DDP over the trainable parameters only.

    torch's DDP rather than accelerate's Accelerator.prepare: prepare would also wrap the
    optimizer and scheduler (its scheduler steps once per process per step unless told
    otherwise, changing the LR schedule), apply its own autocast and device placement, and the
    checkpoints would go through its state format; here the one-process loop, its checkpoints
    and --resume stay as they are and DDP only averages gradients. accelerate launch sets
    torchrun's variables, so the same code runs under either launcher.

    Every rank loads the frozen base from the same file, so frozen parameters and buffers (the
    packed codes, scales, embeddings) are excluded from DDP's initial broadcast and from
    per-step buffer broadcasts (broadcast_buffers=False). What DDP synchronizes is the trainable
    parameters (broadcast from rank 0 once, gradients averaged every step) and the WHT adapter's
    support indices (broadcast once, so every rank trains the same coefficients).
    """
    from torch.nn.parallel import DistributedDataParallel

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    supports = {n for n, _ in model.named_buffers() if n.endswith((".wht.rows", ".wht.cols"))}
    ignore = [n for n, _ in model.named_parameters() if n not in trainable]
    ignore += [n for n, _ in model.named_buffers() if n not in supports]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)
    device = torch.device(device)
    device_ids = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else None  # fmt: skip
    # No buffer broadcast before each forward (the ignored ones would not be sent anyway; the WHT
    # supports never change). torch 2.13 renamed broadcast_buffers to forward_sync_buffers.
    import inspect

    renamed = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    no_forward_sync = {"forward_sync_buffers" if renamed else "broadcast_buffers": False}
    return DistributedDataParallel(model, device_ids=device_ids, **no_forward_sync)


def _held_out_ppl(model: nn.Module, held: torch.Tensor, batch_size: int) -> float:
    """Held-out perplexity; with several ranks each scores every N-th batch and the sums are reduced
    (the same batches as one process, only the float64 sum's order differs)."""
    rank, size = distributed.world()
    if size == 1:
        return perplexity(model, held, batch_size=batch_size, progress=False)["ppl"]
    mine = held.split(batch_size)[rank::size]
    total = torch.zeros(2, dtype=torch.float64, device=next(model.parameters()).device)
    if mine:  # the last (possibly short) batch stays last, so cat + split gives the same batches
        scored = perplexity(model, torch.cat(mine), batch_size=batch_size, progress=False)
        total += torch.tensor([scored["nll"] * scored["tokens"], scored["tokens"]], dtype=torch.float64,
                              device=total.device)  # fmt: skip
    torch.distributed.all_reduce(total)
    return math.exp((total[0] / total[1]).item())


def run(base: str, out: str, config: FinetuneConfig, *, resume: bool = False, overwrite: bool = False,
        device: str | None = None, progress: bool = True) -> dict:  # fmt: skip
    """`loquant finetune`: train, checkpoint, evaluate, and write OUT (see the module docstring).

    Under a launcher (WORLD_SIZE > 1) every rank calls this; rank 0 alone writes OUT."""
    out = Path(out)
    _check_launcher()
    distributed.init_from_env()
    rank, size = distributed.world()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    group_device = "cuda" if torch.cuda.is_available() else "cpu"  # init_from_env: NCCL with CUDA, else gloo
    if size > 1 and torch.device(device).type != group_device:
        raise LoquantError(f"--device {device} under a launcher: the process group here needs {group_device}")
    state = read_state(out) if resume else None
    if resume:
        if state is None:
            raise LoquantError(f"{out}: nothing to resume (no {STATE_FILE})")
        if state["status"] == "done":
            raise LoquantError(f"{out}: this run already finished")
        if Path(state["base"]).resolve() != Path(base).resolve():
            raise LoquantError(f"{out} fine-tunes {state['base']}, not {base}")
        config = FinetuneConfig.from_dict(state["config"])
    else:
        ensure_writable(out, overwrite)
        read_corpus(config.data)  # bad data fails before the model loads
    model, tokenizer, corrections = load_base(out if resume else base)
    if not resume:
        config = resolve(config, corrections)
    if config.batch_size < size:
        raise LoquantError(f"--batch-size {config.batch_size} is the global batch: it cannot be shared by {size} ranks")
    train_ids, held, held_name = split_data(config, tokenizer)
    sourced = None
    if not resume:
        calib = None
        if config.adapter == "wht":
            calib = calib_windows(train_ids, config.calib_seq_len, config.calib_samples, config.seed)
        sourced = from_source(model, config, calib, device, progress)
        state = {"status": "running", "base": str(base), "config": asdict(config), "log": []}
        distributed.barrier()  # every rank has checked OUT before rank 0 writes it; its error stops them all
        text = json.dumps(state, indent=2)
        distributed.rank0(lambda: save(model, out, tokenizer, overwrite=overwrite, extra_files={STATE_FILE: text}))
    model.to(device)
    checkpoint = None
    if resume:
        if not _checkpoints(out):
            raise LoquantError(f"{out}: no checkpoint to resume from")
        checkpoint = _checkpoints(out)[-1]
        saved = load_file(checkpoint / "adapter_state.safetensors")
        if config.mode != "adapter":  # rebuilt from the base in OUT, then filled from the checkpoint
            model = attach(model, {}, config, device=device)
        elif config.adapter == "wht":  # the supports come from the checkpoint
            names = sorted(quant_layers(model))
            model = add_wht(model, {n: tuple(saved[f"{n}.wht.{p}"] for p in ("rows", "cols", "values")) for n in names})
        else:  # built empty, then filled from the checkpoint
            model = attach(model, {}, FinetuneConfig.from_dict({**asdict(config), "init": "zero"}))
        _load_trainable(model, saved)
    else:
        model = attach(model, corrections, config, sourced=sourced)
    if config.gradient_checkpointing:
        enable_checkpointing(model)
    params = [p for p in model.parameters() if p.requires_grad]
    # `model` stays the plain module (evaluation, checkpoints, the saved adapter); `trained` runs the steps.
    trained = _data_parallel(model, device) if size > 1 else model
    optimizer = optimizer_for(model, config)
    from transformers import get_cosine_schedule_with_warmup

    warmup = config.warmup_steps if config.warmup_steps is not None else config.steps // 20
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, config.steps)
    start, log = 0, list(state.get("log", []))
    if checkpoint is not None:
        opt = torch.load(checkpoint / "optimizer.pt", map_location=device, weights_only=True)
        optimizer.load_state_dict(opt["optimizer"])
        scheduler.load_state_dict(opt["scheduler"])
        meta = json.loads((checkpoint / "state.json").read_text())
        start, log = meta["step"], meta["log"]
    bf16 = _bf16(config, device)
    evaluate = lambda: _held_out_ppl(model, held, config.batch_size)  # noqa: E731
    if checkpoint is None:
        model.eval()
        log.append({"step": 0, "eval_ppl": _autocast(device, bf16, evaluate)})
        # Step 0 is a checkpoint too: the base in OUT no longer holds the correction the adapter started from.
        if rank == 0:
            _save_checkpoint(out, model, optimizer, scheduler, 0, log)
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trained_tokens, train_seconds = 0, 0.0
    bar = tqdm(range(start, config.steps), desc="finetune", disable=not progress or rank != 0, unit="step",
               initial=start, total=config.steps)  # fmt: skip
    for step in bar:
        model.train()
        tick = time.perf_counter()
        batch = batch_at(train_ids, step, config)
        step_tokens = batch.numel()
        if size > 1:  # this rank's contiguous share of the global batch (shares differ by at most one window)
            batch = batch.tensor_split(size)[rank]
        batch = batch.to(device)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            loss = trained(input_ids=batch, labels=batch, use_cache=False).loss
        reported = loss
        if size > 1:
            # The loss is the mean over this rank's windows (all of seq_len tokens) and DDP averages
            # gradients over ranks; weighting by share * N / batch makes the average the mean over all
            # windows (the weight is exactly 1 when the batch divides evenly).
            loss = loss * (batch.shape[0] * size / config.batch_size)
            reported = loss.detach().float() / size
            torch.distributed.all_reduce(reported)  # every rank sees the same loss, so all stop together
        if not torch.isfinite(reported):  # stop before a NaN reaches the adapter; OUT stays unfinished
            raise LoquantError(f"step {step + 1}: the loss is {reported.item()}: training diverged, lower --lr")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        train_seconds += time.perf_counter() - tick
        trained_tokens += step_tokens
        done = step + 1
        entry = {"step": done, "loss": reported.item(), "lr": scheduler.get_last_lr()[0]}
        if config.eval_every and (done % config.eval_every == 0 or done == config.steps):
            model.eval()
            entry["eval_ppl"] = _autocast(device, bf16, evaluate)
        log.append(entry)
        bar.set_postfix(loss=f"{entry['loss']:.3f}", **({"eval_ppl": f"{entry['eval_ppl']:.2f}"} if "eval_ppl" in entry
                                                        else {}))  # fmt: skip
        if done % config.save_every == 0 and done < config.steps and rank == 0:
            _save_checkpoint(out, model, optimizer, scheduler, done, log)
    bar.close()
    model.eval()
    if "eval_ppl" not in log[-1]:
        log[-1]["eval_ppl"] = _autocast(device, bf16, evaluate)
    memory_label, memory = _peak_memory(device)
    result = {
        "held_out": held_name,
        "held_out_ppl_start": log[0]["eval_ppl"],
        "held_out_ppl_end": log[-1]["eval_ppl"],
        "trainable_params": sum(p.numel() for p in params),
        "peak_memory_bytes": memory,
        "peak_memory_kind": memory_label,
        "tokens_per_second": trained_tokens / train_seconds if train_seconds else None,
        "device": str(device),
        **({"processes": size} if size > 1 else {}),
    }
    if config.mode != "adapter":
        merged = _merge_qat(model, held, config, device, bf16, result)
        done = {**state, "status": "done", "config": asdict(config), "log": log, "result": result}
        # The whole folder is replaced at once: the merged model, no checkpoints.
        if rank == 0:
            save(merged.cpu(), out, tokenizer, overwrite=True, extra_files={STATE_FILE: json.dumps(done, indent=2)})
        distributed.barrier()  # OUT is complete when any rank returns
        return {"model": merged, **result}
    if rank == 0:
        adapter_dir = out / ADAPTER_DIR
        with atomic_dir(adapter_dir, overwrite=True) as tmp:
            save_adapter(model, tmp)
        _write_state(out, {**state, "status": "done", "config": asdict(config), "log": log, "result": result})
        shutil.rmtree(out / CHECKPOINTS_DIR, ignore_errors=True)
    distributed.barrier()
    return {"model": model, **result}


def _merge_qat(model, held, config, device, bf16, result: dict) -> nn.Module:
    """Merge the QAT layers into plain QuantLinear, in place; records how close the logits stay."""
    from loquant import qat

    batch = held[: config.batch_size].to(device)
    with torch.no_grad():
        trained = model(input_ids=batch).logits.float()
        merged = qat.merge(model)
        logits = merged(input_ids=batch).logits.float()
    result["merged_max_abs_logit_diff"] = (logits - trained).abs().max().item()
    result["merged_logit_scale"] = trained.abs().max().item()
    result["held_out_ppl_end_trained"] = result["held_out_ppl_end"]
    ppl = lambda: _held_out_ppl(merged, held, config.batch_size)  # noqa: E731
    result["held_out_ppl_end"] = _autocast(device, bf16, ppl)
    return merged


def _load_trainable(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for name, tensor in saved.items():
        if name.endswith((".wht.rows", ".wht.cols")):
            continue
        if name not in params:
            raise LoquantError(f"checkpoint tensor {name} does not fit this adapter")
        params[name].data.copy_(tensor)


def _autocast(device, bf16: bool, fn):
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
        return fn()
