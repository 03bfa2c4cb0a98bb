"""LoRAQuant: SVD reparameterization, mixed-precision storage, bits, refinement, folders, CLI."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import loquant
from loquant.adapters import loraquant as lq
from loquant.adapters.attach import load_adapter, merge
from loquant.errors import LoquantError
from loquant.formats import WeightFormat, dequantize_weight, quantize_weight
from loquant.serialization import read_header

from cli_helpers import one_json_line, run


def adapter_pair(r=16, m=512, n=1376, decay=0.8, seed=0):
    """A random adapter with a geometric spectrum (like a trained one) or a flat one (decay 1)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(r, n, generator=g) / n**0.5
    B = torch.randn(m, r, generator=g) * 0.02 * decay ** torch.arange(r).float()
    return A, B


def rel_error(B_hat, A_hat, A, B, scale):
    norm = lq.product_error(0 * B.double(), 0 * A.double(), B.double(), A.double(), scale)
    return math.sqrt(float(lq.product_error(B_hat.double(), A_hat.double(), B.double(), A.double(), scale) / norm))


# --- one layer ---------------------------------------------------------------------------------


def test_svd_factors_keep_the_product_and_split_sigma_evenly():
    A, B = adapter_pair(r=8, m=64, n=96)
    Bp, Ap, sigma = lq.svd_factors(A, B, 2.0)
    assert torch.allclose(Bp @ Ap, 2.0 * B.double() @ A.double(), atol=1e-12)
    assert torch.all(sigma[:-1] >= sigma[1:])
    assert torch.allclose(Bp.t() @ Bp, torch.diag(sigma), atol=1e-12)  # B′ = U√Σ
    assert torch.allclose(Ap @ Ap.t(), torch.diag(sigma), atol=1e-12)  # A′ = √ΣVᵀ


def test_high_rank_is_the_smallest_count_reaching_the_ratio():
    sigma = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64).sqrt()
    assert [lq.high_rank(sigma, p) for p in (0.5, 0.8, 0.81, 0.95, 0.96, 1.0)] == [1, 2, 3, 3, 4, 4]
    assert lq.high_rank(torch.zeros(4), 0.9) == 0


def test_sign_part_is_one_bit_and_the_mean_magnitude_per_row():
    w = torch.randn(3, 40)
    t = lq.sign_quantize(w)
    assert t["qweight"].numel() == 3 * 40 // 8 and t["scales"].dtype == torch.float16
    back = lq.sign_dequantize(t, (3, 40))
    assert torch.equal(back.sign(), torch.where(w >= 0, 1.0, -1.0))
    assert torch.allclose(back.abs(), w.abs().mean(1, keepdim=True).half().float().expand(3, 40))


@pytest.mark.parametrize("bits,group", [(2, -1), (3, 64), (4, 32)])
def test_clipped_ranges_are_a_codec_format_and_never_worse_than_min_max(bits, group):
    w = torch.randn(6, 200)
    fmt = WeightFormat("int", bits, group)
    clipped = dequantize_weight(lq.clipped_quantize(w, fmt), fmt, (6, 200))
    plain = dequantize_weight(quantize_weight(w, fmt), fmt, (6, 200))
    per_row = lambda x: ((x - w) ** 2).sum(1)  # noqa: E731
    assert torch.all(per_row(clipped) <= per_row(plain) + 1e-6)
    if bits == 2:  # Gaussian rows at 2 bits: the tails waste most of min-max's levels
        assert per_row(clipped).sum() < 0.6 * per_row(plain).sum()


def test_bits_count_every_stored_byte():
    A, B = adapter_pair(r=16, m=128, n=96)
    tensors, rec = lq.compress_pair(A, B, 1.0, lq.LoraQuantConfig(ratio=0.9, high_bits=3, group_size=-1))
    r, h, m, n = 16, rec["high_rank"], 128, 96
    assert 0 < h < r
    # high part: 3-bit codes + fp16 scale and offset per row of A′ / column of B′;
    # low part: 1-bit signs + one fp16 scale per row / column
    expected = 3 * h * (m + n) / 8 + 4 * h * 2 + (r - h) * (m + n) / 8 + 2 * (r - h) * 2
    assert rec["bytes"] == sum(t.numel() * t.element_size() for t in tensors.values()) == expected
    assert rec["bits"] == pytest.approx(8 * expected / (r * (m + n)))


