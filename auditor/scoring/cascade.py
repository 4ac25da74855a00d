"""The two-stage audit as a plan of stages: a cheap screening score for every caption, and a confirming score (more
generations and sampler steps) only for the captions whose screening score is over the screening threshold.

numpy only, no torch: the pipeline's write stage, the report and calibration read these definitions, and the score
actor and `Scorer.score_cascade` run them through a Scorer (duck-typed: `score_tokenized`,
`denoiser_rows_per_caption`), so every model family gets the second stage through the family interface.

Flag rule with the second stage: flagged = score > screen_threshold and confirm_score > threshold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from auditor.errors import ConfigError
from auditor.scoring.tokens import TokenizedCaptions

SCREEN = "screen"
CONFIRM = "confirm"
STAGES = (SCREEN, CONFIRM)
# Screening FPR of `auditor calibrate --confirm-*` when --screen-fpr is not given: the share of clean captions the
# second stage re-scores. BENCHMARKS.md §3c measured it on the shipped toy; README "Two-stage audit" says why.
DEFAULT_SCREEN_FPR = 0.05
FLAG_RULE_TWO_STAGE = "score > screen_threshold and confirm_score > threshold"


def check_screen_fpr(fpr: float, screen_fpr: float | None) -> None:
    """A screening FPR calibration can use: in (fpr, 1), so the screen passes more clean captions than the final
    FPR allows (at or under it, the second stage decides nothing)."""
    if screen_fpr is None or not fpr < screen_fpr < 1:
        raise ConfigError(
            f"--screen-fpr must be in (--fpr, 1) = ({fpr:g}, 1), got {screen_fpr!r}: the screen must pass more "
            "clean captions than the final FPR allows, or the second stage decides nothing; e.g. --screen-fpr 0.05."
        )


@dataclass(frozen=True)
class Stage:
    """One scoring setting: `generations` initial noises, each followed for `steps` sampler steps."""

    generations: int = 1
    steps: int = 1

    def to_dict(self) -> dict[str, int]:
        return {"generations": self.generations, "steps": self.steps}

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Stage:
        """A stage from a threshold file's {"generations": N, "steps": K}; ConfigError naming `where` otherwise."""
        if not isinstance(data, dict):
            raise ConfigError(
                f"{where} must be an object {{'generations': N, 'steps': K}}, got {data!r}; rewrite the file "
                "with `auditor calibrate --confirm-generations N --confirm-steps K`."
            )
        values = {name: data.get(name, 1) for name in ("generations", "steps")}
        for name, value in values.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{where}.{name} must be an int >= 1, got {value!r}.")
        return cls(**values)


def denoiser_rows_per_caption(stage: Stage, lead_in_steps: int = 0) -> int:
    """Denoiser rows one caption costs in `stage`: per generation, one conditional row at the first step (the
    unconditional one is shared by every caption on that x_T) and a CFG pair [uncond; cond] at every later step,
    the family's lead-in steps (a fixed-sigma score's approach step) included.
    """
    return stage.generations * (1 + 2 * (lead_in_steps + stage.steps - 1))


@dataclass(frozen=True)
class Cascade:
    """The second stage: rows whose screening score is over `screen_threshold` are scored again with `confirm`."""

    confirm: Stage
    screen_threshold: float

    def __post_init__(self) -> None:
        # -inf (every scored row goes on) is allowed; NaN and +inf decide nothing.
        if isinstance(self.screen_threshold, bool) or not self.screen_threshold < math.inf:
            raise ConfigError(
                f"the screening threshold must be a number below inf, got {self.screen_threshold!r}."
            )

    def rescore(self, scores: np.ndarray) -> np.ndarray:
        """(B,) bool: rows to score again (a NaN score, a row without one, never is)."""
        values = np.asarray(scores, dtype=np.float64)
        return np.isfinite(values) & (values > self.screen_threshold)

    def to_dict(self) -> dict[str, Any]:
        return {**self.confirm.to_dict(), "screen_threshold": self.screen_threshold}


