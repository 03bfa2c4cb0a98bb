"""ICQ (IR-QLoRA): the entropy of code histograms, the shift search, and the nf + icq format."""

import json
import math

import numpy as np
import pytest
import torch

import loquant
from loquant import LoquantError, QuantConfig, quantize
from loquant.allocation import parse_candidates, storage_bits
from loquant.formats import WeightFormat, dequantize_weight, nf_codebook, quantize_weight
from loquant.formats.codec import _grouped, unpack_codes
from loquant.formats.double_quant import dq_dequantize
from loquant.formats.icq import ICQ_SIGMA, code_entropy, grid_factors, search_shift
from loquant.storage import storage_report

from cli_helpers import one_json_line, run
from tiny_models import tiny_model

# --- code_entropy -------------------------------------------------------------------------


def test_entropy_of_known_histograms():
    codes = torch.stack(
        [
            torch.zeros(64, dtype=torch.uint8),  # one code: 0 bits
            torch.arange(64, dtype=torch.uint8) % 16,  # all 16 codes equally often: 4 bits
            (torch.arange(64) % 2).to(torch.uint8) * 9,  # two codes, half each: 1 bit
            torch.tensor([3] * 48 + [7] * 16, dtype=torch.uint8),  # 3/4 and 1/4
            (torch.arange(64) % 8).to(torch.uint8),  # 8 codes: 3 bits
        ]
    )
    h = code_entropy(codes, 4)
    expect = [0.0, 4.0, 1.0, -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25)), 3.0]
    assert h.shape == (5,) and h.dtype == torch.float64
    assert h.tolist() == pytest.approx(expect, abs=1e-12)


def test_entropy_keeps_leading_shape_and_ignores_masked_entries():
    codes = torch.tensor([[[0, 0, 1, 1, 2, 2, 2, 2], [1, 2, 3, 0, 1, 1, 1, 1]]], dtype=torch.uint8)
    valid = torch.tensor([True] * 4 + [False] * 4)  # padding of a short group
    h = code_entropy(codes, 2, valid)
    assert h.shape == (1, 2)
    assert h[0].tolist() == pytest.approx([1.0, 2.0], abs=1e-12)
    unmasked = -(3 * 0.125 * math.log2(0.125) + 0.625 * math.log2(0.625))  # counts 1, 5, 1, 1 of 8
    assert code_entropy(codes, 2)[0].tolist() == pytest.approx([1.5, unmasked], abs=1e-12)


# --- search_shift -------------------------------------------------------------------------


