"""Detection metrics of the paper's protocol (AUC, TPR@1%FPR, best balanced accuracy) and FPR calibration.

numpy and scikit-learn only; no torch, no ray.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from auditor.errors import InputDataError


@dataclass(frozen=True)
class DetectionMetrics:
    """Memorized = positive. tpr_at_fpr: TPR at the last ROC point with FPR strictly below `fpr`."""

    auc: float
    tpr_at_fpr: float
    fpr: float
    accuracy: float
    n_positive: int
    n_negative: int
    positive_mean: float
    negative_mean: float

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def detection_metrics(positive_scores: Sequence[float], negative_scores: Sequence[float], fpr: float = 0.01):
    """ROC metrics as in the paper's notebook (examples/det_mem_viz.ipynb, research/paper.md section 1.3).

    auc = sklearn.metrics.auc(roc_curve); tpr_at_fpr = tpr[where(fpr_curve < fpr)[-1]] (strict; with 200 negatives
    and fpr=0.01 that allows 1 false positive); accuracy = max over thresholds of 1 - (FPR + 1 - TPR)/2.
    """
    from sklearn.metrics import auc, roc_curve

    positive = np.asarray(positive_scores, dtype=np.float64)
    negative = np.asarray(negative_scores, dtype=np.float64)
    if len(positive) == 0 or len(negative) == 0:
        raise InputDataError(
            f"detection metrics need positive and negative scores, got {len(positive)} positive and "
            f"{len(negative)} negative; pass both labelled sets."
        )
    if not (np.isfinite(positive).all() and np.isfinite(negative).all()):
        raise InputDataError(
            "scores contain NaN or inf; drop the rows whose status is not ok before evaluating."
        )
    labels = np.concatenate([np.ones(len(positive)), np.zeros(len(negative))])
    scores = np.concatenate([positive, negative])
    fpr_curve, tpr_curve, _ = roc_curve(labels, scores)
    below = np.where(fpr_curve < fpr)[0]
    return DetectionMetrics(
        auc=float(auc(fpr_curve, tpr_curve)),
        tpr_at_fpr=float(tpr_curve[below[-1]]) if len(below) else 0.0,
        fpr=fpr,
        accuracy=float(np.max(1 - (fpr_curve + (1 - tpr_curve)) / 2)),
        n_positive=len(positive),
        n_negative=len(negative),
        positive_mean=float(positive.mean()),
        negative_mean=float(negative.mean()),
    )


def threshold_at_fpr(reference_scores: Sequence[float], fpr: float) -> float:
    """The score threshold whose false-positive rate on `reference_scores` (believed clean) is at most `fpr`.

    Convention: a caption is flagged when score > threshold. threshold = the (floor(fpr * N) + 1)-th largest
    reference score, so at most floor(fpr * N) reference captions score above it (ties can only lower the count).
    With fpr * N < 1 that is the maximum reference score: nothing in the reference set is flagged.
    """
    scores = np.asarray(reference_scores, dtype=np.float64)
    if not 0 <= fpr < 1:
        raise InputDataError(f"fpr must be in [0, 1), got {fpr}; e.g. --fpr 0.01 for 1%.")
    if len(scores) == 0:
        raise InputDataError("the reference set has no captions; pass a file with clean captions.")
    if not np.isfinite(scores).all():
        raise InputDataError("reference scores contain NaN or inf; drop rows that failed to score.")
    allowed = math.floor(fpr * len(scores) + 1e-9)
    return float(np.sort(scores)[::-1][allowed])


def flagged_fraction(scores: Sequence[float], threshold: float) -> float:
    """Fraction of scores > threshold (the flagging rule of calibrate and audit)."""
    values = np.asarray(scores, dtype=np.float64)
    return float((values > threshold).mean()) if len(values) else 0.0
