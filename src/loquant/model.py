"""Model surgery: one generic pass that swaps a model's linear layers for QuantLinear."""

from __future__ import annotations

import copy
import fnmatch
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from loquant import distributed
from loquant.calibration import Calibration, InputStats, block_list, collect, fisher_diagonal, run_sequential
from loquant.checkpoint import Checkpoint, block_key, group_blocks
from loquant.corrections import DEFAULT_ITERS, METHODS, NEEDS_STATS, correct
from loquant.corrections.methods import Quantizer
from loquant.errors import LoquantError
from loquant.formats import WeightFormat, quantize_weight
from loquant.layers import QuantLinear
from loquant.rilq import RilqConfig, refine

QUANT_METHOD = "loquant"
FORMAT_VERSION = 1
# rtn: round to nearest; gptq: error feedback through the inverse Hessian of the inputs (needs
# calibration); hqq: half-quadratic optimization of the zero points (no data, `int` format only).
QUANTIZERS = ("rtn", "gptq", "hqq")
# Every per-layer correction, plus rilq: a closed-form start trained against the float model.
MODEL_METHODS = (*METHODS, "rilq")

try:  # GPT-2 style layers store the weight as (in, out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a hard dependency
    Conv1D = ()


@dataclass
class QuantConfig:
    """What `quantize` does to a model.

    Targets: by default every linear layer inside the model's repeated blocks (a module path
    with a numeric index, e.g. `model.layers.3.mlp.up_proj`), which leaves embeddings, the
    output head and poolers in float. `include` / `exclude` are glob patterns on module names;
    `overrides` maps a pattern to format fields (later patterns win), e.g.
    `{"*.down_proj": {"bits": 8}}`. `icq` (nf only) shifts each group by IR-QLoRA's
    entropy-maximizing τ (WeightFormat.icq).

    Base quantizer: `quantizer` (QUANTIZERS); every correction runs on its output, and
    LoftQ / LQ-LoRA alternate with it.
    Correction: `method` (see loquant.corrections.METHODS) at `rank` (0 = none); `iters` for
    loftq (default 5) and as lqlora's cap (default 20); `fisher` weights lqlora by the
    diagonal Fisher; `rilq` (method "rilq") starts from `rilq.init` and trains all
    corrections together against the float model (loquant.rilq); `damping` clamps R's
    eigenvalues at that fraction of the largest;
    `sequential` calibrates each block on the outputs of the already quantized blocks.
    `calibration` is a free-form record of the calibration data, saved with the model.
    """

    format: str = "int"
    bits: int = 4
    group_size: int = 64
    double_quant: bool = False
    icq: bool = False
    include: list[str] | None = None
    exclude: list[str] = field(default_factory=list)
    overrides: dict[str, dict] = field(default_factory=dict)
    method: str = "none"
    quantizer: str = "rtn"
    act_order: bool = False
    rank: int = 0
    iters: int | None = None
    fisher: bool = False
    damping: float = 1e-8
    sequential: bool = False
    rilq: RilqConfig = field(default_factory=RilqConfig)
    source_model: str | None = None
    calibration: dict | None = None

    def __post_init__(self) -> None:
        self.base_format()  # validate early, before any layer is touched
        for pattern in self.overrides:
            self.format_for(pattern)
        if self.quantizer not in QUANTIZERS:
            raise LoquantError(f"unknown quantizer {self.quantizer!r}: choose one of {', '.join(QUANTIZERS)}")
        if self.act_order and self.quantizer != "gptq":
            raise LoquantError("--act-order orders GPTQ's columns: use it with --quantizer gptq")
        if self.method not in MODEL_METHODS:
            raise LoquantError(f"unknown method {self.method!r}: choose one of {', '.join(MODEL_METHODS)}")
        if self.method == "rilq" and self.rank == 0:
            raise LoquantError("rilq trains a low-rank correction: give --rank above 0")
        if self.rank < 0:
            raise LoquantError(f"rank must be 0 or more, got {self.rank}")
        if self.fisher and self.layer_method != "lqlora":
            raise LoquantError("--fisher weights the lqlora method only")
        if self.iters is not None and (self.layer_method not in DEFAULT_ITERS or self.iters < 1):
            raise LoquantError("--iters takes a positive count, for loftq, lqlora, lqer or qera-*")
        if self.sequential and not self.needs_stats:
            raise LoquantError("--sequential calibrates gptq, or lqer, qera-approx or qera-exact at a rank above 0")
        if not self.damping >= 0:
            raise LoquantError(f"damping must be 0 or more, got {self.damping}")

    @property
    def corrects(self) -> bool:
        return self.rank > 0 and self.method != "none"

    @property
    def layer_method(self) -> str:
        """The per-layer correction (rilq's start for rilq)."""
        return self.rilq.init if self.method == "rilq" else self.method

    @property
    def needs_stats(self) -> bool:
        """Whether the layers' input statistics are needed (GPTQ's Hessian, activation-aware methods)."""
        return self.quantizer == "gptq" or (self.corrects and self.layer_method in NEEDS_STATS)

    @property
    def needs_calibration(self) -> bool:
        return self.needs_stats or (self.corrects and (self.fisher or self.method == "rilq"))

    def base_format(self) -> WeightFormat:
        return WeightFormat(self.format, self.bits, self.group_size, self.double_quant, self.icq)

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

    def record(self) -> dict:
        """What the saved config says about how the model was made."""
        return {
            "quantizer": self.quantizer,
            "act_order": self.act_order,
            "method": self.method if self.corrects else "none",
            "rank": self.rank if self.corrects else 0,
            "iters": self.iters or DEFAULT_ITERS.get(self.layer_method) if self.corrects else None,
            "fisher": self.fisher,
            "damping": self.damping,
            "sequential": self.sequential,
            "calibration": self.calibration if self.needs_calibration else None,
            **({"rilq": self.rilq.to_dict()} if self.method == "rilq" and self.corrects else {}),
        }


