"""Cost of the allocation error table for a Llama-2-7B-shaped model: one block's 7 matrices x
all default candidates (44), timed, then scaled to 32 blocks. Random weights, R from random
correlated activations (as bench/qera_speed.py), no correction.

    python bench/allocation_cost.py [--blocks 1] [--kind activation]
"""

import argparse
import time

import torch

from loquant.allocation import default_candidates, error_table
from loquant.calibration import Calibration, InputStats
from qera_speed import GROUP_DIM, LAYERS, correlated_R  # bench/ is on sys.path when run from it


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=1)
    ap.add_argument("--kind", default="activation", choices=["activation", "frobenius"])
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    Rs = {d: correlated_R(d, device, d) for d in set(GROUP_DIM.values())}
    calib = Calibration()
    weights = {}
    for b in range(args.blocks):
        for name, out_f, in_f, group in LAYERS:
            key = f"{b}.{name}"
            weights[key] = torch.randn(out_f, in_f, device=device) * 0.02
            R = Rs[GROUP_DIM[group]]
            calib.stats.setdefault(f"{b}.{group}", InputStats(R * 1000, torch.diagonal(R) * 1000, R[0] * 0, 1000))
            calib.owner[key] = f"{b}.{group}"
    cands = default_candidates()
    error_table({"w": weights[next(iter(weights))][:64, :256]}, cands[:1], kind="frobenius", progress=False)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    error_table(weights, cands, kind=args.kind, stats=calib, progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(
        f"{name}: {len(weights)} matrices x {len(cands)} candidates, {args.kind} error: {seconds:.1f} s; "
        f"32 blocks (224 matrices): about {seconds * 32 / args.blocks:.0f} s"
    )


if __name__ == "__main__":
    main()
