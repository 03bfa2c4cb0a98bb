"""QAT on SmolLM2-135M: PEQA, L4Q and LR-QAT against round-to-nearest, and a step's memory.

quality: for INT3 per channel and INT2 g64, the round-to-nearest model is saved and each mode
runs `loquant.finetune.run` on it (what `loquant finetune DIR --mode M` does) with the same
steps, batches (sotu-calib, seeded) and held-out text (sotu-val, 8 x 512). Each mode runs at
its default learning rate (`--lrs alternative` or `both`: at one alternative, to be picked by
the held-out sotu-val perplexity, never by sotu-test). The merged plain model is then measured on
sotu-test 40 x 512 (token-level perplexity, non-overlapping windows).
memory: peak GPU memory of training steps (batch 8 x 512, bf16 autocast) for each mode, for
full-weight QAT (every weight trainable, same quantizer) and for LoRA on the packed base.

    python bench/qat.py quality [--steps 200] [--only "INT3 ch"] [--modes peqa l4q lr-qat]
                                [--lrs default|alternative|both]
    python bench/qat.py memory
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import loquant
from loquant.data import eval_windows, load_text, tokenize
from loquant.evaluate import perplexity
from loquant.finetune import FinetuneConfig, attach, float_weights, load_base, optimizer_for, resolve, run
from loquant.sources import load_model

FORMATS = {"INT3 ch": dict(bits=3, group_size=-1), "INT2 g64": dict(bits=2, group_size=64)}
LRS = {"peqa": [2e-5, 1e-4], "l4q": [2e-4, 1e-3], "lr-qat": [1e-3, 3e-3]}


def _base(folder: Path, fields: dict) -> Path:
    model, tokenizer = load_model("smollm2-135m")
    loquant.quantize(model, loquant.QuantConfig(**fields), progress=False)
    loquant.save(model, folder, tokenizer, overwrite=True)
    return folder


def quality(args) -> None:
    _, tokenizer = load_model("smollm2-135m")
    test = eval_windows(tokenize(tokenizer, load_text("sotu-test")), 512, 40)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, fields in FORMATS.items():
            if args.only and label not in args.only:
                continue
            base = _base(Path(tmp) / label.replace(" ", "-"), fields)
            rtn = loquant.load(base).to("cuda")
            ppl = perplexity(rtn, test, batch_size=8, progress=False)["ppl"]
            rows.append({"format": label, "mode": "rtn", "test": ppl})
            print(json.dumps(rows[-1]), flush=True)
            del rtn
            for i in {"default": [0], "alternative": [1], "both": [0, 1]}[args.lrs]:  # defaults first
                for mode in args.modes:
                    lr = LRS[mode][i]
                    config = FinetuneConfig(mode=mode, lr=lr, steps=args.steps, batch_size=8, seq_len=512, eval_every=0)
                    start = time.perf_counter()
                    result = run(base, Path(tmp) / f"{mode}-{lr}", config, overwrite=True, progress=False)
                    model = result["model"].to("cuda")
                    row = {"format": label, "mode": mode, "lr": lr, "seconds": time.perf_counter() - start,
                           "val": result["held_out_ppl_end"], "test": perplexity(model, test, batch_size=8,
                           progress=False)["ppl"], "merged_max_abs_logit_diff": result["merged_max_abs_logit_diff"],
                           "merged_logit_scale": result["merged_logit_scale"],
                           "val_trained": result["held_out_ppl_end_trained"]}  # fmt: skip
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    del model, result
    print(f"\nsmollm2-135m, {args.steps} steps x 8 x 512 tokens of sotu-calib; held-out sotu-val first 8 x 512; "
          f"sotu-test 40 x 512, token-level; {torch.cuda.get_device_name()}\n")  # fmt: skip
    print("| format | mode | lr | sotu-val ppl (merged) | sotu-test ppl (merged) | max abs logit diff, merged vs QAT |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        if r["mode"] == "rtn":
            print(f"| {r['format']} | rtn | | | {r['test']:.2f} | |")
        else:
            diff = f"{r['merged_max_abs_logit_diff']:.1e} of {r['merged_logit_scale']:.0f}"
            print(f"| {r['format']} | {r['mode']} | {r['lr']:g} | {r['val']:.2f} | {r['test']:.2f} | {diff} |")


def memory(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        base = _base(Path(tmp) / "int3", FORMATS["INT3 ch"])
        rows = []
        for mode in ["adapter", "peqa", "l4q", "lr-qat", "full"]:
            model, tokenizer, corrections = load_base(base)
            config = resolve(FinetuneConfig(mode=mode if mode != "full" else "peqa", batch_size=8, seq_len=512),
                             corrections)  # fmt: skip
            model.to("cuda")
            if mode == "full":
                from loquant import qat

                qat.attach(model, "full", float_weights(model, "cuda"))
            else:
                model = attach(model, corrections, config, device="cuda")
            optimizer = optimizer_for(model, config)
            ids = torch.randint(0, 49152, (8, 512), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            static = torch.cuda.memory_allocated()
            start = time.perf_counter()
            for _ in range(3):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            rows.append((mode, trainable, static / 2**20, torch.cuda.max_memory_allocated() / 2**20,
                         (time.perf_counter() - start) / 3))  # fmt: skip
            print(rows[-1], flush=True)
            del model, optimizer, loss
            torch.cuda.empty_cache()
    print(f"\nsmollm2-135m INT3 per channel, batch 8 x 512, bf16 autocast, AdamW, 3 steps; "
          f"{torch.cuda.get_device_name()}\n")  # fmt: skip
    print("| mode | trainable parameters | memory before the steps (MiB) | peak (MiB) | s / step |")
    print("|---|---:|---:|---:|---:|")
    for mode, n, static, peak, sec in rows:
        print(f"| {mode} | {n:,} | {static:.0f} | {peak:.0f} | {sec:.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["quality", "memory"])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lrs", default="default", choices=["default", "alternative", "both"])
    ap.add_argument("--only", nargs="+")
    ap.add_argument("--modes", nargs="+", default=["peqa", "l4q", "lr-qat"])
    args = ap.parse_args()
    {"quality": quality, "memory": memory}[args.what](args)


if __name__ == "__main__":
    main()
