"""LoRA on QuantLinear through PEFT, with IR-QLoRA's elastic connection (IEC) as an option.

PEFT wraps only the layer types it knows; loquant's QuantLinear joins through PEFT's custom
module API (`LoraConfig._register_custom_module`). That registration lives on the config
object, not in adapter_config.json, so loading an adapter through PEFT takes the config from
`peft_config(path)`:

    base = loquant.load(OUT, adapter=False)
    model = PeftModel.from_pretrained(base, OUT / "adapter", config=loquant.adapters.peft_config(OUT / "adapter"))

IEC (IR-QLoRA) adds two learnable scalars per layer: the input, mean-pooled in groups down to
r, is added after A; the r-dim output, repeated up to `out`, is added after B. Both maps are
linear, so the adapter folds exactly into a plain LoRA pair (A + β1·P, B + β2·U): the saved
adapter is an ordinary PEFT LoRA any PEFT loads, and IEC costs nothing at inference.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from torch import nn

from loquant.layers import QuantLinear


def pool_matrix(in_features: int, rank: int) -> torch.Tensor:
    """P (rank x in): mean of `in` inputs in `rank` contiguous groups (uneven sizes as adaptive pooling)."""
    return F.adaptive_avg_pool1d(torch.eye(in_features)[None], rank)[0].t().contiguous()


def repeat_matrix(out_features: int, rank: int) -> torch.Tensor:
    """U (out x rank): the rank-dim vector tiled up to `out` (row i takes entry i mod rank)."""
    return F.one_hot(torch.arange(out_features) % rank, rank).float()


class LoraQuantLinear(nn.Module, LoraLayer):
    """PEFT's LoRA around a frozen QuantLinear: y = base(x) + s · B'(A'(x)), A' and B' as above."""

    def __init__(self, base_layer: QuantLinear, adapter_name: str, config: LoraConfig, r: int = 0,
                 lora_alpha: int = 1, **kwargs) -> None:  # fmt: skip
        if config.lora_bias:
            raise ValueError("loquant's LoRA layer does not support lora_bias")
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        self.iec_beta = nn.ParameterDict()  # not a PEFT adapter name: folded before PEFT saves
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def enable_iec(self, adapter_name: str = "default") -> None:
        """Add the two IEC scalars, at zero so the layer's output does not change."""
        A = self.lora_A[adapter_name].weight
        B = self.lora_B[adapter_name].weight
        self.iec_beta[adapter_name] = nn.Parameter(torch.zeros(2, device=A.device))
        # P and U are fixed: built once, not per forward; not saved (they follow from the shapes).
        self.register_buffer(f"iec_pool_{adapter_name}", pool_matrix(A.shape[1], A.shape[0]).to(A), persistent=False)
        self.register_buffer(
            f"iec_repeat_{adapter_name}", repeat_matrix(B.shape[0], A.shape[0]).to(B), persistent=False
        )

    def lora_pair(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A', B') with IEC folded in, float32."""
        A = self.lora_A[adapter].weight
        B = self.lora_B[adapter].weight
        if adapter in self.iec_beta:
            beta = self.iec_beta[adapter]
            A = A + beta[0] * getattr(self, f"iec_pool_{adapter}")
            B = B + beta[1] * getattr(self, f"iec_repeat_{adapter}")
        return A, B

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        A, B = self.lora_pair(adapter)
        return (B.float() @ A.float()) * self.scaling[adapter]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x)
        if self.disable_adapters:
            return result
        for adapter in self.active_adapters:
            if adapter not in self.lora_A:
                continue
            dropout = self.lora_dropout[adapter]
            dtype = result.dtype
            xa = x if torch.is_autocast_enabled(x.device.type) else x.to(self.lora_A[adapter].weight.dtype)
            if adapter in self.iec_beta:
                A, B = self.lora_pair(adapter)
                lora = F.linear(F.linear(dropout(xa), A), B)
            else:
                lora = self.lora_B[adapter](self.lora_A[adapter](dropout(xa)))
            result = (result + lora * self.scaling[adapter]).to(dtype)
        return result

    def merge(self, *args, **kwargs) -> None:
        raise NotImplementedError("merge into packed weights is lossy: use `loquant merge` for a 16-bit model")

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def register(config: LoraConfig) -> LoraConfig:
    config._register_custom_module({QuantLinear: LoraQuantLinear})
    return config


def lora_config(**kwargs) -> LoraConfig:
    """A LoraConfig that can wrap QuantLinear (kwargs as LoraConfig's)."""
    return register(LoraConfig(**kwargs))


def peft_config(path: str | os.PathLike) -> LoraConfig:
    """The saved adapter's LoraConfig, registered for QuantLinear: pass it to PeftModel.from_pretrained."""
    return register(LoraConfig.from_pretrained(str(path)))


def lora_layers(model: nn.Module) -> dict[str, LoraQuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraQuantLinear)}
