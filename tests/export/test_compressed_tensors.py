"""`loquant export --to compressed-tensors` on a tiny Llama, read back by the compressed-tensors
package, transformers' compressed-tensors quantizer and PEFT (independent readers)."""

import json

import pytest
import torch
from safetensors.torch import load_file

import loquant
from loquant.cli import main
from loquant.model import quant_layers

from cli_helpers import run

pytest.importorskip("compressed_tensors")

IDS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))


def quantize(checkpoint, out, *flags):
    assert main(["quantize", str(checkpoint), "--out", str(out), *map(str, flags)]) == 0
    return out


def export(src, out, *flags):
    assert main(["export", str(src), "--to", "compressed-tensors", "--out", str(out), *flags]) == 0
    return out


@pytest.fixture(scope="module")
def int4(checkpoint, tmp_path_factory):
    """INT-sym 4-bit g32 with a rank-4 SVD correction, and its export."""
    d = tmp_path_factory.mktemp("int4")
    src = quantize(checkpoint, d / "q", "--format", "int-sym", "--bits", 4, "--group-size", 32, "--rank", 4)
    return src, export(src, d / "ct")


@pytest.fixture(scope="module")
def int8(checkpoint, tmp_path_factory):
    """INT-sym 8-bit per channel, no correction, and its export."""
    d = tmp_path_factory.mktemp("int8")
    src = quantize(checkpoint, d / "q", "--format", "int-sym", "--bits", 8, "--group-size", -1)
    return src, export(src, d / "ct")


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def dequantized_by_compressed_tensors(out, dtype=torch.float16):
    """The export's weights as compressed-tensors' own checkpoint dequantizer reads them."""
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer

    return CompressedTensorsDequantizer(out, dtype=dtype).process(load_file(out / "model.safetensors"))


@pytest.mark.parametrize("which, bits, strategy, group", [("int4", 4, "group", 32), ("int8", 8, "channel", None)])
def test_export_decompresses_to_loquants_weights_exactly(request, which, bits, strategy, group):
    src, out = request.getfixturevalue(which)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["quantization_status"] == "compressed" and qc["ignore"] == ["lm_head"]
    (scheme,) = qc["config_groups"].values()
    assert scheme["targets"] == ["Linear"]
    assert {k: scheme["weights"][k] for k in ("num_bits", "type", "symmetric", "strategy", "group_size")} == {
        "num_bits": bits, "type": "int", "symmetric": True, "strategy": strategy, "group_size": group}  # fmt: skip
    from compressed_tensors.quantization import QuantizationConfig

    QuantizationConfig.model_validate(qc)  # the package's own schema accepts it
    tensors = load_file(out / "model.safetensors")
    model = loquant.load(src)
    layers = quant_layers(model)
    for name, layer in layers.items():
        shape = (layer.out_features, layer.in_features)
        assert tensors[f"{name}.weight_packed"].dtype == torch.int32
        assert tensors[f"{name}.weight_packed"].shape == (shape[0], shape[1] * bits // 32)
        assert tensors[f"{name}.weight_scale"].dtype == torch.float16
        assert tensors[f"{name}.weight_shape"].tolist() == list(shape)
        assert f"{name}.weight" not in tensors
    floats = {k: t for k, t in tensors.items() if not k.rsplit(".", 1)[-1].startswith("weight_")}
    assert "model.embed_tokens.weight" in floats and "model.norm.weight" in floats
    assert "lm_head.weight" not in floats  # tied to the embeddings, stored once
    assert all(t.dtype == torch.bfloat16 for t in floats.values())
    assert torch.equal(floats["model.embed_tokens.weight"], model.model.embed_tokens.weight.to(torch.bfloat16))
    deq = dequantized_by_compressed_tensors(out)
    for name, layer in layers.items():
        assert torch.equal(deq[f"{name}.weight"], layer.dequantize(torch.float16)), name
    assert (out / "tokenizer.json").is_file()
    assert (out / "adapter").is_dir() == (which == "int4")  # only the corrected model has an adapter


def test_transformers_loads_the_export_and_peft_adds_the_correction(int4):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    src, out = int4
    reference = loquant.load(src)
    layers = quant_layers(reference)
    decompress = CompressedTensorsConfig(dequantize=True)
    # float16: the model dtype the fp16 scales keep their value in, so the weights are exact
    fp16 = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float16, quantization_config=decompress)
    for name, layer in layers.items():
        assert torch.equal(fp16.get_submodule(name).weight, layer.dequantize(torch.float16)), name
    ref = logits(reference)
    got = logits(PeftModel.from_pretrained(fp16, out / "adapter"))
    assert (got - ref).abs().max() < 0.01 * ref.abs().max()
    # the config's bfloat16 (scales rounded to bf16 on load, as vLLM does): within bf16 tolerance
    bf16 = AutoModelForCausalLM.from_pretrained(out, quantization_config=decompress)
    assert bf16.dtype == torch.bfloat16
    base_only = logits(bf16)
    got = logits(PeftModel.from_pretrained(bf16, out / "adapter"))  # wraps bf16 in place
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
    assert (got - ref).abs().max() < 0.5 * (base_only - ref).abs().max()  # the adapter is the correction


