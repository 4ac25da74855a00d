"""Detection metrics and FPR calibration: the paper's conventions, on hand-made scores."""

from __future__ import annotations

import numpy as np
import pytest

from auditor.errors import InputDataError
from auditor.report.detection import EvaluationRow, format_evaluation_table
from auditor.report.metrics import detection_metrics, flagged_fraction, threshold_at_fpr


def test_perfect_separation():
    metrics = detection_metrics([5.0, 6.0, 7.0], [1.0, 2.0, 3.0])
    assert metrics.auc == 1.0
    assert metrics.tpr_at_fpr == 1.0
    assert metrics.accuracy == 1.0
    assert (metrics.n_positive, metrics.n_negative) == (3, 3)


def test_auc_matches_pair_counting():
    rng = np.random.default_rng(0)
    pos, neg = rng.normal(1, 1, 50), rng.normal(0, 1, 80)
    pairs = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    assert detection_metrics(pos, neg).auc == pytest.approx(pairs)


def test_tpr_at_fpr_is_strict():
    # 100 negatives 0..99; positives just above negative 98 and 99 levels. FPR must stay strictly < 1%: with 100
    # negatives no false positive is allowed, so only positives above every negative count.
    negatives = np.arange(100, dtype=float)
    positives = np.array([99.5, 100.5, 101.5, 98.5])
    metrics = detection_metrics(positives, negatives, fpr=0.01)
    assert metrics.tpr_at_fpr == pytest.approx(0.75)
    # With 101 negatives one false positive (1/101 < 1%) is allowed.
    metrics = detection_metrics(positives, np.arange(101, dtype=float) - 1, fpr=0.01)
    assert metrics.tpr_at_fpr == pytest.approx(1.0)


def test_random_scores_sit_near_half():
    rng = np.random.default_rng(1)
    metrics = detection_metrics(rng.normal(size=2000), rng.normal(size=2000))
    assert 0.45 < metrics.auc < 0.55


def test_metrics_reject_empty_and_nan():
    with pytest.raises(InputDataError, match="need positive and negative scores"):
        detection_metrics([], [1.0])
    with pytest.raises(InputDataError, match="NaN or inf"):
        detection_metrics([float("nan")], [1.0])


@pytest.mark.parametrize("n", [10, 99, 100, 101, 250, 1000])
@pytest.mark.parametrize("fpr", [0.0, 0.01, 0.05, 0.2])
def test_threshold_at_fpr_bounds_the_reference_fpr(n, fpr):
    scores = np.random.default_rng(n).normal(size=n)
    threshold = threshold_at_fpr(scores, fpr)
    flagged = flagged_fraction(scores, threshold)
    assert flagged <= fpr + 1e-12
    # And it is the tightest such threshold: one rank lower would exceed the allowed count.
    allowed = int(np.floor(fpr * n + 1e-9))
    assert (scores > threshold).sum() == allowed
    assert threshold in scores


def test_threshold_with_ties_never_exceeds_fpr():
    scores = [1.0] * 50 + [2.0] * 50
    threshold = threshold_at_fpr(scores, 0.1)
    assert threshold == 2.0
    assert flagged_fraction(scores, threshold) == 0.0


def test_threshold_small_reference_is_the_maximum():
    assert threshold_at_fpr([0.1, 0.5, 0.3], 0.01) == 0.5


def test_threshold_rejects_bad_input():
    with pytest.raises(InputDataError, match=r"fpr must be in \[0, 1\)"):
        threshold_at_fpr([1.0], 1.0)
    with pytest.raises(InputDataError, match="no captions"):
        threshold_at_fpr([], 0.01)
    with pytest.raises(InputDataError, match="NaN or inf"):
        threshold_at_fpr([float("inf")], 0.01)


def test_evaluation_table_lists_every_row():
    metrics = detection_metrics([3.0, 4.0], [1.0, 2.0])
    rows = [EvaluationRow("held-out", 1, 1, metrics, 0.5), EvaluationRow("seen-once", 5, 4, metrics, 1.5)]
    table = format_evaluation_table(rows)
    assert "TPR@1%FPR" in table
    assert "| held-out | 1 | 1 | 1.0000 |" in table
    assert "| seen-once | 5 | 4 |" in table
    assert rows[0].to_dict()["auc"] == 1.0
