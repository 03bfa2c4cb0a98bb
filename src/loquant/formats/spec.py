"""WeightFormat: what a quantized matrix is stored as, and the tensors that takes."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from loquant.errors import LoquantError
from loquant.formats.bitpack import packed_nbytes
from loquant.formats.double_quant import dq_num_blocks

FORMAT_BITS = {"int": (2, 3, 4, 8), "int-sym": (2, 3, 4, 8), "nf": (2, 3, 4)}
# Per-group parameters each format stores, in order.
FORMAT_PARAMS = {"int": ("scales", "offsets"), "int-sym": ("scales",), "nf": ("scales",)}
# Per-group parameters always stored as int8 in blocks of 256, whatever double_quant says.
ALWAYS_DOUBLE_QUANT = ("shifts",)


@dataclass(frozen=True)
class WeightFormat:
    """A number format and block layout for one weight matrix (out x in).

    format: `int` (asymmetric: fp16 scale and fp16 offset = group minimum), `int-sym`
      (fp16 scale, codes centred on zero, stored with a +2**(b-1) bias), `nf` (NormalFloat
      code book, fp16 absmax scale).
    group_size: consecutive input weights sharing parameters; -1 = one group per output
      channel. A group size that does not divide `in` leaves a shorter last group per row.
    double_quant: store the per-group parameters as int8 in blocks of 256 (QLoRA).
    icq: `nf` only. IR-QLoRA's information calibration: each group is shifted by the τ that
      maximizes its codes' entropy (formats/icq.py), w ≈ τ + scale · book[code]; τ is stored
      as int8 in blocks of 256 (`shifts`, always double-quantized: 8 bits a group plus a
      little), and the scale is absmax(w - τ) with τ as stored.
    """

    format: str = "int"
    bits: int = 4
    group_size: int = 64
    double_quant: bool = False
    icq: bool = False

    def __post_init__(self) -> None:
        if self.format not in FORMAT_BITS:
            raise LoquantError(f"unsupported format {self.format!r}: choose one of {', '.join(FORMAT_BITS)}")
        if isinstance(self.bits, bool) or self.bits not in FORMAT_BITS[self.format]:
            allowed = ", ".join(map(str, FORMAT_BITS[self.format]))
            raise LoquantError(f"unsupported bit width {self.bits} for format {self.format!r}: choose {allowed}")
        if (
            isinstance(self.group_size, bool)
            or not isinstance(self.group_size, int)
            or (self.group_size <= 0 and self.group_size != -1)
        ):
            raise LoquantError(
                f"unsupported group size {self.group_size}: use a positive size "
                "(32, 64, 128, 256) or -1 for one group per output channel"
            )
        if not isinstance(self.icq, bool):
            raise LoquantError(f"icq must be true or false, got {self.icq!r}")
        if self.icq and self.format != "nf":
            raise LoquantError(f"icq shifts NormalFloat groups: use format 'nf', not {self.format!r}")

    def group_len(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else min(self.group_size, in_features)

    def num_groups(self, in_features: int) -> int:
        return -(-in_features // self.group_len(in_features))

    @property
    def param_names(self) -> tuple[str, ...]:
        return FORMAT_PARAMS[self.format] + (("shifts",) if self.icq else ())

    def double_quantized(self, name: str) -> bool:
        """Whether parameter `name` is stored as int8 blocks (`{name}_q/_absmax/_mean`)."""
        return self.double_quant or name in ALWAYS_DOUBLE_QUANT

    def layout(self, out_features: int, in_features: int) -> dict[str, tuple[tuple, torch.dtype]]:
        """Name -> (shape, dtype) of every stored tensor of one out x in matrix."""
        groups = (out_features, self.num_groups(in_features))
        tensors = {"qweight": ((packed_nbytes(out_features * in_features, self.bits),), torch.uint8)}
        for name in self.param_names:
            if self.double_quantized(name):
                blocks = dq_num_blocks(groups[0] * groups[1])
                tensors[f"{name}_q"] = (groups, torch.int8)
                tensors[f"{name}_absmax"] = ((blocks,), torch.float32)
                tensors[f"{name}_mean"] = ((1,), torch.float32)
            else:
                tensors[name] = (groups, torch.float16)
        return tensors

    def to_dict(self) -> dict:
        d = asdict(self)
        if not d["icq"]:  # folders without ICQ stay readable by loquant versions before it
            del d["icq"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> WeightFormat:
        unknown = set(d) - {"format", "bits", "group_size", "double_quant", "icq"}
        if unknown:
            raise LoquantError(f"unknown format fields: {', '.join(sorted(unknown))}")
        return cls(**d)

    @classmethod
    def from_record(cls, rec: dict) -> WeightFormat:
        """The format of a saved layer record (quantization_config["layers"][name]), its other
        keys ignored; `icq`, added later, is False where absent."""
        fields = {k: rec[k] for k in ("format", "bits", "group_size", "double_quant")}
        return cls.from_dict({**fields, "icq": rec.get("icq", False)})

    def describe(self) -> str:
        g = "ch" if self.group_size == -1 else f"g{self.group_size}"
        name = {"int": "INT", "int-sym": "INT-sym", "nf": "NF"}[self.format]
        return f"{name}{self.bits} {g}" + (" dq" if self.double_quant else "") + (" icq" if self.icq else "")
