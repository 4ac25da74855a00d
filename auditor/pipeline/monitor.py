"""Liveness of a running audit: what the pipeline's workers last did (`ActivityLog`, one small Ray actor), the
driver's monitor thread that turns it into progress and stops a run in which nothing moves (`DriverMonitor`), and
the signals that interrupt the driver loop (SIGTERM, the watchdog's).

A run is alive while anything in it moves: a read task delivering rows, a score actor finishing a batch, a write
batch acknowledged, a commit task finishing. A slow run (a CPU actor taking minutes per write batch, a GPU actor
running many generations per caption) keeps its score actors finishing batches and is never stopped; a run whose
work cannot be scheduled (a lost node, actors holding every CPU the readers need) stops after --stall-timeout-s.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import ray

from auditor.config import AuditConfig
from auditor.pipeline.activity import ACTOR_READY, READ, SCORE, ActivityLog
from auditor.pipeline.commit import UnitTracker
from auditor.pipeline.committer import error_text
from auditor.pipeline.metrics import DriverMetrics
from auditor.pipeline.progress import AuditProgress

logger = logging.getLogger(__name__)

MONITOR_PERIOD_S = 1.0
STALL_SIGNAL = signal.SIGUSR1
# How long the monitor waits for the activity log's answer; a late answer only delays the news, never stops a run.
ACTIVITY_QUERY_TIMEOUT_S = 10.0
# What the driver sees itself, beside the stages the workers report (auditor.pipeline.activity).
WRITE, COMMIT, START = "write", "commit", "start"
MOVES = {
    SCORE: "a score actor finished a batch",
    ACTOR_READY: "a score actor finished loading its model",
    READ: "a read task delivered rows",
    WRITE: "a write batch was acknowledged",
    COMMIT: "a commit task finished",
    START: "the pipeline started",
}


def start_activity_log() -> Any:
    """An ActivityLog actor on this driver's node (it lives and dies with the driver, whatever node is lost)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    return (
        ray.remote(ActivityLog)
        .options(
            num_cpus=0, max_restarts=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)
        )
        .remote()
    )


def activity_reader(log: Any) -> Callable[[], dict[str, dict[str, float]]]:
    """What DriverMonitor calls each tick: the snapshot of the ActivityLog actor `log`, waited for at most
    ACTIVITY_QUERY_TIMEOUT_S."""
    return lambda: ray.get(log.snapshot.remote(), timeout=ACTIVITY_QUERY_TIMEOUT_S)


class AuditInterrupted(BaseException):
    """Raised in the driver's main thread by a signal handler: SIGTERM (`ray job stop`) or the stall watchdog."""