def test_adapter_is_a_plain_peft_lora_that_reproduces_the_correction(int4, checkpoint):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    src, out = int4
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 4
    assert config["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    tensors = load_file(out / "adapter" / "adapter_model.safetensors")
    reference = loquant.load(src)
    layers = quant_layers(reference)
    assert len(tensors) == 2 * len(layers)
    for name, layer in layers.items():
        assert torch.equal(tensors[f"base_model.model.{name}.lora_A.weight"], layer.A)  # fp16, bit for bit
        assert torch.equal(tensors[f"base_model.model.{name}.lora_B.weight"], layer.B)
    plain = AutoModelForCausalLM.from_pretrained(checkpoint)  # an ordinary float32 model ...
    for name, layer in layers.items():  # ... holding loquant's dequantized base weights
        plain.get_submodule(name).weight.data = layer.dequantize(torch.float32)
    model = PeftModel.from_pretrained(plain, out / "adapter")
    torch.testing.assert_close(logits(model), logits(reference), rtol=1e-4, atol=1e-4)


def test_a_finetuned_lora_adapter_is_exported_instead(int4, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from loquant.data import load_text

    src, _ = int4
    (tmp_path / "train.txt").write_text(load_text("sotu-calib")[:20000])
    (tmp_path / "held.txt").write_text(load_text("sotu-val")[:6000])
    code, _, err = run(
        capsys, "finetune", src, "--data", tmp_path / "train.txt", "--eval-data", tmp_path / "held.txt",
        "--steps", "3", "--batch-size", "2", "--seq-len", "32", "--eval-windows", "2", "--lr", "1e-2",
        "--iec", "--lora-alpha", "8", "--out", tmp_path / "ft",
    )  # fmt: skip
    assert code == 0, err
    code, printed, err = run(capsys, "export", tmp_path / "ft", "--to", "compressed-tensors", "--out", tmp_path / "ct",
                             "--dtype", "float16")  # fmt: skip
    assert code == 0, err
    assert "PEFT LoRA rank 4" in printed
    config = json.loads((tmp_path / "ct" / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 4  # alpha / r folded into lora_B, IEC into both
    trained = loquant.load(tmp_path / "ft")
    base = AutoModelForCausalLM.from_pretrained(
        tmp_path / "ct", dtype=torch.float16, quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    got = logits(PeftModel.from_pretrained(base, tmp_path / "ct" / "adapter"))
    ref = logits(trained)
    assert (got - ref).abs().max() < 0.01 * ref.abs().max()
    assert not torch.allclose(ref, logits(loquant.load(src)), atol=1e-3)  # training moved it


def test_a_wht_adapter_is_refused(int4, tmp_path, capsys):
    import shutil

    src, _ = int4
    shutil.copytree(src, tmp_path / "ft")
    (tmp_path / "ft" / "adapter").mkdir()
    (tmp_path / "ft" / "adapter" / "wht_config.json").write_text("{}")
    code, _, err = run(capsys, "export", tmp_path / "ft", "--to", "compressed-tensors", "--out", tmp_path / "ct")
    assert code == 2 and "Walsh-Hadamard" in err and "--to merged" in err
    assert not (tmp_path / "ct").exists()


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--format", "int", "--bits", "4", "--group-size", "32"], ["int 4-bit", "symmetric"]),
        (["--format", "nf", "--bits", "4", "--group-size", "32"], ["nf 4-bit"]),
        (["--format", "int-sym", "--bits", "3", "--group-size", "32"], ["int-sym 3-bit"]),
        (["--format", "int-sym", "--bits", "4", "--group-size", "32", "--double-quant"], ["double_quant"]),
        (["--format", "int-sym", "--bits", "4", "--group-size", "64"], ["group size 64 does not divide"]),
    ],
)
def test_formats_it_cannot_hold_are_refused_with_the_alternatives(checkpoint, tmp_path, capsys, flags, words):
    src = quantize(checkpoint, tmp_path / "q", *flags)
    capsys.readouterr()
    code, _, err = run(capsys, "export", src, "--to", "compressed-tensors", "--out", tmp_path / "ct")
    assert code == 2, err
    for w in [*words, "--to merged", "--format int-sym --bits 4"]:
        assert w in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "ct").exists()


def write_plan(path, layers):
    path.write_text(json.dumps({"layers": layers}))
    return path


def test_mixed_schemes_get_one_config_group_each(checkpoint, tmp_path):
    down8 = {"format": "int-sym", "bits": 8, "group_size": -1}
    plan = write_plan(tmp_path / "plan.json", {f"model.layers.{i}.mlp.down_proj": down8 for i in range(2)})
    src = quantize(checkpoint, tmp_path / "q", "--format", "int-sym", "--bits", 4, "--group-size", 32,
                   "--plan", plan, "--exclude", "model.layers.1.self_attn.*")  # fmt: skip
    out = export(src, tmp_path / "ct")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    groups = {(g["weights"]["num_bits"], g["weights"]["strategy"]): g["targets"] for g in qc["config_groups"].values()}
    assert groups[(8, "channel")] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert len(groups[(4, "group")]) == 14 - 4 - 2  # 14 linear layers, 4 in float, 2 at 8 bits
    assert qc["ignore"] == ["lm_head"] + [f"model.layers.1.self_attn.{p}_proj" for p in "koqv"]
    tensors = load_file(out / "model.safetensors")
    assert tensors["model.layers.1.self_attn.q_proj.weight"].dtype == torch.bfloat16  # float layers stay float
    deq = dequantized_by_compressed_tensors(out)
    for name, layer in quant_layers(loquant.load(src)).items():
        assert torch.equal(deq[f"{name}.weight"], layer.dequantize(torch.float16)), name


def test_fused_layers_must_share_a_scheme(checkpoint, tmp_path, capsys):
    plan = write_plan(tmp_path / "plan.json", {"model.layers.0.self_attn.k_proj": {"format": "int-sym", "bits": 8}})
    src = quantize(checkpoint, tmp_path / "q", "--format", "int-sym", "--bits", 4, "--group-size", 32, "--plan", plan)
    code, _, err = run(capsys, "export", src, "--to", "compressed-tensors", "--out", tmp_path / "ct")
    assert code == 2 and "vLLM fuses them" in err and "model.layers.0.self_attn.k_proj" in err
