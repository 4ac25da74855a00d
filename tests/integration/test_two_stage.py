"""The two-stage audit end to end on a local Ray: `auditor calibrate --confirm-*` writes both thresholds, `auditor
audit` with that file re-scores exactly the rows over the screening threshold (confirm_score equal to a standalone
Scorer's), flags by both thresholds, and records the stages and their cost in _audit.json, the report and flagged/;
`add_memorization_scores` gives the same confirm scores in a user's pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from audit_corpus import captions

from auditor import schema
from auditor.cli import main
from tests.scores_close import assert_scores_close

pytestmark = pytest.mark.integration


def read(output: Path, folder: str) -> pa.Table:
    return pads.dataset(str(output / folder), format="parquet", partitioning="hive").to_table()


def test_two_stage_calibrate_audit_report_and_user_pipeline(
    ray_local, tmp_path, micro_model_dir, micro_scorer
):
    from auditor.ray_data import add_memorization_scores

    reference = tmp_path / "clean.txt"
    reference.write_text("\n".join(captions("a clean photo of a", 60)) + "\n")
    threshold_file = tmp_path / "two-stage.json"
    assert main([
        "calibrate", "--model", str(micro_model_dir), "--dtype", "fp32", "--reference", str(reference),
        "--fpr", "0.05", "--screen-fpr", "0.3", "--confirm-generations", "2", "--confirm-steps", "2",
        "--out", str(threshold_file),
    ]) == 0  # fmt: skip
    record = json.loads(threshold_file.read_text())
    assert record["confirm"] == {"generations": 2, "steps": 2} and record["n_rescored"] > 0
    screen, threshold = record["screen_threshold"], record["threshold"]

    (tmp_path / "in").mkdir()
    texts = [*captions("an image of a", 24), *captions("a clean photo of a", 12)]
    pq.write_table(pa.table({"caption": texts}), tmp_path / "in" / "a.parquet")
    out = tmp_path / "out"
    assert main([
        "audit", str(tmp_path / "in"), str(out), "--model", str(micro_model_dir), "--dtype", "fp32",
        "--threshold-file", str(threshold_file), "--quiet",
    ]) == 0  # fmt: skip

    # Scores: the first stage as one-stage, confirm_score for exactly the rows over S, equal to the standalone scorer.
    rows = sorted(read(out, "scores").to_pylist(), key=lambda r: r["row"])
    first = micro_scorer.score(texts)
    assert_scores_close([r["score"] for r in rows], first)
    over = [r for r in rows if r["score"] > screen]
    assert 0 < len(over) < len(rows)
    assert all(r["confirm_score"] is None for r in rows if r["score"] <= screen)
    alone = micro_scorer.score([r["caption"] for r in over], generations=2, steps=2)
    assert_scores_close([r["confirm_score"] for r in over], alone)
    assert [r["flagged"] for r in rows] == [
        r["score"] > screen and r["confirm_score"] is not None and r["confirm_score"] > threshold
        for r in rows
    ]
    flagged = read(out, "flagged")
    assert schema.CONFIRM_SCORE in flagged.column_names
    assert flagged.num_rows == sum(r["flagged"] for r in rows)

    # _audit.json: both thresholds, both stages' settings, rows re-scored, denoiser rows by stage, histogram.
    audit = json.loads((out / "_audit.json").read_text())
    stages = audit["stages"]
    assert audit["threshold"] == threshold and audit["screen_threshold"] == screen
    assert stages["screen"]["rows"] == len(rows) and stages["confirm"]["rows"] == len(over)
    distinct = len(set(texts))
    assert stages["screen"]["denoiser_rows"] == distinct  # 1 generation x 1 step, identical captions once
    assert stages["confirm"]["denoiser_rows"] == len({r["caption"] for r in over}) * 2 * (1 + 2)
    assert sum(stages["confirm"]["confirm_score_histogram"]["counts"]) == len(over)
    report = (out / "report.html").read_text()
    cost = report[report.index('id="second-stage-cost"') : report.index('id="confirm-histogram"')]
    assert f"the {len(over)} rows with a score over the screening threshold" in cost
    assert f"{stages['denoiser_rows_per_caption']:.3f} denoiser rows per scored caption" in cost
    assert "<svg" in report[report.index('id="confirm-histogram"') :]

    # A user's pipeline: the same confirm scores.
    ds = ray_local.data.from_arrow(pa.table({"caption": texts, "k": list(range(len(texts)))}))
    marked = add_memorization_scores(
        ds,
        model=str(micro_model_dir),
        caption_column="caption",
        dtype="fp32",
        threshold_file=str(threshold_file),
    )
    mine = sorted(marked.take_all(), key=lambda r: r["k"])
    for row, audited in zip(mine, rows, strict=True):
        assert row["memorization_flag"] == audited["flagged"]
        if audited["confirm_score"] is None:
            assert row["memorization_confirm_score"] is None or np.isnan(row["memorization_confirm_score"])
        else:
            assert_scores_close(row["memorization_confirm_score"], audited["confirm_score"])
