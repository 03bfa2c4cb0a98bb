"""`torchrun --nproc-per-node 2 -m loquant quantize` on CPU (gloo) writes the one-process folder."""

import argparse
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
    assert done.returncode == 0, done.stderr[:3000] + " ... " + done.stderr[-1000:]
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


def _fail_on_rank0(rank: int, store: str, results) -> None:
    import torch.distributed as dist

    from loquant.distributed import rank0
    from loquant.errors import LoquantError

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        rank0(lambda: (_ for _ in ()).throw(OSError("disk full")))
    except (OSError, LoquantError) as err:
        results[rank] = f"{type(err).__name__}: {err}"
    finally:
        dist.destroy_process_group()


def test_an_error_on_rank0_while_writing_reaches_every_rank(tmp_path):
    """No rank is left waiting at a barrier for a rank 0 that failed to write."""
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.start_processes(_fail_on_rank0, args=(str(tmp_path / "store"), results), nprocs=2, start_method="spawn")
    assert results[0] == "OSError: disk full"
    assert results[1] == "LoquantError: rank 0 failed: disk full"


def test_the_command_line_ends_the_group_it_joined_and_leaves_others(tmp_path, monkeypatch):
    """A group left to interpreter shutdown can abort the process (gloo, SIGABRT in CI)."""
    import torch.distributed as dist

    import loquant.cli as cli
    import loquant.distributed as d

    def join(_args):
        monkeypatch.setattr(dist, "init_process_group", lambda backend: real_init(
            backend, init_method=f"file://{tmp_path / 'a'}", rank=0, world_size=1))  # fmt: skip
        monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it
        assert d.init_from_env() and dist.is_initialized()

    real_init = dist.init_process_group
    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    monkeypatch.setattr(parser, "parse_args", lambda argv: argparse.Namespace(func=join))
    assert cli.main([]) == 0 and not dist.is_initialized()

    real_init("gloo", init_method=f"file://{tmp_path / 'b'}", rank=0, world_size=1)  # the caller's own group
    try:
        monkeypatch.setattr(parser, "parse_args", lambda argv: argparse.Namespace(func=lambda _a: None))
        assert cli.main([]) == 0 and dist.is_initialized()
    finally:
        dist.destroy_process_group()
