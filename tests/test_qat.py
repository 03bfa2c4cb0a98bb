"""QAT (PEQA, L4Q, LR-QAT): the layer, its gradients, its merge, and `loquant finetune --mode`."""

import json

import pytest
import torch

import loquant
from loquant.cli import main
from loquant.errors import LoquantError
from loquant.finetune import FinetuneConfig, run
from loquant.formats import WeightFormat
from loquant.layers import QuantLinear
from loquant.qat import QATLinear, attach, merge, qat_layers
from loquant.storage import model_bits_per_weight

from cli_helpers import interrupted_at
from cli_helpers import run as run_cli
from tiny_models import tiny_model

FORMATS = [("int", 3, -1), ("int", 2, 32), ("int-sym", 3, 32), ("nf", 4, 32)]
SMALL = dict(steps=6, batch_size=2, seq_len=32, eval_windows=2, save_every=2)


def layer_and_weight(f, bits, group, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(40, 100, generator=g) * 0.05  # 100 = 3 x 32 + 4: a short last group
    return QuantLinear.from_weight(W, torch.randn(40, generator=g), WeightFormat(f, bits, group)), W


def modes_for(f):
    return ["peqa", "l4q", "full"] + ([] if f == "nf" else ["lr-qat"])


@pytest.mark.parametrize("f,bits,group", FORMATS)
def test_the_start_is_round_to_nearest_and_merges_exactly(f, bits, group):
    base, W = layer_and_weight(f, bits, group)
    x = torch.randn(5, 100)
    for mode in modes_for(f):
        layer = QATLinear(base, mode, W, rank=4)
        if mode != "lr-qat":  # lr-qat rounds its int8 fixed-point W/s0, which can cross a boundary
            assert torch.equal(layer.build_weight(), base.dequantize()), mode
        with torch.no_grad():  # the merged layer stores exactly the weight the QAT layer computes
            assert torch.equal(layer.to_quant_linear().dequantize(), layer.build_weight()), mode
            assert torch.allclose(layer.to_quant_linear()(x), layer(x), atol=1e-5), mode


def test_lr_qat_start_differs_from_rtn_only_near_rounding_boundaries():
    base, W = layer_and_weight("int", 2, 32)
    layer = QATLinear(base, "lr-qat", W, rank=4)
    moved = (layer.build_weight() != base.dequantize()).float().mean().item()
    assert 0 < moved < 0.02  # within 2^-7 of a .5 boundary: about 1% of the weights
    exact = QATLinear(base, "lr-qat", W, rank=4, phi_dtype="bf16")
    assert (exact.build_weight() != base.dequantize()).float().mean().item() < moved
    assert layer.phi.dtype == torch.uint8 and exact.phi.dtype == torch.bfloat16


@pytest.mark.parametrize("f,bits,group", FORMATS)
def test_gradients_reach_exactly_the_trainables_of_each_mode(f, bits, group):
    base, W = layer_and_weight(f, bits, group)
    for mode in modes_for(f):
        layer = QATLinear(base, mode, W, rank=4)
        if mode in ("l4q", "lr-qat"):
            layer.B.data.normal_(0, 0.01)  # away from B = 0, so A gets a gradient too
        x = torch.randn(3, 7, 100, requires_grad=True)
        layer(x).square().sum().backward()
        names = {"peqa": ["scales"], "full": ["W", "scales"]}.get(mode, ["A", "B", "scales"])
        names += ["offsets"] if f == "int" and mode != "peqa" else []
        trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
        assert trainable == set(names), (mode, trainable)
        for name in names:
            assert getattr(layer, name).grad.abs().sum() > 0, (mode, name)
        assert x.grad is not None and x.grad.abs().sum() > 0
        assert layer.bias.grad is None


def test_straight_through_gradients_match_a_plain_autograd_reference():
    """The recomputing matmul gives the gradients of y = x·Ŵᵀ with Ŵ built by ordinary autograd."""
    base, W = layer_and_weight("int", 3, 32)
    layer = QATLinear(base, "l4q", W, rank=4)
    layer.B.data.normal_(0, 0.01)
    x = torch.randn(6, 100, requires_grad=True)
    layer(x).pow(2).sum().backward()
    got = [p.grad.clone() for p in layer.trainables()] + [x.grad.clone()]
    for p in layer.trainables():
        p.grad = None
    x.grad = None
    (x @ layer.build_weight().T + layer.bias).pow(2).sum().backward()
    want = [p.grad for p in layer.trainables()] + [x.grad]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_only_one_layer_weight_is_saved_for_backward():
    """LR-QAT's memory: nothing weight-shaped in float is kept between forward and backward."""
    base, W = layer_and_weight("int", 2, 32)
    layer = QATLinear(base, "lr-qat", W, rank=4)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(torch.randn(3, 100, requires_grad=True)).sum()
    assert not [t for t in saved if t.shape == W.shape and t.is_floating_point()]


def test_bad_input():
    base, W = layer_and_weight("nf", 4, 32)
    with pytest.raises(LoquantError, match="int or int-sym"):
        QATLinear(base, "lr-qat", W)
    base, W = layer_and_weight("int", 2, 32)
    with pytest.raises(LoquantError, match="float weights"):
        QATLinear(base, "l4q", None)
    with pytest.raises(LoquantError, match="unknown QAT mode"):
        QATLinear(base, "lsq", W)
    dq = QuantLinear.from_weight(W, None, WeightFormat("int", 2, 32, double_quant=True))
    with pytest.raises(LoquantError, match="--double-quant"):
        QATLinear(dq, "peqa")
    corrected = QuantLinear.from_weight(W, None, WeightFormat("int", 2, 32))
    corrected.set_correction(torch.zeros(2, 100), torch.zeros(40, 2))
    with pytest.raises(LoquantError, match="without --rank"):
        QATLinear(corrected, "peqa")
    with pytest.raises(LoquantError, match="int8 fixed point"):
        QATLinear(QuantLinear.from_weight(W, None, WeightFormat("int", 8, 32)), "lr-qat", W)


def test_attach_merge_on_a_model_and_full_qat_trains_every_weight():
    float_model = tiny_model("llama")
    model = loquant.quantize(tiny_model("llama"), loquant.QuantConfig(bits=3, group_size=-1), progress=False)
    bits = model_bits_per_weight(model)
    weights = {n: float_model.get_submodule(n).weight.detach() for n in loquant.model.quant_layers(model)}
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(LoquantError, match="float weights of every"):
        attach(model, "l4q", {})
    assert not qat_layers(model)  # refused before any layer was swapped
    attach(model, "full", weights)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable > sum(w.numel() for w in weights.values())  # every weight, plus scales and offsets
    with torch.no_grad():
        before = model(input_ids=ids).logits
        merged = merge(model)
        assert torch.allclose(merged(input_ids=ids).logits, before, atol=1e-4)
    assert not qat_layers(merged) and model_bits_per_weight(merged) == bits


@pytest.fixture(scope="module")
def int3_channel(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "int3"
    assert main(["quantize", str(checkpoint), "--bits", "3", "--group-size", "-1", "--out", str(out)]) == 0
    return out


def qat_config(texts, **kw):
    return FinetuneConfig(**{**SMALL, "data": str(texts / "train.txt"), "eval_data": str(texts / "held.txt"), **kw})


@pytest.mark.parametrize("mode", ["peqa", "l4q", "lr-qat"])
def test_run_ends_in_a_plain_model_of_the_same_size(int3_channel, texts, tmp_path, mode, capsys):
    out = tmp_path / mode
    result = run(int3_channel, out, qat_config(texts, mode=mode, lr=1e-2 if mode != "peqa" else 1e-3),
                 device="cpu", progress=False)  # fmt: skip
    state = json.loads((out / "finetune.json").read_text())
    assert state["status"] == "done" and state["config"]["mode"] == mode
    assert not (out / "adapter").exists() and not (out / "checkpoints").exists()
    model = loquant.load(out)
    assert not qat_layers(model) and all(layer.rank == 0 for layer in loquant.model.quant_layers(model).values())
    base = loquant.load(int3_channel)
    assert model_bits_per_weight(model) == model_bits_per_weight(base)
    changed = [n for n, t in model.state_dict().items() if not torch.equal(t, base.state_dict()[n])]
    assert changed and all(n.endswith(("qweight", "scales", "offsets")) for n in changed)
    if mode == "peqa":  # the codes stay fixed
        assert all(n.endswith("scales") for n in changed)
    # The merged model is the trained one up to float rounding of the same weights.
    assert result["merged_max_abs_logit_diff"] < 1e-3 * result["merged_logit_scale"]
    assert result["held_out_ppl_end"] == pytest.approx(result["held_out_ppl_end_trained"], rel=1e-3)
    # merge writes that plain model without the training record
    code, stdout, err = run_cli(capsys, "merge", out, "--out", tmp_path / "m")
    assert code == 0 and "plain quantized" in stdout, err
    assert not (tmp_path / "m" / "finetune.json").exists()
    merged = loquant.load(tmp_path / "m")
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(merged(input_ids=ids).logits, model(input_ids=ids).logits)


def test_an_interrupted_qat_run_resumes_to_the_same_model(int3_channel, texts, tmp_path):
    config = qat_config(texts, mode="lr-qat", steps=5)
    run(int3_channel, tmp_path / "a", config, device="cpu", progress=False)
    with interrupted_at(3):
        run(int3_channel, tmp_path / "b", config, device="cpu", progress=False)
    with pytest.raises(LoquantError, match="unfinished"):
        loquant.load(tmp_path / "b")
    run(int3_channel, tmp_path / "b", config, resume=True, device="cpu", progress=False)
    a, b = (loquant.load(tmp_path / x).state_dict() for x in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_mode_flags_and_errors(int3_channel, texts, tmp_path, capsys, checkpoint):
    flags = ["--data", texts / "train.txt", "--eval-data", texts / "held.txt", "--steps", "2", "--batch-size", "2",
             "--seq-len", "32", "--eval-windows", "2", "--device", "cpu"]  # fmt: skip
    code, stdout, err = run_cli(capsys, "finetune", int3_channel, "--mode", "l4q", *flags, "--out", tmp_path / "o")
    assert code == 0, err
    assert "merged to a plain quantized model" in stdout
    config = json.loads((tmp_path / "o" / "finetune.json").read_text())["config"]
    assert config["lr"] == 2e-4 and config["scale_lr"] == 2e-5 and config["rank"] == 16
    for extra, message in [(["--iec"], "adapter options"), (["--scale-lr", "1e-3"], "--scale-lr")]:
        code, _, err = run_cli(capsys, "finetune", int3_channel, "--mode", "peqa", *extra, *flags, "--out",
                               tmp_path / "x")  # fmt: skip
        assert code == 2 and message in err, err
    corrected = tmp_path / "corrected"
    assert main(["quantize", str(checkpoint), "--bits", "3", "--rank", "4", "--out", str(corrected)]) == 0
    code, _, err = run_cli(capsys, "finetune", corrected, "--mode", "lr-qat", *flags, "--out", tmp_path / "y")
    assert code == 2 and "quantize without --rank" in err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.mark.parametrize("flags", [["--mode", "l4q"], ["--adapter", "wht"]])
def test_a_missing_float_source_fails_before_out_is_written(int3_channel, texts, tmp_path, capsys, flags):
    import shutil

    moved = tmp_path / "base"
    shutil.copytree(int3_channel, moved)
    config = json.loads((moved / "config.json").read_text())
    config["quantization_config"]["source_model"] = str(tmp_path / "gone")
    (moved / "config.json").write_text(json.dumps(config))
    code, _, err = run_cli(capsys, "finetune", moved, *flags, "--data", texts / "train.txt", "--steps", "2",
                           "--seq-len", "32", "--calib-samples", "2", "--calib-seq-len", "32", "--device", "cpu",
                           "--out", tmp_path / "o")  # fmt: skip
    assert code == 2 and "model not found" in err, err
    assert not (tmp_path / "o").exists()
