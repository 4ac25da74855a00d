"""Work units on a local Ray: resume inside a file after kill -9, nothing uncommitted visible, changed files redone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from audit_corpus import captions
from test_audit import assert_exactly_once, read_scores

from auditor import schema
from auditor.config import AuditConfig

pytestmark = pytest.mark.integration


def unit_records(output: Path) -> list[Path]:
    folder = output / "_ledger" / "units"
    return list(folder.glob("*.json")) if folder.exists() else []


def visible_rows(output: Path) -> pa.Table:
    """What a reader sees in OUTPUT/scores at this instant (pyarrow dataset, as downstream jobs read it)."""
    if not (output / "scores").exists():
        return pa.table({schema.SOURCE: pa.array([], pa.string()), schema.ROW: pa.array([], pa.int64())})
    return pads.dataset(str(output / "scores"), format="parquet", partitioning="hive").to_table(
        columns=[schema.SOURCE, schema.ROW]
    )


@pytest.mark.slow
def test_kill_9_inside_a_file_then_rerun_scores_only_the_rest(ray_local, tmp_path, micro_model_dir):
    from auditor.pipeline.audit import run

    (tmp_path / "in").mkdir()
    n_rows, group_rows, unit_rows = 400, 20, 40  # one file, 20 row groups, 10 units
    pq.write_table(
        pa.table({"caption": captions("one big file shows a", n_rows)}),
        tmp_path / "in" / "big.parquet",
        row_group_size=group_rows,
    )
    args = [str(tmp_path / "in"), str(tmp_path / "out"), "--model", str(micro_model_dir), "--generations", "4",
            "--batch-size", "4", "--unit-rows", str(unit_rows), "--dtype", "fp32", "--quiet", "--no-report"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "auditor", "audit", *args, "--num-cpus", "2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    try:
        while (
            time.monotonic() < deadline and process.poll() is None and len(unit_records(tmp_path / "out")) < 2
        ):
            time.sleep(0.02)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the run's driver and the local Ray it started
        process.wait(timeout=60)
    committed = len(unit_records(tmp_path / "out"))
    assert 1 <= committed < n_rows // unit_rows, f"kill was not mid-file: {committed} units committed"

    # Right after the kill, a reader sees whole units only, each row once.
    seen = visible_rows(tmp_path / "out").column(schema.ROW).to_pylist()
    assert len(seen) == len(set(seen))
    per_unit = Counter(row // unit_rows for row in seen)
    assert all(count == unit_rows for count in per_unit.values()), per_unit
    assert len(per_unit) >= committed

    result = run(AuditConfig.from_argv(args))
    assert result.exit_code == 0
    rescored = result.counts["rows"]
    assert rescored <= n_rows - committed * unit_rows and rescored % unit_rows == 0
    scores = read_scores(tmp_path / "out")
    assert_exactly_once(scores, {"big.parquet": n_rows})
    rows = scores.to_pylist()
    assert all(r["id"] == f"{r['source']}:{r['row']}" for r in rows)
    assert not list((tmp_path / "out" / "_staging").rglob("*.parquet"))
    # The killed run's lease was taken over at once (same host, its process gone) and released at the end.
    assert not (tmp_path / "out" / "_lease.json").exists()


def test_files_changed_in_place_are_audited_again_whole(ray_local, tmp_path, micro_model_dir, micro_scorer):
    from auditor.pipeline.audit import run

    (tmp_path / "in").mkdir()
    path = tmp_path / "in" / "a.parquet"
    other = tmp_path / "in" / "b.jsonl"
    other.write_text("".join(f'{{"caption": "{c}"}}\n' for c in captions("a still file of a", 6)))

    def write(texts: list[str]) -> None:
        pq.write_table(pa.table({"caption": texts}), path, row_group_size=10)

    def captions_in_output() -> dict[int, str]:
        table = read_scores(tmp_path / "out")
        mine = table.filter(pa.compute.equal(table.column(schema.SOURCE), str(path)))
        return dict(
            zip(mine.column(schema.ROW).to_pylist(), mine.column(schema.CAPTION).to_pylist(), strict=True)
        )

    cfg = AuditConfig(
        inputs=(str(tmp_path / "in"),), output=str(tmp_path / "out"), model=str(micro_model_dir), dtype="fp32",
        unit_rows=20, quiet=True, report=False, batch_size=16,
    )  # fmt: skip
    first = captions("a first version of a", 57)
    write(first)
    assert run(cfg).counts["rows"] == 57 + 6
    assert captions_in_output() == dict(enumerate(first))

    # Rows appended: the file's identity changes, so it is audited again whole; the untouched file is skipped.
    appended = first + captions("then appended a", 50)
    write(appended)
    result = run(cfg)
    assert result.counts["rows"] == 107 and result.files_skipped == 1
    assert captions_in_output() == dict(enumerate(appended))
    assert_exactly_once(read_scores(tmp_path / "out"), {"a.parquet": 107, "b.jsonl": 6})

    # Rows removed (fewer units than before): nothing of the longer version survives.
    shorter = captions("a shorter version of a", 13)
    write(shorter)
    assert run(cfg).counts["rows"] == 13
    assert captions_in_output() == dict(enumerate(shorter))
    assert_exactly_once(read_scores(tmp_path / "out"), {"a.parquet": 13, "b.jsonl": 6})
    parts = sorted(p.name for p in (tmp_path / "out" / "scores").glob("shard=a-*/*.parquet"))
    assert parts == ["part-u000000.parquet"]
    # The scores are those of the new captions.
    table = read_scores(tmp_path / "out").filter(pa.compute.equal(pa.compute.field(schema.SOURCE), str(path)))
    expected = dict(zip(shorter, micro_scorer.score(shorter).tolist(), strict=True))
    for row in table.to_pylist():
        assert abs(row["score"] - expected[row["caption"]]) < 1e-4
