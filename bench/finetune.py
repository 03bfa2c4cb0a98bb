"""Fine-tuning on a quantized SmolLM2-135M: which adapter start trains best, and what memory costs.

starts: INT2 g64 at rank 64, same steps, data (sotu-calib), batches and learning rate for each
  start: LoRA from the qera-exact and loftq corrections, LoRA from zero (QLoRA on the RTN base),
  QWHA (Walsh-Hadamard coefficients, as many as LoRA r64 trains), and LoRA from qera-exact
  with IEC. sotu-test perplexity (40 x 512 token windows, token level) before and after.
memory: peak GPU memory and tokens/s of a LoRA step on an INT4 g64 loquant base against a bf16
  base with PEFT LoRA on ordinary nn.Linear, same model, rank, batch and bf16 autocast.

    python bench/finetune.py starts --steps 300 --work /tmp/ft [--device cuda] [--only qera-exact,zero]
    python bench/finetune.py memory [--rank 16 --batch-size 8 --seq-len 512]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import loquant
from loquant.data import calib_windows, eval_windows, load_text, tokenize
from loquant.evaluate import perplexity
from loquant.finetune import FinetuneConfig, batch_at, prepare, run
from loquant.model import QuantConfig, linear_weight, quant_layers, quantize
from loquant.sources import load_model

MODEL = "smollm2-135m"
STARTS = {  # name: (base correction method or None, finetune settings)
    "qera-exact": ("qera-exact", {}),
    "loftq": ("loftq", {}),
    "zero": (None, {"init": "zero"}),
    "qwha": (None, {"adapter": "wht"}),
    "qera-exact+iec": ("qera-exact", {"iec": True}),
}


def test_ppl(model, tokenizer, device) -> float:
    windows = eval_windows(tokenize(tokenizer, load_text("sotu-test")), 512, 40)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=device.startswith("cuda")):
        return perplexity(model.to(device), windows, batch_size=8, progress=False)["ppl"]


def build_base(method, work: Path, device, rank: int) -> Path:
    out = work / f"base-{method or 'rtn'}"
    if (out / "config.json").is_file():
        return out
    model, tokenizer = load_model(MODEL)
    model.to(device)
    calib = calib_windows(tokenize(tokenizer, load_text("sotu-calib")), 512, 64, 0) if method else None
    record = {"corpus": "sotu-calib", "samples": 64, "seq_len": 512}
    config = QuantConfig(bits=2, group_size=64, method=method or "none", rank=rank if method else 0,
                         source_model=MODEL, calibration=record)  # fmt: skip
    quantize(model, config, calib=calib, progress=False)
    loquant.save(model, out, tokenizer, overwrite=True)
    return out


def starts(args) -> None:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    names = args.only.split(",") if args.only else list(STARTS)
    for name in names:
        method, settings = STARTS[name]
        base = build_base(method, work, args.device, args.rank)
        cfg = FinetuneConfig(steps=args.steps, batch_size=args.batch_size, seq_len=512, rank=args.rank,
                             eval_every=args.eval_every, **settings)  # fmt: skip
        start_model, tokenizer = prepare(base, cfg, device=args.device, progress=False)
        before = test_ppl(start_model, tokenizer, args.device)
        del start_model
        result = run(str(base), str(work / f"ft-{name}"), cfg, overwrite=True, device=args.device, progress=False)
        after = test_ppl(result["model"], tokenizer, args.device)
        row = {"start": name, "trainable": result["trainable_params"], "test_before": before, "test_after": after,
               "val_before": result["held_out_ppl_start"], "val_after": result["held_out_ppl_end"],
               "tokens_per_s": result["tokens_per_second"],
               "peak_mib": result["peak_memory_bytes"] / 2**20}  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
        del result
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    print(f"\nsmollm2-135m INT2 g64, rank {args.rank}, {args.steps} steps x {args.batch_size} x 512 tokens of "
          f"sotu-calib, lr 2e-4 cosine; perplexity token level, sotu-test 40 x 512, sotu-val 8 x 512; "
          f"{torch.cuda.get_device_name() if args.device.startswith('cuda') else 'cpu'}\n")  # fmt: skip
    print("| start | trainable params | sotu-test before | sotu-test after | sotu-val before | sotu-val after "
          "| tokens/s |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['start']} | {r['trainable']:,} | {r['test_before']:.2f} | {r['test_after']:.2f} | "
              f"{r['val_before']:.2f} | {r['val_after']:.2f} | {r['tokens_per_s']:.0f} |")  # fmt: skip


def _step_memory(model, ids, steps: int, device) -> tuple[float, float]:
    """(peak MiB, tokens per second) over `steps` LoRA steps after one warm-up step."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    model.train()  # gradient checkpointing is active only in training mode

    def step(batch):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(ids[0])
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for i in range(steps):
        step(ids[i % len(ids)])
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return torch.cuda.max_memory_allocated() / 2**20, steps * ids[0].numel() / seconds


