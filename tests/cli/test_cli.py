"""The CLI wires the public API: export, run, inspect; errors are one line and a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kiln.cli.__main__ import main


def test_export_run_inspect(checkpoints, tmp_path, capsys):
    path, _ = checkpoints("bert", "text-classification")
    out = tmp_path / "art"
    assert main(["export", str(path), str(out), "--task", "text-classification", "--batch", "1:4", "--seq", "1:32"]) == 0
    assert "2 fused Attention nodes, validated" in capsys.readouterr().out

    assert main(["run", str(out), "i love paris", "the movie was terrible", "--all-labels"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["input"] for line in lines] == ["i love paris", "the movie was terrible"]
    assert sorted(d["label"] for d in lines[0]["output"]) == ["NEGATIVE", "NEUTRAL", "POSITIVE"]

    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text('"hello world"\n\n{"text": "is paris in france", "text_pair": "yes"}\n')
    assert main(["run", str(out), "--input", str(jsonl)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 2 and set(lines[1]["output"]) == {"label", "score"}

    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "attention  2 fused nodes" in text and "validation passed" in text and "input_ids" in text
    assert main(["inspect", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["task"] == "text-classification"


def test_run_feature_extraction_pooled(artifacts, capsys):
    assert main(["run", str(artifacts("bert", "feature-extraction")), "hello", "--pooling", "mean", "--normalize"]) == 0
    vector = json.loads(capsys.readouterr().out)["output"]
    assert len(vector) == 32 and abs(sum(v * v for v in vector) - 1) < 1e-5


@pytest.mark.parametrize("argv, message", [
    (["inspect", "/nonexistent/dir"], "is not a kiln artifact"),
    (["run", "{art}"], "No input"),
    (["export", "/nonexistent/ckpt", "{tmp}/out"], "No checkpoint directory"),
])
def test_errors_are_one_line(argv, message, artifacts, tmp_path, capsys):
    argv = [a.format(art=artifacts("bert", "feature-extraction"), tmp=tmp_path) for a in argv]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bad_jsonl_names_the_line(artifacts, tmp_path, capsys):
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text('"ok"\n{not json\n')
    assert main(["run", str(artifacts("bert", "feature-extraction")), "--input", str(jsonl)]) == 1
    assert "line 2 is not JSON" in capsys.readouterr().err


def test_console_script_exit_code_and_message(tmp_path):
    bad = tmp_path / "ckpt"
    bad.mkdir()
    (bad / "config.json").write_text("{broken")
    proc = subprocess.run([sys.executable, "-m", "kiln.cli", "export", str(bad), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "config.json is not valid JSON" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
