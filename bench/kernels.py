"""Fused dequantize-matmul kernels against bf16 cuBLAS, PyTorch's int4 tinygemm and
bitsandbytes NF4, on Llama-2-7B / Llama-3-8B linear shapes (issue 8). CUDA only.

Timing: every column is the median of triton.testing.do_bench_cudagraph (calls captured in a
CUDA graph, as decode servers run them; median over 10 graph replays). Each method cycles
through enough copies of its weights (> 200 MB together) that no call finds its weight in
the 50 MB L2. Inputs are random normal (never zeros). GB/s counts the bytes each call must
move: packed weight and its parameters (and correction), x, y.

    python bench/kernels.py                     # everything (tables in markdown)
    python bench/kernels.py --sections target   # or correction, paths, shapes, block, configs, dequant,
                                                # crossover, host
"""

from __future__ import annotations

import argparse
import itertools
import math
import time

import torch
import torch.nn.functional as F
import triton

from loquant import QuantLinear, WeightFormat
from loquant.kernels import gluon_wgmma, ops, qlinear

DT = torch.bfloat16
MS = (1, 4, 16, 64, 512, 4096)
SHAPES = {  # (out, in) per linear
    "Llama-2-7B": {"q/k/v/o": (4096, 4096), "gate/up": (11008, 4096), "down": (4096, 11008)},
    "Llama-3-8B": {"q/o": (4096, 4096), "k/v": (1024, 4096), "gate/up": (14336, 4096), "down": (4096, 14336)},
}
FORMATS = {
    "INT4 g128": WeightFormat("int", 4, 128),
    "INT4-sym g128": WeightFormat("int-sym", 4, 128),
    "NF4 g64": WeightFormat("nf", 4, 64),
    "INT3 g128": WeightFormat("int", 3, 128),
    "INT2 g128": WeightFormat("int", 2, 128),
}
COPY_BW = None


def timeit(fn) -> float:
    """Median µs of one call (CUDA graph of many calls)."""
    return triton.testing.do_bench_cudagraph(fn, rep=40, return_mode="median") * 1e3


def rotating(make, nbytes: int):
    """fn() cycling over copies of what make() builds, > 200 MB together (defeats L2)."""
    copies = [make() for _ in range(max(1, min(32, math.ceil(200e6 / max(nbytes, 1)))))]
    it = itertools.cycle(copies)
    return lambda: next(it)()


def copy_bandwidth() -> float:
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    us = timeit(lambda: b.copy_(a))
    return 2 * a.numel() / us / 1e3  # GB/s


def nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def loquant_layer(out_f, in_f, fmt, rank=0):
    w = torch.randn(out_f, in_f, device="cuda") * 0.02
    layer = QuantLinear.from_weight(w, None, fmt)
    if rank:
        layer.set_correction(torch.randn(rank, in_f, device="cuda") * 0.02, torch.randn(out_f, rank, device="cuda"))
    return layer.eval()


def layer_bytes(layer, m):
    t = [*layer.packed().values(), layer.A, layer.B]
    return nbytes(*t) + m * (layer.in_features + layer.out_features) * 2


def bench_loquant(out_f, in_f, fmt, m, rank=0, path=0):
    base = loquant_layer(out_f, in_f, fmt, rank)
    x = torch.randn(m, in_f, device="cuda", dtype=DT)
    wb = nbytes(*base.packed().values(), base.A, base.B)

    def make():
        state, A, B, bias = clone_layer(base)._kernel_state(DT)
        return lambda: qlinear(x, state, A, B, bias, path=path)

    return timeit(rotating(make, wb)), layer_bytes(base, m)


def clone_layer(layer):
    new = QuantLinear(layer.in_features, layer.out_features, layer.fmt, rank=layer.rank, device="cuda")
    new.load_state_dict(layer.state_dict())
    return new.eval()


def bench_bf16(out_f, in_f, m):
    x = torch.randn(m, in_f, device="cuda", dtype=DT)

    def make():
        w = torch.randn(out_f, in_f, device="cuda", dtype=DT)
        return lambda: F.linear(x, w)

    return timeit(rotating(make, out_f * in_f * 2)), (out_f * in_f + m * (in_f + out_f)) * 2


