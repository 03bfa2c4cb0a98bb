"""The plain-Triton kernels (fused GEMM with split K, x·Aᵀ) in Triton's CPU
interpreter against the PyTorch reference, so CI, which has no GPU, runs their indexing,
decoding and split-K bookkeeping on every commit. The Gluon kernels (GEMV, mma, wgmma, dequantize) need a GPU:
tests/kernels/test_triton.py."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

from interpret_kernels import FORMATS, GEMM_TILES  # noqa: E402


def test_plain_triton_kernels_match_the_reference_in_the_interpreter():
    # a fresh process: triton.jit picks the interpreter when the kernels are defined
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    script = Path(__file__).with_name("interpret_kernels.py")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    errors = dict(line.rsplit(" ", 1) for line in done.stdout.splitlines())
    # per format: x·Aᵀ in two dtypes, each GEMM tile in float16
    assert len(errors) == len(FORMATS) * (2 + len(GEMM_TILES))
    bad = {case: e for case, e in errors.items() if not float(e) < 1e-2}
    assert not bad, bad


def test_importing_the_case_lists_patches_nothing():
    """(It once did: on the GPU machine, PDL was then off for the rest of the test process.)"""
    from loquant.kernels import lowrank, ops

    assert lowrank.pdl_supported.__name__ == "pdl_supported" and ops._num_sms.__name__ == "_num_sms"
