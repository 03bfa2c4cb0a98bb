"""LoRAQuant: a LoRA adapter stored at about 1.5-2 bits per parameter.

Per layer, the adapter's update ΔW = s·B·A (s PEFT's scaling) is refactored by SVD,
ΔW = U Σ Vᵀ, into B′ = U√Σ (out x r) and A′ = √Σ Vᵀ (r x in): same product, but its energy
now sits in the first directions. The first h of them (h the smallest count whose σ² reach
`ratio` of the total) are stored with `high_bits` asymmetric round-to-nearest, A′ per row and
B′ per column (groups of `group_size` along them, -1 for one group; each group's range is
clipped where that lowers its squared error); the other r - h as 1 bit, sign x scale, one
scale per row / column, its mean |x| (the L2-optimal one for fixed signs). `refine_steps`
of straight-through alternating least squares then lower ||B̂Â - ΔW||_F.

A compressed adapter folder:

    loquant_adapter.json          avg_bits, settings, the PEFT config, per layer rank/h/bits/error
    loquant_adapter.safetensors   per layer {name}.A_hi.* and .B_hi.* (codec tensors of A′ and B′ᵀ),
                                  {name}.A_lo.* and .B_lo.* (sign bits `qweight` and fp16 `scales`)

`avg_bits` is every stored tensor byte (codes, scales, offsets, padding) x 8 over the
adapter's parameter count r·(in + out) summed over layers. The folder loads back as a PEFT
LoRA (`to_peft`: dequantized, same config, any PEFT loads it) or packed on a loquant base
(`attach`, and `loquant.load` of a folder that also holds the base, from `--base`).
"""

from __future__ import annotations

import json
import math
import pickle
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from loquant.errors import LoquantError
from loquant.formats import WeightFormat, dequantize_weight
from loquant.formats.bitpack import pack, packed_nbytes, unpack
from loquant.formats.codec import _grouped, _store_params, group_params

ADAPTER_JSON = "loquant_adapter.json"
ADAPTER_WEIGHTS = "loquant_adapter.safetensors"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
HIGH_BITS = (2, 3, 4, 8)
# Candidate shrinks of each group's [min, max]: at 2-3 bits the min-max grid wastes levels on
# the tails; the best of these (squared error, fp16 parameters as stored) is kept, 1.0 included.
CLIP_GRID = tuple(1.0 - 0.025 * i for i in range(33))


@dataclass(frozen=True)
class LoraQuantConfig:
    """ratio: energy share kept at high precision (0 < ratio <= 1). high_bits: 2, 3, 4 (8 for
    tests). group_size: high-bit values per scale along A′'s rows and B′'s columns (-1: one
    per row / column). refine_steps: refinement steps (0: round-to-nearest only). max_bits:
    a cap on each layer's bits per parameter, met by moving directions from high bits to signs
    (None: the ratio alone decides)."""

    ratio: float = 0.95
    high_bits: int = 4
    group_size: int = 64
    refine_steps: int = 0
    max_bits: float | None = None

    def __post_init__(self) -> None:
        if not 0 < self.ratio <= 1:
            raise LoquantError(f"--ratio must be in (0, 1], got {self.ratio}")
        if self.high_bits not in HIGH_BITS:
            raise LoquantError(f"--high-bits must be one of {', '.join(map(str, HIGH_BITS))}, got {self.high_bits}")
        WeightFormat("int", self.high_bits, self.group_size)  # validates group_size
        if self.refine_steps < 0:
            raise LoquantError(f"--refine-steps must be >= 0, got {self.refine_steps}")
        if self.max_bits is not None and not self.max_bits >= 1.0:
            raise LoquantError(f"--max-bits must be at least 1 (the sign part alone), got {self.max_bits}")

    @property
    def high_format(self) -> WeightFormat:
        return WeightFormat("int", self.high_bits, self.group_size)


# --- one layer -------------------------------------------------------------------------------


