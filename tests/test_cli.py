"""The command line end to end on a tiny checkpoint: the flags and JSON keys are a contract."""

import subprocess
import sys

import pytest
import torch

from loquant.cli import main

from cli_helpers import one_json_line, run, tiny_calib
from tiny_models import tiny_checkpoint, tiny_model

EVAL = ["--seq-len", "32", "--windows", "4"]


@pytest.fixture(scope="module")
def quantized_dir(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "int4"
    assert (
        main(
            [
                "quantize",
                str(checkpoint),
                "--format",
                "int",
                "--bits",
                "4",
                "--group-size",
                "32",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    return out


def test_quantize_writes_a_folder_and_a_summary(checkpoint, corpus, tmp_path, capsys):
    code, out, _ = run(
        capsys,
        "quantize",
        checkpoint,
        "--format",
        "nf",
        "--bits",
        "3",
        "--group-size",
        "-1",
        "--out",
        tmp_path / "m",
        "--eval",
        "--corpus",
        corpus,
        *EVAL,
    )
    assert code == 0
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (tmp_path / "m").iterdir()}
    assert "bits per weight" in out and "NF3 ch" in out
    ppl_row = next(line for line in out.splitlines() if line.strip().startswith("ppl"))
    before, after = map(float, ppl_row.split()[-2:])
    assert before > 1 and after > 1 and before != after


def test_info_json(quantized_dir, capsys):
    code, out, _ = run(capsys, "info", quantized_dir, "--json")
    info = one_json_line(out)
    assert code == 0
    assert {"bits_per_weight", "base_bits_per_weight", "bytes", "layers"} <= set(info)
    assert info["bits_per_weight"] == info["base_bits_per_weight"] == 5.0  # 4 bits + 2 x fp16 per 32
    assert len(info["layers"]) == 14 and info["layers"][0]["format"] == "INT4 g32"
    code, out, _ = run(capsys, "info", quantized_dir)
    assert code == 0 and "bits per weight" in out


def test_eval_json_quantized_and_float(quantized_dir, checkpoint, corpus, capsys):
    code, out, _ = run(capsys, "eval", quantized_dir, "--corpus", corpus, "--json", *EVAL)
    q = one_json_line(out)
    assert code == 0
    assert {"ppl", "tokens", "seq_len", "windows", "bits_per_weight"} <= set(q)
    assert (q["seq_len"], q["windows"], q["tokens"], q["bits_per_weight"]) == (32, 4, 4 * 31, 5.0)
    code, out, _ = run(capsys, "eval", checkpoint, "--corpus", corpus, "--json", *EVAL)
    f = one_json_line(out)
    assert f["bits_per_weight"] == 32.0 and f["ppl"] != q["ppl"] and f["ppl"] > 1


def test_entry_point_prints_only_json_on_stdout(quantized_dir, corpus):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "loquant.cli",
            "eval",
            str(quantized_dir),
            "--corpus",
            str(corpus),
            "--json",
            *EVAL,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert one_json_line(proc.stdout)["windows"] == 4


@pytest.fixture(scope="module")
def nan_checkpoint(tmp_path_factory):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[3, 3] = float("nan")
    return tiny_checkpoint(tmp_path_factory.mktemp("nan"), model)


BAD_QUANTIZE = {
    "bits": (["--bits", "5"], "bit width 5"),
    "nf-bits": (["--format", "nf", "--bits", "8"], "bit width 8"),
    "format": (["--format", "fp4"], "format 'fp4'"),
    "group-zero": (["--group-size", "0"], "group size 0"),
    "group-negative": (["--group-size", "-3"], "group size -3"),
}


@pytest.mark.parametrize("case", list(BAD_QUANTIZE))
def test_bad_quantize_flags(case, checkpoint, tmp_path, capsys):
    flags, message = BAD_QUANTIZE[case]
    code, out, err = run(capsys, "quantize", checkpoint, *flags, "--out", tmp_path / "m")
    assert code == 2 and message in err
    assert err.startswith("loquant: error:") and err.count("\n") == 1
    assert not (tmp_path / "m").exists()


def test_nan_weight(nan_checkpoint, tmp_path, capsys):
    code, _, err = run(capsys, "quantize", nan_checkpoint, "--out", tmp_path / "m")
    assert code == 2 and "model.layers.0.mlp.down_proj" in err and "NaN" in err
    assert list(tmp_path.iterdir()) == []


def test_missing_model_and_corpus(checkpoint, tmp_path, capsys):
    code, _, err = run(capsys, "quantize", tmp_path / "nowhere", "--out", tmp_path / "m")
    assert code == 2 and "model not found" in err and not (tmp_path / "m").exists()
    code, _, err = run(capsys, "eval", checkpoint, "--corpus", tmp_path / "none.txt")
    assert code == 2 and "corpus not found" in err
    code, _, err = run(capsys, "info", tmp_path / "nowhere")
    assert code == 2 and "no such model folder" in err


def test_existing_output_kept(checkpoint, tmp_path, capsys):
    out = tmp_path / "m"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, err = run(capsys, "quantize", checkpoint, "--out", out)
    assert code == 2 and "--overwrite" in err and (out / "notes.txt").read_text() == "mine"
    code, _, _ = run(capsys, "quantize", checkpoint, "--out", out, "--overwrite")
    assert code == 0 and not (out / "notes.txt").exists()


def test_too_few_windows(quantized_dir, corpus, capsys):
    code, _, err = run(capsys, "eval", quantized_dir, "--corpus", corpus, "--seq-len", "512", "--windows", "1000")
    assert code == 2 and "1000 asked" in err


def test_quantize_with_correction_then_report(checkpoint, corpus, tmp_path, capsys):
    out = tmp_path / "q"
    flags = ["--bits", "2", "--group-size", "32", "--rank", "4", "--method", "qera-exact", *tiny_calib(corpus)]
    code, text, _ = run(capsys, "quantize", checkpoint, *flags, "--out", out)
    assert code == 0 and "qera-exact r4" in text
    code, text, _ = run(capsys, "info", out, "--json")
    info = one_json_line(text)
    assert info["bits_per_weight"] > info["base_bits_per_weight"] == 3.0
    png = tmp_path / "r.png"
    code, text, err = run(
        capsys, "report", out, "--out", png, "--calib", corpus, "--calib-samples", "4", "--calib-seq-len", "32"
    )
    assert code == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [line.split() for line in text.splitlines() if line.strip().startswith("model.layers.")]
    assert len(rows) == 14
    for row in rows:  # output error falls with the correction on held-out windows
        assert float(row[4]) < float(row[3])
    # the correction's own windows are refused as held-out data
    code, _, err = run(capsys, "report", out, "--out", png, "--calib", corpus, "--seed", "0")
    assert code == 2 and "seed 0" in err


BAD_CORRECTION = {
    "rank-too-large": (["--rank", "500", "--method", "svd"], "rank 500 exceeds"),
    "short-calib": (["--rank", "4", "--method", "lqer", "--calib-samples", "10000"], "fewer than the 10000 x 512"),
    "no-damping": (
        ["--rank", "4", "--method", "qera-exact", "--damping", "0", "--calib-samples", "1", "--calib-seq-len", "40"],
        "R is singular",
    ),
    "calib-is-test": (["--rank", "4", "--method", "lqer", "--eval", "--calib", "sotu-test"], "same text"),
}


@pytest.mark.parametrize("case", list(BAD_CORRECTION))
def test_bad_correction_input(case, checkpoint, corpus, tmp_path, capsys):
    flags, message = BAD_CORRECTION[case]
    if "--calib" not in flags:
        flags = [*flags, "--calib", corpus]
    code, _, err = run(capsys, "quantize", checkpoint, *flags, "--out", tmp_path / "m")
    assert code == 2 and message in err, err
    assert not (tmp_path / "m").exists()


def test_quantizer_flags(checkpoint, corpus, tmp_path, capsys):
    import json

    for flags in (["--quantizer", "gptq", "--act-order", *tiny_calib(corpus, 4)], ["--quantizer", "hqq"]):
        out = tmp_path / flags[1]
        code, _, err = run(capsys, "quantize", checkpoint, "--bits", "3", "--group-size", "32", *flags, "--out", out)
        assert code == 0, err
        recipe = json.loads((out / "config.json").read_text())["quantization_config"]["recipe"]
        assert recipe["quantizer"] == flags[1] and recipe["act_order"] == ("--act-order" in flags)
    code, _, err = run(capsys, "quantize", checkpoint, "--format", "nf", "--quantizer", "hqq", "--out", tmp_path / "x")
    assert code == 2 and "--format int" in err and not (tmp_path / "x").exists()
    code, _, err = run(capsys, "quantize", checkpoint, "--act-order", "--out", tmp_path / "y")
    assert code == 2 and "--quantizer gptq" in err
