"""The GPU benchmark runs where GPU time is scarce: its code paths are checked here, on CPU, before that."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_gpu_bench_smoke_run_writes_json_and_table(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCH))
    gpu_bench = importlib.import_module("gpu_bench")
    args = ["--smoke", "--out", str(tmp_path), "--batch-sizes", "2", "3", "--seconds", "0.05"]
    assert gpu_bench.main(args) == 0
    result = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert "smoke run, not a measurement" in result["device"]
    assert [row["batch_size"] for row in result["rows"]] == [2, 3]
    for row in result["rows"]:
        assert row["paper_loop"] > 0 and row["batched"] > 0 and row["graphs"] > 0
        assert row["graphs_captured"] is False
    assert result["unet_tflop_per_sample"] > 0 and result["text_tflop_per_caption"] > 0
    table = capsys.readouterr().out.splitlines()
    assert "(no graph captured: (c) ran eagerly)" in table[-1]
    sys.modules.pop("gpu_bench", None)


def test_gpu_families_smoke_run_writes_json_and_table(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCH))
    gpu_families = importlib.import_module("gpu_families")
    args = [
        "--smoke",
        "--out",
        str(tmp_path),
        "--batch-sizes",
        "2",
        "--seconds",
        "0.05",
        "--spearman-captions",
        "4",
    ]
    assert gpu_families.main(args) == 0
    result = json.loads((tmp_path / "gpu_families.json").read_text())
    assert "smoke run, not a measurement" in result["device"]
    assert [row["family"] for row in result["rows"]] == ["sdxl", "sd3"]
    for row in result["rows"]:
        assert row["paper_loop"] > 0 and row["batched_2"] > 0 and row["tflop_per_caption"] > 0
        # fp32 against fp32 on CPU: the same scores.
        assert row["spearman_fp16_fp32"] > 0.999
    assert capsys.readouterr().out.splitlines()[-1].startswith("sd3 ")
    sys.modules.pop("gpu_families", None)
    sys.modules.pop("gpu_bench", None)
