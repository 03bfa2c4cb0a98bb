"""Data-parallel fine-tuning: `accelerate launch --multi_gpu --num_processes 2 -m loquant finetune`
on CPU (two gloo processes) trains the adapter one process trains on the same global batch."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

import loquant
from loquant.errors import LoquantError
from loquant.finetune import FinetuneConfig, batch_at, load_base, prepare, run, split_data
from test_finetune import IDS, logits, quantize_tiny

SPY = Path(__file__).parent / "ddp_spy.py"
# 4 windows per step, 2 per rank. Checkpoints at steps 0 and 2; the first launch stops at step 3.
FLAGS = dict(steps=4, batch_size=4, seq_len=32, eval_windows=4, save_every=2, lr=1e-2, eval_every=2)


def free_port() -> int:
    with socket.socket() as s:  # accelerate's default 29500 may be taken by another run on this machine
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The launcher makes an NCCL group where CUDA is present, so there the ranks train on two GPUs.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_two = pytest.mark.skipif(0 < torch.cuda.device_count() < 2, reason="NCCL needs a GPU per rank")


def launch(*args, env=None):
    """Two CPU processes under accelerate: --multi_gpu runs torch.distributed.run (gloo without CUDA);
    --cpu --num_processes 2 would start one process."""
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                  "--main_process_port", str(free_port())]  # fmt: skip
    return subprocess.run([*accelerate, *map(str, args)], capture_output=True, text=True, timeout=240,
                          env={**os.environ, **(env or {})})  # fmt: skip


def flags(texts):
    # float32 on GPUs too (bf16 autocast is the CUDA default): the comparison below is to rounding
    argv = ["--data", texts / "train.txt", "--eval-data", texts / "held.txt", "--device", DEVICE, "--no-bf16"]
    for k, v in FLAGS.items():
        argv += [f"--{k.replace('_', '-')}", v]
    return argv


@pytest.fixture(scope="module")
def base(checkpoint, tmp_path_factory):
    return quantize_tiny(checkpoint, tmp_path_factory.mktemp("d") / "svd", "--rank", "4", "--method", "svd")


@needs_two
def test_two_processes_train_the_one_process_adapter_and_resume(base, texts, tmp_path):
    config = FinetuneConfig(data=str(texts / "train.txt"), eval_data=str(texts / "held.txt"), bf16=False, **FLAGS)
    run(base, tmp_path / "one", config, device=DEVICE, progress=False)

    spy, out = tmp_path / "spy", tmp_path / "two" / "ft"
    spy.mkdir()
    env = {"LOQUANT_TEST_SPY": str(spy), "LOQUANT_TEST_GUARD": str(out.parent), "LOQUANT_TEST_STOP_AT": "3"}
    stopped = launch(SPY, "finetune", base, *flags(texts), "--out", out, env=env)
    assert stopped.returncode != 0 and "KeyboardInterrupt" in stopped.stderr, stopped.stderr[-3000:]
    assert "AssertionError" not in stopped.stderr, stopped.stderr[-3000:]  # rank 1 wrote nothing under OUT
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000000", "step-000002"]

    # Each rank trained on its own half of every step's global batch, and the halves make the batch.
    ids, _, _ = split_data(config, load_base(base)[1])
    seen = [[json.loads(line) for line in (spy / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 3  # steps 0, 1, 2
    for step, (mine, theirs) in enumerate(zip(*seen, strict=True)):
        assert len(mine) == len(theirs) == 2
        assert mine + theirs == batch_at(ids, step, config).tolist()

    # The documented command, resumed from step 2 (this launch checks only what it writes).
    resumed = launch("-m", "loquant", "finetune", base, *flags(texts), "--out", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("loquant finetune") == 1  # rank 0 alone reports
    assert not (out / "checkpoints").exists()

    # The same adapter as one process, up to float32 rounding: the gradients differ in reduction order
    # only (the mean over 4 windows vs the average of two 2-window means; matmuls on 1 thread vs 2),
    # ~1e-7 relative. AdamW divides by sqrt(v), which can enlarge that for small gradients, but each
    # step moves a weight by at most ~lr = 1e-2: atol 1e-4 is 1% of one step (measured: 6e-6), while
    # ranks that do not average their gradients end 5e-2 apart.
    one = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    two = load_file(out / "adapter" / "adapter_model.safetensors")
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits(loquant.load(out), IDS), logits(loquant.load(tmp_path / "one"), IDS),
                               rtol=1e-4, atol=1e-4)  # fmt: skip
    a = json.loads((tmp_path / "one" / "finetune.json").read_text())
    b = json.loads((out / "finetune.json").read_text())
    assert b["status"] == "done" and b["result"]["processes"] == 2 and "processes" not in a["result"]
    assert [e["step"] for e in b["log"]] == [e["step"] for e in a["log"]]
    for x, y in zip(a["log"], b["log"], strict=True):  # the loss and held-out perplexity are reduced over ranks
        for key in ("loss", "eval_ppl"):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=1e-4), (x["step"], key)


def test_ddp_synchronizes_only_the_trainable_parameters(base, texts, tmp_path):
    from loquant.finetune import _data_parallel

    model, _ = prepare(base, FinetuneConfig(data=str(texts / "train.txt"), iec=True), device="cpu", progress=False)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = _data_parallel(model, "cpu")
    finally:
        dist.destroy_process_group()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and any("iec_beta" in n for n in trainable)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad} | {n for n, _ in model.named_buffers()}
    assert any(b.dtype == torch.uint8 for b in model.buffers())  # the packed codes
    assert ddp.parameters_to_ignore == frozen  # neither broadcast at the start nor before each forward
    assert ddp.modules_buffers == []
    assert {id(p) for p in ddp._module_parameters} == {id(p) for n, p in model.named_parameters() if n in trainable}


@pytest.mark.parametrize("env, match", [
    ({"ACCELERATE_USE_FSDP": "true"}, "FSDP is not supported"),
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, "DeepSpeed is not supported"),
    ({"ACCELERATE_MIXED_PRECISION": "bf16"}, "--bf16"),
    ({"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1"}, "starts one process"),
])  # fmt: skip
def test_unsupported_launches_are_refused_before_anything_is_written(base, texts, tmp_path, monkeypatch, env, match):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    config = FinetuneConfig(data=str(texts / "train.txt"), eval_data=str(texts / "held.txt"), **FLAGS)
    with pytest.raises(LoquantError, match=match):
        run(base, tmp_path / "ft", config, device="cpu", progress=False)
    assert not (tmp_path / "ft").exists()
