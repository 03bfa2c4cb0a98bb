import pytest

import loquant
from loquant import QuantConfig, quantize
from loquant.serialization import tensor_nbytes
from loquant.storage import memory_bytes, storage_report

from tiny_models import tiny_model


def report_of(model):
    nbytes = {k: v.nbytes for k, v in model.state_dict().items()}
    return storage_report(model.config.quantization_config["layers"], nbytes)


def test_int4_g64_is_4_5_bits(tmp_path):
    # the tiny llama's widths (96, 160, 64) are multiples of 32 but 96 and 160 are not of 64
    model = quantize(tiny_model("llama"), QuantConfig(bits=4, group_size=32), progress=False)
    assert report_of(model)["bits_per_weight"] == pytest.approx(4 + 32 / 32)


def test_folder_bytes_equal_the_reported_bytes(tmp_path):
    model = quantize(tiny_model("qwen2"), QuantConfig(format="nf", bits=3, group_size=64), progress=False)
    layer = model.model.layers[0].self_attn.q_proj
    layer.set_correction(layer.dequantize()[:2] * 0, layer.dequantize()[:, :2] * 0)
    loquant.save(model, tmp_path / "m")
    nbytes = tensor_nbytes(tmp_path / "m")
    report = storage_report(model.config.quantization_config["layers"], nbytes)
    assert report == report_of(model)
    quant_tensors = [
        k
        for k in nbytes
        if k.rsplit(".", 1)[0] in model.config.quantization_config["layers"] and not k.endswith(".bias")
    ]
    assert sum(nbytes[k] for k in quant_tensors) == report["bytes"]
    assert report["bits_per_weight"] > report["base_bits_per_weight"]  # the correction counts
    corr = 2 * 2 * (layer.in_features + layer.out_features)
    assert report["bytes"] - report["base_bytes"] == corr


def test_no_hidden_float_copy_in_memory():
    model = tiny_model("llama")
    float_bytes = memory_bytes(model)
    linear = sum(
        m.weight.nbytes
        for n, m in model.named_modules()
        if n.startswith("model.layers.") and hasattr(m, "weight") and m.weight.ndim == 2
    )
    quantize(model, QuantConfig(format="int", bits=3, group_size=32), progress=False)
    assert memory_bytes(model) == float_bytes - linear + report_of(model)["bytes"]
