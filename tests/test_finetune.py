"""Fine-tuning on a tiny quantized Llama: adapter starts, training, the OUT folder, resume, merge."""

import json

import pytest
import torch

import loquant
from loquant.adapters import attach
from loquant.adapters.lora import lora_layers, peft_config
from loquant.cli import main
from loquant.errors import LoquantError
from loquant.finetune import FinetuneConfig, prepare, read_corpus, run

from cli_helpers import interrupted_at
from cli_helpers import run as run_cli

SMALL = dict(steps=4, batch_size=2, seq_len=32, eval_windows=2, save_every=2, calib_samples=4, calib_seq_len=32)


def quantize_tiny(checkpoint, out, *extra):
    argv = ["quantize", str(checkpoint), "--bits", "2", "--group-size", "32", "--out", str(out), *extra]
    assert main(argv) == 0
    return out


@pytest.fixture(scope="module")
def corrected(checkpoint, tmp_path_factory):
    """INT2 g32 with a rank-4 SVD correction."""
    return quantize_tiny(checkpoint, tmp_path_factory.mktemp("c") / "svd", "--rank", "4", "--method", "svd")


@pytest.fixture(scope="module")
def plain(checkpoint, tmp_path_factory):
    return quantize_tiny(checkpoint, tmp_path_factory.mktemp("p") / "rtn")


def config(texts, **kw):
    defaults = dict(SMALL, data=str(texts / "train.txt"), eval_data=str(texts / "held.txt"))
    return FinetuneConfig(**{**defaults, **kw})


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("iec", [False, True])
def test_correction_start_equals_the_corrected_model_exactly(corrected, texts, iec):
    reference = loquant.load(corrected)
    model, _ = prepare(corrected, config(texts, iec=iec), device="cpu", progress=False)
    assert torch.equal(logits(model, IDS), logits(reference, IDS))
    # The correction moved into the adapter, it is not kept twice.
    assert all(m.base_layer.A is None for m in lora_layers(model).values())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_" in n or "iec_beta" in n) for n in trainable)
    assert any("iec_beta" in n for n in trainable) == iec


def test_zero_start_is_qlora(corrected, texts):
    model, _ = prepare(corrected, config(texts, init="zero"), device="cpu", progress=False)
    for layer in lora_layers(model).values():
        assert layer.base_layer.A is None and not layer.lora_B["default"].weight.any()
    with pytest.raises(LoquantError, match="--rank 4"):
        prepare(corrected, config(texts, rank=8, init="correction"), device="cpu", progress=False)


def test_training_moves_only_the_adapter_and_keeps_no_float_weight(corrected, texts):
    model, _ = prepare(corrected, config(texts), device="cpu", progress=False)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    saved_shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved_shapes.append(tuple(t.shape)) or t, lambda t: t):
        ids = IDS[:1, :13]  # 13 tokens: no activation shares a weight's shape
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), n
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    # Backward keeps no dequantized weight: it dequantizes again from the packed codes.
    weight_shapes = {(m.base_layer.out_features, m.base_layer.in_features) for m in lora_layers(model).values()}
    assert saved_shapes and not weight_shapes & set(saved_shapes)


