"""Round-to-nearest perplexity of the built-in SmolLM2 in every format, through the CLI.

Each row quantizes with `loquant quantize`, saves, then measures the saved folder with
`loquant eval --json` and `loquant info --json` in fresh processes, exactly as a user would.
Prints a markdown table for BENCHMARKS.md.

    python bench/rtn_perplexity.py [--workdir runs/rtn] [--windows 40] [--seq-len 512]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = [  # (label, quantize flags)
    ("INT4 g64", ["--format", "int", "--bits", "4", "--group-size", "64"]),
    ("INT4-sym g64", ["--format", "int-sym", "--bits", "4", "--group-size", "64"]),
    ("NF4 g64", ["--format", "nf", "--bits", "4", "--group-size", "64"]),
    ("NF4 g64 + DQ", ["--format", "nf", "--bits", "4", "--group-size", "64", "--double-quant"]),
    ("INT3 g64", ["--format", "int", "--bits", "3", "--group-size", "64"]),
    ("INT2 g64", ["--format", "int", "--bits", "2", "--group-size", "64"]),
    # ICQ (IR-QLoRA) against plain NF at each width: python bench/rtn_perplexity.py --only <these labels>
    ("NF4 g64 + ICQ", ["--format", "nf", "--bits", "4", "--group-size", "64", "--icq"]),
    ("NF3 g64", ["--format", "nf", "--bits", "3", "--group-size", "64"]),
    ("NF3 g64 + ICQ", ["--format", "nf", "--bits", "3", "--group-size", "64", "--icq"]),
    ("NF2 g64", ["--format", "nf", "--bits", "2", "--group-size", "64"]),
    ("NF2 g64 + ICQ", ["--format", "nf", "--bits", "2", "--group-size", "64", "--icq"]),
]


def loquant(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "loquant.cli", *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--workdir", default="runs/rtn")
    ap.add_argument("--windows", default="40")
    ap.add_argument("--seq-len", default="512")
    ap.add_argument("--only", nargs="*", help="labels to run (default all)")
    args = ap.parse_args()
    protocol = ["--corpus", "sotu-test", "--windows", args.windows, "--seq-len", args.seq_len]
    rows = [("float", loquant("eval", args.model, "--json", *protocol), None)]
    for label, flags in CONFIGS:
        if args.only and label not in args.only:
            continue
        out = Path(args.workdir) / label.replace(" ", "_").replace("+", "").lower()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "loquant.cli",
                "quantize",
                args.model,
                *flags,
                "--out",
                str(out),
                "--overwrite",
            ],
            check=True,
            capture_output=True,
        )
        rows.append((label, loquant("eval", str(out), "--json", *protocol), loquant("info", str(out), "--json")))
        print(f"done {label}", file=sys.stderr)
    print(
        f"{args.model}, sotu-test, {args.windows} x {args.seq_len}-token windows, token-level ppl; "
        f"{platform.node()} ({platform.processor() or platform.machine()}), {time.strftime('%Y-%m-%d')}\n"
    )
    print("| format | bits/weight | quantized-layer bytes (file) | all tensors in memory | ppl | eval s |")
    print("|---|---|---|---|---|---|")
    for label, ev, info in rows:
        nbytes = f"{info['bytes']:,}" if info else "-"
        print(
            f"| {label} | {ev['bits_per_weight']:.4f} | {nbytes} | {ev['memory_bytes']:,} "
            f"| {ev['ppl']:.2f} | {ev['seconds']:.0f} |"
        )


if __name__ == "__main__":
    main()