def svd_factors(A: torch.Tensor, B: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B′, A′, σ) with B′A′ = scale·B·A, B′ = U√Σ, A′ = √ΣVᵀ; float64, via QR of the thin factors."""
    r = A.shape[0]
    if r > min(A.shape[1], B.shape[0]):
        raise LoquantError(f"rank {r} exceeds the layer's smaller side ({B.shape[0]} x {A.shape[1]})")
    Qb, Rb = torch.linalg.qr(B.double())
    Qa, Ra = torch.linalg.qr(A.double().t())
    U, S, Vh = torch.linalg.svd(scale * (Rb @ Ra.t()))
    root = S.sqrt()
    return (Qb @ U) * root, root[:, None] * (Vh @ Qa.t()), S


def high_rank(sigma: torch.Tensor, ratio: float) -> int:
    """The smallest h whose σ² sum reaches `ratio` of the total (0 for a zero update)."""
    energy = sigma.double() ** 2
    total = float(energy.sum())
    if total == 0:
        return 0
    share = torch.cumsum(energy, 0) / total
    return min(int((share < ratio - 1e-12).sum()) + 1, sigma.numel())


def clipped_quantize(w: torch.Tensor, fmt: WeightFormat) -> dict[str, torch.Tensor]:
    """Round-to-nearest in `fmt` (asymmetric int) with each group's range shrunk by the
    CLIP_GRID factor of least squared error; the stored tensors of codec.quantize_weight."""
    w = w.float()
    rows, cols = w.shape
    group, qmax = fmt.group_len(cols), (1 << fmt.bits) - 1
    wg = _grouped(w, group, 0.0)
    valid = _grouped(torch.ones_like(w[:1]), group, 0.0)
    lo = _grouped(w, group, float("inf")).amin(dim=2, keepdim=True)
    hi = _grouped(w, group, float("-inf")).amax(dim=2, keepdim=True)
    best = (torch.full_like(lo, math.inf), lo, hi)
    for a in CLIP_GRID:
        scale = ((hi - lo) * a / qmax).half().float()
        offset = (lo * a).half().float()
        codes = torch.round((wg - offset) / torch.where(scale > 0, scale, 1.0)).clamp(0, qmax)
        err = ((wg - codes * scale - offset) ** 2 * valid).sum(dim=2, keepdim=True)
        better = err < best[0]
        best = (torch.where(better, err, best[0]), torch.where(better, lo * a, best[1]),
                torch.where(better, hi * a, best[2]))  # fmt: skip
    tensors = _store_params({"scales": ((best[2] - best[1]) / qmax)[..., 0], "offsets": best[1][..., 0]}, fmt)
    p = group_params(tensors, fmt)
    scale, offset = p["scales"][:, :, None], p["offsets"][:, :, None]
    codes = torch.round((wg - offset) / torch.where(scale > 0, scale, 1.0)).clamp(0, qmax)
    tensors["qweight"] = pack(codes.reshape(rows, -1)[:, :cols].to(torch.uint8), fmt.bits)
    return tensors


def stored_bytes(rows: int, h: int, cols: int, config: LoraQuantConfig) -> int:
    """Bytes `_quantize_rows` stores for a rows x cols block with h high-bit rows."""
    hi = sum(math.prod(shape) * dtype.itemsize for shape, dtype in config.high_format.layout(h, cols).values())
    return (hi if h else 0) + packed_nbytes((rows - h) * cols, 1) + 2 * (rows - h)


def sign_quantize(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """1 bit per value: code = (w >= 0), value = ±scale, scale = the row's mean |w| (fp16)."""
    return {"qweight": pack((w >= 0).to(torch.uint8), 1), "scales": w.abs().mean(dim=1).to(torch.float16)}


