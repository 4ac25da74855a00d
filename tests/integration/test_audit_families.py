"""The audit end to end on every model family (tiny random SDXL, SD3, PixArt-Sigma on a local Ray): every row once,
scores equal Scorer.score, the family recorded in _audit.json and the report; calibrate, score, explain and filter.
"""

from __future__ import annotations

import json

import pyarrow.dataset as pads
import pytest

from auditor import Scorer, schema
from auditor.cli import main
from auditor.config import AuditConfig
from tests.scores_close import assert_scores_close

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CAPTIONS = [
    "a red cat sitting in a park",
    "a blue bicycle next to a lighthouse",
    "an oil painting of a harbour at dusk",
    "",
    "a red cat sitting in a park",
    " ".join(["a very long caption about a sunny meadow"] * 50),
    "a small dog on a wooden bench, watercolor",
    "a portrait of an old sailor, 😀",
]
CLEAN = [
    f"a {c} {n} in a {p}"
    for c in ("red", "green", "tall")
    for n in ("tree", "house", "boat")
    for p in ("city", "field")
]


@pytest.mark.parametrize("family", ["sdxl", "sd3", "sd3-no-t5", "pixart-sigma"])
def test_audit_calibrate_explain_filter_on_each_family(
    family, ray_local, family_model_dirs, tmp_path, capsys
):
    from auditor.pipeline.audit import run

    model = family_model_dirs[family]
    scorer = Scorer.from_pretrained(model, device="cpu", dtype="fp32")
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "captions.jsonl").write_text(
        "".join(json.dumps({"caption": c}) + "\n" for c in CAPTIONS)
    )
    (tmp_path / "clean.txt").write_text("\n".join(CLEAN) + "\n")

    # 1. calibrate on captions believed clean; the threshold file records the family.
    assert main(["calibrate", "--model", str(model), "--reference", str(tmp_path / "clean.txt"), "--fpr", "0.2",
                 "--out", str(tmp_path / "threshold.json")]) == 0  # fmt: skip
    calibration = json.loads((tmp_path / "threshold.json").read_text())
    assert calibration["model_family"] == scorer.family_name
    # 2. the audit: every row once, scores equal Scorer.score, flagged == score > threshold.
    cfg = AuditConfig(
        inputs=(str(tmp_path / "in"),), output=str(tmp_path / "out"), model=str(model), dtype="fp32",
        threshold_file=str(tmp_path / "threshold.json"), batch_size=4, quiet=True, explain_flagged=True,
    )  # fmt: skip
    assert run(cfg).exit_code == 0
    rows = pads.dataset(str(tmp_path / "out" / "scores"), partitioning="hive").to_table().to_pylist()
    assert sorted(r[schema.ROW] for r in rows) == list(range(len(CAPTIONS)))
    ok = sorted((r for r in rows if r[schema.STATUS] == schema.OK), key=lambda r: r[schema.ROW])
    assert [r[schema.ROW] for r in ok] == [0, 1, 2, 4, 5, 6, 7]
    expected = scorer.score([r[schema.CAPTION] for r in ok])
    assert_scores_close([r[schema.SCORE] for r in ok], expected)
    threshold = calibration["threshold"]
    assert all(r[schema.FLAGGED] == (r[schema.SCORE] > threshold) for r in ok)
    assert next(r for r in rows if r[schema.ROW] == 5)[schema.TRUNCATED] is True
    audit = json.loads((tmp_path / "out" / "_audit.json").read_text())
    assert audit["model_family"] == scorer.family_name
    assert {a["family"] for a in audit["runtime"]["actors"]} == {scorer.family_name}
    assert f">{scorer.family_name}<" in (tmp_path / "out" / "report.html").read_text()
    flagged = pads.dataset(str(tmp_path / "out" / "flagged"), partitioning="hive").to_table().to_pylist()
    assert len(flagged) == sum(r[schema.FLAGGED] for r in ok)
    assert all(f["tokens"] and len(f["tokens"]) == len(f["token_significance"]) for f in flagged)
    # 3. score and explain on this machine.
    capsys.readouterr()
    assert main(["score", "--model", str(model), "--json", CAPTIONS[0]]) == 0
    printed = json.loads(capsys.readouterr().out.splitlines()[0])
    assert_scores_close(printed["score"], expected[0])
    assert main(["explain", "--model", str(model), "--json", CAPTIONS[0]]) == 0
    explained = json.loads(capsys.readouterr().out)
    assert explained["magnitude"] == pytest.approx(float(expected[0]), rel=1e-4)
    assert 0 < len(explained["tokens"]) == len(explained["significance"])
    assert "cat" in "".join(explained["tokens"])
    # 4. filter drops the flagged rows from the dataset.
    assert (
        main(
            ["filter", str(tmp_path / "in"), str(tmp_path / "out"), str(tmp_path / "clean"), "--mode", "drop"]
        )
        == 0
    )
    kept = pads.dataset(str(tmp_path / "clean")).to_table()
    assert kept.num_rows == len(CAPTIONS) - len(flagged)