def test_eight_bits_everywhere_is_nearly_lossless():
    A, B = adapter_pair(r=8, m=64, n=96, decay=1.0)
    tensors, rec = lq.compress_pair(A, B, 0.5, lq.LoraQuantConfig(ratio=1.0, high_bits=8))
    B_hat, A_hat = lq.dequantize_pair(tensors, rec, lq.LoraQuantConfig(ratio=1.0, high_bits=8))
    assert rec["high_rank"] == 8 and rec["rel_error"] < 0.01
    assert rel_error(B_hat, A_hat, A, B, 0.5) == pytest.approx(rec["rel_error"], rel=1e-6)


def test_beats_round_to_nearest_2_bit_at_fewer_bits_on_a_llama_like_adapter():
    A, B = adapter_pair(r=16, m=1376, n=512)
    _, rec = lq.compress_pair(A, B, 1.0, lq.LoraQuantConfig(ratio=0.9, high_bits=3, group_size=-1))
    B_hat, A_hat, rtn_bits = lq.rtn_pair(A, B, 1.0, 2)
    assert rec["bits"] <= 2.0 <= rtn_bits
    assert rec["rel_error"] < 0.8 * rel_error(B_hat, A_hat, A, B, 1.0)


def test_refinement_lowers_the_product_error_and_keeps_the_best_step():
    A, B = adapter_pair(r=16, m=256, n=384)
    plain = lq.compress_pair(A, B, 1.0, lq.LoraQuantConfig(ratio=0.9, high_bits=2))[1]
    refined = lq.compress_pair(A, B, 1.0, lq.LoraQuantConfig(ratio=0.9, high_bits=2, refine_steps=8))[1]
    start, best = refined["refine_loss"]
    assert start == pytest.approx(plain["rel_error"] ** 2, rel=1e-4)
    assert refined["rel_error"] ** 2 == pytest.approx(best, rel=1e-4)
    assert refined["rel_error"] < 0.97 * plain["rel_error"]
    assert refined["bytes"] == plain["bytes"]


def test_an_untrained_adapter_compresses_to_zero():
    A, B = adapter_pair(r=4, m=32, n=48)
    tensors, rec = lq.compress_pair(A, 0 * B, 1.0, lq.LoraQuantConfig(refine_steps=3))
    B_hat, A_hat = lq.dequantize_pair(tensors, rec, lq.LoraQuantConfig())
    assert rec["high_rank"] == 0 and torch.count_nonzero(B_hat @ A_hat) == 0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(ratio=0.0), "ratio"),
        (dict(ratio=1.5), "ratio"),
        (dict(high_bits=1), "high-bits"),
        (dict(high_bits=5), "high-bits"),
        (dict(group_size=0), "group size"),
        (dict(refine_steps=-1), "refine-steps"),
        (dict(max_bits=0.5), "max-bits"),
    ],
)
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(LoquantError, match=match):
        lq.LoraQuantConfig(**kwargs)


def test_nan_in_the_adapter_is_refused():
    A, B = adapter_pair(r=4, m=32, n=48)
    A[0, 0] = float("nan")
    with pytest.raises(LoquantError, match="NaN"):
        lq.compress_pair(A, B, 1.0, lq.LoraQuantConfig())


# --- folders, loading, CLI ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(checkpoint, texts, tmp_path_factory):
    """A loquant INT3 base and a LoRA r8 adapter trained on it by `loquant finetune` (its folder)."""
    from loquant.cli import main

    d = tmp_path_factory.mktemp("lq")
    assert main(["quantize", str(checkpoint), "--bits", "3", "--group-size", "32", "--out", str(d / "q")]) == 0
    assert main(["finetune", str(d / "q"), "--data", str(texts / "train.txt"), "--eval-data", str(texts / "held.txt"),
                 "--steps", "12", "--batch-size", "2", "--seq-len", "32", "--rank", "8", "--init", "zero",
                 "--lr", "1e-2", "--eval-windows", "2", "--out", str(d / "ft")]) == 0  # fmt: skip
    return d / "ft"


