"""Per-layer error report: weight and output error before and after the correction."""

from __future__ import annotations

import math

import torch
from torch import nn

from loquant.calibration import Calibration
from loquant.model import linear_weight, quant_layers


def layer_errors(float_model: nn.Module, quant_model: nn.Module, stats: Calibration, nbytes: dict) -> list[dict]:
    """Rows of relative errors for every quantized layer.

    weight: ‖W - Q (- C)‖ / ‖W‖. output: sqrt(tr(D R Dᵀ) / tr(W R Wᵀ)) with D = W - Q (- C)
    and R from `stats`, which should come from windows the correction never saw.
    """
    floats = dict(float_model.named_modules())
    rows = []
    for name, layer in quant_layers(quant_model).items():
        W = linear_weight(floats[name]).detach().double()
        Q = layer.dequantize(torch.float64).to(W.device)
        E = W - Q
        C = (layer.B.double() @ layer.A.double()).to(W.device) if layer.A is not None else torch.zeros_like(W)
        R = stats[name].R.to(W.device)

        def out_err(D, R=R, W=W):
            return math.sqrt(torch.trace(D @ R @ D.T).item() / torch.trace(W @ R @ W.T).item())

        weights = W.numel()
        stored = sum(n for k, n in nbytes.items() if k.rsplit(".", 1)[0] == name and not k.endswith(".bias"))
        rows.append(
            {
                "name": name,
                "weight_error": (E.norm() / W.norm()).item(),
                "weight_error_corrected": ((E - C).norm() / W.norm()).item(),
                "output_error": out_err(E),
                "output_error_corrected": out_err(E - C),
                "bits_per_weight": 8 * stored / weights,
            }
        )
    return rows


def plot(rows: list[dict], path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = range(len(rows))
    fig, axes = plt.subplots(3, 1, figsize=(12, 9), sharex=True)
    for ax, key, label in (
        (axes[0], "weight_error", "relative weight error"),
        (axes[1], "output_error", "relative output error (held-out R)"),
    ):
        ax.plot(x, [r[key] for r in rows], ".-", lw=0.8, label="quantized")
        ax.plot(x, [r[f"{key}_corrected"] for r in rows], ".-", lw=0.8, label="quantized + correction")
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right")
    axes[2].bar(x, [r["bits_per_weight"] for r in rows], color="gray")
    axes[2].set_ylabel("bits per weight")
    step = max(1, len(rows) // 30)
    axes[2].set_xticks(list(x)[::step], [r["name"] for r in rows][::step], rotation=90, fontsize=6)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