def sign_dequantize(tensors: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
    rows, cols = shape
    signs = unpack(tensors["qweight"], 1, rows * cols).view(rows, cols).float() * 2 - 1
    return signs * tensors["scales"].float()[:, None]


def _quantize_rows(w: torch.Tensor, h: int, config: LoraQuantConfig) -> dict[str, torch.Tensor]:
    """Rows [:h] at high bits (`hi.*`), rows [h:] as signs (`lo.*`); a part with no rows is absent."""
    out = {}
    if h:
        out.update({f"hi.{k}": v for k, v in clipped_quantize(w[:h], config.high_format).items()})
    if h < w.shape[0]:
        out.update({f"lo.{k}": v for k, v in sign_quantize(w[h:].float()).items()})
    return out


def _dequantize_rows(tensors: dict[str, torch.Tensor], h: int, shape: tuple[int, int], config) -> torch.Tensor:
    rows, cols = shape
    parts = []
    if h:
        hi = {k.removeprefix("hi."): v for k, v in tensors.items() if k.startswith("hi.")}
        parts.append(dequantize_weight(hi, config.high_format, (h, cols)))
    if h < rows:
        lo = {k.removeprefix("lo."): v for k, v in tensors.items() if k.startswith("lo.")}
        parts.append(sign_dequantize(lo, (rows - h, cols)))
    return torch.cat(parts)


def fake_quantize_rows(w: torch.Tensor, h: int, config: LoraQuantConfig) -> torch.Tensor:
    return _dequantize_rows(_quantize_rows(w, h, config), h, tuple(w.shape), config)


def product_error(B_hat: torch.Tensor, A_hat: torch.Tensor, B: torch.Tensor, A: torch.Tensor, scale: float):
    """||B̂Â - scale·B·A||²_F from r x r Gram matrices (never the out x in product), float64."""
    B_hat, A_hat, B, A = (t.double() for t in (B_hat, A_hat, B, A))
    own = ((B_hat.t() @ B_hat) * (A_hat @ A_hat.t())).sum()
    cross = ((B_hat.t() @ B) * (A_hat @ A.t())).sum()
    ref = ((B.t() @ B) * (A @ A.t())).sum()
    return own - 2 * scale * cross + scale**2 * ref


def _refine(Bp: torch.Tensor, Ap: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float, h: int,
            config: LoraQuantConfig) -> tuple[torch.Tensor, torch.Tensor, list[float]]:  # fmt: skip
    """Straight-through refinement against ΔW = scale·B·A, keeping the best step.

    Each step solves one factor's latent exactly against the other's quantized value, as the
    straight-through view (rounding as identity) would, then rounds it: B′ = ΔW Âᵀ(ÂÂᵀ)⁺,
    then A′ = (B̂ᵀB̂)⁺B̂ᵀΔW. All through r x r Gram products, never the out x in ΔW. (Adam on
    straight-through gradients raised the error on real adapters: the rounding noise it adds
    outweighs what it fits.)
    """
    A, B = A.double(), B.double()
    norm = float(product_error(torch.zeros_like(B), torch.zeros_like(A), B, A, scale))  # ||ΔW||², > 0 here
    q = lambda w: fake_quantize_rows(w, h, config).double()  # noqa: E731  (rows: directions)
    B_hat, A_hat = q(Bp.t()).t(), q(Ap)
    history = [float(product_error(B_hat, A_hat, B, A, scale)) / norm]
    best = (history[0], Bp, Ap)
    for _ in range(config.refine_steps):
        Bp = scale * B @ (A @ A_hat.t()) @ torch.linalg.pinv(A_hat @ A_hat.t())
        B_hat = q(Bp.t()).t()
        Ap = scale * torch.linalg.pinv(B_hat.t() @ B_hat) @ (B_hat.t() @ B) @ A
        A_hat = q(Ap)
        history.append(float(product_error(B_hat, A_hat, B, A, scale)) / norm)
        if history[-1] < best[0]:
            best = (history[-1], Bp, Ap)
    return best[1], best[2], history


def compress_pair(A: torch.Tensor, B: torch.Tensor, scale: float, config: LoraQuantConfig):
    """(tensors, record) of one layer's adapter (A: r x in, B: out x r, ΔW = scale·B·A)."""
    if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
        raise LoquantError("the adapter contains NaN or Inf")
    Bp, Ap, sigma = svd_factors(A, B, scale)
    h = high_rank(sigma, config.ratio)
    r, n, m = A.shape[0], A.shape[1], B.shape[0]
    bits = lambda h: 8 * (stored_bytes(r, h, n, config) + stored_bytes(r, h, m, config)) / (r * (n + m))  # noqa: E731
    while config.max_bits is not None and h > 0 and bits(h) > config.max_bits:
        h -= 1
    history = []
    if config.refine_steps and float(sigma.abs().sum()) > 0:
        Bp, Ap, history = _refine(Bp, Ap, A, B, scale, h, config)
    tensors = {f"A_{k}": v for k, v in _quantize_rows(Ap, h, config).items()}
    tensors.update({f"B_{k}": v for k, v in _quantize_rows(Bp.t(), h, config).items()})
    record = {"rank": r, "high_rank": h, "in_features": n, "out_features": m, "scaling": scale,
              "params": r * (n + m), "bytes": sum(t.numel() * t.element_size() for t in tensors.values())}  # fmt: skip
    B_hat, A_hat = dequantize_pair(tensors, record, config)
    err = float(product_error(B_hat, A_hat, B, A, scale))
    record["rel_error"] = math.sqrt(max(err, 0.0) / max(float((sigma.double() ** 2).sum()), 1e-300))
    record["bits"] = 8 * record["bytes"] / record["params"]
    if history:
        record["refine_loss"] = [history[0], min(history)]
    return tensors, record


def dequantize_pair(tensors: dict[str, torch.Tensor], record: dict, config: LoraQuantConfig):
    """(B̂ out x r, Â r x in), float32, with B̂Â ≈ ΔW (the scaling folded in)."""
    r, h, n, m = record["rank"], record["high_rank"], record["in_features"], record["out_features"]
    part = lambda p: {k.removeprefix(p): v for k, v in tensors.items() if k.startswith(p)}  # noqa: E731
    A_hat = _dequantize_rows(part("A_"), h, (r, n), config)
    B_hat = _dequantize_rows(part("B_"), h, (r, m), config).t()
    return B_hat, A_hat


def rtn_pair(A: torch.Tensor, B: torch.Tensor, scale: float, bits: int, group_size: int = -1):
    """The baseline: round-to-nearest of A per row and B per column at `bits`, no SVD (with the
    same clipped ranges as LoRAQuant's high-bit part, so only the reparameterization differs).
    Returns (B̂ with the scaling folded in, Â, stored bits per adapter parameter)."""
    fmt = WeightFormat("int", bits, group_size)
    qa, qb = clipped_quantize(A, fmt), clipped_quantize(B.t(), fmt)
    A_hat = dequantize_weight(qa, fmt, tuple(A.shape))
    B_hat = dequantize_weight(qb, fmt, (B.shape[1], B.shape[0])).t() * scale
    nbytes = sum(t.numel() * t.element_size() for t in (*qa.values(), *qb.values()))
    return B_hat, A_hat, 8 * nbytes / (A.numel() + B.numel())


def write_peft(out_dir: str | Path, config: dict, pairs: dict[str, tuple], *, overwrite: bool = False) -> Path:
    """A PEFT LoRA folder (atomically): pairs maps each layer's key to (B̂, Â, scaling, dtype),
    B̂ with the scaling folded in, so lora_B = B̂ / scaling under the unchanged config."""
    from loquant.serialization import atomic_dir

    tensors = {}
    for key, (B_hat, A_hat, scaling, dtype) in pairs.items():
        tensors[f"{key}.lora_A.weight"] = A_hat.to(dtype).contiguous()
        tensors[f"{key}.lora_B.weight"] = (B_hat / scaling).to(dtype).contiguous()
    with atomic_dir(Path(out_dir), overwrite) as tmp:
        save_file(tensors, tmp / PEFT_WEIGHTS[0], metadata={"format": "pt"})
        (tmp / PEFT_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return Path(out_dir)


def rtn_adapter(adapter: str | Path, out_dir: str | Path, bits: int, group_size: int = -1) -> float:
    """The baseline for a whole adapter: `rtn_pair` on every layer, written (dequantized) as a
    PEFT folder with the original config. Returns its stored bits per adapter parameter."""
    config, layers = read_peft(adapter)
    pairs, stored, params = {}, 0.0, 0
    for layer in layers.values():
        B_hat, A_hat, b = rtn_pair(layer["A"], layer["B"], layer["scaling"], bits, group_size)
        pairs[layer["key"]] = (B_hat, A_hat, layer["scaling"], torch.float32)
        n = layer["A"].numel() + layer["B"].numel()
        stored, params = stored + b * n, params + n
    write_peft(out_dir, config, pairs, overwrite=True)
    return stored / params


# --- reading PEFT adapters -------------------------------------------------------------------


def adapter_folder(path: str | Path) -> Path:
    """The PEFT adapter folder at `path`, or in its adapter/ (a `loquant finetune` folder)."""
    path = Path(path)
    for folder in (path, path / "adapter"):
        if (folder / PEFT_CONFIG).is_file():
            return folder
    raise LoquantError(f"{path}: no PEFT adapter ({PEFT_CONFIG}, or adapter/{PEFT_CONFIG})")


def _peft_scaling(config: dict, name: str, rank: int) -> float:
    from peft.utils.other import get_pattern_key

    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), name), config["r"])
    alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), name), config["lora_alpha"])
    if r != rank:
        raise LoquantError(f"layer {name}: the tensors have rank {rank}, adapter_config.json says {r}")
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def read_peft(path: str | Path) -> tuple[dict, dict[str, dict]]:
    """(adapter_config, {layer name: {"A", "B", "scaling", "key", "dtype"}}) of a PEFT LoRA folder."""
    from loquant.serialization import read_header

    folder = adapter_folder(path)
    try:
        config = json.loads((folder / PEFT_CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LoquantError(f"{folder / PEFT_CONFIG}: corrupt JSON: {err}") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise LoquantError(f"{folder}: not a LoRA adapter (peft_type {config.get('peft_type')!r})")
    for key, what in (("use_dora", "DoRA"), ("modules_to_save", "modules_to_save"),
                      ("trainable_token_indices", "trainable tokens")):  # fmt: skip
        if config.get(key):
            raise LoquantError(f"{folder}: {what} adapters are not supported: LoRAQuant compresses LoRA pairs only")
    weights = next((folder / f for f in PEFT_WEIGHTS if (folder / f).is_file()), None)
    if weights is None:
        raise LoquantError(f"{folder}: no {' or '.join(PEFT_WEIGHTS)}")
    try:
        if weights.suffix == ".safetensors":
            read_header(weights)
            tensors = load_file(weights)
        else:
            tensors = torch.load(weights, map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, OSError, ValueError, pickle.UnpicklingError, EOFError) as err:
        raise LoquantError(f"{weights}: unreadable: {str(err).splitlines()[0]}") from None
    pairs: dict[str, dict] = {}
    for key, t in tensors.items():
        for part in ("lora_A", "lora_B"):
            if key.endswith(f".{part}.weight"):
                prefix = key.removesuffix(f".{part}.weight")
                pairs.setdefault(prefix, {})[part[-1]] = t
                break
        else:
            raise LoquantError(f"{weights}: tensor {key} is not a LoRA A or B (only plain LoRA pairs are supported)")
    layers = {}
    for prefix, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            raise LoquantError(f"{weights}: {prefix} has lora_{'AB'.replace(*pair)} but not its partner")
        A, B = pair["A"], pair["B"]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise LoquantError(f"{weights}: {prefix}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} do not pair")
        name = prefix.removeprefix("base_model.model.")
        layers[name] = {"A": A.float(), "B": B.float(), "scaling": _peft_scaling(config, name, A.shape[0]),
                        "key": prefix, "dtype": str(A.dtype).removeprefix("torch.")}  # fmt: skip
    if not layers:
        raise LoquantError(f"{weights}: no LoRA tensors")
    return config, layers


# --- the folder ------------------------------------------------------------------------------


def compress(adapter: str | Path, config: LoraQuantConfig, progress=None) -> tuple[dict, dict[str, torch.Tensor]]:
    """(loquant_adapter.json content, tensors) of one PEFT adapter; `progress` a tqdm bar or None."""
    peft_config, layers = read_peft(adapter)
    tensors, records = {}, {}
    for name, layer in layers.items():
        try:
            packed, records[name] = compress_pair(layer["A"], layer["B"], layer["scaling"], config)
        except LoquantError as err:
            raise LoquantError(f"{adapter}: layer {name}: {err}") from None
        records[name].update(key=layer["key"], dtype=layer["dtype"])
        tensors.update({f"{name}.{k}": v.contiguous() for k, v in packed.items()})
        if progress is not None:
            progress.update(1)
    params = sum(r["params"] for r in records.values())
    nbytes = sum(r["bytes"] for r in records.values())
    errors = [r["rel_error"] for r in records.values()]
    meta = {
        "format": "loquant-adapter",
        "method": "loraquant",
        "version": 1,
        "avg_bits": 8 * nbytes / params,
        "params": params,
        "bytes": nbytes,
        "mean_rel_error": sum(errors) / len(errors),
        "max_rel_error": max(errors),
        "settings": asdict(config),
        "source": str(adapter),
        "peft_config": peft_config,
        "layers": records,
    }
    return meta, tensors


def _write(out: Path, meta: dict, tensors: dict[str, torch.Tensor], base: Path | None) -> None:
    from loquant.serialization import digest

    meta = {**meta, "checksums": {k: digest(t) for k, t in sorted(tensors.items())}}
    save_file(tensors, out / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    meta["file_bits"] = 8 * (out / ADAPTER_WEIGHTS).stat().st_size / meta["params"]
    (out / ADAPTER_JSON).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    if base is not None:
        for f in sorted(base.iterdir()):  # the base's own files: not its adapter, run state or checkpoints
            if f.is_file() and f.name not in ("finetune.json", ADAPTER_JSON, ADAPTER_WEIGHTS):
                shutil.copy2(f, out / f.name)


def peek(folder: Path) -> dict[str, tuple[int, int]]:
    """{layer name: (out, in)} of a PEFT adapter from its safetensors header (no tensor read)."""
    from loquant.serialization import read_header

    weights = folder / PEFT_WEIGHTS[0]
    if not weights.is_file():  # a pickled adapter: read it whole
        return {n: (lay["B"].shape[0], lay["A"].shape[1]) for n, lay in read_peft(folder)[1].items()}
    header, _ = read_header(weights)
    shapes = {}
    for key, entry in header.items():
        for part, side in (("lora_A", 1), ("lora_B", 0)):
            if key.endswith(f".{part}.weight") and len(entry["shape"]) == 2:
                name = key.removesuffix(f".{part}.weight").removeprefix("base_model.model.")
                shapes.setdefault(name, [0, 0])[side] = entry["shape"][side]
    return {n: tuple(s) for n, s in shapes.items()}


def check_base(base: Path, shapes: dict[str, tuple[int, int]], adapter: Path) -> None:
    """Every adapter layer must be a quantized layer of the base, of the same shape."""
    from loquant.serialization import read_config

    layers = read_config(base)["quantization_config"]["layers"]
    for name, shape in shapes.items():
        if name not in layers:
            raise LoquantError(f"{adapter}: layer {name} is not a quantized layer of the base {base}")
        have = (layers[name]["out_features"], layers[name]["in_features"])
        if have != tuple(shape):
            raise LoquantError(f"{adapter}: layer {name} is {shape[0]} x {shape[1]}, "
                               f"in the base {base} {have[0]} x {have[1]}")  # fmt: skip


def find_adapters(path: str | Path) -> dict[str, Path]:
    """{"": path} for one adapter, or {subfolder name: subfolder} for a folder of adapters."""
    path = Path(path)
    if not path.is_dir():
        raise LoquantError(f"{path}: no such adapter folder")
    try:
        return {"": adapter_folder(path)}
    except LoquantError:
        pass
    found = {}
    for sub in sorted(p for p in path.iterdir() if p.is_dir()):
        try:
            found[sub.name] = adapter_folder(sub)
        except LoquantError:
            continue
    if not found:
        raise LoquantError(f"{path}: no PEFT adapter in it or in its subfolders")
    return found


def compress_adapters(
    adapter_dir: str | Path,
    out_dir: str | Path,
    config: LoraQuantConfig | None = None,
    *,
    base: str | Path | None = None,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, dict]:
    """Compress one adapter into out_dir, or each adapter of a folder into out_dir/NAME.

    Each output folder is written atomically; with `resume`, finished ones are kept and
    skipped. `base` (a loquant model folder) is copied into each output, which then loads
    as base + packed adapter. Returns {name: loquant_adapter.json content} ("" for one adapter).
    """
    from loquant.serialization import atomic_dir, ensure_writable

    config = config or LoraQuantConfig()
    adapters = find_adapters(adapter_dir)
    out = Path(out_dir)
    base = Path(base) if base is not None else None
    if base is not None and not base.is_dir():
        raise LoquantError(f"{base}: no such model folder")
    targets = {name: out / name if name else out for name in adapters}
    done = {n: t for n, t in targets.items() if resume and (t / ADAPTER_JSON).is_file()}
    if not resume and len(adapters) > 1:
        ensure_writable(out, overwrite)
    todo = {n: a for n, a in adapters.items() if n not in done}
    results = {n: json.loads((t / ADAPTER_JSON).read_text()) for n, t in done.items()}
    shapes = {n: peek(a) for n, a in todo.items()}
    if base is not None:  # a mismatch fails before any work
        for name, folder in todo.items():
            check_base(base, shapes[name], folder)
    with tqdm(total=sum(map(len, shapes.values())), unit="layer", disable=not progress, desc="compress-adapter") as bar:
        for name, folder in todo.items():
            bar.set_postfix_str(name or folder.name)
            meta, tensors = compress(folder, config, bar)
            with atomic_dir(targets[name], overwrite=overwrite or len(adapters) > 1) as tmp:
                _write(tmp, meta, tensors, base)
            results[name] = json.loads((targets[name] / ADAPTER_JSON).read_text())
    return results


def read_packed(path: str | Path) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """(meta, {layer name: its packed tensors}) of a compressed adapter folder, checksums verified."""
    from loquant.serialization import digest, read_header

    path = Path(path)
    try:
        meta = json.loads((path / ADAPTER_JSON).read_text())
    except FileNotFoundError:
        raise LoquantError(f"{path}: no {ADAPTER_JSON}, not a compressed adapter") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LoquantError(f"{path / ADAPTER_JSON}: corrupt JSON: {err}") from None
    read_header(path / ADAPTER_WEIGHTS)
    try:
        tensors = load_file(path / ADAPTER_WEIGHTS)
    except SafetensorError as err:
        raise LoquantError(f"{path / ADAPTER_WEIGHTS}: unreadable: {err}") from None
    for name, want in meta.get("checksums", {}).items():
        if name not in tensors:
            raise LoquantError(f"{path / ADAPTER_WEIGHTS}: missing tensor {name}")
        if digest(tensors[name]) != want:
            raise LoquantError(f"{path / ADAPTER_WEIGHTS}: tensor {name} is corrupt (checksum mismatch)")
    layers: dict[str, dict[str, torch.Tensor]] = {name: {} for name in meta["layers"]}
    for key, t in tensors.items():
        name, part = key.rsplit(".", 2)[0], ".".join(key.rsplit(".", 2)[1:])
        if name not in layers:
            raise LoquantError(f"{path / ADAPTER_WEIGHTS}: unexpected tensor {key}")
        layers[name][part] = t
    return meta, layers


def read_compressed(path: str | Path) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(meta, {layer name: (B̂, Â)}) of a compressed adapter folder, dequantized, float32."""
    meta, layers = read_packed(path)
    config = LoraQuantConfig(**meta["settings"])
    return meta, {name: dequantize_pair(t, meta["layers"][name], config) for name, t in layers.items()}


def to_peft(path: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write the compressed adapter, dequantized, as a PEFT LoRA folder with the original config."""
    meta, pairs = read_compressed(path)
    layers = meta["layers"]
    pairs = {layers[n]["key"]: (B_hat, A_hat, layers[n]["scaling"], getattr(torch, layers[n]["dtype"]))
             for n, (B_hat, A_hat) in pairs.items()}  # fmt: skip
    return write_peft(out_dir, meta["peft_config"], pairs, overwrite=overwrite)


# --- packed on a loquant base ----------------------------------------------------------------


class PackedLoraLinear(nn.Module):
    """A frozen layer plus a LoRAQuant adapter kept packed: y = base(x) + (x·Âᵀ)·B̂ᵀ.

    Â and B̂ are dequantized on each call (r x in and out x r: small next to the base), so
    memory holds only the packed adapter.
    """

    def __init__(self, base_layer: nn.Module, tensors: dict[str, torch.Tensor], record: dict,
                 config: LoraQuantConfig) -> None:  # fmt: skip
        super().__init__()
        self.base_layer, self.record, self.config = base_layer, record, config
        self.names = sorted(tensors)
        for k in self.names:
            self.register_buffer(k.replace(".", "_"), tensors[k])

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        tensors = {k: getattr(self, k.replace(".", "_")) for k in self.names}
        return dequantize_pair(tensors, self.record, self.config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        B_hat, A_hat = self.factors()
        return y + F.linear(F.linear(x.to(A_hat.dtype), A_hat), B_hat).to(y.dtype)

    def get_delta_weight(self) -> torch.Tensor:
        B_hat, A_hat = self.factors()
        return B_hat @ A_hat


def attach(model: nn.Module, path: str | Path) -> nn.Module:
    """Wrap each adapter layer of a loquant model (loaded with adapter=False) in PackedLoraLinear; in place."""
    path = Path(path)
    meta, packed = read_packed(path)
    config = LoraQuantConfig(**meta["settings"])
    for name, rec in meta["layers"].items():
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise LoquantError(f"{path}: the model has no layer {name} for the adapter") from None
        shape = (getattr(layer, "out_features", None), getattr(layer, "in_features", None))
        if shape != (rec["out_features"], rec["in_features"]):
            raise LoquantError(f"{path}: layer {name} is {shape}, the adapter's is "
                               f"{(rec['out_features'], rec['in_features'])}")  # fmt: skip
        device = next(layer.buffers(), torch.empty(0)).device
        model.set_submodule(name, PackedLoraLinear(layer, packed[name], rec, config).to(device))
    for p in model.parameters():
        p.requires_grad_(False)
    return model