def logits(model, seed=0):
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_cli_with_base_writes_a_model_folder_that_loads_packed_and_evaluates(trained, corpus, tmp_path, capsys):
    out = tmp_path / "c"
    code, stdout, _ = run(
        capsys, "compress-adapter", trained, "--base", trained, "--out", out, "--max-bits", 2, "--json"
    )
    assert code == 0
    summary = one_json_line(stdout)
    meta = json.loads((out / "loquant_adapter.json").read_text())
    header, _ = read_header(out / "loquant_adapter.safetensors")
    stored = sum(e["data_offsets"][1] - e["data_offsets"][0] for e in header.values())
    assert meta["avg_bits"] == pytest.approx(8 * stored / meta["params"]) == pytest.approx(summary["avg_bits"], 1e-3)
    # r 8 on 2 blocks of q, o (96 x 96), k, v (48 x 96), gate, up (160 x 96), down (96 x 160)
    assert meta["params"] == 2 * 8 * (2 * 192 + 2 * 144 + 3 * 256) == 23040
    assert meta["avg_bits"] <= 2.0 and meta["peft_config"]["r"] == 8

    packed = loquant.load(out)
    wrapped = [m for m in packed.modules() if isinstance(m, lq.PackedLoraLinear)]
    assert len(wrapped) == len(meta["layers"]) == 14
    # kept packed: only uint8 codes and fp16 scales / offsets, no float factor
    assert {b.dtype for m in wrapped for n, b in m.named_buffers() if not n.startswith("base_layer")} == {
        torch.uint8, torch.float16}  # fmt: skip

    # dequantized PEFT folder: same function through PEFT, on the same base
    assert run(capsys, "decompress-adapter", out, "--out", tmp_path / "peft")[0] == 0
    through_peft = load_adapter(loquant.load(trained, adapter=False), tmp_path / "peft")
    assert torch.allclose(logits(packed), logits(through_peft), atol=1e-5)
    # and the 16-bit merge folds the same adapter
    assert torch.allclose(logits(merge(packed, torch.float32)), logits(packed), atol=1e-4)

    code, stdout, _ = run(capsys, "eval", out, "--corpus", corpus, "--seq-len", "32", "--windows", "4", "--json")
    assert code == 0 and one_json_line(stdout)["adapter_avg_bits"] == pytest.approx(meta["avg_bits"], abs=1e-4)


def test_high_precision_compression_reproduces_the_16_bit_adapter(trained, tmp_path):
    config = lq.LoraQuantConfig(ratio=1.0, high_bits=8)
    lq.compress_adapters(trained, tmp_path / "c", config, base=trained, progress=False)
    original, packed = logits(loquant.load(trained)), logits(loquant.load(tmp_path / "c"))
    base_only = logits(loquant.load(trained, adapter=False))
    assert (packed - original).abs().max() < 0.02 * (original - base_only).abs().max()


def test_a_plain_peft_adapter_with_rslora_round_trips_through_vanilla_peft(checkpoint, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(checkpoint),
                           LoraConfig(r=8, lora_alpha=32, use_rslora=True, target_modules=["q_proj", "v_proj"],
                                      rank_pattern={"v_proj": 4}))  # fmt: skip
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    model.save_pretrained(tmp_path / "adapter")
    lq.compress_adapters(tmp_path / "adapter", tmp_path / "c", lq.LoraQuantConfig(high_bits=3), progress=False)
    meta, pairs = lq.read_compressed(tmp_path / "c")
    assert meta["layers"]["model.layers.0.self_attn.q_proj"]["scaling"] == pytest.approx(32 / math.sqrt(8))
    assert meta["layers"]["model.layers.0.self_attn.v_proj"]["rank"] == 4
    lq.to_peft(tmp_path / "c", tmp_path / "peft")

    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(checkpoint), tmp_path / "peft")
    for name, (B_hat, A_hat) in pairs.items():
        layer = reloaded.base_model.model.get_submodule(name)
        assert torch.allclose(layer.get_delta_weight("default"), B_hat @ A_hat, atol=1e-6)
    saved = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert set(saved) == set(load_file(tmp_path / "adapter" / "adapter_model.safetensors"))


