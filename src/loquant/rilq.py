"""RILQ: train every layer's low-rank correction together, against the float model.

RILQ (Lee et al., AAAI 2025) observes that at 2 bits the error W - Q(W) of a layer is far
from low rank, so a rank-r correction computed layer by layer leaves most of it. Trained
jointly against the float model's output, low-rank corrections cooperate across layers and
recover much more ("rank-insensitive"). The loss is the model-level discrepancy, the mean
squared difference of the last hidden states of the quantized model and the float teacher,
plus the causal-LM loss on the text ("GT-loss").

Only the A and B of each QuantLinear train, with float32 master copies that are stored back
in 16 bits at the end; the packed codes, scales and every other weight stay frozen. The start
is a closed-form correction (`init`, qera-exact by default). The held-out loss is measured
every `eval_every` steps. The best corrections seen are kept, and training stops after
`patience` evaluations without improvement (early stopping).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from loquant.errors import LoquantError
from loquant.layers import QuantLinear


@dataclass
class RilqConfig:
    """RILQ's training: `steps` at most, AdamW at `lr` (cosine, 5% warm-up), `batch_size`
    calibration windows a step drawn by a seeded (seed, step) generator, loss
    `hidden_weight` · MSE(last hidden states) + `lm_weight` · LM loss. bf16 autocast defaults
    to on with CUDA; `device` (default cuda when available) is where it trains."""

    init: str = "qera-exact"
    steps: int = 200
    lr: float = 2e-4
    batch_size: int = 8
    eval_every: int = 20
    patience: int = 3
    hidden_weight: float = 1.0
    lm_weight: float = 1.0
    seed: int = 0
    bf16: bool | None = None
    device: str | None = None

    def __post_init__(self) -> None:
        from loquant.corrections import METHODS

        if self.init not in METHODS or self.init == "none":
            raise LoquantError(f"RILQ starts from a correction: --rilq-init is one of {', '.join(METHODS[1:])}")
        for name in ("steps", "batch_size", "eval_every", "patience"):
            if getattr(self, name) < 1:
                raise LoquantError(f"rilq {name} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0 or self.hidden_weight < 0 or self.lm_weight < 0 or self.hidden_weight + self.lm_weight == 0:
            raise LoquantError("rilq needs lr > 0 and non-negative loss weights, not both 0")

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "device"}


def _objective(student: nn.Module, teacher: nn.Module, batch: torch.Tensor, config: RilqConfig):
    """(loss, hidden-state MSE, LM loss) of one batch."""
    with torch.no_grad():  # the teacher's decoder only: its logits are not needed
        target = teacher.base_model(input_ids=batch, use_cache=False).last_hidden_state
    out = student(input_ids=batch, labels=batch, output_hidden_states=True, use_cache=False)
    mse = F.mse_loss(out.hidden_states[-1].float(), target.float())
    return config.hidden_weight * mse + config.lm_weight * out.loss, mse, out.loss


def refine(
    model: nn.Module,
    teacher: nn.Module,
    train: torch.Tensor,
    held_out: torch.Tensor,
    config: RilqConfig | None = None,
    *,
    progress: bool = True,
) -> dict:
    """Train the corrections of `model`'s QuantLinear layers in place; returns the run's record.

    teacher: the float model `model` was quantized from. train / held_out: token windows
    (n x seq_len) that do not overlap. The record holds the log, the best step and the
    held-out loss and perplexity (of the LM part) at the start and at the best step.
    """
    config = config or RilqConfig()
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    if not layers or any(layer.A is None for layer in layers):
        raise LoquantError("RILQ trains the low-rank corrections: quantize with --rank above 0")
    if train.ndim != 2 or held_out.ndim != 2 or len(train) < 1 or len(held_out) < 1:
        raise LoquantError("RILQ needs training and held-out windows (n x seq_len token ids)")
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    bf16 = config.bf16 if config.bf16 is not None else device.type == "cuda"
    home = next(model.parameters()).device
    model.to(device).eval()
    teacher.to(device).eval()
    for p in [*model.parameters(), *teacher.parameters()]:
        p.requires_grad_(False)
    params = []
    for layer in layers:  # float32 masters; set_correction stores them back in 16 bits
        layer.A = nn.Parameter(layer.A.detach().float())
        layer.B = nn.Parameter(layer.B.detach().float())
        params += [layer.A, layer.B]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    from transformers import get_cosine_schedule_with_warmup

    scheduler = get_cosine_schedule_with_warmup(optimizer, config.steps // 20, config.steps)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    @torch.no_grad()
    def evaluate() -> dict:
        loss = mse = lm = 0.0
        for batch in held_out.split(config.batch_size):
            with autocast():
                parts = _objective(model, teacher, batch.to(device), config)
            loss, mse, lm = (a + b.item() * len(batch) for a, b in zip((loss, mse, lm), parts, strict=True))
        n = len(held_out)
        return {"held_out_loss": loss / n, "held_out_mse": mse / n, "held_out_ppl": math.exp(lm / n)}

    def snapshot() -> list[torch.Tensor]:
        return [p.detach().to("cpu", copy=True) for p in params]

    start = time.perf_counter()
    log = [{"step": 0, **evaluate()}]
    best, best_state, waited = log[0], snapshot(), 0
    gen = torch.Generator()
    bar = tqdm(range(config.steps), desc="rilq", disable=not progress, unit="step")
    for step in bar:
        gen.manual_seed(config.seed * 1_000_003 + step)
        batch = train[torch.randint(0, len(train), (config.batch_size,), generator=gen)].to(device)
        with autocast():
            loss, _, _ = _objective(model, teacher, batch, config)
        if not torch.isfinite(loss):
            raise LoquantError(f"rilq step {step + 1}: the loss is {loss.item()}: training diverged, lower --rilq-lr")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        if done % config.eval_every and done != config.steps:
            continue
        entry = {"step": done, "loss": loss.item(), **evaluate()}
        log.append(entry)
        bar.set_postfix(held_out_loss=f"{entry['held_out_loss']:.4f}")
        if entry["held_out_loss"] < best["held_out_loss"]:
            best, best_state, waited = entry, snapshot(), 0
        else:
            waited += 1
            if waited >= config.patience:
                break
    bar.close()
    for layer, (A, B) in zip(layers, zip(best_state[::2], best_state[1::2], strict=True), strict=True):
        layer.set_correction(A, B)
    model.to(home)
    teacher.to(home)
    return {
        **config.to_dict(),
        "steps_run": log[-1]["step"],
        "best_step": best["step"],
        "stopped_early": log[-1]["step"] < config.steps,
        "held_out_loss_start": log[0]["held_out_loss"],
        "held_out_loss_best": best["held_out_loss"],
        "held_out_ppl_start": log[0]["held_out_ppl"],
        "held_out_ppl_best": best["held_out_ppl"],
        "seconds": time.perf_counter() - start,
        "log": log,
    }
