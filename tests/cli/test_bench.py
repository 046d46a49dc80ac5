"""kiln bench: rows per shape and engine, torch interleaved on the same feeds, decoders' prefill and decode rows,
shapes outside the artifact skipped with a reason, the plot written, and bad options refused. No timing is asserted:
only that every figure is a real measurement (positive, ordered percentiles, throughput consistent with the median)."""

from __future__ import annotations

import json

import pytest

import kiln
from kiln.benchmark import format_table, parse_sizes
from kiln.cli.__main__ import main
from kiln.errors import InputError


def check_row(row: dict, items: int):
    assert 0 < row["median_ms"] <= row["p90_ms"] <= row["p99_ms"]
    assert row["throughput"] == pytest.approx(items / (row["median_ms"] / 1000), rel=1e-2)
    assert row["peak_rss_mb"] > 10 and row["rounds"] == 3


def test_encoder_rows_against_torch(artifacts):
    result = kiln.bench(artifacts(), batches=(1, 2), seqs=(8, 16, 1000), rounds=3, threads=1, compare=("torch",))
    shapes = {(r["engine"], r["batch"], r["seq"]) for r in result["rows"]}
    assert shapes == {(e, b, s) for e in ("kiln", "torch") for b in (1, 2) for s in (8, 16)}
    for row in result["rows"]:
        assert row["phase"] == "forward"
        check_row(row, row["batch"])
    assert len(result["skipped"]) == 2 and "sequence <= 64" in result["skipped"][0]
    table = format_table(result)
    assert table.count("torch  forward") == 4 and "x" in table.splitlines()[3]  # torch rows carry a ratio


def test_decoder_prefill_and_decode(tmp_path):
    from conftest import TINY_LLAMA, make_causal_lm

    make_causal_lm(tmp_path / "ckpt", "llama", **TINY_LLAMA)
    kiln.export(str(tmp_path / "ckpt"), tmp_path / "art", task="text-generation", batch="1:4")
    result = kiln.bench(tmp_path / "art", batches=(2,), seqs=(5,), new_tokens=4, rounds=3, compare=("torch",))
    rows = {(r["engine"], r["phase"]): r for r in result["rows"]}
    assert set(rows) == {(e, p) for e in ("kiln", "torch") for p in ("prefill", "decode")}
    check_row(rows["kiln", "prefill"], 2)
    check_row(rows["kiln", "decode"], 2)  # tokens/s over the batch


def test_cli_json_and_plot(artifacts, tmp_path, capsys):
    png = tmp_path / "latency.png"
    assert main(["bench", str(artifacts()), "--batch", "1", "--seq", "4,8", "--rounds", "3", "--json",
                 "--plot", str(png)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [(r["engine"], r["seq"]) for r in result["rows"]] == [("kiln", 4), ("kiln", 8)]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(tmp_path.glob(".*tmp*"))


@pytest.mark.parametrize("text", ["1,x", "0", ""])
def test_bad_sizes(text):
    with pytest.raises(InputError, match="--batch"):
        parse_sizes(text, "batch")


def test_bad_options(artifacts, capsys):
    with pytest.raises(InputError, match="text-generation artifacts only"):
        kiln.bench(artifacts(), new_tokens=4)
    with pytest.raises(InputError, match="only 'torch'"):
        kiln.bench(artifacts(), compare=("optimum",))
    assert main(["bench", str(artifacts()), "--batch", "two"]) == 1
    assert "--batch takes comma-separated integers" in capsys.readouterr().err