def test_a_folder_of_adapters_in_one_call_with_progress_and_resume(trained, tmp_path, capsys):
    import shutil

    src = tmp_path / "many"
    for i, name in enumerate(("alpha", "beta")):
        shutil.copytree(trained / "adapter", src / name)
        t = load_file(src / name / "adapter_model.safetensors")
        save_file({k: v * (1 + i) for k, v in t.items()}, src / name / "adapter_model.safetensors")
    (src / "notes").mkdir()  # not an adapter: skipped
    code, stdout, err = run(capsys, "compress-adapter", src, "--out", tmp_path / "out", "--high-bits", "3")
    assert code == 0 and "alpha:" in stdout and "beta:" in stdout
    assert "compress-adapter" in err and "28/28" in err  # one bar over both adapters' 14 layers
    a = json.loads((tmp_path / "out" / "alpha" / "loquant_adapter.json").read_text())
    b = json.loads((tmp_path / "out" / "beta" / "loquant_adapter.json").read_text())
    assert a["settings"]["high_bits"] == b["settings"]["high_bits"] == 3 and a["checksums"] != b["checksums"]

    stamp = (tmp_path / "out" / "alpha" / "loquant_adapter.safetensors").stat().st_mtime_ns
    assert run(capsys, "compress-adapter", src, "--out", tmp_path / "out", "--resume")[0] == 0
    assert (tmp_path / "out" / "alpha" / "loquant_adapter.safetensors").stat().st_mtime_ns == stamp
    code, _, err = run(capsys, "compress-adapter", src, "--out", tmp_path / "out")
    assert code == 2 and "--overwrite" in err


def _corrupt(folder):
    path = folder / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


def _nan(folder):
    t = load_file(folder / "adapter_model.safetensors")
    next(v for k, v in sorted(t.items()) if "lora_B" in k)[0, 0] = float("inf")
    save_file(t, folder / "adapter_model.safetensors")


def _dora(folder):
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))


def _renamed(folder):
    t = load_file(folder / "adapter_model.safetensors")
    save_file(
        {k.replace("layers.1.mlp", "layers.7.mlp"): v for k, v in t.items()}, folder / "adapter_model.safetensors"
    )


def _no_config(folder):
    (folder / "adapter_config.json").unlink()


@pytest.mark.parametrize(
    "spoil,match",
    [
        (_corrupt, "truncated"),
        (_nan, "NaN or Inf"),
        (_dora, "DoRA"),
        (_renamed, "not a quantized layer of the base"),
        (_no_config, "no PEFT adapter"),
    ],
)
def test_bad_adapters_fail_clearly_and_write_nothing(trained, tmp_path, capsys, spoil, match):
    import shutil

    shutil.copytree(trained / "adapter", tmp_path / "adapter")
    spoil(tmp_path / "adapter")
    code, _, err = run(capsys, "compress-adapter", tmp_path / "adapter", "--base", trained, "--out", tmp_path / "o")
    assert code == 2 and match in err
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.*"))


def test_a_corrupt_compressed_adapter_is_named_on_load(trained, tmp_path):
    lq.compress_adapters(trained, tmp_path / "c", base=trained, progress=False)
    path = tmp_path / "c" / "loquant_adapter.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(LoquantError, match="corrupt"):
        loquant.load(tmp_path / "c")


def test_max_bits_caps_each_layer_by_moving_directions_to_signs():
    A, B = adapter_pair(r=16, m=256, n=384, decay=1.0)  # flat spectrum: ρ 0.95 wants most of the rank
    free = lq.compress_pair(A, B, 1.0, lq.LoraQuantConfig(ratio=0.95, high_bits=4))[1]
    tensors, capped = lq.compress_pair(A, B, 1.0, lq.LoraQuantConfig(ratio=0.95, high_bits=4, max_bits=2.0))
    assert free["bits"] > 3.5 and capped["bits"] <= 2.0 < capped["bits"] + (4 - 1) / 16 * 1.1
    assert capped["high_rank"] < free["high_rank"]
    assert capped["bytes"] == lq.stored_bytes(16, capped["high_rank"], 384, lq.LoraQuantConfig(high_bits=4)) + \
        lq.stored_bytes(16, capped["high_rank"], 256, lq.LoraQuantConfig(high_bits=4))  # fmt: skip
