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
from auditor.report.metrics import flagged_fraction, threshold_at_fpr

logger = logging.getLogger(__name__)

FLAG_RULE = "score > threshold"
# Score options that change a score's scale: a threshold calibrated with other values does not apply.
SCALE_FIELDS = ("generations", "steps", "score_sigma")


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
    calibrated_with = {"score_sigma": None} | {k: content[k] for k in SCALE_FIELDS if k in content}
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
    threshold = threshold_at_fpr(scores, fpr)
    record = {
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
        "model": model,
        "model_fingerprint": scorer.fingerprint,
        "model_family": scorer.family_name,
        "model_variant": getattr(scorer.components, "variant", None),
        "generations": generations,
        "steps": steps,
        "score_sigma": scorer.family.score_sigma,
        "seed": seed,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - started, 2),
    }
    logger.info(
        "calibrated threshold %.6f at fpr %g on %d reference captions (reference fpr %.4f)",
        threshold,
        fpr,
        len(scores),
        record["reference_fpr"],
    )
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
