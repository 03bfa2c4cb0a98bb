import pytest
import torch

from loquant import LoquantError, QuantConfig, QuantLinear, quantize
from loquant.model import quant_layers

from tiny_models import CONFIGS, tiny_model

# linear layers per block: attention (q, k, v, o or fused) + MLP
EXPECTED = {"llama": 14, "qwen2": 14, "mistral": 14, "gemma3": 14, "gpt2": 8, "bert": 12}


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_generic_pass_on_every_architecture(arch):
    model = tiny_model(arch)
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        ref = model(input_ids=ids)[0]
    quantize(model, QuantConfig(format="int", bits=8, group_size=32), progress=False)
    layers = quant_layers(model)
    assert len(layers) == EXPECTED[arch]
    assert all(any(p.isdigit() for p in name.split(".")) for name in layers)  # only inside blocks
    with torch.no_grad():
        out = model(input_ids=ids)[0]
    # 8 bits barely changes the function; a transposed GPT-2 Conv1D weight would
    assert (out - ref).norm() / ref.norm() < 0.05
    qc = model.config.quantization_config
    assert qc["quant_method"] == "loquant" and set(qc["layers"]) == set(layers)


def test_head_and_embeddings_stay_float():
    model = quantize(tiny_model("llama"), progress=False)
    assert isinstance(model.lm_head, torch.nn.Linear)
    assert isinstance(model.model.embed_tokens, torch.nn.Embedding)


def test_include_exclude_and_overrides():
    config = QuantConfig(
        bits=4,
        include=["*.mlp.*", "lm_head"],
        exclude=["*.1.mlp.down_proj"],
        overrides={"*.down_proj": {"bits": 8}, "lm_head": {"format": "nf", "group_size": -1}},
    )
    model = quantize(tiny_model("llama"), config, progress=False)
    layers = quant_layers(model)
    assert "model.layers.1.mlp.down_proj" not in layers and "model.layers.0.self_attn.q_proj" not in layers
    assert layers["model.layers.0.mlp.down_proj"].fmt.bits == 8
    assert layers["model.layers.0.mlp.up_proj"].fmt.bits == 4
    assert layers["lm_head"].fmt.format == "nf" and layers["lm_head"].fmt.group_size == -1


def test_nan_weight_names_the_layer_and_changes_nothing():
    model = tiny_model("llama")
    model.model.layers[1].mlp.up_proj.weight.data[0, 0] = float("nan")
    with pytest.raises(LoquantError, match=r"model\.layers\.1\.mlp\.up_proj.*NaN"):
        quantize(model, progress=False)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


def test_bad_config_rejected_before_touching_the_model():
    with pytest.raises(LoquantError):
        QuantConfig(bits=5)
    with pytest.raises(LoquantError):
        QuantConfig(overrides={"*": {"group_size": 0}})
    with pytest.raises(LoquantError, match="no linear layer"):
        quantize(tiny_model("llama"), QuantConfig(include=["nothing*"]), progress=False)
    with pytest.raises(LoquantError, match="already quantized"):
        quantize(quantize(tiny_model("llama"), progress=False), progress=False)


CALIB = torch.randint(0, 128, (8, 24), generator=torch.Generator().manual_seed(0))


def logit_error(arch, config):
    ref_model = tiny_model(arch)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = ref_model(input_ids=ids)[0]
        model = quantize(ref_model, config, calib=CALIB, progress=False)
        return ((model(input_ids=ids)[0] - ref).norm() / ref.norm()).item(), model


@pytest.mark.parametrize("method", ["svd", "loftq", "lqer", "qera-approx", "qera-exact"])
def test_corrections_reduce_the_logit_error(method):
    base, _ = logit_error("llama", QuantConfig(bits=2, group_size=32))
    err, model = logit_error("llama", QuantConfig(bits=2, group_size=32, method=method, rank=8))
    assert err < base
    assert all(layer.rank == 8 for layer in quant_layers(model).values())
    recipe = model.config.quantization_config["recipe"]
    assert recipe["method"] == method and recipe["rank"] == 8


