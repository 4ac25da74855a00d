"""The two-stage audit (auditor.scoring.cascade): the plan of stages, its cost, the flag rule, calibration of both
thresholds, and the score actor's confirm scores, which must equal a standalone Scorer's for every family."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from auditor import schema
from auditor.config import AuditConfig
from auditor.errors import ConfigError
from auditor.pipeline.plan import resolve_threshold, run_fingerprint
from auditor.pipeline.stages import ScoreActor, stage_and_acknowledge
from auditor.report.calibration import calibrate_two_stage, calibration_mismatch, score_options_of
from auditor.scoring.cascade import (
    Cascade,
    Stage,
    calibrate_confirm_threshold,
    denoiser_rows_per_caption,
    flag_rows,
    rank_scores,
)
from tests.scores_close import assert_scores_close

CAPTIONS = [
    "a photo of a cat",
    "mona lisa by leonardo",
    "a red car parked by the sea",
    "a photo of a cat",
    "an astronaut riding a horse on mars",
    "two dogs playing in the snow at night",
    "a bowl of fruit on a wooden table",
    "portrait of an old man, oil painting",
]


def actor_batch(captions) -> pa.Table:
    n = len(captions)
    return pa.table(
        {
            schema.CAPTION: pa.array(captions, pa.string()),
            schema.STATUS: pa.array([schema.OK] * n, pa.string()),
            schema.ERROR: pa.nulls(n, pa.string()),
        }
    )


def score_config(model, **changes) -> AuditConfig:
    return AuditConfig(inputs=("unused",), output="unused-out", model=str(model), dtype="fp32", **changes)


# 1. The plan of stages -------------------------------------------------------------------------------------------
def test_denoiser_rows_per_caption_counts_the_cfg_pairs():
    # One conditional row at the first step (uncond shared), a CFG pair at each later step, per generation.
    assert denoiser_rows_per_caption(Stage(1, 1)) == 1
    assert denoiser_rows_per_caption(Stage(4, 1)) == 4
    assert denoiser_rows_per_caption(Stage(4, 5)) == 36  # the 4 + 4*4*2
    # SD3 at a fixed sigma: the approach step, then the pair at sigma (README: three transformer rows).
    assert denoiser_rows_per_caption(Stage(1, 1), lead_in_steps=1) == 3


def test_flag_rule_needs_both_stages():
    scores = np.array([0.1, 0.5, 0.9, np.nan, 0.8], dtype=np.float32)
    confirm = np.array([np.nan, 0.2, 0.7, np.nan, np.nan], dtype=np.float32)
    cascade = Cascade(Stage(4, 5), screen_threshold=0.4)
    assert cascade.rescore(scores).tolist() == [False, True, True, False, True]
    assert flag_rows(scores, 0.3, cascade, confirm).tolist() == [False, False, True, False, False]
    assert flag_rows(scores, 0.3).tolist() == [False, True, True, False, True]
    assert flag_rows(scores, None, cascade, confirm).tolist() == [False] * 5
    with pytest.raises(ConfigError, match="screening threshold must be a number below inf"):
        Cascade(Stage(), screen_threshold=float("nan"))


def test_stage_from_a_threshold_file_is_checked():
    assert Stage.from_dict({"generations": 4, "steps": 5}, "f") == Stage(4, 5)
    with pytest.raises(ConfigError, match=r"f\.steps must be an int >= 1, got 0"):
        Stage.from_dict({"generations": 4, "steps": 0}, "f")
    with pytest.raises(ConfigError, match="f must be an object"):
        Stage.from_dict([4, 5], "f")


def test_confirm_threshold_meets_the_joint_fpr():
    rng = np.random.default_rng(0)
    n = 1000
    confirm = rng.normal(size=80)  # the 80 reference rows over S
    threshold = calibrate_confirm_threshold(confirm, n, fpr=0.01)
    assert (confirm > threshold).sum() == 10  # floor(0.01 * 1000), distinct values
    # Fewer rows over S than the FPR allows: all but the lowest are flagged.
    few = np.array([3.0, 1.0, 2.0])
    assert calibrate_confirm_threshold(few, n, fpr=0.01) == 1.0
    with pytest.raises(ConfigError, match="no reference caption scored over the screening threshold"):
        calibrate_confirm_threshold(np.array([]), n, fpr=0.01)


def test_rank_scores_orders_as_the_cascade_decides():
    scores = np.array([0.1, 0.9, 0.6, 0.3])
    confirm = np.array([np.nan, 0.2, 0.8, np.nan])
    ranks = rank_scores(scores, confirm, screen_threshold=0.5)
    # Over S by confirm score (0.8 > 0.2), above the cleared rows by their screening score (0.3 > 0.1).
    assert np.argsort(ranks).tolist() == [0, 3, 1, 2]


# 2. Thresholds, files and the run fingerprint ---------------------------------------------------------------------
def test_resolve_threshold_takes_the_second_stage_from_options_or_file(tmp_path, micro_model_dir):
    one_stage = resolve_threshold(score_config(micro_model_dir, threshold=1.0))
    assert one_stage.cascade is None
    on = resolve_threshold(
        score_config(
            micro_model_dir, threshold=1.0, confirm_generations=4, confirm_steps=5, screen_threshold=0.5
        )
    )
    assert on.cascade == Cascade(Stage(4, 5), 0.5) and on.value == 1.0
    file = tmp_path / "t.json"
    file.write_text(
        json.dumps({"threshold": 2.0, "screen_threshold": 0.7, "confirm": {"generations": 2, "steps": 3}})
    )
    from_file = resolve_threshold(score_config(micro_model_dir, threshold_file=str(file)))
    assert from_file.cascade == Cascade(Stage(2, 3), 0.7) and from_file.value == 2.0
    # An option overrides its own setting only; the other comes from the file.
    mixed = resolve_threshold(score_config(micro_model_dir, threshold_file=str(file), confirm_steps=1))
    assert mixed.cascade == Cascade(Stage(2, 1), 0.7)
    overridden = resolve_threshold(
        score_config(micro_model_dir, threshold_file=str(file), screen_threshold=0.1)
    )
    assert overridden.cascade.screen_threshold == 0.1


def test_second_stage_option_errors(tmp_path, micro_model_dir):
    with pytest.raises(ConfigError, match="needs a screening threshold: pass --screen-threshold S"):
        resolve_threshold(score_config(micro_model_dir, threshold=1.0, confirm_generations=4))
    with pytest.raises(ConfigError, match="--screen-threshold applies to the second stage only"):
        resolve_threshold(score_config(micro_model_dir, threshold=1.0, screen_threshold=0.5))
    with pytest.raises(ConfigError, match=r"--confirm-steps must be an int in 1\.\.50, got 51"):
        score_config(micro_model_dir, confirm_steps=51)
    with pytest.raises(ConfigError, match="--confirm-generations must be an int >= 1, got 0"):
        score_config(micro_model_dir, confirm_generations=0)
    with pytest.raises(ConfigError, match="--screen-threshold must be a finite number"):
        score_config(micro_model_dir, confirm_generations=2, screen_threshold=float("inf"))
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps({"threshold": 1.0, "confirm": {"generations": 2, "steps": 2}, "screen_threshold": "x"})
    )
    with pytest.raises(ConfigError, match="has screen_threshold 'x'; it must be a finite number"):
        resolve_threshold(score_config(micro_model_dir, threshold_file=str(bad)))


def test_run_fingerprint_changes_only_with_the_second_stage(micro_model_dir):
    base = score_config(micro_model_dir, threshold=1.0)
    before = run_fingerprint(base, "m", resolve_threshold(base))
    two = score_config(
        micro_model_dir, threshold=1.0, confirm_generations=4, confirm_steps=5, screen_threshold=0.5
    )
    on = run_fingerprint(two, "m", resolve_threshold(two))
    other_screen = score_config(
        micro_model_dir, threshold=1.0, confirm_generations=4, confirm_steps=5, screen_threshold=0.6
    )
    assert len({before, on, run_fingerprint(other_screen, "m", resolve_threshold(other_screen))}) == 3


def test_run_fingerprint_without_second_stage_is_the_old_payload(micro_model_dir):
    """The payload of a one-stage audit is byte-for-byte what it was before the second stage existed."""
    import hashlib

    from auditor.pipeline.plan import RESULT_FIELDS

    cfg = score_config(micro_model_dir, threshold=1.0)
    payload = {name: getattr(cfg, name) for name in RESULT_FIELDS}
    payload.update(model="m", threshold=1.0)
    expected = hashlib.sha256(json.dumps(payload, sort_keys=True, default=list).encode()).hexdigest()
    assert run_fingerprint(cfg, "m", resolve_threshold(cfg)) == expected


def test_a_one_stage_file_under_a_two_stage_audit_warns():
    content = {"model_family": "sd", "generations": 1, "steps": 1}
    why = calibration_mismatch(
        content, "sd", "", score_options_of({"generations": 1, "steps": 1}, Cascade(Stage(4, 5), 0.5))
    )
    assert why is not None and "confirm None there" in why
    two = {**content, "confirm": {"generations": 4, "steps": 5}}
    assert (
        calibration_mismatch(
            two, "sd", "", score_options_of({"generations": 1, "steps": 1}, Cascade(Stage(4, 5), 0.5))
        )
        is None
    )
    assert "confirm" in calibration_mismatch(
        two, "sd", "", score_options_of({"generations": 1, "steps": 1}, None)
    )


# 3. The score actor: confirm scores equal a standalone Scorer's, for every family ----------------------------------
def check_actor_confirm_scores(model_dir, score_sigma=None, confirm: Stage | None = None):
    confirm = confirm or Stage(2, 2)
    from auditor import Scorer

    scorer = Scorer.from_pretrained(model_dir, device="cpu", dtype="fp32", score_sigma=score_sigma)
    first = scorer.score(CAPTIONS, seed=3)
    screen = float(np.median(first))
    threshold = float(np.min(first))  # low: the flags follow the screen and the confirm scores
    cfg = score_config(
        model_dir, seed=3, score_sigma=score_sigma, threshold=threshold,
        confirm_generations=confirm.generations, confirm_steps=confirm.steps, screen_threshold=screen,
    )  # fmt: skip
    out = ScoreActor(cfg)(actor_batch(CAPTIONS))
    scores = np.array(out.column(schema.SCORE).to_pylist(), dtype=np.float32)
    confirm_scores = out.column(schema.CONFIRM_SCORE).to_pylist()
    # The first stage is bitwise what a one-stage actor gives.
    plain = ScoreActor(score_config(model_dir, seed=3, score_sigma=score_sigma))(actor_batch(CAPTIONS))
    assert out.column(schema.SCORE).to_pylist() == plain.column(schema.SCORE).to_pylist()
    assert plain.column(schema.CONFIRM_SCORE).null_count == len(CAPTIONS)
    over = scores > screen
    assert 0 < over.sum() < len(CAPTIONS)
    for caption, score, value in zip(CAPTIONS, scores, confirm_scores, strict=True):
        if score > screen:
            alone = scorer.score([caption], generations=confirm.generations, steps=confirm.steps, seed=3)[0]
            assert_scores_close(value, alone, err_msg=caption)
        else:
            assert value is None, caption
    expected_flags = [
        bool(s > screen and c is not None and c > threshold)
        for s, c in zip(scores, confirm_scores, strict=False)
    ]
    assert out.column(schema.FLAGGED).to_pylist() == expected_flags
    # Cost: identical captions are run once, by the first of them.
    screen_rows = out.column(schema.DENOISER_ROWS["screen"]).to_pylist()
    confirm_rows = out.column(schema.DENOISER_ROWS["confirm"]).to_pylist()
    assert screen_rows[3] == 0 and sum(screen_rows) == 7 * scorer.denoiser_rows_per_caption(Stage())
    distinct_over = len({c for c, o in zip(CAPTIONS, over, strict=False) if o})
    assert sum(confirm_rows) == distinct_over * scorer.denoiser_rows_per_caption(confirm)
    return scorer, out


def test_actor_confirm_scores_sd(tiny_model_dir):
    check_actor_confirm_scores(tiny_model_dir)


@pytest.mark.parametrize("family", ["sdxl", "sd3", "pixart-sigma"])
def test_actor_confirm_scores_families(family_model_dirs, family):
    check_actor_confirm_scores(family_model_dirs[family])


def test_actor_confirm_scores_sd3_at_a_fixed_sigma(family_model_dirs):
    scorer, _ = check_actor_confirm_scores(family_model_dirs["sd3"], score_sigma=0.94, confirm=Stage(2, 1))
    assert scorer.denoiser_rows_per_caption(Stage(2, 1)) == 6


def test_scorer_score_cascade_matches_two_scores(tiny_scorer):
    first = tiny_scorer.score(CAPTIONS, seed=1)
    screen = float(np.median(first))
    result = tiny_scorer.score_cascade(
        CAPTIONS, screen_threshold=screen, confirm_generations=2, confirm_steps=2, seed=1
    )
    np.testing.assert_array_equal(result.score, first)
    again = first > screen
    np.testing.assert_array_equal(result.rescored, again)
    expected = tiny_scorer.score(
        [c for c, a in zip(CAPTIONS, again, strict=False) if a], generations=2, steps=2, seed=1
    )
    assert_scores_close(result.confirm_score[again], expected)
    assert result.denoiser_rows == {
        "screen": 7,
        "confirm": len({c for c, a in zip(CAPTIONS, again, strict=False) if a}) * 6,
    }
    with pytest.raises(ConfigError, match="confirm_steps must be an int >= 1"):
        tiny_scorer.score_cascade(CAPTIONS, screen_threshold=screen, confirm_steps=0)


def test_write_stage_counts_both_stages(tmp_path, tiny_model_dir):
    first = ScoreActor(score_config(tiny_model_dir)).scorer.score(CAPTIONS)
    cfg = AuditConfig(
        inputs=("unused",), output=str(tmp_path / "out"), model=str(tiny_model_dir), dtype="fp32", threshold=0.0,
        confirm_generations=2, confirm_steps=2, screen_threshold=float(np.median(first)),
    )  # fmt: skip
    out = ScoreActor(cfg)(actor_batch(CAPTIONS))
    n = out.num_rows
    out = out.append_column(schema.SOURCE, pa.array(["s"] * n)).append_column(
        schema.UNIT, pa.array([0] * n, pa.int32())
    )
    out = out.append_column(schema.ID, pa.array([f"s:{i}" for i in range(n)])).append_column(
        schema.ROW, pa.array(range(n), pa.int64())
    )
    acks = stage_and_acknowledge(out, cfg).to_pylist()
    assert len(acks) == 1
    stages = json.loads(acks[0]["stages"])
    rescored = out.column(schema.CONFIRM_SCORE).to_pylist()
    assert stages["rescored"] == sum(v is not None for v in rescored) > 0
    assert stages["denoiser_rows_screen"] == 7 and stages["denoiser_rows_confirm"] > 0
    assert sum(json.loads(acks[0]["confirm_histogram"]).values()) == stages["rescored"]


# 4. Calibration of both thresholds -------------------------------------------------------------------------------
def test_calibrate_two_stage_meets_the_joint_fpr(tiny_scorer):
    words = [
        "red",
        "green",
        "blue",
        "cat",
        "dog",
        "house",
        "tree",
        "car",
        "boat",
        "sky",
        "sea",
        "hill",
        "lamp",
        "chair",
        "book",
        "cup",
    ]
    rng = np.random.default_rng(0)
    captions = [" ".join(rng.choice(words, size=5)) for _ in range(200)]
    record = calibrate_two_stage(
        tiny_scorer, captions, confirm=Stage(2, 2), fpr=0.01, screen_fpr=0.1, reference="r", model="m"
    )
    assert record["rule"] == "score > screen_threshold and confirm_score > threshold"
    assert record["confirm"] == {"generations": 2, "steps": 2}
    scores = tiny_scorer.score(captions)
    over = scores > record["screen_threshold"]
    assert over.sum() == record["n_rescored"] <= 20 and record["screen_reference_fpr"] == over.mean()
    confirm = tiny_scorer.score(
        [c for c, o in zip(captions, over, strict=False) if o], generations=2, steps=2
    )
    assert (
        (confirm > record["threshold"]).sum() == 2 == round(record["reference_fpr"] * 200)
    )  # floor(0.01 * 200)
    assert sum(record["reference_confirm_score_histogram"]["counts"]) == over.sum()
    with pytest.raises(ConfigError, match=r"--screen-fpr must be in \(--fpr, 1\)"):
        calibrate_two_stage(tiny_scorer, captions, confirm=Stage(2, 2), fpr=0.05, screen_fpr=0.05)


# 5. The command line ----------------------------------------------------------------------------------------------
def test_score_cli_adds_confirm_scores(micro_model_dir, micro_scorer, capsys):
    from auditor.cli import main

    captions = CAPTIONS[:3]
    first = micro_scorer.score(captions)
    screen = float(np.median(first))
    args = ["score", "--model", str(micro_model_dir), "--dtype", "fp32", "--json", *captions]
    assert (
        main(
            [*args, "--confirm-generations", "2", "--confirm-steps", "2", "--screen-threshold", repr(screen)]
        )
        == 0
    )
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["caption"] for r in rows] == captions
    for row, score in zip(rows, first, strict=True):
        if score > screen:
            alone = micro_scorer.score([row["caption"]], generations=2, steps=2)[0]
            assert_scores_close(row["confirm_score"], alone)
        else:
            assert row["confirm_score"] is None
    # Without --screen-threshold every caption gets the second stage; without --confirm-* there is no column.
    assert main([*args, "--confirm-steps", "2"]) == 0
    assert all(json.loads(line)["confirm_score"] is not None for line in capsys.readouterr().out.splitlines())
    assert main(args) == 0
    assert all("confirm_score" not in json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert main([*args, "--screen-threshold", "0.1"]) == 2
    assert "--screen-threshold applies to the second stage only" in capsys.readouterr().err


def test_evaluate_cli_adds_a_cascade_row(tmp_path, micro_model_dir, capsys):
    from auditor.cli import main

    (tmp_path / "pos.txt").write_text("\n".join(CAPTIONS[:4]) + "\n")
    (tmp_path / "neg.txt").write_text(
        "\n".join(CAPTIONS[4:] + ["a blue boat", "a tall tree", "an empty road"]) + "\n"
    )
    args = ["evaluate", "--model", str(micro_model_dir), "--dtype", "fp32", "--positives", str(tmp_path / "pos.txt"),
            "--negatives", str(tmp_path / "neg.txt"), "--generations", "1", "--steps", "1", "--json"]  # fmt: skip
    assert main([*args, "--confirm-generations", "2", "--confirm-steps", "2", "--screen-fpr", "0.5"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 2 and "confirm_generations" not in rows[0]
    cascade = rows[1]
    assert cascade["confirm_generations"] == 2 and cascade["confirm_steps"] == 2
    assert 0 < cascade["rescored_share"] <= 1
    np.testing.assert_allclose(
        cascade["denoiser_rows_per_caption"], 1 + cascade["rescored_share"] * 6, rtol=1e-3
    )
    assert main([*args, "--screen-fpr", "0.5"]) == 2
    assert "--screen-fpr and --screen-threshold apply to the second stage only" in capsys.readouterr().err


def test_calibrate_cli_option_errors(tmp_path, micro_model_dir, capsys):
    from auditor.cli import main

    (tmp_path / "ref.txt").write_text("\n".join(CAPTIONS) + "\n")
    args = ["calibrate", "--model", str(micro_model_dir), "--reference", str(tmp_path / "ref.txt"),
            "--out", str(tmp_path / "t.json"), "--fpr", "0.1"]  # fmt: skip
    assert main([*args, "--screen-fpr", "0.2"]) == 2
    assert "apply to the second stage only" in capsys.readouterr().err
    assert main([*args, "--confirm-steps", "2", "--screen-fpr", "0.05"]) == 2
    assert r"--screen-fpr must be in (--fpr, 1) = (0.1, 1), got 0.05" in capsys.readouterr().err
    # An explicit screening threshold instead of --screen-fpr.
    assert main([*args, "--confirm-steps", "2", "--screen-threshold", "-1"]) == 0
    record = json.loads((tmp_path / "t.json").read_text())
    assert record["screen_threshold"] == -1.0 and record["n_rescored"] == len(CAPTIONS)
    assert record["screen_fpr"] is None and record["confirm"] == {"generations": 1, "steps": 2}
