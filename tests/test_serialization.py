import json
import struct

import pytest
import torch

import loquant
from loquant import LoquantError, QuantConfig, quantize
from loquant.serialization import WEIGHTS, atomic_dir

from tiny_models import CONFIGS, tiny_model


def quantized(arch="llama", **kw):
    model = tiny_model(arch)
    model.loquant_source = f"tiny-{arch}"
    return quantize(model, QuantConfig(**kw), progress=False)


def logits(model, seed=0):
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids)[0]


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_load_gives_identical_outputs(arch, tmp_path):
    model = quantized(arch, format="nf", bits=3, group_size=32)
    loquant.save(model, tmp_path / "m")
    back = loquant.load(tmp_path / "m")
    assert torch.equal(logits(model), logits(back))
    assert back.config.quantization_config["source_model"] == f"tiny-{arch}"


def test_correction_and_double_quant_survive(tmp_path):
    model = quantized(format="int", bits=2, group_size=64, double_quant=True)
    layer = model.model.layers[0].mlp.up_proj
    layer.set_correction(torch.randn(4, layer.in_features), torch.randn(layer.out_features, 4))
    loquant.save(model, tmp_path / "m")
    back = loquant.load(tmp_path / "m")
    assert back.model.layers[0].mlp.up_proj.rank == 4
    assert torch.equal(logits(model), logits(back))


def test_tied_head_stored_once_and_still_tied(tmp_path):
    model = quantized("llama")
    loquant.save(model, tmp_path / "m")
    with open(tmp_path / "m" / WEIGHTS, "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    assert "model.embed_tokens.weight" in header and "lm_head.weight" not in header
    back = loquant.load(tmp_path / "m")
    assert back.lm_head.weight.data_ptr() == back.model.embed_tokens.weight.data_ptr()


def test_byte_identical_files(tmp_path):
    for name in ("a", "b"):
        loquant.save(quantized(format="int-sym", bits=4), tmp_path / name)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_crash_while_writing_leaves_nothing(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr("loquant.serialization.save_file", boom)
    with pytest.raises(RuntimeError):
        loquant.save(quantized(), tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(LoquantError, match="--overwrite"):
        loquant.save(quantized(), out)
    assert (out / "keep.txt").read_text() == "precious"
    loquant.save(quantized(), out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / WEIGHTS).exists()
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_atomic_dir_replaces_empty_folder(tmp_path):
    (tmp_path / "m").mkdir()
    with atomic_dir(tmp_path / "m") as tmp:
        (tmp / "x").write_text("1")
    assert (tmp_path / "m" / "x").read_text() == "1"


def test_unquantized_model_cannot_be_saved(tmp_path):
    with pytest.raises(LoquantError, match="no quantized layer"):
        loquant.save(tiny_model("llama"), tmp_path / "m")


@pytest.fixture
def saved(tmp_path):
    loquant.save(quantized(), tmp_path / "m")
    return tmp_path / "m"


def test_truncated_file_names_the_tensor(saved):
    data = (saved / WEIGHTS).read_bytes()
    (saved / WEIGHTS).write_bytes(data[:-1000])
    with pytest.raises(LoquantError, match=r"truncated: tensor \S+"):
        loquant.load(saved)


def test_truncated_header(saved):
    (saved / WEIGHTS).write_bytes((saved / WEIGHTS).read_bytes()[:100])
    with pytest.raises(LoquantError, match="truncated"):
        loquant.load(saved)


def test_flipped_byte_names_the_tensor(saved):
    data = bytearray((saved / WEIGHTS).read_bytes())
    data[-5] ^= 0xFF
    (saved / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(LoquantError, match=r"tensor \S+ is corrupt"):
        loquant.load(saved)


def test_mismatched_config_names_the_tensor(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["quantization_config"]["layers"]["model.layers.0.mlp.up_proj"]["bits"] = 3
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoquantError, match=r"model\.layers\.0\.mlp\.up_proj\.qweight"):
        loquant.load(saved)


def test_missing_pieces(saved, tmp_path):
    with pytest.raises(LoquantError, match="no such model folder"):
        loquant.load(tmp_path / "nowhere")
    (saved / WEIGHTS).unlink()
    with pytest.raises(LoquantError, match="missing"):
        loquant.load(saved)
    (saved / "config.json").write_text("{not json")
    with pytest.raises(LoquantError, match="corrupt JSON"):
        loquant.load(saved)
