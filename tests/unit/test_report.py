"""The HTML report from small audit outputs written with pyarrow (no Ray, no model): sections, escaping, bad input,
--against, s3://, the CLI."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from synthetic_audit import MEMORIZED, SCRIPT_CAPTION, SHARDS, TOP_CAPTION, write_audit_output

from auditor.cli import main
from auditor.errors import ConfigError
from auditor.report import audit_output
from auditor.report.audit_output import compare_outputs, open_audit_output, scan_scores, top_flagged
from auditor.report.html import token_spans, write_report

FAILED_UNIT = {"source": "/data/corpus/part-00003.parquet", "unit": 4, "error": "OSError: <b>disk</b> gone"}


@pytest.fixture()
def audit(tmp_path):
    return write_audit_output(tmp_path / "audit", failed_units=[FAILED_UNIT])


def read(path: str) -> str:
    with open(path, encoding="utf-8") as fh:
        return fh.read()


def test_report_sections_and_escaping(audit):
    path = write_report(str(audit))
    assert path == str(audit / "report.html")
    html = read(path)
    for section in ("summary", "distribution", "where", "flagged"):
        assert f'<section id="{section}">' in html
    assert 'id="comparison"' not in html
    # Summary: rows, flags, threshold and origin, failed units with their (escaped) error, runtime, timings.
    assert re.search(r'id="flagged-count">6<', html)
    assert re.search(r'id="threshold-value">1\.0000<', html)
    assert "--threshold-file runs/threshold.json (auditor calibrate)" in html
    assert "null_caption" in html and "pipeline" in html and "node-1" in html
    assert "/data/corpus/part-00003.parquet" in html and "OSError: &lt;b&gt;disk&lt;/b&gt; gone" in html
    # Distribution: an inline SVG with the threshold drawn, and the calibration reference beside it.
    distribution = html[html.index('id="score-histogram"') : html.index('id="where"')]
    assert "<svg" in distribution and "threshold 1.0000" in distribution
    assert "calibration reference: 300 captions" in distribution
    assert 'id="reference-fpr"' in html
    # Flagged captions: top first, duplicates grouped with their count, token shading from --explain-flagged.
    table = html[html.index('id="flagged-table"') :]
    assert table.index("the zorblat tower at dusk") < table.index("&lt;script&gt;") < table.index("fox")
    assert re.search(r"4\.2500</td>\s*<td class=\"caption\">the zorblat tower", table)
    assert '<td class="num">3</td>' in table and "+2" in table
    assert 'class="tok" style="background-color: rgba(192, 57, 43, 0.850)"' in table
    # The web caption is text, never markup: no script element anywhere, and no network reference.
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<script" not in html.lower()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert "@import" not in html and "url(http" not in html


def test_report_shard_table_sorted_by_rate(audit):
    html = read(write_report(str(audit)))
    table = html[html.index('id="shards"') : html.index("</table>", html.index('id="shards"'))]
    keys = re.findall(r'<td class="mono">([^<]+)</td>', table)
    assert keys[0] == SHARDS[0] and set(keys) == set(SHARDS)  # every flag is in shard 0
    assert "5.00%" in table


def test_report_without_threshold_says_why(tmp_path):
    audit = write_audit_output(tmp_path / "audit", threshold=None)
    html = read(write_report(str(audit)))
    assert 'id="no-threshold"' in html and "Nothing was flagged" in html
    assert "without a threshold (neither --threshold nor --threshold-file)" in html
    assert re.search(r'id="threshold-value">none<', html)
    assert 'id="flagged-table"' not in html
    assert (
        "<svg" in html[html.index('id="score-histogram"') :]
    )  # the scores are there to pick a threshold from


def test_report_lists_failed_input_files_when_there_are_no_units(tmp_path):
    audit = write_audit_output(tmp_path / "audit")
    summary = json.loads((audit / "_audit.json").read_text())
    summary["files"]["failed"] = [{"source": "s3://b/bad.jsonl", "error": "ArrowInvalid: JSON parse error"}]
    (audit / "_audit.json").write_text(json.dumps(summary))
    html = read(write_report(str(audit)))
    failures = html[html.index('id="failures"') :]
    assert "Failed input files" in html and "s3://b/bad.jsonl" in failures and "JSON parse error" in failures


def test_report_tolerates_a_minimal_summary(tmp_path):
    audit = write_audit_output(tmp_path / "audit", with_histogram=False)
    (audit / "_audit.json").write_text(json.dumps({"threshold": 1.0}))
    html = read(write_report(str(audit), out=str(tmp_path / "elsewhere" / "r.html")))
    assert re.search(r'id="flagged-count">6<', html) and TOP_CAPTION in html


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda p: None, r"is not an audit output: _audit\.json and scores/ not found there"),
        (lambda p: (p / "_audit.json").write_text("{}"), r"is not an audit output: scores/ not found"),
        (lambda p: (p / "scores").mkdir(), r"is not an audit output: _audit\.json not found"),
    ],
)
def test_report_refuses_what_is_not_an_audit_output(tmp_path, make, match):
    folder = tmp_path / "not-an-audit"
    folder.mkdir()
    make(folder)
    with pytest.raises(ConfigError, match=match):
        write_report(str(folder))


def test_report_refuses_unreadable_summary_and_bad_top(tmp_path, audit):
    (audit / "_audit.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"cannot be read as JSON .* Rerun the audit"):
        write_report(str(audit))
    (audit / "_audit.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"holds a JSON list, expected the object"):
        write_report(str(audit))
    with pytest.raises(ConfigError, match=r"--top must be an int >= 0, got -1"):
        write_report(str(audit), top_k=-1)


def test_scan_counts_the_histogram_when_the_summary_lacks_it(tmp_path):
    stored = open_audit_output(str(write_audit_output(tmp_path / "a")))
    scanned = open_audit_output(str(write_audit_output(tmp_path / "b", with_histogram=False)))
    a, b = scan_scores(stored), scan_scores(scanned)
    assert (a.histogram_origin, b.histogram_origin) == ("_audit.json", "scan")
    assert a.histogram == b.histogram and sum(b.histogram) == 3 * 119
    assert b.rows == 360 and b.flagged == 6
    assert b.shards == {SHARDS[0]: [120, 6], SHARDS[1]: [120, 0], SHARDS[2]: [120, 0]}
    assert b.by_tokens_rows.sum() == 357  # rows without a caption have no token count
    assert b.by_tokens_flagged[len(SCRIPT_CAPTION.split())] == 1


def test_tallies_from_footers_match_the_row_scan(tmp_path):
    # With both histograms in _audit.json no row is read: the same tallies come from parquet footers.
    by_rows = scan_scores(open_audit_output(str(write_audit_output(tmp_path / "a"))))
    from_footers = scan_scores(
        open_audit_output(str(write_audit_output(tmp_path / "b", with_token_histogram=True)))
    )
    assert (by_rows.tallies_origin, from_footers.tallies_origin) == ("rows", "footers")
    assert from_footers.shards == by_rows.shards and from_footers.rows == by_rows.rows == 360
    assert from_footers.flagged == by_rows.flagged == 6 and from_footers.histogram == by_rows.histogram
    for name in ("by_tokens_rows", "by_tokens_flagged"):
        a, b = getattr(from_footers, name), getattr(by_rows, name)
        assert np.array_equal(np.pad(a, (0, 80 - len(a))), np.pad(b, (0, 80 - len(b)))), name


def test_top_flagged_groups_duplicates_across_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(audit_output, "BATCH_ROWS", 2)  # the running top k must survive many small batches
    output = open_audit_output(str(write_audit_output(tmp_path / "a")))
    top, n_rows = top_flagged(output, 2)
    assert n_rows == 6
    assert [(t.caption, t.count) for t in top] == [(MEMORIZED[0][0], 3), (SCRIPT_CAPTION, 1)]
    assert top[0].score == pytest.approx(4.25) and top[0].id == "file0:0" and top[0].sources == 1
    assert top[0].tokens[0] == "the</w>" and top[0].significance[0] == pytest.approx(1.0)
    assert top_flagged(output, 0) == ([], 6)


def test_token_spans_text_and_shade():
    spans = token_spans(["mona</w>", "li", "sa</w>"], [0.5, 1.0, 0.0])
    assert [s["text"] for s in spans] == ["mona ", "li", "sa "]
    assert [s["shade"] for s in spans] == [0.5, 1.0, 0.0]
    assert sum(s["share"] for s in spans) == pytest.approx(1.0)
    assert [s["shade"] for s in token_spans(["a</w>"], None)] == [0.0]


def test_compare_outputs_newly_and_no_longer_flagged(tmp_path):
    # Same corpus; the earlier audit's model memorized only the first caption, and it saw fewer rows per file.
    current = open_audit_output(str(write_audit_output(tmp_path / "now")))
    before = write_audit_output(
        tmp_path / "before", memorized=MEMORIZED[:1], rows_per_shard=100, threshold=1.2
    )
    result = compare_outputs(current, open_audit_output(str(before)), k=2)
    assert (result.both, result.only_this, result.only_other) == (300, 60, 0)
    assert (result.newly_flagged, result.no_longer_flagged, result.flagged_both) == (3, 0, 3)
    assert [r.caption for r in result.newly_top] == [SCRIPT_CAPTION, MEMORIZED[2][0]]  # top k=2 by score
    assert result.newly_top[0].score == pytest.approx(3.5) and result.newly_top[0].score_other < 1.2
    assert result.scored_both == 297 and result.changed == 3  # the earlier audit's last row per file was null
    assert result.shift_counts.sum() == 297 and result.shift_mean > 0
    reverse = compare_outputs(open_audit_output(str(before)), current, k=5)
    assert (reverse.newly_flagged, reverse.no_longer_flagged, reverse.only_other) == (0, 3, 60)
    assert {r.caption for r in reverse.no_longer_top} == {SCRIPT_CAPTION, MEMORIZED[2][0]}


def test_compare_outputs_joins_across_renamed_shards(tmp_path):
    current = open_audit_output(str(write_audit_output(tmp_path / "now")))
    before = write_audit_output(tmp_path / "before", memorized=MEMORIZED[:1])
    renamed = write_audit_output(
        tmp_path / "renamed", memorized=MEMORIZED[:1], shards=tuple(s + "x" for s in SHARDS)
    )
    by_shard = compare_outputs(current, open_audit_output(str(before)))
    in_one_piece = compare_outputs(current, open_audit_output(str(renamed)))
    assert by_shard.joined_in_one_piece == 0 and in_one_piece.joined_in_one_piece == 720
    for name in ("both", "only_this", "newly_flagged", "no_longer_flagged", "scored_both", "changed"):
        assert getattr(by_shard, name) == getattr(in_one_piece, name), name
    assert np.array_equal(by_shard.shift_counts, in_one_piece.shift_counts)


def test_report_against_renders_the_comparison(tmp_path, audit):
    before = write_audit_output(tmp_path / "before", memorized=MEMORIZED[:1])
    html = read(write_report(str(audit), against=str(before), out=str(tmp_path / "vs.html")))
    section = html[html.index('<section id="comparison">') :]
    assert re.search(r'id="newly-flagged">3<', section) and re.search(r'id="no-longer-flagged">0<', section)
    assert "<svg" in section[section.index('id="shift-plot"') :]
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in section[section.index('id="newly-table"') :]
    with pytest.raises(ConfigError, match=r"is not an audit output"):
        write_report(str(audit), against=str(tmp_path / "nothing"))


def test_report_cli(tmp_path, audit, capsys):
    out = tmp_path / "report.html"
    assert main(["report", str(audit), "--out", str(out), "--top", "1"]) == 0
    assert capsys.readouterr().out.strip() == f"report: {out}"
    html = out.read_text(encoding="utf-8")
    assert TOP_CAPTION in html and "&lt;script&gt;" not in html[html.index('id="flagged-table"') :]
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "is not an audit output" in capsys.readouterr().err
    assert main(["report", str(audit), "--storage-option", "secret=x"]) == 2
    assert "would put a credential on the command line" in capsys.readouterr().err


def test_report_on_s3(tmp_path, audit, s3_endpoint):
    import s3fs

    options = {"endpoint_url": s3_endpoint}
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    fs.mkdir("reports")
    fs.put(str(audit), "reports/audit", recursive=True)
    assert fs.exists("reports/audit/scores")
    written = write_report("s3://reports/audit", options)
    assert written == "s3://reports/audit/report.html"
    fs.invalidate_cache()
    html = fs.cat("reports/audit/report.html").decode("utf-8")
    assert TOP_CAPTION in html and re.search(r'id="flagged-count">6<', html)
    assert not [p for p in fs.ls("reports/audit") if p.rsplit("/", 1)[-1].startswith("_tmp-")]


def test_report_modules_do_not_import_ray():
    code = (
        "import sys\n"
        "import auditor.report.html, auditor.report.audit_output, auditor.report.plots, auditor.cli.report\n"
        "print(','.join(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
