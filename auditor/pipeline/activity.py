"""What the pipeline's workers did lately (`ActivityLog`) and how they say so (`report_activity`): the driver's
liveness and progress come from it (auditor.pipeline.monitor). Plain Python: the read and score workers import it,
and must not import ray through it (the log's handle arrives as an argument).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

# Stages that report from the workers: a read task delivering a table, a score actor finishing a batch, and a score
# actor ready (its model loaded: minutes for a large model from object storage, and progress all the same).
READ, SCORE, ACTOR_READY = "read", "score", "actor_ready"


class ActivityLog:
    """What the workers did lately, by stage: {stage: [events, rows, last time]}. Runs as a Ray actor on the
    driver's node (start_activity_log); read tasks and score actors report each table or batch they finish through
    report_activity, fire-and-forget: one small call per batch, nothing waits for it. Plain Python, so it is tested
    without Ray.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._stages: dict[str, list[float]] = {}

    def record(self, stage: str, rows: int) -> None:
        entry = self._stages.setdefault(stage, [0, 0, 0.0])
        entry[0] += 1
        entry[1] += rows
        entry[2] = self._clock()

    def snapshot(self) -> dict[str, dict[str, float]]:
        """{stage: {"events", "rows", "age_s"}}: age_s is the time since the stage last reported, by this clock
        (the reader adds its own elapsed time; no two machines' clocks are compared)."""
        now = self._clock()
        return {
            stage: {"events": events, "rows": rows, "age_s": now - last}
            for stage, (events, rows, last) in self._stages.items()
        }


def report_activity(log: Any, stage: str, rows: int) -> None:
    """Tell the run's ActivityLog (None: none, as outside an audit) that a stage finished a table of rows. Never
    raises: liveness news must not fail the batch it is about."""
    if log is None:
        return
    try:
        log.record.remote(stage, rows)
    except Exception as exc:  # a log that died with its driver: the run is over anyway
        logger.debug("activity not reported (%s: %s)", type(exc).__name__, exc)
