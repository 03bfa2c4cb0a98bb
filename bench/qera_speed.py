"""QERA-exact for every linear layer of a Llama-2-7B-shaped model: loquant's route against the
official route (scipy.linalg.sqrtm on the CPU, once per layer), side by side.

loquant: one float64 eigendecomposition of R per input group (q/k/v share one, gate/up one),
then C = SVD_r(E V Λ^½) Λ^-½ Vᵀ per layer, on the GPU (randomized SVD for these sizes).
Official: R^½ = sqrtm(R), R^-½ = inv(R^½), C = SVD_r(E R^½) R^-½, per layer.

Weights are random (speed does not depend on them); R comes from random correlated activations
with log-normal channel scales. sqrtm on an 11008-wide R takes longer than one command may run
here, so its time is measured at 1024, 2048 and 4096 and extended to 11008 by the fitted n³ law;
the output says which numbers are measured and which extrapolated.

    python bench/qera_speed.py [--blocks 32] [--rank 64] [--max-seconds 300]
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import scipy.linalg
import torch

from loquant.calibration import InputStats
from loquant.corrections.methods import _qera_exact

HIDDEN, MLP, BLOCKS = 4096, 11008, 32
# (name, out, in, input group) per block
LAYERS = [
    ("q", HIDDEN, HIDDEN, "attn_in"),
    ("k", HIDDEN, HIDDEN, "attn_in"),
    ("v", HIDDEN, HIDDEN, "attn_in"),
    ("o", HIDDEN, HIDDEN, "o_in"),
    ("gate", MLP, HIDDEN, "mlp_in"),
    ("up", MLP, HIDDEN, "mlp_in"),
    ("down", HIDDEN, MLP, "down_in"),
]
GROUP_DIM = {"attn_in": HIDDEN, "o_in": HIDDEN, "mlp_in": HIDDEN, "down_in": MLP}


def correlated_R(dim: int, device, seed: int) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    mix = torch.randn(dim, dim, device=device, generator=g) / math.sqrt(dim)
    scale = torch.exp(torch.randn(dim, device=device, generator=g))  # outlier channels
    L = (torch.eye(dim, device=device) + mix) * scale
    return (L @ L.T).double() / dim


def stats_of(R: torch.Tensor) -> InputStats:
    s = InputStats(R * 1000, torch.diagonal(R) * 1000, torch.zeros(R.shape[0], dtype=R.dtype, device=R.device), 1000)
    return s


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def objective(E, C, R):
    D = E - C
    return torch.trace(D @ R @ D.T).item()


def sqrtm_route(E: np.ndarray, R: np.ndarray, rank: int) -> tuple[np.ndarray, float]:
    t = time.perf_counter()
    root = np.real(scipy.linalg.sqrtm(R))
    inv_root = np.linalg.inv(root)
    U, S, Vh = np.linalg.svd(E @ root, full_matrices=False)
    C = (U[:, :rank] * S[:rank]) @ Vh[:rank] @ inv_root
    return C, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=BLOCKS)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--damping", type=float, default=1e-8)
    ap.add_argument("--sqrtm-dims", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--max-seconds", type=float, default=300)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    Rs = {dim: correlated_R(dim, device, dim) for dim in (HIDDEN, MLP)}
    E = {(o, i): torch.randn(o, i, device=device, dtype=torch.float64) * 0.01 for _, o, i, _ in LAYERS}
    # warm-up (CUDA context, cusolver handles)
    _qera_exact(E[(HIDDEN, HIDDEN)], stats_of(Rs[HIDDEN]), args.rank, args.damping)
    sync(device)

    per_shape: dict[str, list[float]] = {}
    start = time.perf_counter()
    blocks_done = 0
    for _ in range(args.blocks):
        groups = {g: stats_of(Rs[d]) for g, d in GROUP_DIM.items()}  # fresh objects: eigh once per group
        for _, o, i, g in LAYERS:
            sync(device)
            t = time.perf_counter()
            _qera_exact(E[(o, i)], groups[g], args.rank, args.damping)
            sync(device)
            per_shape.setdefault(f"{o}x{i}", []).append(time.perf_counter() - t)
        blocks_done += 1
        if time.perf_counter() - start > args.max_seconds:
            break
    ours_measured = time.perf_counter() - start
    ours_total = ours_measured * BLOCKS / blocks_done

    # accuracy on one 4096 layer: our C against the sqrtm route's, same objective, float64
    R64 = Rs[HIDDEN]
    Eq = E[(HIDDEN, HIDDEN)]
    B, A = _qera_exact(Eq, stats_of(R64), args.rank, args.damping)
    ours_obj = objective(Eq, B @ A, R64)

    sq_times = {}
    for dim in args.sqrtm_dims:
        R = correlated_R(dim, device, dim).cpu().numpy()
        Ed = torch.randn(dim, dim, dtype=torch.float64).numpy() * 0.01
        C, sq_times[dim] = sqrtm_route(Ed, R, args.rank)
        if dim == HIDDEN:
            ref_obj = objective(
                torch.from_numpy(Eq.cpu().numpy()),
                torch.from_numpy(sqrtm_route(Eq.cpu().numpy(), R64.cpu().numpy(), args.rank)[0]),
                R64.cpu(),
            )
    dims = sorted(sq_times)
    times = [sq_times[d] for d in dims]
    coef = float(times[-1] / dims[-1] ** 3)  # t = coef n³ through the largest measured size
    t_hidden = sq_times.get(HIDDEN, coef * HIDDEN**3)
    t_mlp = coef * MLP**3
    n_hidden = sum(1 for _, _, i, _ in LAYERS if i == HIDDEN) * BLOCKS
    n_mlp = sum(1 for _, _, i, _ in LAYERS if i == MLP) * BLOCKS
    sqrtm_total = n_hidden * t_hidden + n_mlp * t_mlp

    print(f"QERA-exact, Llama-2-7B shapes ({BLOCKS} blocks x 7 layers), rank {args.rank}, damping {args.damping}")
    print(f"device: {name}; sqrtm on {torch.get_num_threads()} CPU threads\n")
    print("| route | what | seconds |")
    print("|---|---|---|")
    for shape, ts in per_shape.items():
        print(
            f"| loquant (eigh + SVD, GPU) | {shape}, median of {len(ts)} layers (first of each group pays the eigh)"
            f" | {np.median(ts):.3f} (max {max(ts):.3f}) |"
        )
    kind = "measured" if blocks_done == BLOCKS else f"measured {blocks_done} blocks, scaled to {BLOCKS}"
    print(f"| loquant | all 224 layers ({kind}) | {ours_total:.1f} |")
    for d in dims:
        print(f"| sqrtm (scipy, CPU) | one {d}x{d} R, measured | {sq_times[d]:.2f} |")
    print(f"| sqrtm | one {MLP}x{MLP} R, extrapolated (t = {coef:.3e} n^3) | {t_mlp:.1f} |")
    print(
        f"| sqrtm | all 224 layers: {n_hidden} x {t_hidden:.1f} s + {n_mlp} x {t_mlp:.1f} s "
        f"({'4096 measured' if HIDDEN in sq_times else 'extrapolated'}, 11008 extrapolated) | {sqrtm_total:.0f} |"
    )
    print(f"\nspeed-up: {sqrtm_total / ours_total:.0f}x")
    if HIDDEN in sq_times:
        print(
            f"accuracy on a 4096x4096 layer: output-error objective loquant {ours_obj:.6e}, "
            f"sqrtm route {ref_obj:.6e} (ratio {ours_obj / ref_obj:.6f})"
        )


if __name__ == "__main__":
    main()