def brute_force(group: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every candidate of one group quantized elementwise in float64: (taus, entropies, |f|)."""
    x = group.double()
    tau0 = x.median()
    f = grid_factors()
    taus = tau0 + f * (x - tau0).abs().max()  # (candidates,)
    y = x[None] - taus[:, None]
    y = y / y.abs().amax(1, keepdim=True)
    book = nf_codebook(bits).double()
    codes = (y[..., None] - book).abs().argmin(-1)  # nearest NF value, (candidates, group)
    return taus, code_entropy(codes, bits), f.abs()


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("kind", ["skewed", "gaussian", "grid"])
def test_search_picks_the_entropy_maximizing_shift(bits, kind):
    g = torch.Generator().manual_seed(bits)
    if kind == "skewed":  # exponential tails on one side: the median far from the mid-range
        w = torch.empty(200, 64).exponential_(1.0, generator=g) ** 1.5 * 0.02 - 0.01
        w[::2] = -w[::2]
    elif kind == "gaussian":
        w = torch.randn(200, 64, generator=g) * 0.02
    else:  # values on a coarse grid: many candidates tie, the nearest to τ0 must win
        w = torch.round(torch.randn(200, 64, generator=g) * 4) / 4
    tau = search_shift(w, bits)
    assert tau.shape == (200,) and tau.dtype == torch.float32
    moved = 0
    for r in range(200):
        taus, ents, absf = brute_force(w[r], bits)
        best = ents.max()
        chosen = (taus.float() - tau[r]).abs().argmin()
        assert (taus[chosen].float() - tau[r]).abs() <= 1e-6 * w[r].abs().max()
        assert ents[chosen] == pytest.approx(best.item(), abs=1e-9), r
        # ties: the maximizer nearest to the median
        assert absf[chosen] == absf[(ents >= best - 1e-9)].min(), r
        moved += int(ents[chosen] > ents[absf.argmin()] + 1e-6)
    if kind == "skewed":
        assert moved >= 100  # on skewed groups the median itself is rarely the best shift


def test_search_range_is_the_official_grid():
    f = grid_factors()
    assert f.numel() == 201 and torch.all(f[1:] > f[:-1])
    assert ICQ_SIGMA == pytest.approx(1 / 1.848, abs=1e-3)  # 1 / Φ⁻¹(0.9677083), IR-QLoRA's sigma
    assert f[0].item() == pytest.approx(-0.1 * ICQ_SIGMA) and f[-1].item() == pytest.approx(0.1 * ICQ_SIGMA)
    # the shift never leaves τ0 ± 0.1σ · absmax(w - τ0)
    w = torch.randn(200, 64)
    tau = search_shift(w, 4)
    tau0 = w.median(1).values
    assert torch.all((tau - tau0).abs() <= 0.1 * ICQ_SIGMA * (w - tau0[:, None]).abs().amax(1) * (1 + 1e-5))


def test_search_ignores_padding_and_flat_groups():
    w = torch.zeros(3, 64)
    w[0, :10] = torch.linspace(5.0, 5.9, 10)  # 10 real weights, 54 padded slots
    w[1] = 0.3  # zero range: every candidate is τ0, entropy 0
    w[2] = torch.randn(64)
    valid = torch.ones(3, 64, dtype=torch.bool)
    valid[0, 10:] = False
    tau = search_shift(w, 4, valid)
    assert 5.0 <= tau[0] <= 5.9  # the zeros of the padding would have dragged τ0 to 0
    assert tau[1] == pytest.approx(0.3)
    alone = search_shift(w[0, :10][None], 4)
    assert tau[0] == alone[0]
    assert search_shift(w[2:], 4)[0] == tau[2]


# --- the nf + icq format ------------------------------------------------------------------


def reference(w: np.ndarray, tensors: dict, fmt: WeightFormat) -> np.ndarray:
    """float64 nearest-code dequantization against the stored shift and scale, group by group."""
    p = {n: v.double().numpy() for n, v in _stored_params(tensors, fmt).items()}
    book = nf_codebook(fmt.bits).double().numpy()
    g = fmt.group_len(w.shape[1])
    out = np.empty_like(w)
    for r in range(w.shape[0]):
        for j, s in enumerate(range(0, w.shape[1], g)):
            tau, scale = p["shifts"][r, j], p["scales"][r, j]
            y = np.clip((w[r, s : s + g] - tau) / (scale or 1.0), -1, 1)
            out[r, s : s + g] = book[np.abs(y[:, None] - book[None]).argmin(1)] * scale + tau
    return out


def _stored_params(t: dict, fmt: WeightFormat) -> dict:
    tau = dq_dequantize(t["shifts_q"], t["shifts_absmax"], t["shifts_mean"])
    if fmt.double_quant:
        scales = dq_dequantize(t["scales_q"], t["scales_absmax"], t["scales_mean"])
    else:
        scales = t["scales"].float()
    return {"shifts": tau, "scales": scales}


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("dq", [False, True])
def test_round_trip_against_float64_reference(bits, dq):
    torch.manual_seed(bits + 10 * dq)
    w = torch.randn(24, 200) * 0.05 + 0.01 * torch.rand(24, 1)  # 200 = 3 x 64 + 8
    fmt = WeightFormat("nf", bits, 64, dq, icq=True)
    t = quantize_weight(w, fmt)
    assert {k: (tuple(v.shape), v.dtype) for k, v in t.items()} == {
        k: (tuple(s), d) for k, (s, d) in fmt.layout(24, 200).items()
    }
    assert t["shifts_q"].shape == (24, 4) and t["shifts_q"].dtype == torch.int8
    ours = dequantize_weight(t, fmt, (24, 200), torch.float64).numpy()
    ref = reference(w.double().numpy(), t, fmt)
    mismatch = ~np.isclose(ours, ref, rtol=0, atol=1e-6)
    assert mismatch.mean() < 1e-3, f"{mismatch.sum()} of {mismatch.size} differ"
    # the stored shift is the searched one up to its int8 step
    valid = _grouped(torch.ones(1, 200, dtype=torch.bool), 64, False)
    searched = search_shift(_grouped(w, 64, 0.0), bits, valid)
    stored = _stored_params(t, fmt)
    assert (stored["shifts"] - searched).abs().max() <= t["shifts_absmax"].max() / 127
    # and every weight lies within half the widest NF gap of its group (plus parameter rounding)
    if not dq:
        book = nf_codebook(bits)
        half_gap = (book[1:] - book[:-1]).max() / 2
        err = _grouped((torch.from_numpy(ours).float() - w).abs(), 64, 0.0).amax(2)
        assert torch.all(err <= stored["scales"] * half_gap * 1.01 + 1e-6)
        # the scale is absmax(w - τ) with τ as stored, over the real weights only
        lo, hi = _grouped(w, 64, float("inf")).amin(2), _grouped(w, 64, float("-inf")).amax(2)
        absmax = torch.maximum(hi - stored["shifts"], stored["shifts"] - lo)
        assert torch.allclose(stored["scales"], absmax.half().float())


def test_codes_have_more_entropy_than_plain_nf():
    torch.manual_seed(0)
    w = torch.randn(256, 256) * 0.02 + 0.004 * torch.randn(256, 1)
    w = w + 0.01 * torch.rand(256, 256) ** 8  # a skewed tail
    for bits in (2, 3, 4):
        h = {}
        for icq in (False, True):
            fmt = WeightFormat("nf", bits, 64, icq=icq)
            h[icq] = code_entropy(_grouped(unpack_codes(quantize_weight(w, fmt), fmt, (256, 256)), 64, 0), bits)
        # on average: a single group can lose, plain NF's τ = 0 lying outside ICQ's grid around the median
        assert h[True].mean() > h[False].mean() + 0.02


def test_short_last_group_gets_its_own_shift():
    torch.manual_seed(1)
    w = torch.randn(6, 200) * 0.02
    w[:, 192:] = 3.0 + torch.rand(6, 8) ** 3 * 0.1  # 8 weights far from 0, skewed
    fmt = WeightFormat("nf", 4, 64, icq=True)
    t = quantize_weight(w, fmt)
    tau = _stored_params(t, fmt)["shifts"]
    scales = t["scales"].float()
    assert torch.all((tau[:, 3] > 2.99) & (tau[:, 3] < 3.1))  # not dragged towards the padding
    assert torch.all(scales[:, 3] < 0.11)  # the scale spans the 8 weights around τ, not 0..3
    deq = dequantize_weight(t, fmt, (6, 200))
    assert (deq[:, 192:] - w[:, 192:]).abs().max() < 0.01


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("dq", [False, True])
def test_zero_range_groups(bits, dq):
    w = torch.randn(3, 128) * 0.1
    w[1, :64] = 0.0
    w[2, 64:] = 0.25  # constant, non-zero group
    fmt = WeightFormat("nf", bits, 64, dq, icq=True)
    deq = dequantize_weight(quantize_weight(w, fmt), fmt, tuple(w.shape))
    assert torch.isfinite(deq).all()
    if dq:  # int8 scales approximate a tiny scale to within a step of their block
        tol = 0.01 * w.abs().max()
    else:  # the shift lands within an int8 step and the fp16 scale brings the rest back
        tol = 1e-4
    assert deq[1, :64].abs().max() <= tol
    assert (deq[2, 64:] - 0.25).abs().max() <= tol


def test_double_quant_combination_costs_little_accuracy():
    torch.manual_seed(2)
    w = torch.randn(512, 512) * 0.02
    err = {}
    for dq in (False, True):
        fmt = WeightFormat("nf", 4, 64, dq, icq=True)
        t = quantize_weight(w, fmt)
        assert "shifts_q" in t and ("scales_q" in t) == dq and ("scales" in t) == (not dq)
        err[dq] = ((dequantize_weight(t, fmt, (512, 512)) - w).norm() / w.norm()).item()
    assert err[True] < err[False] * 1.02


# --- layout, bits, config -----------------------------------------------------------------


def test_layout_and_bits_per_weight():
    fmt = WeightFormat("nf", 4, 64, icq=True)
    layout = fmt.layout(576, 1536)
    assert set(layout) == {"qweight", "scales", "shifts_q", "shifts_absmax", "shifts_mean"}
    assert layout["shifts_q"] == ((576, 24), torch.int8)
    assert layout["shifts_absmax"] == ((54,), torch.float32)  # 576 x 24 groups / 256
    weights = 576 * 1536
    bits = storage_bits(fmt, (576, 1536), 0, False) / weights
    # 4 bits, an fp16 scale and an int8 shift per 64, an f32 absmax per 256 groups, one f32 mean
    assert bits == pytest.approx(4 + 16 / 64 + 8 / 64 + 32 * 54 / weights + 32 / weights)
    assert bits == pytest.approx(4.377, abs=1e-3)
    dq = WeightFormat("nf", 4, 64, True, True)
    assert storage_bits(dq, (576, 1536), 0, False) / weights == pytest.approx(
        4 + 2 * (8 / 64 + 32 / 64 / 256), abs=1e-4
    )
    assert fmt.param_names == ("scales", "shifts") and WeightFormat("nf").param_names == ("scales",)


def test_format_record_round_trip_and_old_records():
    fmt = WeightFormat("nf", 3, 128, icq=True)
    assert fmt.to_dict() == {"format": "nf", "bits": 3, "group_size": 128, "double_quant": False, "icq": True}
    assert WeightFormat.from_dict(fmt.to_dict()) == fmt
    old = {"format": "nf", "bits": 4, "group_size": 64, "double_quant": True}  # saved before icq existed
    assert WeightFormat.from_dict(old) == WeightFormat("nf", 4, 64, True) and not WeightFormat.from_dict(old).icq
    record = {**old, "in_features": 64, "out_features": 8, "rank": 0, "bias": False}
    assert WeightFormat.from_record(record) == WeightFormat("nf", 4, 64, True)
    assert WeightFormat.from_record({**record, "icq": True}).icq
    assert fmt.describe() == "NF3 g128 icq"
    assert WeightFormat("nf", 4, 64, True, True).describe() == "NF4 g64 dq icq"


@pytest.mark.parametrize("kwargs", [dict(format="int"), dict(format="int-sym"), dict(format="int", bits=8)])
def test_icq_needs_nf(kwargs):
    with pytest.raises(LoquantError, match="icq.*'nf'"):
        WeightFormat(icq=True, **kwargs)
    with pytest.raises(LoquantError, match="icq"):
        QuantConfig(icq=True, **kwargs)
    with pytest.raises(LoquantError, match="icq must be"):
        WeightFormat("nf", icq=1)


def test_quant_config_passes_icq_to_every_layer_and_overrides():
    config = QuantConfig(format="nf", bits=4, icq=True, overrides={"*.down_proj": {"bits": 2}})
    assert config.base_format().icq
    assert config.format_for("model.layers.0.mlp.down_proj") == WeightFormat("nf", 2, 64, icq=True)
    assert config.format_for("model.layers.0.mlp.up_proj") == WeightFormat("nf", 4, 64, icq=True)
    with pytest.raises(LoquantError, match="icq"):
        QuantConfig(format="nf", icq=True, overrides={"*.down_proj": {"format": "int"}})


def test_candidates_with_icq():
    assert parse_candidates("nf:2,4:64:icq int:4:32") == [
        WeightFormat("nf", 2, 64, icq=True),
        WeightFormat("nf", 4, 64, icq=True),
        WeightFormat("int", 4, 32),
    ]
    with pytest.raises(LoquantError, match="icq"):
        parse_candidates("int:4:64:icq")
    with pytest.raises(LoquantError, match=r"FORMAT:BITS:GROUPS\[:icq\]"):
        parse_candidates("nf:4:64:dq")


# --- models: save / load, CLI -------------------------------------------------------------


def _logits(model):
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids)[0]


@pytest.mark.parametrize("dq", [False, True])
def test_save_load_gives_identical_logits(dq, tmp_path):
    model = tiny_model("llama")
    model.loquant_source = "tiny-llama"
    quantize(model, QuantConfig(format="nf", bits=3, group_size=64, double_quant=dq, icq=True), progress=False)
    layer = model.model.layers[0].self_attn.q_proj  # 96 inputs: groups of 64 and 32
    assert layer.shifts_q.shape == (96, 2) and layer.fmt.icq
    loquant.save(model, tmp_path / "m")
    back = loquant.load(tmp_path / "m")
    assert torch.equal(_logits(model), _logits(back))
    assert back.model.layers[0].self_attn.q_proj.fmt == WeightFormat("nf", 3, 64, dq, True)
    records = back.config.quantization_config["layers"]
    assert all(r["icq"] for r in records.values())
    nbytes = {k: v.nbytes for k, v in back.state_dict().items()}
    report = storage_report(records, nbytes)
    assert {r["format"] for r in report["layers"]} == {f"NF3 g64{' dq' if dq else ''} icq"}
    plain = quantize(tiny_model("llama"), QuantConfig(format="nf", bits=3, double_quant=dq), progress=False)
    plain_bits = storage_report(
        plain.config.quantization_config["layers"], {k: v.nbytes for k, v in plain.state_dict().items()}
    )["bits_per_weight"]
    assert report["bits_per_weight"] > plain_bits + 8 / 64  # int8 shift per group + block constants


def test_folder_saved_without_icq_keys_still_loads(tmp_path):
    model = tiny_model("llama")
    quantize(model, QuantConfig(format="nf", bits=4), progress=False)
    loquant.save(model, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    # without ICQ nothing about it is written: older loquant versions read the folder too
    assert all("icq" not in rec for rec in cfg["quantization_config"]["layers"].values())
    back = loquant.load(tmp_path / "m")
    assert torch.equal(_logits(model), _logits(back))
    assert not back.model.layers[0].mlp.up_proj.fmt.icq


def test_cli_icq(checkpoint, tmp_path, capsys):
    flags = ["--format", "nf", "--bits", "4", "--group-size", "32"]
    code, out, err = run(capsys, "quantize", checkpoint, *flags, "--icq", "--out", tmp_path / "m")
    assert code == 0, err
    assert "NF4 g32 icq" in out
    code, out, _ = run(capsys, "info", tmp_path / "m", "--json")
    info = one_json_line(out)
    assert info["layers"][0]["format"] == "NF4 g32 icq"
    # 4 bits + fp16 scale + int8 shift per 32, + f32 absmax per 256 groups and a mean per matrix
    assert 4 + 24 / 32 < info["bits_per_weight"] < 4 + 24 / 32 + 0.02
    code, out, _ = run(capsys, "quantize", checkpoint, *flags, "--out", tmp_path / "p")
    assert code == 0
    code, out, _ = run(capsys, "info", tmp_path / "p", "--json")
    assert one_json_line(out)["bits_per_weight"] == 4.5


@pytest.mark.parametrize("flags", [[], ["--format", "int"], ["--format", "int-sym", "--bits", "4"]])
def test_cli_icq_needs_nf(flags, checkpoint, tmp_path, capsys):
    code, _, err = run(capsys, "quantize", checkpoint, *flags, "--icq", "--out", tmp_path / "m")
    assert code == 2 and "--icq" in err and "--format nf" in err
    assert err.startswith("loquant: error:") and err.count("\n") == 1
    assert not (tmp_path / "m").exists()