def linear_weight(module: nn.Module) -> torch.Tensor | None:
    """The (out x in) weight of a linear-like module, or None for anything else."""
    if isinstance(module, nn.Linear):
        return module.weight
    if Conv1D and isinstance(module, Conv1D):
        return module.weight.t()
    return None


def hf_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PeftModel (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


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


def update_quantization_config(model: nn.Module, source_model: str | None = None, recipe: dict | None = None) -> dict:
    """Record every QuantLinear's format in model.config.quantization_config."""
    previous = getattr(model.config, "quantization_config", None)
    previous = previous.to_dict() if hasattr(previous, "to_dict") else previous  # from transformers' loader
    previous = previous if isinstance(previous, dict) and previous.get("quant_method") == QUANT_METHOD else {}
    qc = {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "source_model": source_model or previous.get("source_model"),
        "recipe": recipe or previous.get("recipe"),
        "layers": {name: layer_record(m) for name, m in sorted(quant_layers(model).items())},
    }
    model.config.quantization_config = qc
    return qc


def source_name(model: nn.Module) -> str | None:
    return getattr(model, "loquant_source", None) or getattr(model, "name_or_path", None) or None


def quantize(
    model: nn.Module,
    config: QuantConfig | None = None,
    *,
    calib: torch.Tensor | None = None,
    stats: Calibration | None = None,
    held_out: torch.Tensor | None = None,
    progress: bool = True,
    checkpoint: Checkpoint | None = None,
) -> nn.Module:
    """Replace the targeted linear layers of `model` in place by QuantLinear; returns it.

    calib: calibration windows (n x seq_len token ids), needed by the data-aware methods.
    stats: input statistics already gathered from this model's float layers with
      `loquant.calibration.collect` (sweeps reuse them across configs); not with `sequential`.
    held_out: rilq's early-stopping windows, which must not overlap `calib` (rilq trains on
      calib, with a copy of the float model taken before quantization as the teacher).
    Every target is checked first, and without `sequential` every layer is built before any
    is swapped in, so bad input leaves the model as it was. Seconds spent per phase are left
    in `model.loquant_timings`. checkpoint: keeps each finished block on disk and restores the
    blocks an interrupted run finished (loquant.checkpoint).
    """
    config = config or QuantConfig()
    targets = targets_of(model, config)
    if stats is not None and config.sequential:
        raise LoquantError("sequential calibration gathers its own statistics: pass calib, not stats")
    if config.needs_calibration and calib is None and (stats is None or config.fisher):
        raise LoquantError(f"method {config.method} needs calibration windows (calib=...)")
    if config.method == "rilq" and held_out is None:
        raise LoquantError("rilq stops early on held-out windows: pass held_out=... (text apart from calib)")
    teacher = copy.deepcopy(model) if config.method == "rilq" else None
    timings = {"calibration_s": 0.0, "fisher_s": 0.0, "decomposition_s": 0.0}
    modules = {name: module for name, module, _, _ in targets}
    fisher = None
    if config.corrects and config.fisher:
        start = time.perf_counter()
        params = {n: m.weight for n, m in modules.items()}
        fisher = fisher_diagonal(model, calib, params, progress=progress)
        fisher = {n: f.t() if isinstance(modules[n], Conv1D) else f for n, f in fisher.items()}  # to (out x in)
        timings["fisher_s"] = time.perf_counter() - start

    groups = group_blocks([name for name, _, _, _ in targets])
    by_name = {t[0]: t for t in targets}
    builder = BlockBuilder(config, fisher, checkpoint, len(groups), timings)

    def block_layers(i: int, stats, bar) -> list[tuple[str, QuantLinear]]:
        return builder.block(i, [by_name[n] for n in groups[i]], stats, bar)

    needs_stats = config.needs_stats
    with tqdm(total=len(targets), desc="quantize", disable=not progress, unit="layer") as bar:
        if needs_stats and config.sequential:
            index = {block_key(g[0]): i for i, g in enumerate(groups)}

            def process_block(i, block_stats):
                if f"{block_prefix}.{i}." in index:
                    for name, layer in block_layers(index[f"{block_prefix}.{i}."], block_stats, bar):
                        model.set_submodule(name, layer)

            start = time.perf_counter()
            block_prefix = block_list(model, list(modules))[0]
            run_sequential(model, calib, modules, process_block, progress=False)
            timings["calibration_s"] = time.perf_counter() - start - timings["decomposition_s"]
        else:
            done = checkpoint.blocks_done if checkpoint is not None else 0
            if needs_stats and stats is None:
                start = time.perf_counter()
                todo = {n: modules[n] for g in groups[done:] for n in g}  # restored blocks need none
                stats = collect(model, calib, todo, progress=progress) if todo else {}
                timings["calibration_s"] = time.perf_counter() - start
            built = [pair for i in range(len(groups)) for pair in block_layers(i, stats, bar)]
            for name, layer in built:
                model.set_submodule(name, layer)
    recipe = config.record()
    if teacher is not None:
        start = time.perf_counter()
        recipe["rilq"] = refine(model, teacher, calib, held_out, config.rilq, progress=progress)
        timings["rilq_s"] = time.perf_counter() - start
        del teacher
    update_quantization_config(model, config.source_model or source_name(model), recipe)
    model.loquant_timings = timings
    return model


def build_layer(name: str, module: nn.Module, weight: torch.Tensor, fmt: WeightFormat, config: QuantConfig,
                stats: Calibration | None = None, fisher: dict | None = None) -> QuantLinear:  # fmt: skip
    """One target quantized and corrected as `config` says."""
    try:
        layer_stats = stats[name] if stats is not None and name in stats else None
        result = correct(
            weight,
            fmt,
            config.layer_method,
            config.rank,
            stats=layer_stats,
            fisher=fisher[name] if fisher else None,
            iters=config.iters,
            damping=config.damping,
            quantizer=base_quantizer(config.quantizer, layer_stats, act_order=config.act_order),
        )
    except LoquantError as err:
        raise LoquantError(f"layer {name}: {err}") from None
    layer = QuantLinear.from_tensors(result.tensors, fmt, tuple(weight.shape), module.bias, weight.dtype)
    layer.set_correction(result.A, result.B)
    return layer


class BlockBuilder:
    """Builds one block's layers: restored from the checkpoint if an earlier run finished it,
    else split across processes (loquant.distributed), built, exchanged and checkpointed."""

    def __init__(self, config: QuantConfig, fisher: dict | None, checkpoint: Checkpoint | None, total: int,
                 timings: dict) -> None:  # fmt: skip
        self.config, self.fisher, self.checkpoint, self.total, self.timings = config, fisher, checkpoint, total, timings

    def block(self, i: int, targets: list, stats: Calibration | None, bar,
              extra: dict[str, torch.Tensor] | None = None) -> list[tuple[str, QuantLinear]]:  # fmt: skip
        """targets: (name, module, weight, fmt) of block i; extra: float tensors its checkpoint
        file also keeps (a streamed block's norms)."""
        modules = {name: module for name, module, _, _ in targets}
        restored = self.checkpoint.restore(i, modules) if self.checkpoint is not None else None
        if restored is not None:
            bar.update(len(restored))
            return list(restored.items())
        own = distributed.mine(targets)
        built: list | LoquantError = []
        try:
            for name, module, weight, fmt in own:
                start = time.perf_counter()
                built.append((name, build_layer(name, module, weight, fmt, self.config, stats, self.fisher)))
                self.timings["decomposition_s"] += time.perf_counter() - start
                bar.update()
        except LoquantError as err:
            built = err
        built = distributed.share(built, [t[0] for t in targets], modules)  # several processes: everyone's layers
        bar.update(len(built) - len(own))
        if self.checkpoint is not None and distributed.world()[0] == 0:
            self.checkpoint.save(i, self.total, dict(built), extra)
        return built


def base_quantizer(name: str, stats: InputStats | None = None, *, act_order: bool = False) -> Quantizer:
    """The (W, fmt) -> stored tensors function of a base quantizer; GPTQ reads the layer's R."""
    if name == "rtn":
        return quantize_weight
    if name == "hqq":
        from loquant.quantizers.hqq import hqq_quantize

        return lambda W, fmt: hqq_quantize(W.float(), fmt)
    if stats is None:
        raise LoquantError("gptq needs calibration statistics of the layer inputs")
    from loquant.quantizers.gptq import gptq_quantize

    return lambda W, fmt: gptq_quantize(W.float(), fmt, stats.R.to(W.device), act_order=act_order)


def check_finite(name: str, weight: torch.Tensor) -> None:
    if not torch.isfinite(weight).all():
        raise LoquantError(f"layer {name}: weight contains NaN or Inf")


def targets_of(model: nn.Module, config: QuantConfig, *, check_values: bool = True,
               ) -> list[tuple[str, nn.Module, torch.Tensor, WeightFormat]]:  # fmt: skip
    """(name, module, weight, format) of every layer `config` quantizes; check_values=False
    for a skeleton whose weights are not loaded yet (loquant.streaming checks each block)."""
    targets = []
    for name, module in model.named_modules():
        weight = linear_weight(module)
        if weight is None or not config.selects(name):
            continue
        if check_values:
            check_finite(name, weight)
        if config.corrects and config.rank > min(weight.shape):
            raise LoquantError(f"layer {name}: rank {config.rank} exceeds min(out, in) = {min(weight.shape)}")
        targets.append((name, module, weight.detach(), config.format_for(name)))
    if not targets:
        if quant_layers(model):
            raise LoquantError("the model is already quantized: start from its float source")
        raise LoquantError("no linear layer matched: check include/exclude patterns")
    return targets
