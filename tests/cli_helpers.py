"""Shared test helpers: run the CLI in-process and read its one-line JSON; interrupt training."""

import contextlib
import json
import re

import pytest

from loquant.cli import main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def tiny_calib(corpus, samples: int = 8) -> list:
    """Calibration flags small enough for the tiny test models."""
    return ["--calib", corpus, "--calib-samples", str(samples), "--calib-seq-len", "32"]


def one_json_line(out: str) -> dict:
    lines = out.strip().splitlines()
    assert len(lines) == 1, out
    data = json.loads(lines[0])
    for v in data.values():  # numbers rounded to 4 decimals
        if isinstance(v, float):
            assert re.fullmatch(r"-?\d+(\.\d{1,4})?(e-?\d+)?", repr(v)), v
    return data


def crash_at(step: int):
    """Make `loquant.finetune` raise KeyboardInterrupt when it reaches `step`, as a killed run
    would; returns the real `batch_at` (to restore)."""
    import loquant.finetune as ft

    real = ft.batch_at

    def crash(ids, at, config):
        if at == step:
            raise KeyboardInterrupt
        return real(ids, at, config)

    ft.batch_at = crash
    return real


@contextlib.contextmanager
def interrupted_at(step: int):
    """`loquant.finetune.run` inside this block stops with KeyboardInterrupt at `step`."""
    import loquant.finetune as ft

    real = crash_at(step)
    try:
        with pytest.raises(KeyboardInterrupt):
            yield
    finally:
        ft.batch_at = real