def bench_tinygemm(out_f, in_f, m, group=128):
    x = torch.randn(m, in_f, device="cuda", dtype=DT)

    def make():
        q = torch.randint(0, 16, (out_f, in_f), dtype=torch.int32, device="cuda")
        packed = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
        w = torch.ops.aten._convert_weight_to_int4pack(packed, 8)
        sz = torch.randn(in_f // group, out_f, 2, device="cuda", dtype=DT) * 0.01
        return lambda: torch.ops.aten._weight_int4pack_mm(x, w, group, sz)

    wb = out_f * in_f // 2 + (in_f // group) * out_f * 4
    return timeit(rotating(make, wb)), wb + m * (in_f + out_f) * 2


def bench_bnb(out_f, in_f, m):
    try:
        import bitsandbytes as bnb
    except ImportError:
        return float("nan"), 0
    x = torch.randn(m, in_f, device="cuda", dtype=DT)
    holder = {}

    def make():
        w = torch.randn(out_f, in_f, device="cuda", dtype=DT) * 0.02
        qw, st = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4")
        holder["b"] = nbytes(qw, st.absmax)
        return lambda: bnb.matmul_4bit(x, qw.t(), quant_state=st)

    fn = rotating(make, out_f * in_f // 2)
    return timeit(fn), holder["b"] + m * (in_f + out_f) * 2


def fmt_speed(us, ref):
    return f"{us:.1f} µs ({ref / us:.2f}×)"


def section_target(args):
    out_f, in_f = 11008, 4096
    print(f"\n### Target layer: x (M × {in_f}) · W ({out_f} × {in_f})ᵀ, bf16, µs and speedup vs bf16 cuBLAS\n")
    cols = ["bf16 cuBLAS", "tinygemm int4 g128", "bnb NF4 b64", *FORMATS, "INT4 g128 + r64", "NF4 g64 + r64"]
    print("| M | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    m1 = {}
    for m in args.ms:
        bf, bfb = bench_bf16(out_f, in_f, m)
        row = [f"{bf:.1f} µs"]
        tg, _ = bench_tinygemm(out_f, in_f, m) if m <= 512 or args.slow_baselines else (float("nan"), 0)
        bb, _ = bench_bnb(out_f, in_f, m)
        row += [fmt_speed(tg, bf), fmt_speed(bb, bf)]
        for name, fmt in FORMATS.items():
            us, b = bench_loquant(out_f, in_f, fmt, m)
            row.append(fmt_speed(us, bf))
            if m == 1:
                m1[name] = (us, b)
        for name, fmt in (("INT4 g128", FORMATS["INT4 g128"]), ("NF4 g64", FORMATS["NF4 g64"])):
            us, b = bench_loquant(out_f, in_f, fmt, m, rank=64)
            row.append(fmt_speed(us, bf))
            if m == 1:
                m1[name + " + r64"] = (us, b)
        if m == 1:
            m1["bf16 cuBLAS"] = (bf, bfb)
        print(f"| {m} | " + " | ".join(row) + " |", flush=True)
    if m1:
        print(f"\nM = 1, achieved bandwidth (copy bandwidth measured {COPY_BW:.0f} GB/s):\n")
        print("| kernel | µs | bytes moved | GB/s | % of copy bandwidth |")
        print("|---|---|---|---|---|")
        for name, (us, b) in m1.items():
            gbs = b / us / 1e3
            print(f"| {name} | {us:.1f} | {b / 1e6:.1f} MB | {gbs:.0f} | {100 * gbs / COPY_BW:.0f} % |")
        for name in ("INT4 g128", "NF4 g64"):
            if name in m1 and name + " + r64" in m1:
                extra = m1[name + " + r64"][0] / m1[name][0] - 1
                print(f"\nrank-64 correction on {name}, M = 1: +{100 * extra:.1f} % time")


def section_correction(args):
    """The rank-64 correction's cost, three ways of getting xa = x·Aᵀ to the epilogue: the
    default (loquant's x·Aᵀ kernel, the main kernel a programmatic dependent launch after it),
    the same two kernels launched plainly one after the other, and xa from cuBLAS first."""
    from loquant.kernels import lowrank

    out_f, in_f = 11008, 4096
    print(f"\n### Rank-64 correction on {out_f} × {in_f}, µs (added time against no correction)\n")
    print("| format | M | no correction | r64, x·Aᵀ kernel + PDL (default) | r64, x·Aᵀ kernel, no PDL | "
          "r64, x·Aᵀ by cuBLAS first |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    pdl_xa, supported = lowrank.xa, lowrank.pdl_supported

    def cublas(x2, A):  # xa from cuBLAS
        return F.linear(x2, A), False

    variants = ((pdl_xa, supported), (pdl_xa, lambda device: False), (cublas, supported))
    for name in ("INT4 g128", "NF4 g64"):
        for m in [m for m in args.ms if m <= ops.MMA_MAX_M]:
            base, _ = bench_loquant(out_f, in_f, FORMATS[name], m)
            cells = []
            for xa, pdl in variants:
                lowrank.xa, lowrank.pdl_supported = xa, pdl
                try:
                    us, _ = bench_loquant(out_f, in_f, FORMATS[name], m, rank=64)
                finally:
                    lowrank.xa, lowrank.pdl_supported = pdl_xa, supported
                cells.append(f"{us:.1f} (+{100 * (us / base - 1):.0f} %)")
            print(f"| {name} | {m} | {base:.1f} | " + " | ".join(cells) + " |", flush=True)


def section_paths(args):
    out_f, in_f = 11008, 4096
    print("\n### Paths compared (INT4 g128 and NF4 g64, 11008 × 4096), µs\n")
    print("| format | M | bf16 | GEMV (CUDA cores) | mma.sync (Gluon) | wgmma (Gluon, Hopper) | fused GEMM (Triton) | "
          "dequantize + cuBLAS |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for name in ("INT4 g128", "NF4 g64"):
        for m in sorted({2, 3, 8, *args.ms}):
            bf, _ = bench_bf16(out_f, in_f, m)
            cells = []
            for path in (ops.GEMV, ops.MMA, ops.WGMMA, ops.GEMM, ops.DEQUANT):
                skip = path == ops.GEMV and m > 16 or path == ops.MMA and m > 512 or path == ops.GEMM and m == 1
                if skip or path == ops.WGMMA and (m < 16 or not gluon_wgmma.supported(torch.device("cuda"))):
                    cells.append("-")
                    continue
                us, _ = bench_loquant(out_f, in_f, FORMATS[name], m, path=path)
                cells.append(f"{us:.1f}")
            print(f"| {name} | {m} | {bf:.1f} | " + " | ".join(cells) + " |", flush=True)


def section_dequant(args):
    """The large-M path's first half alone: deq(W) written as a bf16 matrix (cuBLAS then
    multiplies it). Bytes moved: the packed weight and its parameters read, n·k·2 written."""
    from loquant.kernels import gluon_dequant

    out_f, in_f = 11008, 4096
    print(f"\n### Dequantize kernel alone ({out_f} × {in_f} to bf16); copy bandwidth {COPY_BW:.0f} GB/s\n")
    print("| format | µs | bytes moved | GB/s | % of copy bandwidth |")
    print("|---|---|---|---|---|")
    for name, fmt in FORMATS.items():
        base = loquant_layer(out_f, in_f, fmt)
        moved = nbytes(*base.packed().values()) + out_f * in_f * 2

        def make(base=base):
            p = clone_layer(base)._kernel_state(DT)[0]
            w = torch.empty(out_f, in_f, device="cuda", dtype=DT)
            args = (p["qweight"], p["scales"], p["offsets"], p["book"], p["bits"], p["fmt"], out_f, in_f, p["group"], w)
            return lambda: gluon_dequant.dequantize(*args)

        us = timeit(rotating(make, moved))
        gbs = moved / us / 1e3
        print(f"| {name} | {us:.1f} | {moved / 1e6:.1f} MB | {gbs:.0f} | {100 * gbs / COPY_BW:.0f} % |", flush=True)


def section_crossover(args):
    """wgmma against dequantize + cuBLAS, every format, where ops.pick_path switches between
    them (WGMMA_MAX_M, WGMMA_MAX_M_FP32, gluon_wgmma.fills). Hopper only."""
    if not gluon_wgmma.supported(torch.device("cuda")):
        print("\n(crossover: the wgmma kernel needs Hopper; skipped)")
        return
    print("\n### wgmma / dequantize + cuBLAS, µs\n")
    print("| layer | M | bf16 | " + " | ".join(FORMATS) + " |")
    print("|---" * (len(FORMATS) + 3) + "|")
    for out_f, in_f in ((11008, 4096), (4096, 4096), (4096, 11008)):
        for m in args.ms:
            bf, _ = bench_bf16(out_f, in_f, m)
            cells = []
            for fmt in FORMATS.values():
                w, _ = bench_loquant(out_f, in_f, fmt, m, path=ops.WGMMA)
                d, _ = bench_loquant(out_f, in_f, fmt, m, path=ops.DEQUANT)
                cells.append(f"{w:.1f} / {d:.1f}")
            print(f"| {out_f} × {in_f} | {m} | {bf:.1f} | " + " | ".join(cells) + " |", flush=True)


def section_configs(args):
    """Layouts tried for the Gluon GEMV at M = 1 and M = 4 (the defaults: gluon_gemv.gemv_config)."""
    out_f, in_f = 11008, 4096
    print("\n### GEMV layout sweep (11008 × 4096), µs\n")
    keys = ("MR", "RPT", "V", "TJ", "WR", "WJ")
    m1 = ((1, 2, 4, 32, 2, 2), (1, 4, 4, 32, 1, 2), (1, 2, 4, 32, 4, 1), (1, 2, 4, 16, 2, 2), (1, 2, 2, 32, 2, 2),
          (1, 1, 4, 32, 2, 2), (1, 4, 4, 8, 4, 1))  # fmt: skip
    m4 = ((4, 2, 2, 32, 2, 2), (4, 2, 2, 16, 4, 1), (2, 2, 4, 32, 2, 2), (4, 1, 4, 32, 2, 2), (8, 1, 2, 32, 2, 2))
    sweep = {1: [dict(zip(keys, c, strict=True)) for c in m1], 4: [dict(zip(keys, c, strict=True)) for c in m4]}
    for name in ("INT4 g128", "NF4 g64", "INT2 g128"):
        for m, cfgs in sweep.items():
            for cfg in cfgs:
                ops.OVERRIDE["gemv"] = cfg
                try:
                    us, b = bench_loquant(out_f, in_f, FORMATS[name], m, path=ops.GEMV)
                    print(f"gemv {name} M={m} {cfg}: {us:.1f} µs ({b / us / 1e3:.0f} GB/s)", flush=True)
                except Exception as e:  # noqa: BLE001
                    print(f"gemv {name} M={m} {cfg}: failed {type(e).__name__}: {str(e)[:200]}")
    ops.OVERRIDE.pop("gemv", None)


def section_shapes(args):
    print("\n### Llama linear shapes, loquant INT4 g128 (auto path) against bf16 cuBLAS, tinygemm int4 g128, "
          f"bitsandbytes NF4 b64; % of copy bandwidth {COPY_BW:.0f} GB/s\n")  # fmt: skip
    print("| model | layer (out × in) | M | bf16 µs | tinygemm µs | bnb NF4 µs | loquant µs | loquant GB/s | "
          "% copy bw | vs bf16 | vs tinygemm | vs bnb |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for model, layers in SHAPES.items():
        for lname, (out_f, in_f) in layers.items():
            for m in args.ms:
                bf, _ = bench_bf16(out_f, in_f, m)
                tg, _ = bench_tinygemm(out_f, in_f, m) if m <= 512 or args.slow_baselines else (float("nan"), 0)
                bb, _ = bench_bnb(out_f, in_f, m)
                us, b = bench_loquant(out_f, in_f, FORMATS["INT4 g128"], m)
                gbs = b / us / 1e3
                print(f"| {model} | {lname} {out_f}×{in_f} | {m} | {bf:.1f} | {tg:.1f} | {bb:.1f} | {us:.1f} | "
                      f"{gbs:.0f} | {100 * gbs / COPY_BW:.0f} % | {bf / us:.2f}× | {tg / us:.2f}× | {bb / us:.2f}× |",
                      flush=True)  # fmt: skip


def eager_us(fn, calls: int = 1000, repeats: int = 5) -> tuple[float, float]:
    """(host µs, wall µs) per call of fn issued back to back without a CUDA graph: the time to
    issue the calls, and the time until the GPU has run them all; the least of `repeats` runs
    of `calls` calls (the host's own noise only ever adds time)."""
    host, wall = [], []
    for _ in range(repeats):
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        host.append((t1 - t0) / calls * 1e6)
        wall.append((time.perf_counter() - t0) / calls * 1e6)
    return min(host), min(wall)


def section_host(args):
    """Eager calls, as a model runs without CUDA graphs or torch.compile: the host time of a
    call (on a 256 x 4096 layer, whose kernels take a few µs, so the host is what limits)
    and the wall time per call on the target layer (weights rotated as elsewhere)."""
    print("\n### Eager calls (no CUDA graph): host µs per call (256 × 4096 layer) and wall µs per call "
          "(11008 × 4096, calls back to back)\n")  # fmt: skip
    names = [("INT4 g128", 0), ("INT4 g128", 64), ("NF4 g64", 0), ("NF4 g64", 64)]
    print("| M | bf16 F.linear | " + " | ".join(f"{n}{' + r64' if r else ''}" for n, r in names) + " |")
    print("|---" * (2 + len(names)) + "|")
    for m in args.ms:
        cells = []
        for n_out, fmt, rank in [(n, None, 0) for n in (256, 11008)] + [
            (n, FORMATS[f], r) for f, r in names for n in (256, 11008)
        ]:
            x = torch.randn(m, 4096, device="cuda", dtype=DT)
            if fmt is None:

                def make(n_out=n_out, x=x):
                    w = torch.randn(n_out, 4096, device="cuda", dtype=DT)
                    return lambda: F.linear(x, w)

                nb = n_out * 4096 * 2
            else:
                base = loquant_layer(n_out, 4096, fmt, rank)

                def make(base=base, x=x):
                    layer = clone_layer(base)
                    return lambda: layer(x)

                nb = nbytes(*base.packed().values(), base.A, base.B)
            with torch.inference_mode():
                cells.append(eager_us(rotating(make, nb))[0 if n_out == 256 else 1])
        pairs = [f"{cells[i]:.1f} / {cells[i + 1]:.1f}" for i in range(0, len(cells), 2)]
        print(f"| {m} | " + " | ".join(pairs) + " |", flush=True)


def section_block(args):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32)
    cfg._attn_implementation = "sdpa"
    rope = LlamaRotaryEmbedding(cfg).cuda()
    print("\n### Llama-2-7B decoder block (random weights), M = 1 token, bf16 activations, µs per block\n")
    print("| weights | µs | speedup vs bf16 |")
    print("|---|---|---|")
    base = None
    variants = [("bf16", None, 0)] + [(f"{name}{' + r64' if r else ''}", FORMATS[name], r)
                                      for name in ("INT4 g128", "INT2 g128", "NF4 g64") for r in (0, 64)]  # fmt: skip
    for name, fmt, rank in variants:

        def make(fmt=fmt, rank=rank):
            block = LlamaDecoderLayer(cfg, layer_idx=0).to("cuda", DT).eval()
            if fmt is not None:
                for _, mod in list(block.named_modules()):
                    for child_name, child in list(mod.named_children()):
                        if isinstance(child, torch.nn.Linear):
                            w = torch.randn(child.weight.shape, device="cuda") * 0.02
                            q = QuantLinear.from_weight(w, None, fmt)
                            if rank:
                                q.set_correction(torch.randn(rank, q.in_features, device="cuda") * 0.02,
                                                 torch.randn(q.out_features, rank, device="cuda") * 0.02)  # fmt: skip
                            setattr(mod, child_name, q.eval())
            x = torch.randn(1, 1, 4096, device="cuda", dtype=DT)
            pos = rope(x, torch.zeros(1, 1, dtype=torch.long, device="cuda"))

            def run():
                out = block(x, position_embeddings=pos, attention_mask=None)
                return out[0] if isinstance(out, tuple) else out

            return run

        params = 4 * 4096 * 4096 + 3 * 11008 * 4096
        with torch.inference_mode():
            us = timeit(rotating(make, params * (2 if fmt is None else fmt.bits / 8)))
        base = base or us
        print(f"| {name} | {us:.1f} | {base / us:.2f}× |", flush=True)


def main():
    global COPY_BW
    p = argparse.ArgumentParser()
    p.add_argument("--sections", default="target,correction,paths,shapes,block")
    p.add_argument("--ms", default=",".join(map(str, MS)))
    p.add_argument("--slow-baselines", action="store_true", help="also time tinygemm at M = 4096 (slow)")
    args = p.parse_args()
    args.ms = [int(m) for m in args.ms.split(",")]
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    COPY_BW = copy_bandwidth()
    print(f"GPU: {props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}, triton "
          f"{triton.__version__}; copy bandwidth (1 GiB device-to-device, read + write) "
          f"{COPY_BW:.0f} GB/s")  # fmt: skip
    print("timing: triton.testing.do_bench_cudagraph, median; weights rotated over > 200 MB of copies")
    t0 = time.time()
    for s in args.sections.split(","):
        globals()[f"section_{s}"](args)
        print(f"\n[{s}: {time.time() - t0:.0f} s]", flush=True)


if __name__ == "__main__":
    main()
