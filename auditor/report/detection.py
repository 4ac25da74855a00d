"""Detection quality of a model: score labelled captions, tabulate AUC and TPR@FPR per (steps, generations).

Takes a loaded Scorer (duck-typed: `.score(captions, generations, steps, seed)`); imports no torch itself.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from auditor.report.metrics import DetectionMetrics, detection_metrics, threshold_at_fpr
from auditor.scoring.cascade import Stage, rank_scores

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluationRow:
    """Metrics of one negative set at one (steps, generations) setting. seconds: scoring time of both sets."""

    negatives: str
    steps: int
    generations: int
    metrics: DetectionMetrics
    seconds: float
    # A two-stage row: the confirm stage, the screening threshold, the share of both sets re-scored and the
    # denoiser rows per caption (None on one-stage rows).
    confirm: Stage | None = None
    screen_threshold: float | None = None
    rescored_share: float | None = None
    denoiser_rows_per_caption: float | None = None

    def to_dict(self) -> dict[str, object]:
        row: dict[str, object] = {
            "negatives": self.negatives,
            "steps": self.steps,
            "generations": self.generations,
            **self.metrics.to_dict(),
            "seconds": round(self.seconds, 2),
        }
        if self.confirm is not None:
            row.update(
                confirm_generations=self.confirm.generations,
                confirm_steps=self.confirm.steps,
                screen_threshold=self.screen_threshold,
                rescored_share=self.rescored_share,
                denoiser_rows_per_caption=self.denoiser_rows_per_caption,
            )
        return row

    @property
    def setting(self) -> tuple[str, str]:
        """(steps, generations) as the table shows them: "1->5" for a two-stage row."""
        if self.confirm is None:
            return str(self.steps), str(self.generations)
        return f"{self.steps}->{self.confirm.steps}", f"{self.generations}->{self.confirm.generations}"


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


def evaluate_cascade(
    scorer,
    positives: Sequence[str],
    negative_sets: Mapping[str, Sequence[str]],
    *,
    screen: Stage,
    confirm: Stage,
    screen_fpr: float | None = None,
    screen_threshold: float | None = None,
    seed: int = 0,
    fpr: float = 0.01,
) -> list[EvaluationRow]:
    """The two-stage score against each negative set: the screening threshold S at `screen_fpr` of that set's
    screening scores (or `screen_threshold`), the captions over S scored again with `confirm`, and the rows ranked
    as the cascade decides them (`rank_scores`): AUC and TPR@FPR of what a two-stage audit would flag.
    """
    started = time.perf_counter()
    positive_scores = scorer.score(
        list(positives), generations=screen.generations, steps=screen.steps, seed=seed
    )
    positive_seconds = time.perf_counter() - started
    rows: list[EvaluationRow] = []
    for name, negatives in negative_sets.items():
        started = time.perf_counter()
        negative_scores = scorer.score(
            list(negatives), generations=screen.generations, steps=screen.steps, seed=seed
        )
        threshold = (
            threshold_at_fpr(negative_scores, screen_fpr) if screen_threshold is None else screen_threshold
        )
        captions = [*positives, *negatives]
        scores = np.concatenate([positive_scores, negative_scores])
        over = scores > threshold
        confirm_scores = np.full(len(scores), np.nan)
        if over.any():
            chosen = [caption for caption, again in zip(captions, over, strict=True) if again]
            confirm_scores[over] = scorer.score(
                chosen, generations=confirm.generations, steps=confirm.steps, seed=seed
            )
        ranks = rank_scores(scores, confirm_scores, threshold)
        metrics = detection_metrics(ranks[: len(positives)], ranks[len(positives) :], fpr=fpr)
        # The means are of the screening scores, as on one-stage rows; the ROC is of the cascade's ranking.
        metrics = dataclasses.replace(
            metrics, positive_mean=float(positive_scores.mean()), negative_mean=float(negative_scores.mean())
        )
        share = float(over.mean())
        cost = scorer.denoiser_rows_per_caption(screen) + share * scorer.denoiser_rows_per_caption(confirm)
        rows.append(
            EvaluationRow(
                name,
                screen.steps,
                screen.generations,
                metrics,
                positive_seconds + time.perf_counter() - started,
                confirm=confirm,
                screen_threshold=float(threshold),
                rescored_share=share,
                denoiser_rows_per_caption=round(cost, 4),
            )  # fmt: skip
        )
        logger.info(
            "cascade %s -> %s vs %s: AUC %.4f TPR@%g%%FPR %.3f, %.1f%% re-scored",
            screen, confirm, name, metrics.auc, 100 * fpr, metrics.tpr_at_fpr, 100 * share,
        )  # fmt: skip
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
        steps, generations = row.setting
        lines.append(
            f"| {row.negatives} | {steps} | {generations} | {m.auc:.4f} | {m.tpr_at_fpr:.3f} | {m.accuracy:.3f} "
            f"| {m.positive_mean:.4f} | {m.negative_mean:.4f} | {m.n_positive} / {m.n_negative} | {row.seconds:.1f} |"
        )
    return "\n".join(lines)