def flag_rows(
    scores: np.ndarray,
    threshold: float | None,
    cascade: Cascade | None = None,
    confirm_scores: np.ndarray | None = None,
) -> np.ndarray:
    """(B,) bool. One stage: score > threshold. Two: score > screen_threshold and confirm_score > threshold.
    NaN scores (rows without one) are never flagged; threshold None flags nothing."""
    scores = np.asarray(scores, dtype=np.float64)
    if threshold is None:
        return np.zeros(len(scores), dtype=bool)
    if cascade is None:
        return np.isfinite(scores) & (scores > threshold)
    if confirm_scores is None:
        raise ValueError("a two-stage flag needs the confirm scores")
    confirm = np.asarray(confirm_scores, dtype=np.float64)
    return cascade.rescore(scores) & np.isfinite(confirm) & (confirm > threshold)


@dataclass
class CascadeScores:
    """score: (B,) float32 screening scores; confirm_score: (B,) float32, NaN where the row was not re-scored.
    denoiser_rows: the rows each stage ran ({"screen": n, "confirm": n}), identical captions counted once."""

    score: np.ndarray
    confirm_score: np.ndarray
    denoiser_rows: dict[str, int] = field(default_factory=dict)

    @property
    def rescored(self) -> np.ndarray:
        return np.isfinite(self.confirm_score)


def distinct_rows(tokens: TokenizedCaptions) -> int:
    """Captions the Scorer really runs for these tokens: it scores identical token ids once."""
    return len(np.unique(tokens.input_ids, axis=0)) if len(tokens) else 0


def score_stages(
    scorer: Any, tokens: TokenizedCaptions, screen: Stage, cascade: Cascade | None, seed: int
) -> CascadeScores:
    """Both stages on already tokenized captions: the screening score of every row, then the confirm score of the
    rows over the screening threshold, each exactly what `scorer.score_tokenized` gives them alone."""
    scores = scorer.score_tokenized(tokens, generations=screen.generations, steps=screen.steps, seed=seed)
    rows = {SCREEN: distinct_rows(tokens) * scorer.denoiser_rows_per_caption(screen)}
    confirm = np.full(len(scores), np.nan, dtype=np.float32)
    if cascade is not None:
        again = cascade.rescore(scores)
        subset = tokens.take(again)
        if again.any():
            confirm[again] = scorer.score_tokenized(
                subset, generations=cascade.confirm.generations, steps=cascade.confirm.steps, seed=seed
            )
        rows[CONFIRM] = distinct_rows(subset) * scorer.denoiser_rows_per_caption(cascade.confirm)
    return CascadeScores(scores, confirm, rows)


def calibrate_confirm_threshold(confirm_scores: np.ndarray, n_reference: int, fpr: float) -> float:
    """The final threshold T of a two-stage calibration: at most floor(fpr * N) of the N reference captions have
    score > S and confirm_score > T. `confirm_scores` are those of the reference rows over S (the others are never
    flagged). When no more rows than that are over S, T is their lowest confirm score (all others flagged).
    """
    values = np.sort(np.asarray(confirm_scores, dtype=np.float64))[::-1]
    if len(values) == 0:
        raise ConfigError(
            "no reference caption scored over the screening threshold, so the confirm threshold cannot be "
            "calibrated; raise --screen-fpr or pass a larger --reference set."
        )
    if not np.isfinite(values).all():
        raise ConfigError("confirm scores contain NaN or inf; drop rows that failed to score.")
    allowed = math.floor(fpr * n_reference + 1e-9)
    return float(values[min(allowed, len(values) - 1)])


def rank_scores(scores: np.ndarray, confirm_scores: np.ndarray, screen_threshold: float) -> np.ndarray:
    """One score per row that orders rows as the cascade decides them, for ROC metrics: a row over S ranks by its
    confirm score above every row the screen cleared, which rank by their screening score among themselves.
    Returned as ranks (float64, 0 = lowest), since the two scales do not mix."""
    scores = np.asarray(scores, dtype=np.float64)
    confirm = np.asarray(confirm_scores, dtype=np.float64)
    over = np.isfinite(confirm) & (scores > screen_threshold)
    key = np.where(over, confirm, scores)
    order = np.lexsort((key, over))  # primary: over S; secondary: the score that decides
    ranks = np.empty(len(scores), dtype=np.float64)
    ranks[order] = np.arange(len(scores), dtype=np.float64)
    return ranks
