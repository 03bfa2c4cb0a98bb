"""LoRAQuant: bits per adapter parameter against quality, on real and random adapters.

quality: SmolLM2-135M adapters fine-tuned by loquant (sotu-calib, 200 steps x 8 x 512, bf16),
  each compressed at several settings. sotu-test perplexity (40 x 512 token windows, token
  level) of base + adapter: 16-bit, LoRAQuant (packed on the base, `compress-adapter --base`),
  and round-to-nearest of A and B (same clipped ranges) at 2 and 3 bits.
random: Llama-2-7B-shaped layers (4096 x 4096, 11008 x 4096, 4096 x 11008) with random
  adapters, r 16 and 64, iid Gaussian factors (a flat spectrum, the worst case) and factors
  with a geometric spectrum: bits and relative product error ||B̂Â - BA||_F / ||BA||_F.

    python bench/loraquant.py quality --work /tmp/lq [--device cuda] [--keep-adapters DIR]
    python bench/loraquant.py random [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

import loquant
from loquant.adapters.attach import load_adapter
from loquant.adapters.loraquant import (
    LoraQuantConfig,
    compress_adapters,
    compress_pair,
    product_error,
    rtn_adapter,
    rtn_pair,
)
from loquant.data import eval_windows, load_text, tokenize
from loquant.evaluate import perplexity
from loquant.finetune import FinetuneConfig, run
from loquant.model import QuantConfig, quantize
from loquant.sources import load_model

MODEL = "smollm2-135m"
ADAPTERS = {  # name: (base QuantConfig kwargs, finetune settings)
    "INT3 g64 + LoRA r16 (zero start)": (dict(bits=3, group_size=64), dict(rank=16, init="zero")),
    "INT4 g128 + LoRA r16 (zero start)": (dict(bits=4, group_size=128), dict(rank=16, init="zero")),
    "INT2 g64 + LoRA r64 (qera-exact start)": (
        dict(bits=2, group_size=64, method="qera-exact", rank=64),
        dict(rank=64),
    ),  # fmt: skip
}
SETTINGS = {  # label: LoraQuantConfig kwargs
    "ρ0.9 hb2": dict(ratio=0.9, high_bits=2),
    "ρ0.9 hb3": dict(ratio=0.9, high_bits=3),
    "ρ0.95 hb3 g64": dict(ratio=0.95, high_bits=3, group_size=64),
    "ρ0.95 hb4 g64": dict(ratio=0.95, high_bits=4, group_size=64),
    "ρ0.95 hb4 g64 refine10": dict(ratio=0.95, high_bits=4, group_size=64, refine_steps=10),
    "ρ0.99 hb3 g64": dict(ratio=0.99, high_bits=3, group_size=64),
}


def test_ppl(model, tokenizer, device) -> float:
    windows = eval_windows(tokenize(tokenizer, load_text("sotu-test")), 512, 40)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=device.startswith("cuda")):
        return perplexity(model.to(device), windows, batch_size=8, progress=False)["ppl"]


def train(name: str, work: Path, device: str, steps: int) -> Path:
    slug = "".join(c if c.isalnum() else "-" for c in name.split(" + ")[0] + name.split("(")[1])
    ft = work / f"ft-{slug}"
    if (ft / "finetune.json").is_file() and json.loads((ft / "finetune.json").read_text()).get("status") == "done":
        return ft
    base_kwargs, ft_kwargs = ADAPTERS[name]
    model, tokenizer = load_model(MODEL)
    calib = None
    if base_kwargs.get("method"):
        from loquant.data import calib_windows

        calib = calib_windows(tokenize(tokenizer, load_text("sotu-calib")), 512, 64, 0)
    record = {"corpus": "sotu-calib", "samples": 64, "seq_len": 512}
    quantize(model.to(device), QuantConfig(**base_kwargs, source_model=MODEL, calibration=record), calib=calib,
             progress=False)  # fmt: skip
    base = work / f"base-{slug}"
    loquant.save(model.cpu(), base, tokenizer, overwrite=True)
    run(str(base), str(ft), FinetuneConfig(steps=steps, batch_size=8, seq_len=512, **ft_kwargs), overwrite=True,
        device=device, progress=False)  # fmt: skip
    return ft


def rtn_model(ft: Path, bits: int, work: Path):
    """Base + the adapter with A and B rounded to nearest at `bits` (PEFT folder, dequantized)."""
    stored = rtn_adapter(ft, work / f"rtn{bits}", bits)
    return load_adapter(loquant.load(ft, adapter=False), work / f"rtn{bits}"), stored


def quality(args) -> None:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    names = [n for n in ADAPTERS if not args.only or any(o in n for o in args.only.split(","))]
    print("| adapter | storage | bits per adapter parameter | mean rel. product error | sotu-test ppl | × fp32 |")
    print("|---|---|---|---|---|---|")
    for name in names:
        t0 = time.perf_counter()
        ft = train(name, work, args.device, args.steps)
        _, tokenizer = load_model(str(ft))
        base_ppl = test_ppl(loquant.load(ft, adapter=False), tokenizer, args.device)
        ref = test_ppl(loquant.load(ft), tokenizer, args.device)
        print(f"| {name} | base alone, no adapter | | | {base_ppl:.2f} | {base_ppl / ref:.3f} |")
        print(f"| {name} | fp32 adapter as trained | 32 | 0 | {ref:.2f} | 1.000 |")
        if args.keep_adapters:
            shutil.copytree(ft / "adapter", Path(args.keep_adapters) / ft.name, dirs_exist_ok=True)
        for bits in (2, 3):
            model, b = rtn_model(ft, bits, work)
            ppl = test_ppl(model, tokenizer, args.device)
            print(f"| {name} | RTN{bits} of A and B (per row / column) | {b:.3f} | | {ppl:.2f} | {ppl / ref:.3f} |")
        for label, kwargs in SETTINGS.items():
            out = work / "compressed"
            start = time.perf_counter()
            meta = compress_adapters(ft, out, LoraQuantConfig(**kwargs), base=ft, overwrite=True, progress=False)[""]
            seconds = time.perf_counter() - start
            ppl = test_ppl(loquant.load(out), tokenizer, args.device)
            print(f"| {name} | LoRAQuant {label} ({seconds:.1f} s) | {meta['avg_bits']:.3f} | "
                  f"{meta['mean_rel_error']:.3f} | {ppl:.2f} | {ppl / ref:.3f} |", flush=True)  # fmt: skip
        print(f"<!-- {name}: {time.perf_counter() - t0:.0f} s -->", flush=True)


SHAPES = {"q/k/v/o 4096x4096": (4096, 4096), "gate/up 11008x4096": (11008, 4096), "down 4096x11008": (4096, 11008)}


def random_adapters(args) -> None:
    torch.manual_seed(0)
    print("| shape (out x in) | r | spectrum | storage | bits | rel. product error | s per layer |")
    print("|---|---|---|---|---|---|---|")
    for label, (m, n) in SHAPES.items():
        for r in (16, 64):
            for spectrum in ("iid", "geometric 0.8"):
                A = torch.randn(r, n, device=args.device) / n**0.5
                B = torch.randn(m, r, device=args.device) * 0.01
                if spectrum != "iid":
                    B = B * (0.8 ** torch.arange(r, device=args.device).float())
                B_hat, A_hat, bits = rtn_pair(A, B, 1.0, 2)
                norm = product_error(0 * B, 0 * A, B.double(), A.double(), 1.0)
                err = (product_error(B_hat.double(), A_hat.double(), B.double(), A.double(), 1.0) / norm).sqrt()
                print(f"| {label} | {r} | {spectrum} | RTN2 of A and B | {bits:.3f} | {float(err):.3f} | |")
                for s_label, kwargs in SETTINGS.items():
                    start = time.perf_counter()
                    _, rec = compress_pair(A, B, 1.0, LoraQuantConfig(**kwargs))
                    seconds = time.perf_counter() - start
                    print(f"| {label} | {r} | {spectrum} | LoRAQuant {s_label} | {rec['bits']:.3f} | "
                          f"{rec['rel_error']:.3f} | {seconds:.2f} |", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quality")
    q.add_argument("--work", default="/tmp/loquant-lq")
    q.add_argument("--steps", type=int, default=200)
    q.add_argument("--only", help="comma-separated substrings of adapter names")
    q.add_argument("--keep-adapters", help="copy each trained 16-bit adapter folder here")
    q.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    q.set_defaults(func=quality)
    r = sub.add_parser("random")
    r.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    r.set_defaults(func=random_adapters)
    args = parser.parse_args()
    print(f"<!-- {json.dumps({k: v for k, v in vars(args).items() if k != 'func'})} -->")
    args.func(args)


if __name__ == "__main__":
    main()
