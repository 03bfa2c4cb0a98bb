"""`python -m loquant ...` for test_finetune_distributed, run by each rank of a launcher, with three
test hooks: every training forward's input_ids are appended to $LOQUANT_TEST_SPY/rank{RANK}.jsonl
(what this rank really trained on); a rank other than 0 that creates, opens for writing, renames or
removes anything under $LOQUANT_TEST_GUARD fails; and $LOQUANT_TEST_STOP_AT=k stops the run with
KeyboardInterrupt when it reaches step k (as a killed run would)."""

import builtins
import io
import json
import os
import shutil
import sys

import transformers

from loquant.cli import main

from cli_helpers import crash_at  # tests/ is sys.path[0]: this file runs as a script

RANK = int(os.environ.get("RANK", "0"))
record = os.path.join(os.environ["LOQUANT_TEST_SPY"], f"rank{RANK}.jsonl")
real_forward = transformers.LlamaForCausalLM.forward


def forward(self, *args, **kwargs):
    if self.training:
        with open(record, "a") as f:
            f.write(json.dumps(kwargs["input_ids"].tolist()) + "\n")
    return real_forward(self, *args, **kwargs)


transformers.LlamaForCausalLM.forward = forward

if "LOQUANT_TEST_STOP_AT" in os.environ:
    crash_at(int(os.environ["LOQUANT_TEST_STOP_AT"]))

if RANK != 0:
    guarded = os.path.abspath(os.environ["LOQUANT_TEST_GUARD"])

    def check(path):
        path = os.path.abspath(os.fspath(path))
        if path == guarded or path.startswith(guarded + os.sep):
            raise AssertionError(f"rank {RANK} writes {path}")

    def guard(fn):
        def wrapped(path, *args, **kwargs):
            check(path)
            return fn(path, *args, **kwargs)

        return wrapped

    for name in ("mkdir", "replace", "rename", "unlink", "remove"):
        setattr(os, name, guard(getattr(os, name)))
    shutil.rmtree = guard(shutil.rmtree)
    real_open = builtins.open

    def guarded_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+"):
            check(file)
        return real_open(file, mode, *args, **kwargs)

    builtins.open = io.open = guarded_open

sys.exit(main())
