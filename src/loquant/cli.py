"""The `loquant` command: quantize, eval, info. Thin over the library."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from loquant import distributed
from loquant.checkpoint import Checkpoint
from loquant.corrections import METHODS
from loquant.data import calib_windows, eval_windows, load_text, tokenize
from loquant.errors import LoquantError
from loquant.evaluate import perplexity
from loquant.model import MODEL_METHODS, QUANTIZERS, QuantConfig, quant_layers, quantize
from loquant.qat import MODES as QAT_MODES
from loquant.rilq import RilqConfig
from loquant.serialization import ensure_writable, read_config, save, tensor_nbytes, weight_files
from loquant.sources import load_model
from loquant.storage import memory_bytes, model_bits_per_weight, storage_report

DEFAULT_MODEL = "smollm2-135m"


def _round(obj):
    if isinstance(obj, float):
        return round(obj, 4)
    if isinstance(obj, dict):
        return {k: _round(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_round(v) for v in obj]
    return obj


def _emit_json(obj: dict) -> None:
    print(json.dumps(_round(obj), sort_keys=True))


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpus", default="sotu-test", help="sotu-test, sotu-calib or a text file")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--windows", type=int, default=40, help="windows evaluated (default 40)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass")


def _eval(model, tokenizer, args) -> dict:
    windows = eval_windows(tokenize(tokenizer, load_text(args.corpus)), args.seq_len, args.windows)
    start = time.perf_counter()
    result = perplexity(model, windows, batch_size=args.batch_size)
    return {
        **result,
        "corpus": args.corpus,
        "seq_len": args.seq_len,
        "windows": args.windows,
        "bits_per_weight": model_bits_per_weight(model),
        "memory_bytes": memory_bytes(model),
        "seconds": time.perf_counter() - start,
    }


# quantize flags that do not change the saved model (a resumed run may differ in them)
_NOT_SETTINGS = (
    "func",
    "command",
    "resume",
    "overwrite",
    "eval",
    "corpus",
    "seq_len",
    "windows",
    "batch_size",
    "offload_activations",
)


def _complete(out: Path) -> bool:
    try:
        read_config(out)
        return all(f.is_file() for f in weight_files(out))
    except LoquantError:
        return False


def _check_stream(args, config: QuantConfig, budgeted: bool) -> None:
    """--stream reads a safetensors folder block by block: what needs the whole model is refused."""
    refused = {
        "--budget/--budget-gb": budgeted,
        "--eval (evaluate OUT with `loquant eval`)": args.eval,
        "--method rilq": config.method == "rilq",
        "--fisher": config.fisher,
    }
    for flag, given in refused.items():
        if given:
            raise LoquantError(f"--stream quantizes one block at a time and cannot take {flag}")
    if not Path(args.model).is_dir():
        raise LoquantError(f"--stream reads a local folder of safetensors shards; {args.model} is not a folder")


def _stream_tokenizer(folder: str, needed: bool):
    """The source folder's tokenizer (saved with the model); calibration cannot do without it."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as err:
        if needed:
            why = str(err).splitlines()[0]
            raise LoquantError(f"{folder}: no tokenizer for the calibration text ({why})") from None
        return None