def memory(args) -> None:
    from peft import LoraConfig, get_peft_model

    device = "cuda"
    work = Path(args.work)
    model, tokenizer = load_model(MODEL)
    ids_all = tokenize(tokenizer, load_text("sotu-calib"))
    cfg = FinetuneConfig(batch_size=args.batch_size, seq_len=args.seq_len)
    batches = [batch_at(ids_all, s, cfg).to(device) for s in range(4)]
    targets = sorted(n for n, m in model.named_modules() if linear_weight(m) is not None and QuantConfig().selects(n))
    rows = []
    # bf16 base + PEFT LoRA on nn.Linear
    model = model.to(device, torch.bfloat16)
    for p in model.parameters():
        p.requires_grad_(False)
    lora = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=targets))
    for p in lora.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    if args.gradient_checkpointing:
        lora.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    rows.append(("bf16 base + LoRA", *_step_memory(lora, batches, args.steps, device)))
    del lora, model
    torch.cuda.empty_cache()
    # INT4 g64 loquant base (its other weights in bf16) + LoRA
    base_dir = work / "base-int4"
    if not (base_dir / "config.json").is_file():
        float_model, tok = load_model(MODEL)
        quantize(float_model, QuantConfig(bits=4, group_size=64, source_model=MODEL), progress=False)
        loquant.save(float_model, base_dir, tok, overwrite=True)
    cfg = FinetuneConfig(rank=args.rank, init="zero", gradient_checkpointing=args.gradient_checkpointing)
    qmodel, _ = prepare(base_dir, cfg, device=device, progress=False)
    inner = {id(t) for layer in quant_layers(qmodel.get_base_model()).values() for t in layer.buffers()}
    for p in qmodel.parameters():
        if not p.requires_grad and id(p) not in inner:
            p.data = p.data.to(torch.bfloat16)
    rows.append(("INT4 g64 loquant base + LoRA", *_step_memory(qmodel, batches, args.steps, device)))
    print(f"\nsmollm2-135m, LoRA r{args.rank} on every block linear layer, batch {args.batch_size} x "
          f"{args.seq_len}, bf16 autocast, AdamW, gradient checkpointing "
          f"{'on' if args.gradient_checkpointing else 'off'}; "
          f"{args.steps} timed steps after 1 warm-up; {torch.cuda.get_device_name()}\n")  # fmt: skip
    print("| base | peak GPU memory (MiB) | tokens/s | memory vs bf16 |")
    print("|---|---:|---:|---:|")
    for name, mib, tps in rows:
        print(f"| {name} | {mib:.0f} | {tps:.0f} | {mib / rows[0][1]:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["starts", "memory"])
    ap.add_argument("--work", default="runs/bench-finetune")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--eval-every", type=int, default=0)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--only", help="comma-separated starts")
    args = ap.parse_args()
    starts(args) if args.what == "starts" else memory(args)


if __name__ == "__main__":
    main()
