"""`torchrun --nproc-per-node 2 -m loquant quantize` on CPU (gloo) writes the one-process folder."""

import subprocess
import sys

import pytest

from loquant.distributed import mine, world

from cli_helpers import run, tiny_calib


def test_one_process_owns_everything():
    assert world() == (0, 1) and mine([1, 2, 3]) == [1, 2, 3]


@pytest.mark.parametrize("extra", [[], ["--sequential"], ["--stream"]], ids=["one-pass", "sequential", "stream"])
def test_two_gloo_processes_write_the_single_process_bytes(checkpoint, corpus, tmp_path, capsys, extra):
    args = ["quantize", checkpoint, "--bits", "3", "--group-size", "32", "--rank", "4", "--method", "qera-exact",
            *tiny_calib(corpus), *extra]  # fmt: skip
    assert run(capsys, *args, "--out", tmp_path / "one")[0] == 0
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    done = subprocess.run([*torchrun, "-m", "loquant", *map(str, args), "--out", str(tmp_path / "two")],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("loquant quantize") == 1  # rank 0 alone reports and writes
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "two").iterdir())
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    assert not (tmp_path / "two.partial").exists()


def test_each_rank_builds_every_size_th_layer(monkeypatch):
    import loquant.distributed as d

    monkeypatch.setattr(d, "world", lambda: (1, 3))
    assert d.mine(list(range(7))) == [1, 4]
