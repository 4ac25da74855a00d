"""The GPU benchmark runs where GPU time is scarce: its code paths are checked here, on CPU, before that."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_gpu_bench_smoke_run_writes_json_and_table(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCH))
    gpu_bench = importlib.import_module("gpu_bench")
    args = [
        "--smoke",
        "--out",
        str(tmp_path),
        "--batch-sizes",
        "2",
        "3",
        "--seconds",
        "0.05",
        "--cascade-batch",
        "4",
    ]
    assert gpu_bench.main(args) == 0
    result = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert "smoke run, not a measurement" in result["device"]
    assert [row["batch_size"] for row in result["rows"]] == [2, 3]
    for row in result["rows"]:
        assert row["paper_loop"] > 0 and row["batched"] > 0 and row["graphs"] > 0
        assert row["graphs_captured"] is False
    assert result["unet_tflop_per_sample"] > 0 and result["text_tflop_per_caption"] > 0
    # The two-stage rows: one stage 1x1 and 4x5, then the cascade re-scoring 5% of the captions.
    two_stage = result["two_stage"]
    assert [round(r["denoiser_rows_per_caption"], 3) for r in two_stage[:2]] == [1.0, 36.0]
    assert 1.0 < two_stage[2]["denoiser_rows_per_caption"] < 1.0 + 0.1 * 36
    assert all(r["captions_per_s"] > 0 for r in two_stage)
    table = capsys.readouterr().out.splitlines()
    graphs_row = table.index(next(line for line in table if line.startswith("two-stage audit"))) - 2
    assert "(no graph captured: (c) ran eagerly)" in table[graphs_row]
    assert table[-1].startswith("cascade 1x1 -> 4x5 (5% re-scored)")
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


BUSY_TESTS = """
import subprocess, sys, time

def spin(seconds):
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass

def test_busy_here():
    spin(0.4)

def test_busy_in_a_child():
    subprocess.run([sys.executable, "-c", "import test_busy; test_busy.spin(0.4)"], check=True)
"""


def run_with_cpu_per_test(tmp_path, *pytest_args: str) -> subprocess.CompletedProcess:
    (tmp_path / "test_busy.py").write_text(BUSY_TESTS)
    env = os.environ | {"PYTHONPATH": str(BENCH), "CPU_PER_TEST_OUT": str(tmp_path / "rows.jsonl")}
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "cpu_per_test",
        "-p",
        "no:cacheprovider",
        *pytest_args,
    ]
    return subprocess.run(
        [*command, str(tmp_path / "test_busy.py")], cwd=tmp_path, env=env, capture_output=True, text=True
    )


def test_cpu_per_test_counts_the_machine_not_only_pytest(tmp_path, monkeypatch, capsys):
    done = run_with_cpu_per_test(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {row["test"].split("::")[1]: row for row in map(json.loads, (tmp_path / "rows.jsonl").open())}
    assert set(rows) == {"test_busy_here", "test_busy_in_a_child"}
    # Lower bounds only: anything else running on the machine adds to machine_cpu_s.
    assert rows["test_busy_here"]["machine_cpu_s"] >= 0.3 and rows["test_busy_here"]["pytest_cpu_s"] >= 0.3
    child = rows["test_busy_in_a_child"]
    assert child["machine_cpu_s"] >= 0.3 and child["pytest_cpu_s"] < 0.3
    monkeypatch.syspath_prepend(str(BENCH))
    cpu_per_test = importlib.import_module("cpu_per_test")
    assert cpu_per_test.main([str(tmp_path / "rows.jsonl"), "--top", "1"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("2 tests: ") and "| 2 | `test_busy.py` |" in table[4]
    assert [line for line in table if "::" in line] == [table[-1]] and "test_busy" in table[-1]
    sys.modules.pop("cpu_per_test", None)


def test_cpu_per_test_refuses_parallel_workers(tmp_path):
    done = run_with_cpu_per_test(tmp_path, "-n", "2")
    assert done.returncode == 4, done.stdout + done.stderr
    assert "run it without -n" in done.stderr


def test_webdataset_bench_smoke_run_prints_every_path(tmp_path, capsys):
    """bench/webdataset.py is loaded under another name: on sys.path as `webdataset` it would hide the package."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_webdataset", BENCH / "webdataset.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--smoke", "--json", str(tmp_path / "wds.json")]) == 0
    rows = json.loads((tmp_path / "wds.json").read_text())["results"]["local"]
    assert [r["path"] for r in rows] == ["plain read", "tars", "sidecars"]
    assert (
        rows[1]["captions"] == rows[2]["captions"] == 40
    )  # 2 shards x 20 samples; failed downloads not counted
    assert rows[2]["bytes_per_caption"] < rows[1]["bytes_per_caption"]
    assert "tasks/GPU" in capsys.readouterr().out
