"""`auditor calibrate`: reading reference captions, the threshold JSON contract, bad input."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from auditor import histogram
from auditor.cli import main
from auditor.cli.calibrate import read_caption_file
from auditor.errors import InputDataError
from auditor.report.calibration import calibrate_threshold

CAPTIONS = [
    f"a {c} cat sitting in a park, photograph" for c in ("red", "blue", "green", "white", "black")
] * 8


def write_reference(tmp_path, suffix: str, column: str = "caption"):
    path = tmp_path / f"reference{suffix}"
    if suffix == ".txt":
        path.write_text("\n".join(CAPTIONS) + "\n\n", encoding="utf-8")
    elif suffix == ".parquet":
        pq.write_table(pa.table({column: CAPTIONS, "url": ["u"] * len(CAPTIONS)}), path)
    else:
        path.write_text("".join(json.dumps({column: c, "n": i}) + "\n" for i, c in enumerate(CAPTIONS)))
    return path


@pytest.mark.parametrize("suffix", [".txt", ".parquet", ".jsonl"])
def test_read_caption_file_formats(tmp_path, suffix):
    assert read_caption_file(str(write_reference(tmp_path, suffix))) == CAPTIONS


def test_read_caption_file_names_missing_column(tmp_path):
    path = write_reference(tmp_path, ".parquet", column="TEXT")
    with pytest.raises(
        InputDataError, match=r"'caption' not found .*columns are: TEXT, url\. Pass --caption-column"
    ):
        read_caption_file(str(path))
    assert read_caption_file(str(path), "TEXT") == CAPTIONS


def test_read_caption_file_rejects_missing_and_unknown(tmp_path):
    with pytest.raises(InputDataError, match="does not exist"):
        read_caption_file(str(tmp_path / "nope.txt"))
    odd = tmp_path / "captions.xlsx"
    odd.write_text("x")
    with pytest.raises(
        InputDataError, match=r"xlsx has an unknown extension; expected one of \.parquet.*\.gz"
    ):
        read_caption_file(str(odd))


def test_read_caption_file_reads_every_audit_format_compressed_too(tmp_path):
    import bz2
    import gzip

    (tmp_path / "r.csv.gz").write_bytes(
        gzip.compress(("caption,n\n" + "".join(f'"{c}",1\n' for c in CAPTIONS)).encode())
    )
    (tmp_path / "r.txt.bz2").write_bytes(bz2.compress(("\n".join(CAPTIONS) + "\n\n").encode()))
    (tmp_path / "r.tsv").write_text("caption\n" + "".join(f"{c}\n" for c in CAPTIONS))
    for name in ("r.csv.gz", "r.txt.bz2", "r.tsv"):
        assert read_caption_file(str(tmp_path / name)) == CAPTIONS, name
    with pytest.raises(InputDataError, match=r"'text' not found in .*r\.csv\.gz; columns are: caption, n"):
        read_caption_file(str(tmp_path / "r.csv.gz"), "text")


def test_calibrate_threshold_record(tiny_scorer):
    captions = [
        f"a {w} dog by the sea, watercolor" for w in ("old", "new", "tiny", "huge", "wet", "dry")
    ] * 20
    record = calibrate_threshold(tiny_scorer, captions, fpr=0.05, reference="ref.txt", model="m")
    scores = tiny_scorer.score(captions)
    assert record["threshold"] in scores
    assert (scores > record["threshold"]).mean() <= 0.05
    assert record["reference_fpr"] == pytest.approx((scores > record["threshold"]).mean())
    assert record["method"] == "calibrate" and record["rule"] == "score > threshold"
    assert record["model_fingerprint"] == tiny_scorer.fingerprint
    assert (record["n_reference"], record["generations"], record["steps"], record["seed"]) == (120, 1, 1, 0)
    # The reference distribution in the audit histogram's bins, for the report.
    assert record["reference_score_histogram"]["counts"] == histogram.count_scores(scores)
    assert sum(record["reference_score_histogram"]["counts"]) == 120


def test_calibrate_cli_writes_threshold_json(tmp_path, tiny_model_dir, capsys):
    reference = write_reference(tmp_path, ".jsonl")
    out = tmp_path / "calib" / "threshold.json"
    code = main(
        ["calibrate", "--model", str(tiny_model_dir), "--reference", str(reference), "--fpr", "0.1"]
        + ["--generations", "2", "--out", str(out)]
    )
    assert code == 0
    record = json.loads(out.read_text())
    expected_keys = {"threshold", "fpr", "method", "reference", "n_reference", "model", "model_fingerprint"}
    assert expected_keys | {"generations", "steps", "seed", "created_at"} <= set(record)
    assert record["n_reference"] == len(CAPTIONS) and record["generations"] == 2 and record["fpr"] == 0.1
    assert np.isfinite(record["threshold"])
    assert sum(record["reference_score_histogram"]["counts"]) == len(CAPTIONS)
    printed = capsys.readouterr().out
    assert "flags score > threshold" in printed
    assert "reference_score_histogram" not in printed  # 146 counts: in the file, not on the terminal


def test_calibrate_cli_rejects_bad_fpr(tmp_path, tiny_model_dir, capsys):
    reference = write_reference(tmp_path, ".txt")
    code = main(
        ["calibrate", "--model", str(tiny_model_dir), "--reference", str(reference), "--fpr", "1.5"]
        + ["--out", str(tmp_path / "t.json")]
    )
    assert code == 2
    assert "--fpr must be in [0, 1), got 1.5" in capsys.readouterr().err
