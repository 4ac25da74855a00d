"""The two-stage audit in `_audit.json`: each stage's settings, rows, denoiser rows (the cost) and the confirm
scores' histogram, summed from the ledger records of the units the output holds. Never imports ray or torch.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from auditor import schema
from auditor.histogram import EDGES, merge_counts
from auditor.pipeline.commit import dense_histogram
from auditor.pipeline.plan import ThresholdChoice
from auditor.scoring.cascade import CONFIRM, FLAG_RULE_TWO_STAGE, SCREEN, Stage


def stages_summary(
    screen: Stage, threshold: ThresholdChoice, records: list[dict[str, Any]]
) -> dict[str, Any]:
    """What `_audit.json["stages"]` holds for the output's done unit `records`: per stage its settings, rows and
    denoiser rows, and denoiser rows per scored caption. Records from before stages were counted add nothing, so
    an output partly audited by an older version under-counts the cost (their units have no "stages")."""
    counts: Counter = Counter()
    scored = 0
    for record in records:
        counts.update(record.get("stages") or {})
        scored += int((record.get("counts") or {}).get(schema.OK, 0))
    cost = {stage: int(counts.get(schema.DENOISER_ROWS_COUNT[stage], 0)) for stage in (SCREEN, CONFIRM)}
    summary: dict[str, Any] = {
        "rule": "score > threshold" if threshold.cascade is None else FLAG_RULE_TWO_STAGE,
        SCREEN: {**screen.to_dict(), "rows": scored, "denoiser_rows": cost[SCREEN]},
        "denoiser_rows_per_caption": round(sum(cost.values()) / scored, 4) if scored else None,
    }
    if threshold.cascade is not None:
        rescored = int(counts.get(schema.RESCORED_COUNT, 0))
        histogram = merge_counts(dense_histogram(r.get("confirm_histogram")) for r in records)
        summary[CONFIRM] = {
            **threshold.cascade.confirm.to_dict(),
            "screen_threshold": threshold.cascade.screen_threshold,
            "threshold": threshold.value,
            "rows": rescored,
            "share_of_scored": round(rescored / scored, 6) if scored else None,
            "denoiser_rows": cost[CONFIRM],
            "confirm_score_histogram": {"edges": EDGES.tolist(), "counts": histogram},
        }
    return summary