def test_sd3_audit_at_a_fixed_sigma(ray_local, family_model_dirs, tmp_path, capsys, caplog):
    """--score-sigma on SD3 end to end: calibrate, the audit's scores and records, a threshold calibrated at
    sigma 1 warned about, and a rerun without the flag re-audits rather than reusing the rows."""
    from auditor.pipeline.audit import run

    model = family_model_dirs["sd3"]
    scorer = Scorer.from_pretrained(model, device="cpu", dtype="fp32", score_sigma=0.94)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "captions.txt").write_text("\n".join(CAPTIONS[:3]) + "\n")
    (tmp_path / "clean.txt").write_text("\n".join(CLEAN) + "\n")
    for name, extra in (("sigma1.json", []), ("sigma094.json", ["--score-sigma", "0.94"])):
        assert main(["calibrate", "--model", str(model), "--reference", str(tmp_path / "clean.txt"),
                     "--fpr", "0.2", "--out", str(tmp_path / name), *extra]) == 0  # fmt: skip
    assert json.loads((tmp_path / "sigma094.json").read_text())["score_sigma"] == 0.94
    assert json.loads((tmp_path / "sigma1.json").read_text())["score_sigma"] is None

    def audit(threshold_file: str, *extra: str) -> list[dict]:
        argv = [str(tmp_path / "in"), str(tmp_path / "out"), "--model", str(model), "--dtype", "fp32",
                "--threshold-file", str(tmp_path / threshold_file), "--quiet", *extra]  # fmt: skip
        with caplog.at_level("WARNING"):
            assert run(AuditConfig.from_argv(argv)).exit_code == 0
        table = pads.dataset(str(tmp_path / "out" / "scores"), partitioning="hive").to_table()
        return sorted(table.to_pylist(), key=lambda r: r[schema.ROW])

    rows = audit("sigma1.json", "--score-sigma", "0.94")
    assert_scores_close([r[schema.SCORE] for r in rows], scorer.score(CAPTIONS[:3]))
    summary = json.loads((tmp_path / "out" / "_audit.json").read_text())
    assert summary["config"]["score_sigma"] == 0.94
    assert {a["score_sigma"] for a in summary["runtime"]["actors"]} == {0.94}
    assert "calibrated with other score options (score_sigma None there, 0.94 here)" in caplog.text
    assert "score_sigma None there, 0.94 here" in (tmp_path / "out" / "report.html").read_text()
    caplog.clear()
    # Without the flag the rows' scores change, so the ledger does not reuse them.
    rows = audit("sigma1.json")
    plain = Scorer.from_pretrained(model, device="cpu", dtype="fp32").score(CAPTIONS[:3])
    assert_scores_close([r[schema.SCORE] for r in rows], plain)
    assert "other score options" not in caplog.text
    capsys.readouterr()
    assert main(["score", "--model", str(model), "--json", "--score-sigma", "0.94", CAPTIONS[0]]) == 0
    printed = json.loads(capsys.readouterr().out.splitlines()[0])
    assert_scores_close(printed["score"], scorer.score(CAPTIONS[:1])[0])
    assert main(["score", "--model", str(family_model_dirs["sdxl"]), "--score-sigma", "0.94", "a cat"]) == 2
    assert "--score-sigma 0.94 applies to flow-matching models (SD3 / SD3.5)" in capsys.readouterr().err
