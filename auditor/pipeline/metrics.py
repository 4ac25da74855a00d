"""Prometheus metrics of an audit through `ray.util.metrics`: the score actors' per-batch counts and timings, and
the driver's units committed / failed / remaining and ETA.

Ray's per-node metrics agent exports them in Prometheus format (names prefixed `ray_`, counters suffixed `_total`,
plus Ray's own tags such as WorkerId and NodeAddress) and the Ray dashboard's Grafana can show them
(infra/grafana/auditor-dashboard.json). Tag values stay few: the model's short fingerprint and a row status, never
a row or a file. Outside a Ray worker or driver every recorder is a no-op, so `ScoreActor(cfg)(batch)` runs in a
plain unit test. Imports ray only once Ray is initialized in the process (never at import).
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Mapping
from typing import Any

logger = logging.getLogger(__name__)

# Metric names as recorded (the export adds the `ray_` prefix, and `_total` to counters).
# Captions/s per actor is `rate(ray_auditor_rows_scored_total{status="ok"}[1m])` by WorkerId: a rate of the counter
# survives actor restarts and the end of a run (Ray drops a dead worker's gauges, so a per-actor gauge would not).
ROWS_SCORED = "auditor_rows_scored"  # counter {model, status}: rows through a score actor, by row status
ROWS_FLAGGED = "auditor_rows_flagged"  # counter {model}: rows with score > threshold
BATCH_SECONDS = "auditor_batch_seconds"  # histogram {model}: seconds per score-actor call
ROWS_RESCORED = (
    "auditor_rows_rescored"  # counter {model}: rows the second stage scored again (over the screen)
)
DENOISER_ROWS = (
    "auditor_denoiser_rows"  # counter {model, stage}: denoiser rows run, by stage (screen, confirm)
)
UNITS_COMMITTED = "auditor_units_committed"  # counter {model}: work units committed by the driver
UNITS_FAILED = "auditor_units_failed"  # counter {model}
UNITS_REMAINING = "auditor_units_remaining"  # gauge {model}: units this run still has to process
ETA_SECONDS = "auditor_eta_seconds"  # gauge {model}: the progress line's ETA; ETA_UNKNOWN when it has none
METRIC_NAMES = (
    ROWS_SCORED,
    ROWS_FLAGGED,
    BATCH_SECONDS,
    ROWS_RESCORED,
    DENOISER_ROWS,
    UNITS_COMMITTED,
    UNITS_FAILED,
    UNITS_REMAINING,
    ETA_SECONDS,
)
MODEL_TAG = "model"
STATUS_TAG = "status"
STAGE_TAG = "stage"
FINGERPRINT_CHARS = 12  # the model tag: a prefix of the sha256 fingerprint (one value per model)
# A batch of 32-256 captions takes ~0.05 s on a GPU and seconds to minutes on a CPU actor.
BATCH_SECONDS_BOUNDARIES = [0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0]
# What the ETA gauge holds while the progress line says "unknown" (Prometheus drops NaN gauges from Ray's export).
ETA_UNKNOWN = -1.0


def ray_active() -> bool:
    """True inside a Ray worker or a driver that has called ray.init (never imports ray itself)."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def model_tag(fingerprint: str) -> str:
    return fingerprint[:FINGERPRINT_CHARS]


@functools.cache
def _metric(kind: str, name: str, description: str, tag_keys: tuple[str, ...]) -> Any:
    """One metric object per process and name (Ray registers a name once per worker)."""
    from ray.util import metrics

    if kind == "histogram":
        return metrics.Histogram(
            name, description=description, boundaries=BATCH_SECONDS_BOUNDARIES, tag_keys=tag_keys
        )
    return getattr(metrics, kind.capitalize())(name, description=description, tag_keys=tag_keys)


class ScoreMetrics:
    """What a score actor records once per batch (never per row). No-op when Ray is not initialized."""

    def __init__(self, fingerprint: str | None) -> None:
        self.enabled = fingerprint is not None and ray_active()
        if not self.enabled:
            return
        self.tags = {MODEL_TAG: model_tag(fingerprint)}
        self.rows = _metric(
            "counter", ROWS_SCORED, "Rows through a score actor, by row status.", (MODEL_TAG, STATUS_TAG)
        )
        self.flagged = _metric("counter", ROWS_FLAGGED, "Rows flagged (score > threshold).", (MODEL_TAG,))
        self.seconds = _metric("histogram", BATCH_SECONDS, "Seconds per score-actor batch.", (MODEL_TAG,))
        self.rescored = _metric(
            "counter", ROWS_RESCORED, "Rows scored again by the second stage.", (MODEL_TAG,)
        )
        self.denoiser_rows = _metric(
            "counter", DENOISER_ROWS, "Denoiser rows run, by stage (the GPU cost).", (MODEL_TAG, STAGE_TAG)
        )

    def record_batch(
        self,
        statuses: Mapping[str, int],
        flagged: int,
        seconds: float,
        rescored: int = 0,
        denoiser_rows: Mapping[str, int] | None = None,
    ) -> None:
        """statuses: data rows of the batch by status; seconds: the whole call; rescored: rows the second stage
        scored; denoiser_rows: rows run by stage."""
        if not self.enabled:
            return
        try:
            for status, count in statuses.items():
                if count:
                    self.rows.inc(count, tags={**self.tags, STATUS_TAG: status})
            if flagged:
                self.flagged.inc(flagged, tags=self.tags)
            if rescored:
                self.rescored.inc(rescored, tags=self.tags)
            for stage, count in (denoiser_rows or {}).items():
                if count:
                    self.denoiser_rows.inc(count, tags={**self.tags, STAGE_TAG: stage})
            self.seconds.observe(seconds, tags=self.tags)
        except Exception:  # observability boundary: a metric that fails never fails a batch
            logger.debug("recording the batch metrics failed", exc_info=True)


class DriverMetrics:
    """The driver's unit counts and ETA, from AuditProgress snapshots (counters advance by the change since the
    last update). No-op when Ray is not initialized."""

    def __init__(self, fingerprint: str) -> None:
        self.enabled = ray_active()
        self._committed = 0
        self._failed = 0
        if not self.enabled:
            return
        self.tags = {MODEL_TAG: model_tag(fingerprint)}
        self.committed = _metric("counter", UNITS_COMMITTED, "Work units committed.", (MODEL_TAG,))
        self.failed = _metric(
            "counter", UNITS_FAILED, "Work units failed (redone by the next run).", (MODEL_TAG,)
        )
        self.remaining = _metric(
            "gauge", UNITS_REMAINING, "Work units this run has still to process.", (MODEL_TAG,)
        )
        self.eta = _metric(
            "gauge",
            ETA_SECONDS,
            f"Seconds left, as the progress line says ({ETA_UNKNOWN:g}: unknown).",
            (MODEL_TAG,),
        )

    def update(self, snapshot: Mapping[str, Any]) -> None:
        """snapshot: `AuditProgress.snapshot()`."""
        if not self.enabled:
            return
        committed, failed = snapshot["units_committed"], snapshot["units_failed"]
        try:
            if committed > self._committed:
                self.committed.inc(committed - self._committed, tags=self.tags)
                self._committed = committed
            if failed > self._failed:
                self.failed.inc(failed - self._failed, tags=self.tags)
                self._failed = failed
            self.remaining.set(snapshot["units_remaining"], tags=self.tags)
            eta = snapshot["eta_s"]
            self.eta.set(ETA_UNKNOWN if eta is None else float(eta), tags=self.tags)
        except Exception:  # observability boundary: a metric that fails never fails the audit
            logger.debug("recording the driver metrics failed", exc_info=True)
