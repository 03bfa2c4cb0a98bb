"""Run the CLI in-process and read its one-line JSON."""

import json
import re

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
