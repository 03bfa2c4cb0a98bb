import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests import tiny_models

from tiny_models import tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """A tiny Llama saved as an ordinary transformers folder with a real (tiny) tokenizer."""
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """Test text from the evaluation split, short enough for tiny windows."""
    from loquant.data import load_text

    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text(load_text("sotu-test")[:20000])
    return path


@pytest.fixture(scope="session")
def texts(tmp_path_factory):
    """Fine-tuning data: training text from the calibration split, held-out text from validation."""
    from loquant.data import load_text

    d = tmp_path_factory.mktemp("texts")
    (d / "train.txt").write_text(load_text("sotu-calib")[:20000])
    (d / "held.txt").write_text(load_text("sotu-val")[:6000])
    return d
