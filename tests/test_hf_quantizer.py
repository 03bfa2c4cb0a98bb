"""`import loquant` makes transformers' from_pretrained / save_pretrained read and write loquant folders."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import loquant
from loquant.cli import main
from loquant.layers import QuantLinear

IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def folder(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "nf4-r4"
    argv = ["quantize", str(checkpoint), "--format", "nf", "--bits", "4", "--group-size", "32", "--rank", "4",
            "--double-quant", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    return out


def test_from_pretrained_rebuilds_the_packed_model(folder):
    ours = loquant.load(folder)
    theirs = AutoModelForCausalLM.from_pretrained(folder)
    layer = theirs.model.layers[0].self_attn.q_proj
    assert isinstance(layer, QuantLinear) and layer.qweight.dtype == torch.uint8 and layer.A.dtype == torch.float16
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    with torch.no_grad():
        assert torch.equal(ours(IDS).logits, theirs(IDS).logits)


def test_save_pretrained_writes_the_same_format_back(folder, tmp_path):
    theirs = AutoModelForCausalLM.from_pretrained(folder)
    theirs.save_pretrained(tmp_path / "again")
    back = loquant.load(tmp_path / "again")  # loquant's own loader checks every tensor's checksum
    with torch.no_grad():
        assert torch.equal(back(IDS).logits, loquant.load(folder)(IDS).logits)
    # and loquant can save what transformers loaded
    loquant.save(theirs, tmp_path / "resaved")
    resaved = loquant.load(tmp_path / "resaved").config.quantization_config
    assert resaved["layers"] == back.config.quantization_config["layers"]


def test_from_pretrained_cannot_quantize_a_float_checkpoint(checkpoint):
    from loquant.hf_quantizer import LoquantConfig

    with pytest.raises(ValueError, match="loquant quantize"):
        AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=LoquantConfig())
