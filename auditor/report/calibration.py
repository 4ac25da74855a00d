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
        "generations": generations,
        "steps": steps,
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
