"""The command line: every --help teaches; `auditor score` prints scores equal to the API's."""

from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path

import pytest

from auditor.cli import COMMAND_MODULES, build_parser, main
from tests.scores_close import assert_scores_close


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for action in build_parser()._subparsers._group_actions[0].choices:
        assert action in out


@pytest.mark.parametrize("command", sorted(build_parser()._subparsers._group_actions[0].choices))
def test_every_subcommand_help_has_examples(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "example" in capsys.readouterr().out.lower()


def test_command_modules_all_register():
    assert len(build_parser()._subparsers._group_actions[0].choices) >= len(COMMAND_MODULES)


def test_score_prints_the_api_scores(tiny_model_dir, tiny_scorer, tmp_path, capsys):
    captions_file = tmp_path / "captions.txt"
    captions_file.write_text("a blue horse on a beach\n\nan old clock\n", encoding="utf-8")
    code = main(
        ["score", "--model", str(tiny_model_dir), "a red cat", "--file", str(captions_file), "--json"]
    )
    assert code == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["caption"] for r in rows] == ["a red cat", "a blue horse on a beach", "an old clock"]
    expected = tiny_scorer.score([r["caption"] for r in rows])
    assert_scores_close([r["score"] for r in rows], expected)


def test_score_table_and_errors(tiny_model_dir, tmp_path, capsys):
    assert main(["score", "--model", str(tiny_model_dir), "a red cat"]) == 0
    assert "a red cat" in capsys.readouterr().out
    assert main(["score", "--model", str(tiny_model_dir)]) == 2
    assert "no captions given" in capsys.readouterr().err
    assert main(["score", "--model", str(tmp_path / "missing"), "x"]) == 2
    assert "neither a local folder" in capsys.readouterr().err
    assert main(["score", "--model", str(tiny_model_dir), "--file", str(tmp_path / "nope.txt")]) == 2
    assert "nope.txt does not exist" in capsys.readouterr().err


def _parsers_under(parser):
    """The parser and every subcommand parser below it, recursively."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from _parsers_under(child)


def test_abbreviated_flags_are_refused(capsys):
    """A cron line with `--unit-row` would work until a new flag made the prefix ambiguous: refuse it now."""
    from auditor.config import AuditConfig, FilterConfig

    parsers = [*_parsers_under(build_parser()), AuditConfig.parser(), FilterConfig.parser()]
    assert [p.prog for p in parsers if p.allow_abbrev] == []
    with pytest.raises(SystemExit) as exit_info:
        main(["audit", "in/", "out/", "--model", "m", "--unit-row", "8"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --unit-row" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        AuditConfig.from_argv(["in/", "out/", "--model", "m", "--unit-row", "8"])  # what jobs/audit.py parses
    assert "unrecognized arguments: --unit-row" in capsys.readouterr().err
    assert AuditConfig.from_argv(["in/", "out/", "--model", "m", "--unit-rows", "8"]).unit_rows == 8


def test_every_argument_parser_in_the_repository_refuses_abbreviations():
    """bench/, examples/ and the module entry points build their own parsers: each passes allow_abbrev=False."""
    root = Path(__file__).resolve().parents[2]
    missing = []
    for folder in ("auditor", "bench", "examples", "jobs"):
        for path in sorted((root / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if not isinstance(node, ast.Call):
                    continue
                name = (
                    node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                )
                if name not in ("ArgumentParser", "add_parser"):
                    continue
                refuses = any(
                    k.arg == "allow_abbrev" and isinstance(k.value, ast.Constant) and k.value.value is False
                    for k in node.keywords
                )
                if not refuses:
                    missing.append(f"{path.relative_to(root)}:{node.lineno}")
    assert missing == []


def test_audit_without_a_threshold_ends_saying_nothing_could_be_flagged(tmp_path, monkeypatch, capsys):
    """`3000 scored, 0 flagged` alone reads like a clean corpus; without a threshold nothing could be flagged, and
    the last lines say so and give the calibrate command (with the audit's scale options) to get one."""
    from auditor.pipeline import audit as audit_mod

    result = audit_mod.AuditResult(
        output=str(tmp_path / "out"), files_done=1, files_skipped=0, failed={},
        counts={"rows": 3000, "ok": 3000, "flagged": 0}, units_done=1,
    )  # fmt: skip
    monkeypatch.setattr(audit_mod, "run", lambda cfg: result)
    paths = [str(tmp_path / "in"), str(tmp_path / "out")]
    args = ["audit", *paths, "--model", "models/sd15", "--generations", "4"]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("3000 rows: 3000 scored, 0 flagged")
    assert lines[1] == (
        "no threshold was given (--threshold or --threshold-file), so nothing could be flagged; the scores are "
        "written."
    )
    assert lines[2].startswith(
        "to flag: calibrate on clean captions, `auditor calibrate --model models/sd15 --generations 4 --reference "
        "CLEAN_CAPTIONS.txt --fpr 0.01 --out threshold.json`, then rerun this audit with --threshold-file "
        "threshold.json"
    )
    assert lines[3] == f"results: {tmp_path / 'out'}"
    # With a threshold the counts say what they mean: no such lines.
    assert main([*args, "--threshold", "2.5"]) == 0
    assert "nothing could be flagged" not in capsys.readouterr().out
