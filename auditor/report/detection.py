"""Detection quality of a model: score labelled captions, tabulate AUC and TPR@FPR per (steps, generations).

Takes a loaded Scorer (duck-typed: `.score(captions, generations, steps, seed)`); imports no torch itself.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from auditor.report.metrics import DetectionMetrics, detection_metrics

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluationRow:
    """Metrics of one negative set at one (steps, generations) setting. seconds: scoring time of both sets."""

    negatives: str
    steps: int
    generations: int
    metrics: DetectionMetrics
    seconds: float

    def to_dict(self) -> dict[str, object]:
        return {
            "negatives": self.negatives,
            "steps": self.steps,
            "generations": self.generations,
            **self.metrics.to_dict(),
            "seconds": round(self.seconds, 2),
        }


def evaluate_detection(
    scorer,
    positives: Sequence[str],
    negative_sets: Mapping[str, Sequence[str]],
    *,
    generations: Sequence[int] = (1, 4),
    steps: Sequence[int] = (1, 5),
    seed: int = 0,
    fpr: float = 0.01,
) -> list[EvaluationRow]:
    """Memorized `positives` against each named negative set, for every steps x generations combination.

    Every caption shares the same x_T for a given (seed, generation), as in the paper's paired protocol.
    """
    rows: list[EvaluationRow] = []
    for n_steps in steps:
        for n_gen in generations:
            started = time.perf_counter()
            positive_scores = scorer.score(list(positives), generations=n_gen, steps=n_steps, seed=seed)
            positive_seconds = time.perf_counter() - started
            for name, negatives in negative_sets.items():
                started = time.perf_counter()
                negative_scores = scorer.score(list(negatives), generations=n_gen, steps=n_steps, seed=seed)
                metrics = detection_metrics(positive_scores, negative_scores, fpr=fpr)
                row = EvaluationRow(
                    name, n_steps, n_gen, metrics, positive_seconds + time.perf_counter() - started
                )
                logger.info(
                    "steps=%d generations=%d vs %s: AUC %.4f TPR@%g%%FPR %.3f",
                    n_steps,
                    n_gen,
                    name,
                    metrics.auc,
                    100 * fpr,
                    metrics.tpr_at_fpr,
                )
                rows.append(row)
    return rows


def format_evaluation_table(rows: Sequence[EvaluationRow]) -> str:
    """A fixed-width text table (also valid GitHub markdown) of evaluation rows."""
    if not rows:
        return "(no rows)"
    fpr_label = f"TPR@{100 * rows[0].metrics.fpr:g}%FPR"
    header = (
        f"| negatives | steps | generations | AUC | {fpr_label} | best acc | mean score mem | mean score neg "
        f"| n mem / n neg | seconds |"
    )
    lines = [header, "|" + "---|" * 10]
    for row in rows:
        m = row.metrics
        lines.append(
            f"| {row.negatives} | {row.steps} | {row.generations} | {m.auc:.4f} | {m.tpr_at_fpr:.3f} | {m.accuracy:.3f} "
            f"| {m.positive_mean:.4f} | {m.negative_mean:.4f} | {m.n_positive} / {m.n_negative} | {row.seconds:.1f} |"
        )
    return "\n".join(lines)
