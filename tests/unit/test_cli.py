"""The command line: every --help teaches; `auditor score` prints scores equal to the API's."""

from __future__ import annotations

import json

import pytest

from auditor.cli import COMMAND_MODULES, build_parser, main


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
    assert [r["score"] for r in rows] == pytest.approx(expected.tolist(), rel=1e-5)


def test_score_table_and_errors(tiny_model_dir, tmp_path, capsys):
    assert main(["score", "--model", str(tiny_model_dir), "a red cat"]) == 0
    assert "a red cat" in capsys.readouterr().out
    assert main(["score", "--model", str(tiny_model_dir)]) == 2
    assert "no captions given" in capsys.readouterr().err
    assert main(["score", "--model", str(tmp_path / "missing"), "x"]) == 2
    assert "neither a local folder" in capsys.readouterr().err
    assert main(["score", "--model", str(tiny_model_dir), "--file", str(tmp_path / "nope.txt")]) == 2
    assert "nope.txt does not exist" in capsys.readouterr().err