class DriverMonitor:
    """A thread beside the driver loop. Each tick it reads the ActivityLog, feeds the rows the score actors have
    finished to the progress line (and with metrics, the progress to Prometheus), and interrupts the loop
    (STALL_SIGNAL to this process, which the loop's handler turns into AuditInterrupted) when nothing has moved
    for stall_timeout_s: no read, score batch, write acknowledgement or commit, counted from the pipeline's start.

    read_activity_log: returns the ActivityLog's snapshot (activity_reader; raises when the log does not answer);
    None: only the driver's own view, acknowledgements and commits. last_commit: when a commit task last finished
    (time.monotonic()), None before the first.
    """

    def __init__(
        self,
        tracker: UnitTracker,
        progress: AuditProgress,
        stall_timeout_s: float,
        metrics: DriverMetrics | None = None,
        read_activity_log: Callable[[], dict[str, dict[str, float]]] | None = None,
        last_commit: Callable[[], float | None] = lambda: None,
    ):
        self.tracker = tracker
        self.progress = progress
        self.metrics = metrics
        self.read_activity_log = read_activity_log
        self.last_commit = last_commit
        self.stall_timeout_s = stall_timeout_s
        self.started = time.monotonic()
        self.stalled_s: float | None = None
        self.last_moves = ""  # what was last seen moving, when the stall was detected
        self.cluster = ""  # cluster_state() when the stall was detected
        self._seen: dict[str, dict[str, float]] = {}  # the ActivityLog's last snapshot
        self._seen_at = self.started  # when it was taken (this process's clock)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="audit-monitor", daemon=True)

    def __enter__(self) -> DriverMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=ACTIVITY_QUERY_TIMEOUT_S + 5)

    def _run(self) -> None:
        while not self._stop.wait(MONITOR_PERIOD_S):
            self.read_activity()
            if self.stalled():
                os.kill(os.getpid(), STALL_SIGNAL)
                return

    def read_activity(self) -> None:
        """Refresh the ActivityLog's snapshot (kept as it was when the log does not answer) and pass the rows
        scored on to the progress line and the metrics."""
        if self.read_activity_log is not None:
            try:
                self._seen = self.read_activity_log()
                self._seen_at = time.monotonic()
            except Exception as exc:  # late or gone: the ages go on growing from the last answer
                logger.debug("activity log did not answer (%s)", type(exc).__name__)
        if SCORE in self._seen:
            self.progress.rows_scored(int(self._seen[SCORE]["rows"]))
        self.progress.tick()
        if self.metrics is not None:
            self.metrics.update(self.progress.snapshot())

    def ages(self, now: float | None = None) -> dict[str, float]:
        """Seconds since each stage last moved, as far as this driver knows ('start': since the pipeline began)."""
        now = time.monotonic() if now is None else now
        ages = {stage: seen["age_s"] + (now - self._seen_at) for stage, seen in self._seen.items()}
        ages[START] = now - self.started
        if self.tracker.acks:
            ages[WRITE] = now - self.tracker.last_ack
        last_commit = self.last_commit()
        if last_commit is not None:
            ages[COMMIT] = now - last_commit
        return ages

    def stalled(self, now: float | None = None) -> bool:
        """True (and stalled_s, last_moves and cluster set) when nothing moved for stall_timeout_s."""
        ages = self.ages(now)
        idle = min(ages.values())
        if idle <= self.stall_timeout_s:
            return False
        self.stalled_s = idle
        self.last_moves = describe_moves(ages, self._seen)
        self.cluster = cluster_state()  # now, while the stalled work still holds its resources
        return True


def describe_moves(ages: dict[str, float], seen: dict[str, dict[str, float]]) -> str:
    """`a score actor finished a batch 25 s ago (1,234 rows scored in all); a read task delivered rows 40 s ago;
    …`, most recent first."""
    parts = []
    for stage, age in sorted(ages.items(), key=lambda item: item[1]):
        if stage not in MOVES:
            continue
        text = f"{MOVES[stage]} {age:.0f} s ago"
        if stage == SCORE:
            text += f" ({int(seen[SCORE]['rows']):,} rows scored in all)"
        parts.append(text)
    return "; ".join(parts)


@contextlib.contextmanager
def interruptible(armed: threading.Event | None = None) -> Iterator[None]:
    """SIGTERM and the watchdog's signal raise AuditInterrupted in the driver loop (main thread only; elsewhere,
    e.g. a notebook's worker thread, the default handlers stay). `armed` is set while the handlers are in place,
    so that another thread knows it may send STALL_SIGNAL (whose default action would end the process)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, _frame: Any) -> None:
        raise AuditInterrupted(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, STALL_SIGNAL)}
    was_armed = armed is not None and armed.is_set()
    if armed is not None:
        armed.set()
    try:
        yield
    finally:
        if armed is not None and not was_armed:
            armed.clear()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def stop_reason(error: BaseException, monitor: DriverMonitor | None, cfg: AuditConfig) -> str:
    if monitor is not None and monitor.stalled_s is not None:
        return (
            f"nothing in the pipeline moved for {monitor.stalled_s:.0f} s (--stall-timeout-s "
            f"{cfg.stall_timeout_s:g}); last seen moving: {monitor.last_moves}. The cluster cannot run the pending "
            f"work (a lost node, or actors holding every CPU the readers need). {monitor.cluster}"
        )
    if isinstance(error, AuditInterrupted) and str(error) == "SIGTERM":
        return "stopped by SIGTERM (ray job stop, or the operator)."
    text = error_text(error)
    return text if text.endswith(".") else f"{text}."


def cluster_state() -> str:
    try:
        alive = [n for n in ray.nodes() if n.get("Alive")]
        return (
            f"Ray has {len(alive)} alive node(s) with {cpus_and_gpus(ray.cluster_resources())} in all; "
            f"free when the run stalled: {cpus_and_gpus(ray.available_resources())}."
        )
    except Exception as exc:  # the state of a broken cluster may itself be unreadable
        return f"(cluster state unavailable: {type(exc).__name__})"


def cpus_and_gpus(resources: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in sorted(resources.items()) if k in ("CPU", "GPU")) or "none"