def cmd_quantize(args) -> None:
    from loquant import allocation

    budgeted = args.budget is not None or args.budget_gb is not None
    if budgeted and args.plan:
        raise LoquantError("--plan re-applies a plan: give it without --budget/--budget-gb")
    if args.budget is not None and args.budget_gb is not None:
        raise LoquantError("give one of --budget and --budget-gb")
    if args.alloc_error not in allocation.ALLOC_ERRORS:
        raise LoquantError(f"unknown --alloc-error {args.alloc_error!r}")
    overrides = {}
    if args.plan:
        overrides = allocation.read_plan(args.plan)
    if args.icq and args.format != "nf":
        raise LoquantError("--icq shifts NormalFloat groups: use it with --format nf")
    candidates = None
    if budgeted:
        if args.candidates:
            candidates = allocation.parse_candidates(args.candidates)
        else:
            pick = lambda v: None if v is None else [v]  # noqa: E731
            candidates = allocation.default_candidates(
                pick(args.format), pick(args.bits), pick(args.group_size), icq=args.icq
            )
    config = QuantConfig(
        format="int" if args.format is None else args.format,
        bits=4 if args.bits is None else args.bits,
        group_size=64 if args.group_size is None else args.group_size,
        double_quant=args.double_quant,
        icq=args.icq,
        include=args.include,
        exclude=args.exclude or [],
        overrides=overrides,
        method=args.method,
        quantizer=args.quantizer,
        act_order=args.act_order,
        rank=args.rank,
        iters=args.iters,
        fisher=args.fisher,
        damping=args.damping,
        sequential=args.sequential,
        rilq=RilqConfig(
            init=args.rilq_init,
            steps=args.rilq_steps,
            lr=args.rilq_lr,
            batch_size=args.rilq_batch_size,
            eval_every=args.rilq_eval_every,
            patience=args.rilq_patience,
            seed=args.seed,
            device=args.device,
        ),
        source_model=args.model,
        calibration={
            "corpus": args.calib,
            "samples": args.calib_samples,
            "seq_len": args.calib_seq_len,
            "seed": args.seed,
        },
    )
    needs_calib = config.needs_calibration or (budgeted and args.alloc_error in ("activation", "fisher"))
    if args.stream:
        _check_stream(args, config, budgeted)
    elif args.offload_activations:
        raise LoquantError("--offload-activations keeps a streamed run's activations on disk: add --stream")
    distributed.init_from_env()  # under torchrun: one process group, rank 0 writes
    rank = distributed.world()[0]
    out = Path(args.out)
    partial = out.with_name(out.name + ".partial")
    if args.resume and _complete(out):
        print(f"loquant quantize: {out} is complete, nothing to resume")
        return
    if partial.exists() and not args.resume:
        if not args.overwrite:
            raise LoquantError(f"{partial} holds an interrupted run: --resume continues it, --overwrite starts over")
        shutil.rmtree(partial)
    ensure_writable(out, args.overwrite)  # fail before the slow steps
    if args.eval:
        load_text(args.corpus)
        if needs_calib and args.calib == args.corpus:
            raise LoquantError(f"calibrating and evaluating on the same text ({args.corpus}) is not a measurement")
    rilq = config.method == "rilq"
    held_name = args.rilq_held_out or ("sotu-val" if args.calib == "sotu-calib" else None)
    if rilq and held_name is not None and held_name in (args.calib, args.corpus if args.eval else None):
        raise LoquantError(f"rilq's early stopping cannot hold out {held_name}: it is calibrated or evaluated on")
    calib_text = load_text(args.calib) if needs_calib else None
    model, tokenizer = (None, _stream_tokenizer(args.model, needs_calib)) if args.stream else load_model(args.model)
    calib = held_out = None
    if calib_text is not None:
        ids = tokenize(tokenizer, calib_text)
        if rilq:  # early stopping needs text apart from the training windows
            if held_name is None:
                cut = int(ids.numel() * 0.95)
                ids, held = ids[:cut], ids[cut:]
            else:
                held = tokenize(tokenizer, load_text(held_name))
            count = min(args.rilq_held_out_windows, held.numel() // args.calib_seq_len)
            if count < 1:
                raise LoquantError(f"rilq's held-out text has {held.numel()} tokens, less than one window")
            held_out = eval_windows(held, args.calib_seq_len, count)
        calib = calib_windows(ids, args.calib_seq_len, args.calib_samples, args.seed)
    stats, extra, plan_lines = None, {}, []
    if budgeted:
        plan, info = allocation.allocate(
            model,
            config,
            candidates,
            budget_bits_per_weight=args.budget,
            budget_gb=args.budget_gb,
            include_correction=args.budget_includes_correction,
            kind=args.alloc_error,
            calib=calib,
        )
        config.overrides = {n: f.to_dict() for n, f in plan.items()}
        stats = info["stats"] if not config.sequential else None
        record = allocation.plan_record(
            plan,
            budget=args.budget,
            budget_gb=args.budget_gb,
            includes_correction=args.budget_includes_correction,
            alloc_error=args.alloc_error,
            method=config.method,
            rank=config.rank,
        )
        extra["plan.json"] = json.dumps(record, indent=2, sort_keys=True) + "\n"
        plan_lines = [
            f"plan: {info['matrices']} matrices x {info['candidates']} candidates, error table "
            f"{info['table_seconds']:.1f} s, HiGHS {info['solve_seconds']:.2f} s, "
            f"{info['planned_bits_per_weight']:.4f} planned bits per weight",
            *info["summary"],
        ]
    before = _eval(model, tokenizer, args) if args.eval else None
    float_bits = None if args.stream else model_bits_per_weight(model)
    start = time.perf_counter()
    settings = {k: v for k, v in vars(args).items() if k not in _NOT_SETTINGS}
    distributed.barrier()  # every rank has checked OUT and OUT.partial before rank 0 writes
    checkpoint = Checkpoint(partial, json.loads(json.dumps(settings)))
    resumed = checkpoint.blocks_done
    try:
        if args.stream:
            from loquant.streaming import quantize_streaming

            offload = partial / "activations" if args.offload_activations else None
            model = quantize_streaming(args.model, partial / "model", config, checkpoint, calib=calib,
                                       tokenizer=tokenizer, offload=offload, progress=rank == 0)  # fmt: skip
            float_bits = float(torch.finfo(model.dtype).bits)  # the source's
        else:
            quantize(model, config, calib=calib, stats=stats, held_out=held_out, checkpoint=checkpoint,
                     progress=rank == 0)  # fmt: skip
    except LoquantError:
        if not resumed and rank == 0:  # bad input: resuming cannot help, and nothing is left behind
            shutil.rmtree(partial, ignore_errors=True)
        raise
    seconds = time.perf_counter() - start

    def finish() -> None:  # written inside DIR.partial, then moved to DIR, then DIR.partial goes
        if not args.stream:  # a streamed model is written as it goes
            save(model, partial / "model", tokenizer, overwrite=True, extra_files=extra)
        if out.exists():
            ensure_writable(out, args.overwrite)
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(partial / "model", out)
        shutil.rmtree(partial)

    distributed.rank0(finish)  # every rank holds the whole model; rank 0 writes and reports
    if rank != 0:
        return
    after = _eval(model, tokenizer, args) if args.eval else None
    nbytes = tensor_nbytes(out) if args.stream else {k: v.nbytes for k, v in model.state_dict().items()}
    report = storage_report(model.config.quantization_config["layers"], nbytes)
    float_mb = report["weights"] * float_bits / 8 / 2**20
    rows = [
        ("", "float", "mixed (plan)" if config.overrides else config.base_format().describe()),
        ("quantized layers", str(len(quant_layers(model))), ""),
        ("bits per weight", f"{float_bits:.2f}", f"{report['bits_per_weight']:.3f}"),
        ("their size (MiB)", f"{float_mb:.1f}", f"{report['bytes'] / 2**20:.1f}"),
    ]
    if config.corrects:
        t = model.loquant_timings
        rows.append(("correction", "", f"{config.method} r{config.rank}"))
        rows.append(
            ("seconds: calib / decomp", "", f"{t['calibration_s'] + t['fisher_s']:.1f} / {t['decomposition_s']:.1f}")
        )
    if rilq:
        r = model.config.quantization_config["recipe"]["rilq"]
        rows.append(("rilq steps (best / run)", "", f"{r['best_step']} / {r['steps_run']}"))
        rows.append(("rilq held-out ppl", f"{r['held_out_ppl_start']:.2f}", f"{r['held_out_ppl_best']:.2f}"))
    if before and after:
        label = f"ppl {args.corpus} {args.windows}x{args.seq_len}"
        rows.append((label, f"{before['ppl']:.2f}", f"{after['ppl']:.2f}"))
    width = max(len(r[0]) for r in rows)
    resumed_text = f", resumed after {resumed} of {checkpoint.blocks} blocks" if resumed else ""
    print(f"loquant quantize {args.model} -> {out}  ({seconds:.1f} s{resumed_text})")
    for line in plan_lines:
        print(f"  {line}")
    for name, a, b in rows:
        print(f"  {name:<{width}}  {a:>10}  {b:>12}")


def cmd_eval(args) -> None:
    load_text(args.corpus)  # a missing corpus fails before the model loads
    model, tokenizer = load_model(args.model)
    result = {"model": args.model, **_eval(model, tokenizer, args)}
    compressed = Path(args.model) / "loquant_adapter.json"
    if compressed.is_file():  # base + LoRAQuant adapter: its storage too
        result["adapter_avg_bits"] = json.loads(compressed.read_text())["avg_bits"]
    if args.json:
        _emit_json(result)
    else:
        print(
            f"{args.model}: ppl {result['ppl']:.4f} on {args.corpus} "
            f"({args.windows} x {args.seq_len} tokens, token level), "
            f"{result['bits_per_weight']:.3f} bits per weight"
        )


def _saved(folder: str) -> tuple[Path, dict]:
    """A folder written by `loquant quantize` and its quantization_config."""
    path = Path(folder)
    if not path.is_dir():
        raise LoquantError(f"{path}: no such model folder")
    return path, read_config(path)["quantization_config"]


def cmd_info(args) -> None:
    path, qc = _saved(args.dir)
    nbytes = tensor_nbytes(path)
    report = storage_report(qc["layers"], nbytes)
    report["source_model"] = qc.get("source_model")
    report["model_bytes"] = sum(nbytes.values())
    if args.json:
        _emit_json(report)
        return
    print(f"{path}  (source: {report['source_model']})")
    print(f"  {'layer':<44} {'format':<12} {'rank':>4} {'bytes':>10} {'bits/w':>7}")
    for r in report["layers"]:
        bpw = r["bits_per_weight"]
        print(f"  {r['name']:<44} {r['format']:<12} {r['rank']:>4} {r['bytes']:>10} {bpw:>7.3f}")
    print(
        f"  total: {len(report['layers'])} layers, {report['bytes']} bytes, "
        f"{report['bits_per_weight']:.4f} bits per weight "
        f"({report['base_bits_per_weight']:.4f} without corrections); "
        f"all tensors {report['model_bytes']} bytes"
    )


def cmd_report(args) -> None:
    from loquant import report
    from loquant.calibration import collect
    from loquant.model import linear_weight

    path, qc = _saved(args.dir)
    recorded = (qc.get("recipe") or {}).get("calibration") or {}
    if recorded.get("corpus") == args.calib and recorded.get("seed") == args.seed:
        raise LoquantError(f"seed {args.seed} drew the correction's own calibration windows: pick another --seed")
    if not str(args.out).lower().endswith(".png"):
        raise LoquantError(f"--out must name a .png file, got {args.out}")
    text = load_text(args.calib)
    quant_model, tokenizer = load_model(str(path))
    source = qc.get("source_model")
    if not source:
        raise LoquantError(f"{path}: no source_model recorded, cannot reload the float weights")
    float_model, _ = load_model(source)
    windows = calib_windows(tokenize(tokenizer, text), args.calib_seq_len, args.calib_samples, args.seed)
    layers = {n: m for n, m in float_model.named_modules() if n in qc["layers"] and linear_weight(m) is not None}
    stats = collect(float_model, windows, layers)
    rows = report.layer_errors(float_model, quant_model, stats, tensor_nbytes(path))
    recipe = qc.get("recipe") or {}
    total = storage_report(qc["layers"], tensor_nbytes(path))
    formats = sorted({r["format"] for r in total["layers"]})
    formats_text = "/".join(formats) if len(formats) <= 3 else f"{len(formats)} formats (plan)"
    title = (
        f"{path.name}: {formats_text}, {recipe.get('method', 'none')} rank {recipe.get('rank', 0)}, "
        f"{total['bits_per_weight']:.3f} bits/weight; output error on {args.calib_samples} x "
        f"{args.calib_seq_len} held-out {args.calib} tokens (seed {args.seed})"
    )
    report.plot(rows, args.out, title)
    print(title)
    print(f"  {'layer':<44} {'w err':>8} {'w err+C':>8} {'out err':>8} {'out+C':>8} {'bits/w':>7}")
    for r in rows:
        print(
            f"  {r['name']:<44} {r['weight_error']:>8.4f} {r['weight_error_corrected']:>8.4f} "
            f"{r['output_error']:>8.4f} {r['output_error_corrected']:>8.4f} {r['bits_per_weight']:>7.3f}"
        )
    mean = lambda k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    print(
        f"  {'mean':<44} {mean('weight_error'):>8.4f} {mean('weight_error_corrected'):>8.4f} "
        f"{mean('output_error'):>8.4f} {mean('output_error_corrected'):>8.4f} {total['bits_per_weight']:>7.3f}"
    )
    print(f"wrote {args.out}")


def cmd_finetune(args) -> None:
    from dataclasses import fields

    from loquant.finetune import FinetuneConfig, run

    # every FinetuneConfig field is a flag of the same name
    config = FinetuneConfig(**{f.name: getattr(args, f.name) for f in fields(FinetuneConfig)})
    _saved(args.dir)
    result = run(args.dir, args.out, config, resume=args.resume, overwrite=args.overwrite, device=args.device)
    if distributed.world()[0] != 0:  # under a launcher rank 0 alone reports
        return
    tps = result["tokens_per_second"]
    print(f"loquant finetune {args.dir} -> {args.out}  ({result['device']})")
    print(f"  trainable parameters   {result['trainable_params']:,}")
    start, end = result["held_out_ppl_start"], result["held_out_ppl_end"]
    print(f"  held-out ppl ({result['held_out']})  {start:.2f} -> {end:.2f}")
    print(f"  {result['peak_memory_kind']}  {result['peak_memory_bytes'] / 2**20:.1f} MiB")
    print(f"  tokens per second      {tps:.1f}" if tps else "  tokens per second      (no step run)")
    if config.mode != "adapter":
        diff, scale = result["merged_max_abs_logit_diff"], result["merged_logit_scale"]
        trained = result["held_out_ppl_end_trained"]
        print(f"  merged to a plain quantized model: held-out ppl {end:.2f} (trained {trained:.2f}), "
              f"max |logit diff| {diff:.2e} of {scale:.1f}")  # fmt: skip


def cmd_merge(args) -> None:
    import torch

    from loquant.adapters.attach import merge
    from loquant.finetune import read_state

    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[args.dtype]
    path, _ = _saved(args.dir)
    out = Path(args.out)
    ensure_writable(out, args.overwrite)
    model, tokenizer = load_model(str(path))
    state = read_state(path) or {}
    if args.command == "merge" and state.get("config", {}).get("mode", "adapter") != "adapter":
        # A QAT run already ended in integer codes: MERGED is that plain quantized model alone.
        save(model, out, tokenizer, overwrite=args.overwrite)
        print(f"loquant merge {path} -> {out}: a plain quantized model ({state['config']['mode']}, no adapter)")
        return
    merged = merge(model, dtype)
    from loquant.serialization import atomic_dir

    with atomic_dir(out, args.overwrite) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    print(f"loquant merge {path} -> {out}: a {args.dtype} transformers model")


def cmd_export(args) -> None:
    if args.to == "merged":
        cmd_merge(args)
        return
    import torch

    from loquant.export import export_compressed_tensors

    path, _ = _saved(args.dir)
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[args.dtype]
    r = export_compressed_tensors(path, args.out, dtype=dtype, overwrite=args.overwrite)
    adapter = f", adapter/ (PEFT LoRA rank {r['adapter_rank']})" if r["adapter_rank"] else ""
    print(f"loquant export {path} -> {args.out}: compressed-tensors {', '.join(r['schemes'])}, "
          f"{r['layers']} layers{adapter}")  # fmt: skip


def cmd_compress_adapter(args) -> None:
    from loquant.adapters.loraquant import LoraQuantConfig, compress_adapters

    config = LoraQuantConfig(ratio=args.ratio, high_bits=args.high_bits, group_size=args.group_size,
                             refine_steps=args.refine_steps, max_bits=args.max_bits)  # fmt: skip
    results = compress_adapters(args.adapter_dir, args.out, config, base=args.base, overwrite=args.overwrite,
                                resume=args.resume, progress=not args.json)  # fmt: skip
    params = sum(m["params"] for m in results.values())
    summary = {
        "avg_bits": sum(m["avg_bits"] * m["params"] for m in results.values()) / params,
        "params": params,
        "adapters": {
            name or Path(args.adapter_dir).name: {
                k: m[k] for k in ("avg_bits", "file_bits", "params", "mean_rel_error", "max_rel_error")
            }
            for name, m in results.items()
        },  # fmt: skip
        "out": args.out,
    }
    if args.json:
        _emit_json(summary)
        return
    print(f"loquant compress-adapter {args.adapter_dir} -> {args.out}"
          + (f" (base {args.base}: loquant eval {args.out} works)" if args.base else ""))  # fmt: skip
    for name, m in summary["adapters"].items():
        print(
            f"  {name}: {m['avg_bits']:.3f} bits per adapter parameter ({m['params']:,} parameters), "
            f"product error {m['mean_rel_error']:.3f} mean, {m['max_rel_error']:.3f} max (relative Frobenius)"
        )
    if len(results) > 1:
        print(f"  all {len(results)}: {summary['avg_bits']:.3f} bits per adapter parameter")


def cmd_decompress_adapter(args) -> None:
    from loquant.adapters.loraquant import to_peft

    to_peft(args.dir, args.out, overwrite=args.overwrite)
    print(f"loquant decompress-adapter {args.dir} -> {args.out}: a PEFT LoRA adapter (dequantized)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loquant", description="Low-bit LLM weights with 16-bit corrections.")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model's linear layers and save it")
    q.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"model (default {DEFAULT_MODEL})")
    q.add_argument("--format", help="int, int-sym or nf (default int; with --budget: fixes the candidates' format)")
    q.add_argument("--bits", type=int, help="2, 3, 4 or 8 (nf: 2-4; default 4)")
    q.add_argument("--group-size", type=int, help="32, 64, 128, 256 or -1 per channel (default 64)")
    q.add_argument("--budget", type=float, help="average bits per weight over the quantized layers: plan formats")
    q.add_argument("--budget-gb", type=float, help="size of the whole saved model in GB (1e9 bytes): plan formats")
    q.add_argument("--budget-includes-correction", action="store_true", help="--budget counts the correction too")
    q.add_argument("--candidates", help="formats the plan may pick, e.g. 'int:2,3,4:64,128 nf:4:64[:icq]'")
    q.add_argument("--alloc-error", default="activation", help="frobenius, activation (default) or fisher")
    q.add_argument("--plan", help="re-apply a plan.json written by an earlier budgeted run")
    q.add_argument("--double-quant", action="store_true", help="8-bit scales in blocks of 256 (QLoRA)")
    q.add_argument("--icq", action="store_true", help="nf only: per-group shift maximizing code entropy (IR-QLoRA)")
    q.add_argument(
        "--quantizer", default="rtn", choices=QUANTIZERS, help="base quantizer: rtn (default), gptq (calibrated), hqq"
    )
    q.add_argument("--act-order", action="store_true", help="gptq: quantize columns by descending input energy")
    q.add_argument("--rank", type=int, default=0, help="rank of the 16-bit correction (0 = none)")
    q.add_argument("--method", default="svd", choices=MODEL_METHODS, help="how the correction is made (default svd)")
    q.add_argument("--iters", type=int, help="loftq: iterations (5); lqlora, lqer, qera-*: alternation cap (20; 1)")
    q.add_argument("--fisher", action="store_true", help="lqlora: weight the error by the diagonal Fisher")
    q.add_argument("--damping", type=float, default=1e-8, help="clamp R's eigenvalues at this x the largest")
    q.add_argument("--sequential", action="store_true", help="calibrate each block on quantized predecessors")
    rilq_help = {
        "init": "rilq: the closed-form start (default qera-exact)",
        "steps": "rilq: most training steps (default 200)",
        "lr": "rilq: peak learning rate (default 2e-4, cosine)",
        "batch-size": "rilq: calibration windows per step (default 8)",
        "eval-every": "rilq: held-out loss every K steps (default 20)",
        "patience": "rilq: stop after this many evaluations without improvement (default 3)",
        "held-out": "rilq: early-stopping text (default: sotu-val for sotu-calib, else the last 5%% of --calib)",
        "held-out-windows": "rilq: early-stopping windows of --calib-seq-len (default 8)",
    }
    defaults = RilqConfig()
    q.add_argument("--rilq-init", default=defaults.init, choices=METHODS[1:], help=rilq_help["init"])
    for name, kind in (("steps", int), ("lr", float), ("batch-size", int), ("eval-every", int), ("patience", int)):
        q.add_argument(f"--rilq-{name}", type=kind, default=getattr(defaults, name.replace("-", "_")),
                       help=rilq_help[name])  # fmt: skip
    q.add_argument("--rilq-held-out", help=rilq_help["held-out"])
    q.add_argument("--rilq-held-out-windows", type=int, default=8, help=rilq_help["held-out-windows"])
    q.add_argument("--device", help="rilq: where it trains, cpu or cuda (default: cuda when available)")
    q.add_argument("--calib", default="sotu-calib", help="calibration text: sotu-calib or a file")
    q.add_argument("--calib-samples", type=int, default=64, help="calibration windows (default 64)")
    q.add_argument("--calib-seq-len", type=int, default=512, help="tokens per calibration window (default 512)")
    q.add_argument("--seed", type=int, default=0, help="seed of the calibration window offsets (default 0)")
    q.add_argument("--include", nargs="+", metavar="PATTERN", help="quantize only layers matching these globs")
    q.add_argument("--exclude", nargs="+", metavar="PATTERN", help="leave layers matching these globs in float")
    q.add_argument("--out", required=True, help="output folder (written atomically)")
    q.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (and any OUT.partial)")
    q.add_argument("--resume", action="store_true", help="continue an interrupted run from OUT.partial (same flags)")
    q.add_argument("--eval", action="store_true", help="measure perplexity before and after")
    q.add_argument("--stream", action="store_true",
                   help="read a safetensors folder block by block: memory about one block, whatever the depth; "
                        "OUT is written as shards")  # fmt: skip
    q.add_argument(
        "--offload-activations",
        action="store_true",
        help="--stream: keep the calibration activations in OUT.partial/ on disk instead of memory",
    )
    _add_eval_args(q)
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("eval", help="perplexity over fixed non-overlapping windows")
    e.add_argument("model", metavar="MODEL_OR_DIR")
    _add_eval_args(e)
    e.add_argument("--json", action="store_true", help="one JSON line on stdout")
    e.set_defaults(func=cmd_eval)

    i = sub.add_parser("info", help="formats, bytes and bits per weight of a saved model")
    i.add_argument("dir")
    i.add_argument("--json", action="store_true", help="one JSON line on stdout")
    i.set_defaults(func=cmd_info)

    r = sub.add_parser("report", help="per-layer weight and output errors, before and after the correction")
    r.add_argument("dir")
    r.add_argument("--out", required=True, help="PNG file to write")
    r.add_argument("--calib", default="sotu-calib", help="text for the held-out statistics (default sotu-calib)")
    r.add_argument("--calib-samples", type=int, default=16, help="held-out windows (default 16)")
    r.add_argument("--calib-seq-len", type=int, default=512, help="tokens per window (default 512)")
    r.add_argument("--seed", type=int, default=1, help="window seed, not the correction's own (default 1)")
    r.set_defaults(func=cmd_report)

    f = sub.add_parser("finetune", help="train an adapter on a quantized model (LoRA from its correction, or QWHA)")
    f.add_argument("dir", help="a folder written by `loquant quantize`")
    f.add_argument("--data", default="sotu-calib", help="sotu-calib, a .txt file or a .jsonl file with a 'text' field")
    f.add_argument("--eval-data", help="held-out text (default: sotu-val for sotu-calib, else the last 5%% of --data)")
    f.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    f.add_argument("--mode", default="adapter", choices=["adapter", *QAT_MODES],
                   help="adapter (default), or QAT ending in a plain quantized model: peqa, l4q, lr-qat")  # fmt: skip
    f.add_argument("--lr", type=float, help="peak lr, cosine, warm-up (default 2e-4; lr-qat 1e-3, peqa 2e-5)")
    f.add_argument("--scale-lr", type=float, help="l4q, lr-qat: the step sizes' learning rate (default 2e-5)")
    f.add_argument("--phi-dtype", default="int8", choices=["int8", "bf16"], help="lr-qat: storage of W/s0 (int8)")
    f.add_argument("--warmup-steps", type=int, help="linear warm-up steps (default: 5%% of --steps)")
    f.add_argument("--batch-size", type=int, default=8, help="windows per step (default 8)")
    f.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")
    f.add_argument("--adapter", default="lora", choices=["lora", "wht"], help="LoRA (default) or QWHA Walsh-Hadamard")
    f.add_argument("--rank", type=int, help="LoRA rank (default: the base's correction rank, else 16)")
    f.add_argument("--params", type=int, help="wht: trainable coefficients in all (default: LoRA's count at --rank)")
    f.add_argument("--init", choices=["correction", "zero"], help="LoRA start (default: correction when there is one)")
    f.add_argument("--iec", action="store_true", help="IR-QLoRA's elastic connection on the LoRA adapter")
    f.add_argument("--lora-alpha", type=float, help="LoRA alpha (default: the rank, i.e. scaling 1)")
    f.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout (default 0)")
    f.add_argument("--eval-every", type=int, default=0, help="held-out perplexity every K steps (0: start and end)")
    f.add_argument("--eval-windows", type=int, default=8, help="held-out windows of --seq-len (default 8)")
    f.add_argument("--save-every", type=int, default=100, help="checkpoint every K steps (default 100)")
    f.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    f.add_argument("--calib-samples", type=int, default=64, help="wht: calibration windows for QWHA's init")
    f.add_argument("--calib-seq-len", type=int, default=512, help="wht: tokens per calibration window")
    f.add_argument("--damping", type=float, default=1e-8, help="wht: damping of the input statistics")
    f.add_argument("--seed", type=int, default=0, help="seed of the batch offsets (default 0)")
    f.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    f.add_argument("--bf16", action=argparse.BooleanOptionalAction, help="bf16 autocast (default: on with CUDA)")
    f.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    f.add_argument("--out", required=True, help="output folder: base + adapter/, loadable by loquant eval")
    f.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    f.set_defaults(func=cmd_finetune)

    c = sub.add_parser("compress-adapter", help="LoRAQuant: store PEFT LoRA adapters at ~1.5-2 bits per parameter")
    c.add_argument("adapter_dir", help="a PEFT LoRA folder, a `loquant finetune` folder, or a folder of either")
    c.add_argument("--ratio", type=float, default=0.95, help="energy share of the high-bit directions (default 0.95)")
    c.add_argument("--high-bits", type=int, default=4, help="bits of the high-energy directions: 2, 3 or 4 (default 4)")
    c.add_argument(
        "--group-size", type=int, default=64, help="high-bit values per scale (default 64; -1: per row / column)"
    )
    c.add_argument("--refine-steps", type=int, default=0, help="refinement steps against B·A (default 0)")
    c.add_argument("--max-bits", type=float, help="cap per layer: fewer high-bit directions until bits <= this")
    c.add_argument("--base", help="a loquant model folder: OUT then holds base + compressed adapter (loquant eval)")
    c.add_argument("--out", required=True, help="output folder (one per adapter, OUT/NAME, for a folder of them)")
    c.add_argument("--resume", action="store_true", help="keep the adapters already finished in --out")
    c.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    c.add_argument("--json", action="store_true", help="one JSON line on stdout (no progress bar)")
    c.set_defaults(func=cmd_compress_adapter)

    d = sub.add_parser("decompress-adapter", help="a compress-adapter folder as a dequantized PEFT LoRA adapter")
    d.add_argument("dir")
    d.add_argument("--out", required=True, help="output folder (written atomically)")
    d.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    d.set_defaults(func=cmd_decompress_adapter)

    helps = {
        "merge": "fold the adapter (or correction) into a 16-bit transformers model; a QAT run: its plain model",
        "export": "export a model for other tools (merged: 16-bit transformers; compressed-tensors: vLLM)",
    }
    for name, help_text in helps.items():
        m = sub.add_parser(name, help=help_text)
        m.add_argument("dir")
        if name == "export":
            m.add_argument("--to", required=True, choices=["merged", "compressed-tensors"],
                           help="merged: W = deq(W) + corrections, 16-bit; compressed-tensors: int-sym 4/8-bit "
                           "pack-quantized + the correction as a PEFT LoRA in OUT/adapter")  # fmt: skip
        m.add_argument("--out", required=True, help="output folder (written atomically)")
        m.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
        m.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
        m.set_defaults(func=cmd_export if name == "export" else cmd_merge)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except LoquantError as err:
        print(f"loquant: error: {err}", file=sys.stderr)
        return 2
    finally:
        distributed.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
