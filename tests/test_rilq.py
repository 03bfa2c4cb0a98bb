"""RILQ: joint training of the corrections against the float model, early stopping, the recipe."""

import copy
import json

import pytest
import torch

from loquant.errors import LoquantError
from loquant.model import QuantConfig, quant_layers, quantize
from loquant.rilq import RilqConfig, refine

from cli_helpers import run, tiny_calib
from tiny_models import tiny_model


def windows(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 128, (n, 32), generator=torch.Generator().manual_seed(seed))


def quantized(rank: int = 4):
    float_model = tiny_model("llama")
    model = quantize(copy.deepcopy(float_model), QuantConfig(bits=2, group_size=32, method="svd", rank=rank),
                     progress=False)  # fmt: skip
    return float_model, model


def state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_refine_lowers_the_held_out_loss_and_trains_only_the_corrections():
    teacher, model = quantized()
    before = state(model)
    # Random tokens on a random model: only the distillation term generalizes, so train on it alone.
    record = refine(model, teacher, windows(16, 0), windows(4, 1),
                    RilqConfig(steps=30, lr=3e-3, batch_size=4, eval_every=5, patience=10, lm_weight=0, device="cpu"),
                    progress=False)  # fmt: skip
    assert record["held_out_loss_best"] < 0.85 * record["held_out_loss_start"], record["log"]
    assert record["best_step"] == 30
    assert record["steps_run"] == 30 and not record["stopped_early"]
    assert [e["step"] for e in record["log"]] == [0, 5, 10, 15, 20, 25, 30]
    after = state(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith((".A", ".B")) for k in changed)  # codes, scales, embeddings untouched
    for layer in quant_layers(model).values():
        assert layer.A.dtype == torch.float16 and not layer.A.requires_grad and not layer.B.requires_grad
    assert all(not p.requires_grad for p in teacher.parameters())


def test_early_stopping_keeps_the_best_corrections():
    teacher, model = quantized()
    ids = windows(2, 3)
    with torch.no_grad():
        start = model(input_ids=ids).logits
    # A step size this large only makes the corrections worse: stop after `patience` evaluations.
    record = refine(model, teacher, windows(8, 0), windows(4, 1),
                    RilqConfig(steps=50, lr=1.0, batch_size=4, eval_every=2, patience=2, device="cpu"),
                    progress=False)  # fmt: skip
    assert record["stopped_early"] and record["steps_run"] == 4 and record["best_step"] == 0
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, start)


def test_a_diverging_run_stops_with_a_clear_error():
    teacher, model = quantized()
    next(iter(quant_layers(model).values())).A.data[0, 0] = float("nan")  # a diverged correction
    with pytest.raises(LoquantError, match="diverged, lower --rilq-lr"):
        refine(model, teacher, windows(8, 0), windows(4, 1), RilqConfig(steps=20, batch_size=4, device="cpu"),
               progress=False)  # fmt: skip


def test_bad_input():
    teacher, model = quantized(rank=0)
    with pytest.raises(LoquantError, match="--rank above 0"):
        refine(model, teacher, windows(4, 0), windows(2, 1), RilqConfig(device="cpu"), progress=False)
    with pytest.raises(LoquantError, match="--rilq-init"):
        RilqConfig(init="none")
    with pytest.raises(LoquantError, match="patience"):
        RilqConfig(patience=0)
    with pytest.raises(LoquantError, match="--rank above 0"):
        QuantConfig(method="rilq")
    with pytest.raises(LoquantError, match="held_out"):
        quantize(tiny_model("llama"), QuantConfig(method="rilq", rank=4), calib=windows(4, 0), progress=False)


def test_quantize_records_the_run_and_starts_from_the_chosen_correction():
    rilq = RilqConfig(init="qera-exact", steps=4, batch_size=2, eval_every=2, device="cpu")
    config = QuantConfig(bits=2, group_size=32, method="rilq", rank=4, rilq=rilq)
    assert config.needs_stats and config.needs_calibration  # qera-exact's statistics, and the training windows
    model = quantize(tiny_model("llama"), config, calib=windows(8, 0), held_out=windows(2, 1), progress=False)
    recipe = model.config.quantization_config["recipe"]
    assert recipe["method"] == "rilq" and recipe["rank"] == 4
    assert recipe["rilq"]["init"] == "qera-exact" and recipe["rilq"]["steps_run"] == 4
    assert recipe["rilq"]["held_out_loss_best"] <= recipe["rilq"]["held_out_loss_start"]
    assert "rilq_s" in model.loquant_timings
    # The start is qera-exact's correction: with no training step kept it is exactly that model.
    plain = quantize(tiny_model("llama"), QuantConfig(bits=2, group_size=32, method="qera-exact", rank=4),
                     calib=windows(8, 0), progress=False)  # fmt: skip
    frozen = quantize(tiny_model("llama"), QuantConfig(bits=2, group_size=32, method="rilq", rank=4,
                      rilq=RilqConfig(steps=1, lr=1e-9, eval_every=1, device="cpu")),
                      calib=windows(8, 0), held_out=windows(2, 1), progress=False)  # fmt: skip
    for name, layer in quant_layers(plain).items():
        other = quant_layers(frozen)[name]
        assert torch.equal(layer.qweight, other.qweight)
        assert torch.allclose(layer.A.float(), other.A.float(), atol=1e-3, rtol=0)


def test_cli(checkpoint, corpus, tmp_path, capsys):
    out = tmp_path / "m"
    flags = ["--bits", "2", "--group-size", "32", "--rank", "4", "--method", "rilq", "--rilq-steps", "4",
             "--rilq-eval-every", "2", "--rilq-batch-size", "2", "--device", "cpu", *tiny_calib(corpus)]  # fmt: skip
    code, stdout, err = run(capsys, "quantize", checkpoint, *flags, "--out", out)
    assert code == 0, err
    assert "rilq held-out ppl" in stdout
    recipe = json.loads((out / "config.json").read_text())["quantization_config"]["recipe"]
    assert recipe["method"] == "rilq" and recipe["rilq"]["steps_run"] == 4 and recipe["rilq"]["lr"] == 2e-4
    code, stdout, err = run(capsys, "eval", out, "--corpus", corpus, "--seq-len", "32", "--windows", "2", "--json")
    assert code == 0, err
    # Early stopping on the evaluation text would select on it.
    other = tmp_path / "other.txt"
    other.write_text(corpus.read_text()[::-1])
    code, _, err = run(capsys, "quantize", checkpoint, *flags, "--rilq-held-out", other, "--eval", "--corpus", other,
                       "--out", tmp_path / "x")  # fmt: skip
    assert code == 2 and "cannot hold out" in err and not (tmp_path / "x").exists()