def test_iec_folds_into_a_plain_lora_pair(corrected, texts):
    model, _ = prepare(corrected, config(texts, iec=True, init="zero"), device="cpu", progress=False)
    gen = torch.Generator().manual_seed(1)
    for layer in lora_layers(model).values():
        layer.lora_B["default"].weight.data.normal_(generator=gen)
        layer.iec_beta["default"].data = torch.randn(2, generator=gen)
    x = torch.randn(3, 96, generator=gen)
    layer = next(iter(lora_layers(model).values()))
    A, B = layer.lora_pair("default")
    A0, B0 = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    beta = layer.iec_beta["default"]
    h = x @ A0.T + beta[0] * x.view(3, A0.shape[0], -1).mean(-1)  # 96 inputs pooled to r = 4 groups
    reference = h @ B0.T + beta[1] * h.repeat(1, B0.shape[0] // A0.shape[0] + 1)[:, : B0.shape[0]]
    torch.testing.assert_close(x @ A.T @ B.T, reference, rtol=1e-5, atol=1e-5)


def test_run_writes_a_model_folder_that_peft_reloads(corrected, texts, tmp_path, capsys):
    out = tmp_path / "ft"
    code, printed, _ = run_cli(
        capsys, "finetune", corrected, "--data", texts / "train.txt", "--eval-data", texts / "held.txt",
        "--steps", "4", "--batch-size", "2", "--seq-len", "32", "--eval-every", "2", "--eval-windows", "2",
        "--lr", "1e-2", "--device", "cpu", "--out", out,
    )  # fmt: skip
    assert code == 0, printed
    assert "peak process RSS" in printed and "tokens per second" in printed
    assert [p.relative_to(out).as_posix() for p in out.rglob("adapter_config.json")] == ["adapter/adapter_config.json"]
    assert not (out / "checkpoints").exists()
    state = json.loads((out / "finetune.json").read_text())
    assert state["status"] == "done" and state["config"]["init"] == "correction" and state["config"]["rank"] == 4
    assert [e["step"] for e in state["log"] if "eval_ppl" in e] == [0, 2, 4]
    trained = loquant.load(out)
    from peft import PeftModel

    base = loquant.load(out, adapter=False)
    assert all(layer.A is None for layer in loquant.model.quant_layers(base).values())
    via_peft = PeftModel.from_pretrained(base, out / "adapter", config=peft_config(out / "adapter"))
    assert torch.equal(logits(via_peft, IDS), logits(trained, IDS))
    assert not torch.equal(logits(trained, IDS), logits(loquant.load(corrected), IDS))
    code, printed, _ = run_cli(capsys, "eval", out, "--corpus", texts / "held.txt", "--seq-len", "32", "--windows", "2")
    assert code == 0 and "ppl" in printed


def test_merge_matches_base_plus_adapter(corrected, texts, tmp_path, capsys):
    out = tmp_path / "ft"
    run(corrected, out, config(texts, lr=1e-2), progress=False)
    trained = loquant.load(out)
    merged32 = attach.merge(loquant.load(out), torch.float32)
    torch.testing.assert_close(logits(merged32, IDS), logits(trained, IDS), rtol=1e-4, atol=1e-4)
    code, _, err = run_cli(capsys, "merge", out, "--out", tmp_path / "merged")
    assert code == 0, err
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert reloaded.dtype == torch.bfloat16 and not hasattr(reloaded.config, "quantization_config")
    ref = logits(trained, IDS)
    got = logits(reloaded, IDS).float()
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()  # bf16 weights
    code, _, _ = run_cli(capsys, "export", out, "--to", "merged", "--out", tmp_path / "exported", "--dtype", "float32")
    assert code == 0
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exported")
    torch.testing.assert_close(logits(exported, IDS), logits(merged32, IDS))


def test_an_interrupted_run_resumes_to_the_same_adapter(corrected, texts, tmp_path):
    cfg = config(texts, lr=1e-2, iec=True)
    run(corrected, tmp_path / "straight", cfg, progress=False)
    with interrupted_at(3):
        run(corrected, tmp_path / "resumed", cfg, progress=False)
    with pytest.raises(LoquantError, match="unfinished"):
        loquant.load(tmp_path / "resumed")
    assert (tmp_path / "resumed" / "checkpoints" / "step-000002").is_dir()
    run(corrected, tmp_path / "resumed", FinetuneConfig(), resume=True, progress=False)
    a = loquant.load(tmp_path / "straight")
    b = loquant.load(tmp_path / "resumed")
    assert torch.equal(logits(a, IDS), logits(b, IDS))
    with pytest.raises(LoquantError, match="already finished"):
        run(corrected, tmp_path / "resumed", cfg, resume=True, progress=False)


def test_wht_adapter_trains_and_reloads(plain, texts, tmp_path, checkpoint):
    out = tmp_path / "wht"
    result = run(plain, out, config(texts, adapter="wht", rank=2, lr=1e-2), progress=False)
    layers = loquant.model.quant_layers(loquant.load(plain)).values()
    expected = sum(2 * (m.in_features + m.out_features) for m in layers)
    assert abs(result["trainable_params"] - expected) <= len(layers)
    assert (out / "adapter" / "wht_config.json").is_file() and not list(out.rglob("adapter_config.json"))
    reloaded = loquant.load(out)
    torch.testing.assert_close(logits(reloaded, IDS), logits(result["model"].cpu(), IDS))
    # QWHA's start brings the quantized model's logits closer to the float model's.
    from transformers import AutoModelForCausalLM

    started, _ = prepare(plain, config(texts, adapter="wht", rank=16), device="cpu", progress=False)
    reference = logits(AutoModelForCausalLM.from_pretrained(checkpoint), IDS)
    error = lambda m: (logits(m, IDS) - reference).square().mean()  # noqa: E731
    assert error(started) < 0.7 * error(loquant.load(plain))
    merged = attach.merge(loquant.load(out), torch.float32)
    torch.testing.assert_close(logits(merged, IDS), logits(reloaded, IDS), rtol=1e-4, atol=1e-4)


def test_python_entry_trains_with_the_transformers_trainer(corrected, texts, tmp_path):
    from transformers import Trainer, TrainingArguments

    model, tokenizer = prepare(corrected, config(texts, gradient_checkpointing=True), device="cpu", progress=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    data = [{"input_ids": IDS[i % 2], "labels": IDS[i % 2]} for i in range(4)]
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
        report_to=[], save_strategy="no", use_cpu=True, logging_steps=1,
    )  # fmt: skip
    Trainer(model=model, args=args, train_dataset=data).train()
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed


def test_data_errors_are_clear(tmp_path, corrected, plain, texts):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"no_text": 1}\n')
    with pytest.raises(LoquantError, match=r"bad.jsonl:2"):
        read_corpus(str(bad))
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(json.dumps({"text": t}) for t in ["one line", "two"]) + "\n")
    assert read_corpus(str(good)) == "one line\n\ntwo"
    with pytest.raises(LoquantError, match="no correction"):
        prepare(plain, config(texts, init="correction"), device="cpu", progress=False)
    with pytest.raises(LoquantError, match="held-out text is the training text"):
        run(corrected, tmp_path / "x", config(texts, eval_data=str(texts / "train.txt")), progress=False)
    assert not (tmp_path / "x").exists()


def test_a_diverging_run_stops_with_a_clear_error_and_loads_nothing(corrected, texts, tmp_path):
    with pytest.raises(LoquantError, match="diverged"):
        run(corrected, tmp_path / "nan", config(texts, lr=1e30), device="cpu", progress=False)
    with pytest.raises(LoquantError, match="unfinished"):
        loquant.load(tmp_path / "nan")


def test_a_corrupt_or_missing_adapter_names_the_file(corrected, texts, tmp_path):
    out = tmp_path / "ft"
    run(corrected, out, config(texts), device="cpu", progress=False)
    weights = out / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(LoquantError, match="adapter_model.safetensors: truncated"):
        loquant.load(out)
    weights.unlink()
    with pytest.raises(LoquantError, match="adapter_model.safetensors: missing"):
        loquant.load(out)
