"""Resumable `loquant quantize`: a run killed with SIGKILL and resumed saves the same bytes."""

import json
import os
import subprocess
import sys

import pytest

from loquant.checkpoint import KILL_AFTER_ENV, block_key, group_blocks

from cli_helpers import run, tiny_calib


def test_blocks_are_the_path_up_to_the_first_index():
    assert block_key("model.layers.3.mlp.up_proj") == "model.layers.3."
    assert block_key("transformer.h.10.attn.c_attn") == "transformer.h.10."
    assert block_key("lm_head") == ""
    names = ["model.layers.0.q", "model.layers.0.k", "model.layers.1.q", "lm_head", "model.layers.10.q"]
    assert group_blocks(names) == [["model.layers.0.q", "model.layers.0.k"], ["model.layers.1.q"],
                                   ["model.layers.10.q"], ["lm_head"]]  # fmt: skip


def quantize_args(checkpoint, corpus, out, *extra):
    return ["quantize", checkpoint, "--bits", "3", "--group-size", "32", "--rank", "4", "--method", "qera-exact",
            *tiny_calib(corpus), *extra, "--out", out]  # fmt: skip


def killed_after_block(args, block: int) -> subprocess.CompletedProcess:
    env = {**os.environ, KILL_AFTER_ENV: str(block)}
    return subprocess.run([sys.executable, "-m", "loquant.cli", *map(str, args)], env=env, capture_output=True)


def same_files(a, b) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all((a / n).read_bytes() == (b / n).read_bytes()
                                                                for n in names)  # fmt: skip


@pytest.mark.parametrize("extra", [[], ["--sequential"]], ids=["one-pass", "sequential"])
def test_sigkill_then_resume_gives_the_uninterrupted_bytes(checkpoint, corpus, tmp_path, capsys, extra):
    assert run(capsys, *quantize_args(checkpoint, corpus, tmp_path / "whole", *extra))[0] == 0

    out = tmp_path / "cut"
    killed = killed_after_block(quantize_args(checkpoint, corpus, out, *extra), 0)
    assert killed.returncode == -9  # SIGKILL, mid-way
    partial = tmp_path / "cut.partial"
    assert not out.exists()
    assert json.loads((partial / "progress.json").read_text()) == {"blocks_done": 1, "blocks": 2}

    code, stdout, _ = run(capsys, *quantize_args(checkpoint, corpus, out, *extra, "--resume"))
    assert code == 0 and "resumed after 1 of 2 blocks" in stdout
    assert same_files(tmp_path / "whole", out) and not partial.exists()

    stamp = (out / "model.safetensors").stat().st_mtime_ns
    code, stdout, _ = run(capsys, *quantize_args(checkpoint, corpus, out, *extra, "--resume"))
    assert code == 0 and "complete, nothing to resume" in stdout
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp


def test_resume_without_a_partial_run_starts_fresh(checkpoint, corpus, tmp_path, capsys):
    assert run(capsys, *quantize_args(checkpoint, corpus, tmp_path / "a"))[0] == 0
    assert run(capsys, *quantize_args(checkpoint, corpus, tmp_path / "b", "--resume"))[0] == 0
    assert same_files(tmp_path / "a", tmp_path / "b")


def test_a_partial_run_is_neither_ignored_nor_resumed_with_other_settings(checkpoint, corpus, tmp_path, capsys):
    out = tmp_path / "cut"
    assert killed_after_block(quantize_args(checkpoint, corpus, out), 0).returncode == -9
    code, _, err = run(capsys, *quantize_args(checkpoint, corpus, out))
    assert code == 2 and "--resume continues it" in err
    code, _, err = run(capsys, *quantize_args(checkpoint, corpus, out, "--resume", "--seed", "3"))
    assert code == 2 and "other settings (seed)" in err
    code, _, _ = run(capsys, *quantize_args(checkpoint, corpus, out, "--overwrite"))
    assert code == 0 and (out / "model.safetensors").is_file() and not (tmp_path / "cut.partial").exists()


def test_bad_input_leaves_no_partial_run(checkpoint, corpus, tmp_path, capsys):
    code, _, err = run(capsys, *quantize_args(checkpoint, corpus, tmp_path / "x"), "--rank", "500")
    assert code == 2 and "rank" in err
    assert not list(tmp_path.iterdir())
