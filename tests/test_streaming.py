"""`loquant quantize --stream`: block by block from safetensors shards, the in-memory bytes."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import loquant
from loquant import streaming
from loquant.errors import LoquantError
from loquant.serialization import INDEX, weight_files
from test_checkpoint import killed_after_block, same_files

from cli_helpers import run, tiny_calib
from tiny_models import tiny_checkpoint, tiny_model

CASES = {
    "rtn": ["--bits", "4", "--group-size", "32"],
    "svd-r4": ["--bits", "3", "--group-size", "32", "--method", "svd", "--rank", "4"],
    "qera-exact-r4": ["--bits", "3", "--group-size", "32", "--method", "qera-exact", "--rank", "4"],
    "lqer-sequential": ["--bits", "3", "--group-size", "32", "--method", "lqer", "--rank", "4", "--sequential"],
    "gptq-nf": ["--format", "nf", "--bits", "4", "--group-size", "32", "--quantizer", "gptq"],
    # block 0 holds no target: its float outputs still feed block 1's statistics
    "second-block-only": ["--method", "qera-exact", "--rank", "4", "--include", "model.layers.1.*"],
}


def all_tensors(folder) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in weight_files(folder):
        tensors.update(load_file(file))
    return tensors


def assert_same_model(a, b) -> None:
    ta, tb = all_tensors(a), all_tensors(b)
    assert sorted(ta) == sorted(tb)
    for name, t in ta.items():
        assert t.dtype == tb[name].dtype and torch.equal(
            t.view(-1).view(torch.uint8), tb[name].view(-1).view(torch.uint8)
        ), name
    ca, cb = (json.loads((f / "config.json").read_text()) for f in (a, b))
    assert ca == cb  # the same layers, recipe and checksums


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, checkpoint):
    """The tiny Llama saved in several shards with an index, as large models are."""
    path = tmp_path_factory.mktemp("sharded")
    model = loquant.load_model(str(checkpoint))[0] if hasattr(loquant, "load_model") else None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    model.save_pretrained(path, max_shard_size="150KB")
    AutoTokenizer.from_pretrained(checkpoint).save_pretrained(path)
    assert len(json.loads((path / INDEX).read_text())["weight_map"]) > 0 and len(list(path.glob("*.safetensors"))) > 2
    return path


@pytest.mark.parametrize("case", list(CASES))
def test_streamed_model_has_the_in_memory_bytes(sharded, corpus, tmp_path, capsys, case):
    flags = [*CASES[case], *tiny_calib(corpus)]
    assert run(capsys, "quantize", sharded, *flags, "--out", tmp_path / "mem")[0] == 0
    assert run(capsys, "quantize", sharded, *flags, "--stream", "--out", tmp_path / "str")[0] == 0
    assert (tmp_path / "str" / INDEX).is_file() and not (tmp_path / "str" / "model.safetensors").exists()
    assert_same_model(tmp_path / "mem", tmp_path / "str")


def test_streamed_folder_loads_everywhere(checkpoint, corpus, tmp_path, capsys):
    out = tmp_path / "str"
    flags = [*CASES["qera-exact-r4"], *tiny_calib(corpus), "--offload-activations"]
    assert run(capsys, "quantize", checkpoint, *flags, "--stream", "--out", out)[0] == 0
    assert (
        run(capsys, "quantize", checkpoint, *CASES["qera-exact-r4"], *tiny_calib(corpus), "--out", tmp_path / "m")[0]
        == 0
    )
    assert_same_model(tmp_path / "m", out)  # activations on disk: the same statistics
    ids = torch.arange(24)[None]
    reference = loquant.load(tmp_path / "m")(ids).logits
    assert torch.equal(loquant.load(out)(ids).logits, reference)
    from transformers import AutoModelForCausalLM

    assert torch.equal(AutoModelForCausalLM.from_pretrained(out)(ids).logits, reference)
    code, stdout, _ = run(capsys, "info", out, "--json")
    assert code == 0 and json.loads(stdout)["layers"]
    code, stdout, _ = run(capsys, "eval", out, "--corpus", corpus, "--windows", "2", "--seq-len", "16")
    assert code == 0 and "ppl" in stdout


def live_tensor_bytes() -> int:
    import gc

    gc.collect()
    tensors = [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and not o.is_meta]
    return sum(t.untyped_storage().nbytes() for t in {id(t): t for t in tensors}.values())


@pytest.mark.parametrize("extra", [[], ["--sequential"]], ids=["one-pass", "sequential"])
def test_one_block_in_memory_at_a_time(checkpoint, corpus, tmp_path, capsys, monkeypatch, extra):
    """When a block loads, every earlier block is back on the meta device and nothing of it is alive."""
    real_load, real_skeleton = streaming._load_into, streaming.skeleton
    blocks, seen = [], []

    def spy(module, prefix, shards):
        seen.append((prefix, [i for i, b in enumerate(blocks[0]) if any(not p.is_meta for p in b.parameters())],
                     live_tensor_bytes()))  # fmt: skip
        return real_load(module, prefix, shards)

    def keep(folder):
        model = real_skeleton(folder)
        blocks.append(model.model.layers)
        return model

    monkeypatch.setattr(streaming, "_load_into", spy)
    monkeypatch.setattr(streaming, "skeleton", keep)
    flags = [*CASES["qera-exact-r4"], *tiny_calib(corpus), *extra]
    assert run(capsys, "quantize", checkpoint, *flags, "--stream", "--out", tmp_path / "o")[0] == 0
    assert [(prefix, loaded) for prefix, loaded, _ in seen] == [("model.layers.0.", []), ("model.layers.1.", [])]
    assert seen[1][2] <= seen[0][2]  # block 0's float and quantized tensors are gone
    assert all(p.is_meta for p in blocks[0].parameters())


@pytest.mark.parametrize("extra", [[], ["--sequential"]], ids=["one-pass", "sequential"])
def test_sigkill_then_resume_streamed(sharded, corpus, tmp_path, capsys, extra):
    args = ["quantize", sharded, *CASES["qera-exact-r4"], *tiny_calib(corpus), *extra, "--stream"]
    assert run(capsys, *args, "--out", tmp_path / "whole")[0] == 0
    out = tmp_path / "cut"
    assert killed_after_block([*args, "--out", out], 0).returncode == -9
    assert json.loads((tmp_path / "cut.partial" / "progress.json").read_text()) == {"blocks_done": 1, "blocks": 2}
    code, stdout, _ = run(capsys, *args, "--out", out, "--resume")
    assert code == 0 and "resumed after 1 of 2 blocks" in stdout
    assert same_files(tmp_path / "whole", out) and not (tmp_path / "cut.partial").exists()


def test_data_free_resume_reads_no_finished_block(checkpoint, tmp_path, capsys, monkeypatch):
    args = ["quantize", checkpoint, *CASES["svd-r4"], "--stream"]
    assert run(capsys, *args, "--out", tmp_path / "whole")[0] == 0
    out = tmp_path / "cut"
    assert killed_after_block([*args, "--out", out], 0).returncode == -9
    loads = []
    real = streaming._load_into
    monkeypatch.setattr(streaming, "_load_into", lambda m, prefix, s: loads.append(prefix) or real(m, prefix, s))
    assert run(capsys, *args, "--out", out, "--resume")[0] == 0
    assert loads == ["model.layers.1."]
    assert same_files(tmp_path / "whole", out)


def test_refusals(checkpoint, corpus, tmp_path, capsys):
    cases = [
        (["smollm2-135m"], "not a folder"),
        ([checkpoint, "--budget", "3"], "--budget"),
        ([checkpoint, "--eval"], "--eval"),
        ([checkpoint, "--method", "rilq", "--rank", "4"], "rilq"),
        (
            [
                checkpoint,
                "--include",
                "lm_head",
                "model.layers.*",
                "--method",
                "qera-exact",
                "--rank",
                "4",
                *tiny_calib(corpus),
            ],
            "lm_head is outside the blocks",
        ),
    ]
    for argv, message in cases:
        code, _, err = run(capsys, "quantize", *argv, "--stream", "--out", tmp_path / "o")
        assert code != 0 and message in err, (argv, err)
        assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()
    code, _, err = run(capsys, "quantize", checkpoint, "--offload-activations", "--out", tmp_path / "o")
    assert code != 0 and "add --stream" in err


def test_bad_shards_fail_before_any_work(sharded, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(sharded, broken)
    shard = sorted(broken.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    code, _, err = run(capsys, "quantize", broken, "--stream", "--out", tmp_path / "o")
    assert code != 0 and "truncated" in err and not (tmp_path / "o.partial").exists()
    shard.unlink()
    code, _, err = run(capsys, "quantize", broken, "--stream", "--out", tmp_path / "o")
    assert code != 0 and "missing" in err


def test_nan_in_a_later_block_names_the_layer(tmp_path, capsys):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    src = tiny_checkpoint(tmp_path / "nan", model)
    code, _, err = run(capsys, "quantize", src, "--stream", "--out", tmp_path / "o")
    assert code != 0 and "model.layers.1.mlp.down_proj: weight contains NaN" in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_data_free_layers_outside_the_blocks(checkpoint, tmp_path, capsys):
    """lm_head (tied in the tiny Llama: absent from its file) cannot be streamed; an untied head can."""
    model = tiny_model("qwen2")
    src = tiny_checkpoint(tmp_path / "qwen", model)
    flags = ["--include", "lm_head", "model.layers.*", "--method", "svd", "--rank", "4"]
    assert run(capsys, "quantize", src, *flags, "--out", tmp_path / "mem")[0] == 0
    assert run(capsys, "quantize", src, *flags, "--stream", "--out", tmp_path / "str")[0] == 0
    assert_same_model(tmp_path / "mem", tmp_path / "str")


def test_shards_reader_errors(tmp_path):
    with pytest.raises(LoquantError, match="no model.safetensors"):
        streaming.Shards(tmp_path)
    (tmp_path / INDEX).write_text("{not json")
    with pytest.raises(LoquantError, match="corrupt index"):
        streaming.Shards(tmp_path)
    save_file({"a": torch.zeros(2)}, tmp_path / "s.safetensors")
    (tmp_path / INDEX).write_text(json.dumps({"weight_map": {"a": "s.safetensors", "b": "s.safetensors"}}))
    with pytest.raises(LoquantError, match="lacks b"):
        streaming.Shards(tmp_path)