def test_sequential_and_fisher_run_generically():
    err_seq, model = logit_error(
        "gpt2", QuantConfig(bits=2, group_size=32, method="qera-exact", rank=4, sequential=True)
    )
    base, _ = logit_error("gpt2", QuantConfig(bits=2, group_size=32))
    assert err_seq < base and model.loquant_timings["decomposition_s"] > 0
    err_f, model = logit_error("llama", QuantConfig(bits=2, group_size=32, method="lqlora", rank=4, fisher=True))
    assert model.config.quantization_config["recipe"]["fisher"] and model.loquant_timings["fisher_s"] > 0


def test_correction_input_errors():
    with pytest.raises(LoquantError, match="needs calibration"):
        quantize(tiny_model("llama"), QuantConfig(method="qera-exact", rank=4), progress=False)
    model = tiny_model("llama")
    with pytest.raises(LoquantError, match=r"k_proj: rank 60 exceeds"):
        quantize(model, QuantConfig(method="svd", rank=60), progress=False)
    assert not quant_layers(model)
    with pytest.raises(LoquantError, match="lqlora method only"):
        QuantConfig(method="svd", rank=4, fisher=True)
    with pytest.raises(LoquantError, match="unknown method"):
        QuantConfig(method="gptq")
    with pytest.raises(LoquantError, match="--sequential"):
        QuantConfig(method="loftq", rank=4, sequential=True)
    with pytest.raises(LoquantError, match="--iters"):
        QuantConfig(method="svd", rank=4, iters=3)


def output_error(config) -> float:
    """Σ over layers of tr(E R Eᵀ), E = W - deq(W), R from the float model's inputs on CALIB."""
    from loquant.calibration import collect
    from loquant.model import targets_of

    float_model = tiny_model("llama")
    layers = {name: module for name, module, _, _ in targets_of(float_model, config)}
    stats = collect(float_model, CALIB, layers, progress=False)
    model = quantize(tiny_model("llama"), config, calib=CALIB, progress=False)
    total = 0.0
    for name, layer in quant_layers(model).items():
        E = layers[name].weight.detach().double() - layer.dequantize(torch.float64)
        total += torch.trace(E @ stats[name].R @ E.T).item()
    return total


@pytest.mark.parametrize("sequential", [False, True])
def test_gptq_base_lowers_the_output_error_and_corrections_run_on_it(sequential):
    rtn = output_error(QuantConfig(bits=2, group_size=32))
    assert output_error(QuantConfig(bits=2, group_size=32, quantizer="gptq", sequential=sequential)) < 0.8 * rtn
    gptq, model = logit_error("llama", QuantConfig(bits=2, group_size=32, quantizer="gptq"))
    assert model.config.quantization_config["recipe"]["quantizer"] == "gptq"
    corrected, model = logit_error(
        "llama", QuantConfig(bits=2, group_size=32, quantizer="gptq", method="qera-exact", rank=8)
    )
    assert corrected < gptq and all(layer.rank == 8 for layer in quant_layers(model).values())


def test_hqq_base_runs_under_loftq():
    err, model = logit_error("llama", QuantConfig(bits=2, group_size=32, quantizer="hqq", method="loftq", rank=4))
    base, _ = logit_error("llama", QuantConfig(bits=2, group_size=32, quantizer="hqq"))
    assert err < base and model.config.quantization_config["recipe"]["quantizer"] == "hqq"


def test_quantizer_input_errors():
    with pytest.raises(LoquantError, match="unknown quantizer"):
        QuantConfig(quantizer="awq")
    with pytest.raises(LoquantError, match="needs calibration"):
        quantize(tiny_model("llama"), QuantConfig(quantizer="gptq"), progress=False)
    assert QuantConfig(quantizer="gptq").needs_calibration and not QuantConfig(quantizer="hqq").needs_calibration
