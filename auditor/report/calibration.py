"""Threshold calibration: the score above which a caption is flagged, chosen for a target FPR on clean captions.

The record written here is what `auditor audit --threshold-file` reads (key "threshold"). No torch import.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from auditor import histogram
from auditor.redact import redact_uri
from auditor.report.metrics import flagged_fraction, threshold_at_fpr
from auditor.scoring.cascade import FLAG_RULE_TWO_STAGE, Stage, calibrate_confirm_threshold, check_screen_fpr

logger = logging.getLogger(__name__)

FLAG_RULE = "score > threshold"
# Score options that change a score's scale: a threshold calibrated with other values does not apply.
SCALE_FIELDS = ("generations", "steps", "score_sigma")
# The second stage's settings ({"generations": N, "steps": K}, None without one), compared like SCALE_FIELDS.
CONFIRM_FIELD = "confirm"


def score_options_of(config: dict[str, Any], cascade: Any = None) -> dict[str, Any]:
    """What calibration_mismatch compares, from a config's JSON and the resolved second stage (a Cascade or its
    to_dict(), None for one stage)."""
    options = {name: config[name] for name in SCALE_FIELDS if name in config}
    if isinstance(cascade, dict):
        options[CONFIRM_FIELD] = {k: cascade[k] for k in ("generations", "steps") if k in cascade}
    else:
        options[CONFIRM_FIELD] = None if cascade is None else cascade.confirm.to_dict()
    return options


def calibration_mismatch(
    content: dict[str, Any], family: str, model_fingerprint: str, score_options: dict[str, Any] | None = None
) -> str | None:
    """Why a threshold file's record (`content`) does not fit this audit, as the end of "the threshold ...", or
    None: another model family, another model, or other SCALE_FIELDS (score_options: name -> this audit's value).
    """
    calibrated_on = content.get("model_fingerprint")
    # A file written before families existed was calibrated on an SD model; before score_sigma, at sigma = 1.
    calibrated_family = content.get("model_family", "sd" if calibrated_on else None)
    if calibrated_family is not None and family and calibrated_family != family:
        return (
            f"was calibrated on a {calibrated_family} model, this audit runs a {family} model: thresholds never "
            "transfer between families; recalibrate with `auditor calibrate` on this model."
        )
    if calibrated_on is not None and model_fingerprint and calibrated_on != model_fingerprint:
        return (
            f"was calibrated on another model (fingerprint {str(calibrated_on)[:12]}..., this one "
            f"{model_fingerprint[:12]}...): thresholds are per model; recalibrate with `auditor calibrate` on it."
        )
    calibrated_with = {"score_sigma": None, CONFIRM_FIELD: None} | {
        k: content[k] for k in (*SCALE_FIELDS, CONFIRM_FIELD) if k in content
    }
    differ = [
        f"{name} {calibrated_with[name]} there, {value} here"
        for name, value in (score_options or {}).items()
        if name in calibrated_with and calibrated_with[name] != value
    ]
    if differ:
        return (
            f"was calibrated with other score options ({', '.join(differ)}): the scores' scale differs; "
            "recalibrate with `auditor calibrate` and the same options."
        )
    return None


def calibrate_threshold(
    scorer,
    reference_captions: Sequence[str],
    *,
    fpr: float = 0.01,
    generations: int = 1,
    steps: int = 1,
    seed: int = 0,
    reference: str = "",
    model: str = "",
) -> dict[str, Any]:
    """Score the clean `reference_captions` and return the calibration record (a JSON-ready dict).

    threshold = the (floor(fpr * N) + 1)-th largest reference score (`threshold_at_fpr`); flagged means
    score > threshold, so the reference FPR ("reference_fpr") is at most `fpr`.
    """
    started = time.perf_counter()
    scores = scorer.score(list(reference_captions), generations=generations, steps=steps, seed=seed)
    record = threshold_record(
        scorer,
        scores,
        fpr=fpr,
        generations=generations,
        steps=steps,
        seed=seed,
        reference=reference,
        model=model,
    )
    record["seconds"] = round(time.perf_counter() - started, 2)
    logger.info(
        "calibrated threshold %.6f at fpr %g on %d reference captions (reference fpr %.4f)",
        record["threshold"],
        fpr,
        len(scores),
        record["reference_fpr"],
    )
    return record


def threshold_record(
    scorer,
    scores: np.ndarray,
    *,
    fpr: float,
    generations: int,
    steps: int,
    seed: int,
    reference: str,
    model: str,
) -> dict[str, Any]:
    """The one-stage calibration record of reference `scores` at `fpr` (no "seconds")."""
    threshold = threshold_at_fpr(scores, fpr)
    return {
        "threshold": threshold,
        "fpr": fpr,
        "method": "calibrate",
        "rule": FLAG_RULE,
        "quantile": "threshold = (floor(fpr*N)+1)-th largest reference score",
        "reference": reference,
        "n_reference": len(scores),
        "reference_fpr": flagged_fraction(scores, threshold),
        "reference_score_quantiles": {
            q: float(np.quantile(scores, float(q))) for q in ("0.5", "0.9", "0.99")
        },
        # The reference distribution in the audit histogram's bins, drawn beside the audit's in the report.
        "reference_score_histogram": reference_histogram(scores),
        "model": redact_uri(str(model)),  # the file is shared; a model URI may carry credentials
        "model_fingerprint": scorer.fingerprint,
        "model_family": scorer.family_name,
        "model_variant": getattr(scorer.components, "variant", None),
        "generations": generations,
        "steps": steps,
        "score_sigma": scorer.family.score_sigma,
        "seed": seed,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def calibrate_two_stage(
    scorer,
    reference_captions: Sequence[str],
    *,
    confirm: Stage,
    fpr: float = 0.01,
    screen_fpr: float | None = None,
    screen_threshold: float | None = None,
    generations: int = 1,
    steps: int = 1,
    seed: int = 0,
    reference: str = "",
    model: str = "",
) -> dict[str, Any]:
    """Both thresholds of a two-stage audit on clean `reference_captions`: the screening threshold S at
    `screen_fpr` of the first stage's scores (or `screen_threshold` as given), then the final threshold T on the
    confirm scores of the captions over S, so that at most floor(fpr * N) reference captions have score > S and
    confirm_score > T (the joint FPR). The record is the one-stage record with T as "threshold", plus S, the
    confirm settings, the measured FPRs and the confirm scores' histogram.
    """
    if screen_threshold is None:
        check_screen_fpr(fpr, screen_fpr)
    started = time.perf_counter()
    captions = list(reference_captions)
    scores = scorer.score(captions, generations=generations, steps=steps, seed=seed)
    record = threshold_record(
        scorer, scores, fpr=screen_fpr if screen_threshold is None else fpr,
        generations=generations, steps=steps, seed=seed, reference=reference, model=model,
    )  # fmt: skip
    screen = float(record["threshold"]) if screen_threshold is None else float(screen_threshold)
    over = [caption for caption, score in zip(captions, scores, strict=True) if score > screen]
    confirm_scores = np.asarray(
        scorer.score(over, generations=confirm.generations, steps=confirm.steps, seed=seed) if over else [],
        dtype=np.float64,
    )
    threshold = calibrate_confirm_threshold(confirm_scores, len(captions), fpr)
    flagged = int((confirm_scores > threshold).sum())
    record.update(
        {
            "threshold": threshold,
            "fpr": fpr,
            "rule": FLAG_RULE_TWO_STAGE,
            "quantile": "screen_threshold = (floor(screen_fpr*N)+1)-th largest reference score; threshold = the "
            "(floor(fpr*N)+1)-th largest confirm score of the reference captions over screen_threshold",
            "reference_fpr": flagged / len(captions),
            "screen_threshold": screen,
            "screen_fpr": screen_fpr if screen_threshold is None else None,
            "screen_reference_fpr": len(over) / len(captions),
            "n_rescored": len(over),
            "confirm": confirm.to_dict(),
            "reference_confirm_score_histogram": reference_histogram(confirm_scores),
            "seconds": round(time.perf_counter() - started, 2),
        }
    )
    logger.info(
        "two-stage calibration: screen threshold %.6f (%d of %d reference captions over it), confirm threshold "
        "%.6f (joint reference fpr %.4f, target %g)",
        screen, len(over), len(captions), threshold, record["reference_fpr"], fpr,
    )  # fmt: skip
    return record


def reference_histogram(scores: Sequence[float] | np.ndarray) -> dict[str, Any]:
    """Counts of the reference scores in `auditor.histogram` bins, with the bin parameters they were made with."""
    return {
        "counts": histogram.count_scores(scores),
        "low": histogram.LOW,
        "high": histogram.HIGH,
        "bins_per_decade": histogram.BINS_PER_DECADE,
    }


def write_threshold_file(record: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return path
