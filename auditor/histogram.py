"""Fixed-bin score histograms: counted per work unit on the workers, merged by addition anywhere. numpy only.

Every audit uses the same log-spaced bin edges, so histograms of units, runs and different audits add up and
compare bin by bin without loading a single score. Scores of Stable Diffusion models land between ~0.05 and ~20;
the range below covers them with 24 bins per decade (a bin is ~10% wide) and keeps the tails in two extra bins.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

LOW = 1e-3
HIGH = 1e3
BINS_PER_DECADE = 24
# Inner edges, log-spaced from LOW to HIGH. Counts have len(EDGES) + 1 entries: [< LOW, inner bins..., >= HIGH].
EDGES: np.ndarray = np.logspace(
    np.log10(LOW), np.log10(HIGH), int(round(np.log10(HIGH / LOW))) * BINS_PER_DECADE + 1
)
N_COUNTS = len(EDGES) + 1


def count_scores(scores: np.ndarray | Sequence[float]) -> list[int]:
    """Counts of finite scores per bin (NaN, i.e. rows without a score, are left out). Bin i+1 is [EDGES[i], EDGES[i+1])."""
    values = np.asarray(scores, dtype=np.float64)
    values = values[np.isfinite(values)]
    index = np.searchsorted(EDGES, values, side="right")
    return np.bincount(index, minlength=N_COUNTS).astype(np.int64).tolist()


def merge_counts(histograms: Iterable[Sequence[int] | None]) -> list[int]:
    """Sum of histograms (None entries are skipped). Raises ValueError on a histogram of another binning."""
    total = np.zeros(N_COUNTS, dtype=np.int64)
    for counts in histograms:
        if counts is None:
            continue
        if len(counts) != N_COUNTS:
            raise ValueError(
                f"histogram has {len(counts)} counts, expected {N_COUNTS}: it was made with other bin edges"
            )
        total += np.asarray(counts, dtype=np.int64)
    return total.tolist()


def bin_bounds() -> list[tuple[float, float]]:
    """(low, high) of every count's bin; the outer two bins are (0, LOW) and (HIGH, inf)."""
    edges = [0.0, *EDGES.tolist(), float("inf")]
    return list(zip(edges[:-1], edges[1:], strict=True))


def count_above(counts: Sequence[int], threshold: float) -> int:
    """Rows in bins that lie wholly above `threshold` (a lower bound of the rows with score > threshold)."""
    return int(sum(c for c, (low, _) in zip(counts, bin_bounds(), strict=True) if low > threshold))
