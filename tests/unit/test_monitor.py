"""The audit's liveness without Ray: the ActivityLog, and DriverMonitor's view of what moved, its stall rule and
its message (issue 36: a slow run is not a stalled run)."""

from __future__ import annotations

import io
import time

import pytest

from auditor.config import AuditConfig
from auditor.pipeline.activity import READ, SCORE, ActivityLog, report_activity
from auditor.pipeline.commit import UnitTracker
from auditor.pipeline.monitor import DriverMonitor, stop_reason
from auditor.pipeline.progress import AuditProgress


class FakeClock:
    def __init__(self, now: float = 500.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def monitor_with(log: ActivityLog | None, stall_timeout_s: float = 20.0, **kwargs) -> DriverMonitor:
    progress = AuditProgress(3, tty=False, stream=io.StringIO())
    return DriverMonitor(
        UnitTracker(), progress, stall_timeout_s, None, log.snapshot if log is not None else None, **kwargs
    )


def test_activity_log_counts_events_and_rows_and_ages_by_its_own_clock():
    clock = FakeClock()
    log = ActivityLog(clock)
    log.record(READ, 4096)
    clock.now += 2
    log.record(SCORE, 64)
    log.record(SCORE, 32)
    clock.now += 5
    assert log.snapshot() == {
        READ: {"events": 1, "rows": 4096, "age_s": 7.0},
        SCORE: {"events": 2, "rows": 96, "age_s": 5.0},
    }


def test_report_activity_never_fails_the_batch():
    class Gone:
        class record:  # noqa: N801 - the handle's method, as Ray spells it
            @staticmethod
            def remote(stage, rows):
                raise RuntimeError("the actor died")

    report_activity(Gone(), SCORE, 8)
    report_activity(None, SCORE, 8)


def test_a_slow_run_whose_actors_finish_batches_is_not_stalled():
    """One long unit: no acknowledgement for far longer than the timeout, but the score actor keeps finishing
    batches. Before, the watchdog measured only acknowledgements and stopped such runs."""
    clock = FakeClock()
    log = ActivityLog(clock)
    monitor = monitor_with(log)
    monitor.started -= 300  # the pipeline began 5 min ago, and no write batch was acknowledged since
    for scored in range(1, 6):
        clock.now += 10
        log.record(SCORE, 16)
        monitor.read_activity()
        assert not monitor.stalled()
        assert monitor.progress.rows_seen == 16 * scored  # the progress line's rows rise before any commit


def test_a_run_where_nothing_moves_is_stalled_and_says_what_moved_last():
    clock = FakeClock()
    log = ActivityLog(clock)
    log.record(READ, 4096)
    clock.now += 15
    log.record(SCORE, 1234)
    monitor = monitor_with(log, last_commit=lambda: time.monotonic() - 50)
    monitor.started -= 100
    monitor.read_activity()
    now = monitor._seen_at
    assert not monitor.stalled(now + 19)  # the last score batch: 19 s
    assert monitor.stalled(now + 21)
    assert monitor.stalled_s == pytest.approx(21, abs=0.5)
    moves = monitor.last_moves
    assert moves.startswith("a score actor finished a batch 21 s ago (1,234 rows scored in all)")
    assert "a read task delivered rows 36 s ago" in moves
    assert "a commit task finished" in moves and "the pipeline started" in moves
    assert moves.index("read task") < moves.index("commit task") < moves.index("pipeline started")
    cfg = AuditConfig(inputs=("in",), output="out", model="m", stall_timeout_s=20)
    reason = stop_reason(RuntimeError("interrupted"), monitor, cfg)
    assert reason.startswith(
        "nothing in the pipeline moved for 21 s (--stall-timeout-s 20); last seen moving: "
    )
    assert "cannot run the pending work" in reason


def test_without_news_the_ages_grow_from_the_last_answer():
    """A log that stops answering (its node gone, or late) does not keep the run alive forever."""
    clock = FakeClock()
    log = ActivityLog(clock)
    log.record(SCORE, 8)
    answers = iter([log.snapshot()])

    def flaky():
        try:
            return next(answers)
        except StopIteration:
            raise TimeoutError("no answer") from None

    monitor = DriverMonitor(
        UnitTracker(), AuditProgress(1, tty=False, stream=io.StringIO()), 20.0, None, flaky
    )
    monitor.started -= 100
    monitor.read_activity()
    first = monitor._seen_at
    monitor.read_activity()  # no answer: the last one stands
    assert monitor._seen_at == first and monitor.progress.rows_seen == 8
    assert monitor.stalled(first + 25)


def test_a_run_that_never_moved_stalls_from_its_start():
    monitor = monitor_with(None)
    assert not monitor.stalled()
    monitor.started -= 30
    assert monitor.stalled()
    assert monitor.last_moves == f"the pipeline started {monitor.stalled_s:.0f} s ago"
