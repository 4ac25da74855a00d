"""`auditor audit` on a local Ray: every format, exactly-once rows, scores equal Scorer.score, resume, filter."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from audit_corpus import captions, write_corpus

from auditor import schema
from auditor.config import AuditConfig, FilterConfig
from auditor.io.ledger import DONE, FAILED
from tests.scores_close import assert_scores_close

pytestmark = pytest.mark.integration


def read_scores(output: Path) -> pa.Table:
    return pads.dataset(str(output / "scores"), format="parquet", partitioning="hive").to_table()


def ledger(output: Path) -> dict[str, dict]:
    """Per input file name: {"status": done (every unit committed) | failed (a unit failed) | partial, "units": n}."""
    import fsspec

    from auditor.io.ledger import Ledger

    by_file: dict[str, list[dict]] = {}
    for record in Ledger(fsspec.filesystem("file"), str(output)).entries().values():
        by_file.setdefault(Path(record["source"]).name, []).append(record)
    summary = {}
    for name, records in by_file.items():
        done = {r["unit"] for r in records if r["status"] == DONE}
        total = max((r["file_units"] or 0) for r in records)
        status = (
            FAILED
            if any(r["status"] == FAILED for r in records)
            else DONE
            if done == set(range(total)) and total
            else "partial"
        )
        summary[name] = {"status": status, "units": len(done)}
    return summary


def assert_exactly_once(scores: pa.Table, expected_rows: dict[str, int]) -> None:
    keys = list(
        zip(scores.column(schema.SOURCE).to_pylist(), scores.column(schema.ROW).to_pylist(), strict=True)
    )
    assert len(keys) == len(set(keys)), "a row was written twice"
    per_file: dict[str, list[int]] = {}
    for source, row in keys:
        per_file.setdefault(Path(source).name, []).append(row)
    assert {name: sorted(rows) for name, rows in per_file.items()} == {
        name: list(range(n)) for name, n in expected_rows.items()
    }


def test_audit_every_format_exactly_once_then_incremental(ray_local, tmp_path, micro_model_dir, micro_scorer):
    from auditor.pipeline.audit import run

    expected = write_corpus(tmp_path / "in")
    good = {
        name: [c for c in values if isinstance(c, str) and c.strip()] for name, values in expected.items()
    }
    texts = [c for values in good.values() for c in values]
    reference = dict(zip(texts, micro_scorer.score(texts).tolist(), strict=True))
    threshold = float(np.quantile(list(reference.values()), 0.75))
    cfg = AuditConfig(
        inputs=(str(tmp_path / "in"),), output=str(tmp_path / "out"), model=str(micro_model_dir),
        threshold=threshold, dtype="fp32", batch_size=8, quiet=True,
    )  # fmt: skip
    result = run(cfg)

    # 1. The corrupt file fails alone; the exit code says so.
    assert result.exit_code == 1 and list(result.failed) == [str(tmp_path / "in" / "z_corrupt.parquet")]
    # 2. Every row of every readable file exactly once, with <source>:<row> ids.
    scores = read_scores(tmp_path / "out")
    assert_exactly_once(scores, {name: len(v) for name, v in expected.items()})
    rows = scores.to_pylist()
    assert all(r["id"] == f"{r['source']}:{r['row']}" for r in rows)
    assert len({r["shard"] for r in rows}) == 5
    # 3. Bad rows carry a status and no score.
    by_key = {(Path(r["source"]).name, r["row"]): r for r in rows}
    assert by_key[("a.parquet", 18)]["status"] == schema.NULL_CAPTION
    assert by_key[("a.parquet", 19)]["status"] == schema.EMPTY_CAPTION
    assert by_key[("b.jsonl", 12)]["status"] == schema.BAD_RECORD
    assert by_key[("b.jsonl", 13)]["status"] == schema.NOT_STRING
    assert by_key[("e.txt", 5)]["status"] == schema.EMPTY_CAPTION
    assert all(r["score"] is None and not r["flagged"] for r in rows if r["status"] != schema.OK)
    # 4. Scores equal Scorer.score; flagged == score > threshold; flagged/ holds exactly those rows.
    ok = [r for r in rows if r["status"] == schema.OK]
    assert len(ok) == len(texts)
    assert_scores_close([r["score"] for r in ok], [reference[r["caption"]] for r in ok])
    assert all(r["flagged"] == (r["score"] > threshold) for r in ok)
    flagged = pads.dataset(
        str(tmp_path / "out" / "flagged"), format="parquet", partitioning="hive"
    ).to_table()
    assert sorted(flagged.column(schema.ID).to_pylist()) == sorted(r["id"] for r in ok if r["flagged"])
    assert 0 < flagged.num_rows < len(ok)
    # 5. _audit.json and the ledger.
    audit = json.loads((tmp_path / "out" / "_audit.json").read_text())
    assert audit["model_fingerprint"] == micro_scorer.fingerprint
    assert audit["runtime"]["actor_device"] == "cpu" and audit["runtime"]["cuda_graphs"] is False
    # What the actors reported they ran with, not only what the driver resolved.
    (actor,) = audit["runtime"]["actors"]
    assert actor["device"] == "cpu" and actor["dtype"] == "float32" and actor["shared_prefix"] is True
    assert actor["torch_threads"] >= 1 and actor["batch_size"] == audit["config"]["batch_size"]
    assert audit["threshold"] == threshold and audit["threshold_origin"] == {
        "kind": "flag",
        "value": threshold,
    }
    assert audit["counts"]["this_run"]["rows"] == sum(len(v) for v in expected.values())
    assert audit["counts"]["this_run"]["flagged"] == flagged.num_rows
    assert audit["files"]["failed"][0]["error"].startswith(str(tmp_path / "in" / "z_corrupt.parquet"))
    assert {"list_inputs", "model_fingerprint", "ray_init", "pipeline"} <= set(audit["timings_s"])
    assert audit["config"]["threshold"] == threshold and "ray" in audit["versions"]
    records = ledger(tmp_path / "out")
    assert records["z_corrupt.parquet"]["status"] == FAILED
    assert all(records[name]["status"] == DONE for name in expected)

    # 6. Incremental: a new file is the only one audited; nothing is duplicated.
    new = captions("a new photo of a", 5)
    pq.write_table(pa.table({"caption": new}), tmp_path / "in" / "f_new.parquet")
    again = run(cfg)
    assert again.files_done == 1 and again.files_skipped == 5 and again.counts["rows"] == 5
    assert_exactly_once(
        read_scores(tmp_path / "out"), {**{n: len(v) for n, v in expected.items()}, "f_new.parquet": 5}
    )
    audit = json.loads((tmp_path / "out" / "_audit.json").read_text())
    assert audit["files"]["complete_in_output"] == 6
    assert audit["counts"]["output_total"]["rows"] == sum(len(v) for v in expected.values()) + 5


def test_empty_files_audit_as_0_rows_on_the_first_run_and_every_rerun(ray_local, tmp_path, micro_model_dir):
    """Issue 32: one writer's empty .jsonl (or .csv) among the files, sampled by planning, is 0 rows on the first run
    and on a rerun that has to read it again; before, it failed its unit and then stopped every rerun (exit 2)."""
    from auditor.pipeline.audit import run

    (tmp_path / "in").mkdir()
    texts = captions("a photo of a", 6)
    pq.write_table(pa.table({"caption": texts}), tmp_path / "in" / "a.parquet")
    (tmp_path / "in" / "b.jsonl").write_text("".join(json.dumps({"caption": c}) + "\n" for c in texts[:4]))
    for name in ("empty.jsonl", "empty.csv"):
        (tmp_path / "in" / name).write_bytes(b"")
    cfg = AuditConfig(
        inputs=(str(tmp_path / "in"),), output=str(tmp_path / "out"), model=str(micro_model_dir),
        threshold=1e9, dtype="fp32", quiet=True, report=False,
    )  # fmt: skip
    first = run(cfg)
    assert first.exit_code == 0 and not first.failed and first.files_done == 4
    assert_exactly_once(read_scores(tmp_path / "out"), {"a.parquet": 6, "b.jsonl": 4})
    assert {name: r["status"] for name, r in ledger(tmp_path / "out").items()} == dict.fromkeys(
        ("a.parquet", "b.jsonl", "empty.jsonl", "empty.csv"), DONE
    )
    # A rerun that must read the empty files again (a writer touched them): the plan samples only those two.
    later = time.time() + 5
    for name in ("empty.jsonl", "empty.csv"):
        os.utime(tmp_path / "in" / name, (later, later))
    again = run(cfg)
    assert again.exit_code == 0 and again.files_done == 2 and again.files_skipped == 2
    assert again.counts["rows"] == 0
    audit = json.loads((tmp_path / "out" / "_audit.json").read_text())
    assert audit["files"]["complete_in_output"] == 4
    assert audit["counts"]["output_total"]["rows"] == 10
    assert_exactly_once(read_scores(tmp_path / "out"), {"a.parquet": 6, "b.jsonl": 4})


def test_id_column_keep_columns_and_filter(ray_local, tmp_path, micro_model_dir, micro_scorer):
    from auditor.pipeline.audit import run
    from auditor.pipeline.filter import run_filter

    (tmp_path / "in").mkdir()
    texts = captions("an image of a", 30)
    pq.write_table(
        pa.table(
            {"key": [f"k{i}" for i in range(20)], "caption": texts[:20], "url": [f"u{i}" for i in range(20)]}
        ),
        tmp_path / "in" / "part-0.parquet",
    )
    (tmp_path / "in" / "part-1.jsonl").write_text(
        "".join(json.dumps({"key": f"k{i}", "caption": texts[i], "url": i}) + "\n" for i in range(20, 30))
    )
    threshold = float(np.median(micro_scorer.score(texts)))
    threshold_file = tmp_path / "threshold.json"
    threshold_file.write_text(json.dumps({"threshold": threshold, "target_fpr": 0.5}))
    cfg = AuditConfig(
        inputs=(str(tmp_path / "in"),), output=str(tmp_path / "out"), model=str(micro_model_dir),
        id_column="key", keep_columns=("url",), threshold_file=str(threshold_file), dtype="fp32", quiet=True,
    )  # fmt: skip
    assert run(cfg).exit_code == 0
    scores = read_scores(tmp_path / "out").to_pylist()
    assert sorted(r["id"] for r in scores) == sorted(f"k{i}" for i in range(30))
    assert {r["id"]: r["url"] for r in scores}["k3"] == "u3"
    assert {r["id"]: r["url"] for r in scores}["k25"] == "25"  # jsonl keep columns are text
    audit = json.loads((tmp_path / "out" / "_audit.json").read_text())
    assert audit["threshold_origin"]["content"] == {"threshold": threshold, "target_fpr": 0.5}
    flagged_ids = {r["id"] for r in scores if r["flagged"]}
    assert 0 < len(flagged_ids) < 30

    drop = run_filter(FilterConfig(inputs=(str(tmp_path / "in"),), audit_output=str(tmp_path / "out"),
                                   output=str(tmp_path / "clean"), quiet=True))  # fmt: skip
    assert drop.exit_code == 0
    assert drop.counts["rows"] == 30 and drop.counts["flagged"] == len(flagged_ids)
    kept = pa.concat_tables(pq.read_table(tmp_path / "clean" / f"part-{i}.parquet") for i in (0,)).to_pylist()
    kept += pq.read_table(tmp_path / "clean" / "part-1.parquet").to_pylist()
    assert {r["key"] for r in kept} == {f"k{i}" for i in range(30)} - flagged_ids
    assert set(kept[0]) == {"key", "caption", "url"}

    mark = run_filter(FilterConfig(inputs=(str(tmp_path / "in"),), audit_output=str(tmp_path / "out"),
                                   output=str(tmp_path / "marked"), mode="mark", quiet=True))  # fmt: skip
    assert mark.counts["written"] == 30
    marked = pq.read_table(tmp_path / "marked" / "part-0.parquet").to_pylist()
    by_id = {r["id"]: r for r in scores}
    assert all(r["memorization_flag"] == by_id[r["key"]]["flagged"] for r in marked)
    np.testing.assert_allclose(
        [r["memorization_score"] for r in marked], [by_id[r["key"]]["score"] for r in marked]
    )


def test_filter_needs_an_audit_output(tmp_path):
    from auditor.errors import ConfigError
    from auditor.pipeline.filter import run_filter

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("x\n")
    with pytest.raises(ConfigError, match="has no scores/ folder; pass the OUTPUT folder of `auditor audit`"):
        run_filter(
            FilterConfig(
                inputs=(str(tmp_path / "in"),), audit_output=str(tmp_path), output=str(tmp_path / "o")
            )
        )


def test_config_errors_fail_before_ray_starts(tmp_path, micro_model_dir):
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"TEXT": ["a"], "url": ["u"]}), tmp_path / "in" / "a.parquet")
    started = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "auditor", "audit", str(tmp_path / "in"), str(tmp_path / "out"),
         "--model", str(micro_model_dir)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2
    assert (
        "'caption' not found in" in out.stderr
        and "columns are: TEXT, url. Pass --caption-column TEXT" in out.stderr
    )
    assert "Started a local Ray" not in out.stderr
    assert time.perf_counter() - started < 60


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_is_exactly_once(ray_local, tmp_path, micro_model_dir, micro_scorer):
    """With the second stage on: the rerun re-scores exactly the rows over the screening threshold, once."""
    from auditor.pipeline.audit import run

    (tmp_path / "in").mkdir()
    n_files, n_rows = 10, 24
    for i in range(n_files):
        pq.write_table(
            pa.table({"caption": captions(f"file {i} shows a", n_rows)}),
            tmp_path / "in" / f"p{i:02d}.parquet",
        )
    # Units of 8 rows (each file is one row group, so one unit): the write stage then stages every 8 rows, and
    # files commit one by one instead of all together at the end of this small corpus.
    screen = float(np.quantile(micro_scorer.score(captions("file 0 shows a", n_rows), generations=4), 0.7))
    args = [str(tmp_path / "in"), str(tmp_path / "out"), "--model", str(micro_model_dir), "--generations", "4",
            "--batch-size", "4", "--num-cpus", "2", "--dtype", "fp32", "--quiet", "--unit-rows", "8",
            "--confirm-generations", "2", "--confirm-steps", "2", "--screen-threshold", repr(screen)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "auditor", "audit", *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if any(r["status"] == DONE for r in ledger(tmp_path / "out").values()):
                break
            time.sleep(0.02)
    finally:
        # The run's own process group: its driver and the local Ray it started; nothing else.
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    done_before = sum(r["status"] == DONE for r in ledger(tmp_path / "out").values())
    assert 1 <= done_before < n_files, f"kill was not mid-way: {done_before} files done"

    at = args.index("--num-cpus")
    result = run(AuditConfig.from_argv(args[:at] + args[at + 2 :]))
    assert result.exit_code == 0
    assert result.files_skipped == done_before and result.files_done == n_files - done_before
    scores = read_scores(tmp_path / "out")
    assert_exactly_once(scores, {f"p{i:02d}.parquet": n_rows for i in range(n_files)})
    rows = scores.to_pylist()
    over = [r for r in rows if r["score"] > screen]
    assert 0 < len(over) < len(rows)
    assert all((r["confirm_score"] is not None) == (r["score"] > screen) for r in rows)
    sample = over[:: max(1, len(over) // 6)]
    assert_scores_close(
        [r["confirm_score"] for r in sample],
        micro_scorer.score([r["caption"] for r in sample], generations=2, steps=2),
    )
    stages = json.loads((tmp_path / "out" / "_audit.json").read_text())["stages"]
    assert stages["confirm"]["rows"] == len(over)  # the output's rows, those of both runs
    assert not list((tmp_path / "out").rglob("_tmp-*"))
    assert not list((tmp_path / "out" / "_staging").rglob("*.parquet"))


def test_actors_that_would_starve_readers_fail_before_ray(tmp_path, micro_model_dir):
    from auditor.errors import ConfigError
    from auditor.pipeline.audit import run

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("a cat\n")
    cfg = AuditConfig(inputs=(str(tmp_path / "in"),), output=str(tmp_path / "out"), model=str(micro_model_dir),
                      actors=2, num_cpus=2)  # fmt: skip
    with pytest.raises(ConfigError, match=r"needs 3 CPUs; Ray has 2 .*starve the readers.*Lower --actors"):
        run(cfg)
