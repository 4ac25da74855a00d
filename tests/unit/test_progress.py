"""AuditProgress with a fake clock: the line, the 60-s rate window, ETA, throttling, per-node summary, bar vs log."""

from __future__ import annotations

import io
import logging
import subprocess
import sys

import pytest

from auditor.pipeline.progress import AuditProgress, format_eta


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make(clock: FakeClock, total_units: int = 40, **kwargs) -> AuditProgress:
    kwargs.setdefault("tty", False)
    kwargs.setdefault("stream", io.StringIO())
    return AuditProgress(total_units, clock=clock, **kwargs)


def progress_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "auditor.progress"]


def test_line_reports_units_rows_rate_and_unit_based_eta():
    clock = FakeClock()
    progress = make(clock)
    for _ in range(12):  # one 1000-row unit every 5 s
        clock.advance(5)
        progress.unit_committed(1000)
    # 12 units in the last 60 s: 5 s per unit, 28 units left -> 140 s
    assert progress.line() == (
        "audit progress: 12/40 units (30.0%), 12,000 rows, 200 rows/s (last 60 s), ETA 0:02:20"
    )


def test_rows_based_eta_when_total_rows_is_known():
    clock = FakeClock()
    progress = make(clock, total_units=4, total_rows=1_000_000)
    clock.advance(30)
    progress.unit_committed(250_000)
    # 250,000 rows in 30 s (the run is younger than the window) -> 750,000 rows left at 8,333 rows/s = 90 s
    assert progress.rate() == (pytest.approx(250_000 / 30), 30.0)
    assert progress.eta_s() == pytest.approx(90.0)
    assert progress.line().endswith("8,333 rows/s (last 30 s), ETA 0:01:30")


def test_rows_based_eta_falls_back_to_units_when_the_row_total_was_an_underestimate():
    clock = FakeClock()
    progress = make(clock, total_units=3, total_rows=100)
    clock.advance(10)
    progress.unit_committed(150)
    assert progress.eta_s() == pytest.approx(20.0)  # 2 units left x 10 s per unit


def test_rate_counts_only_the_last_60_seconds():
    clock = FakeClock()
    progress = make(clock)
    progress.unit_committed(6000)  # at t=0: drops out of the window at t=60
    clock.advance(30)
    progress.unit_committed(600)
    clock.advance(20)  # t=50: both commits are in the window
    assert progress.rate() == (pytest.approx(6600 / 50), 50.0)
    clock.advance(20)  # t=70: only the t=30 commit is
    assert progress.rate() == (pytest.approx(600 / 60), 60.0)
    # 38 units left of 3300 rows each on average (6600 rows in 2 units), at 10 rows/s
    assert progress.eta_s() == pytest.approx(38 * 3300 / 10)
    clock.advance(40)  # t=110: nothing in the last 60 s
    assert progress.rate() == (0.0, 60.0)
    assert progress.rows == 6600  # the totals are not windowed


def test_eta_is_unknown_without_a_recent_commit():
    clock = FakeClock()
    progress = make(clock, total_rows=10_000)
    assert progress.eta_s() is None
    assert progress.line() == "audit progress: 0/40 units (0.0%), 0 rows, 0 rows/s (last 0 s), ETA unknown"
    clock.advance(10)
    progress.unit_committed(100)
    clock.advance(61)  # stalled: no honest ETA
    assert progress.line().endswith("0 rows/s (last 60 s), ETA unknown")


def test_rows_rise_as_the_score_actors_finish_batches_before_any_commit(caplog):
    """Issue 36: one long unit showed '0 rows, 0 rows/s' until it committed; the rows scored now count."""
    caplog.set_level(logging.INFO, logger="auditor.progress")
    clock = FakeClock()
    progress = make(clock, total_units=1, interval_s=30)
    for scored in (0, 600, 1200, 1800):
        clock.advance(30)
        progress.rows_scored(scored)
        progress.tick()
    assert progress_lines(caplog)[-3:] == [
        "audit progress: 0/1 units (0.0%), 600 rows, 10 rows/s (last 60 s), ETA unknown",
        "audit progress: 0/1 units (0.0%), 1,200 rows, 20 rows/s (last 60 s), ETA unknown",
        "audit progress: 0/1 units (0.0%), 1,800 rows, 20 rows/s (last 60 s), ETA unknown",
    ]
    # The unit commits: its rows were counted already, and never twice.
    clock.advance(5)
    progress.unit_committed(2000)
    progress.rows_scored(1900)  # a late, smaller count changes nothing
    assert (progress.rows, progress.rows_seen) == (2000, 2000)
    summary = progress.close()
    assert summary["rows"] == summary["rows_scored"] == 2000
    assert summary["rows_per_s"] == pytest.approx(2000 / 125, abs=0.1)


def test_rows_based_eta_follows_the_rows_scored():
    clock = FakeClock()
    progress = make(clock, total_units=1, total_rows=10_000)
    clock.advance(20)
    progress.rows_scored(2_000)  # 100 rows/s over 20 s, 8000 left
    assert progress.eta_s() == pytest.approx(80.0)


def test_eta_counts_the_rows_already_scored_of_units_in_flight():
    """Issue 36: rows scored inside units not yet committed shorten the ETA as they are scored."""
    clock = FakeClock()
    progress = make(clock, total_units=4)
    clock.advance(10)
    progress.unit_committed(1000)  # 3 units of ~1000 rows left, 100 rows/s
    assert progress.eta_s() == pytest.approx(30.0)
    clock.advance(5)
    progress.rows_scored(1500)  # half of the next unit scored: 2500 rows left at 1500/15 rows/s
    assert progress.eta_s() == pytest.approx(25.0)


def test_a_stopped_run_keeps_the_rows_it_scored_apart_from_those_committed():
    clock = FakeClock()
    progress = make(clock, total_units=2)
    clock.advance(10)
    progress.unit_committed(100)
    progress.rows_scored(350)  # the second unit was being scored when the run stopped
    summary = progress.close()
    assert (summary["rows"], summary["rows_scored"], summary["rows_per_s"]) == (100, 350, 35.0)


def test_failed_units_are_not_remaining_and_are_shown():
    clock = FakeClock()
    progress = make(clock, total_units=3)
    clock.advance(10)
    progress.unit_committed(100)
    progress.unit_failed()
    assert progress.eta_s() == pytest.approx(10.0)  # 1 unit left
    assert progress.line().startswith("audit progress: 1/3 units (33.3%), 1 failed, 100 rows,")
    progress.unit_committed(100)
    assert progress.eta_s() == 0.0


def test_snapshot_is_what_the_metrics_export():
    clock = FakeClock()
    progress = make(clock, total_units=4)
    assert progress.snapshot() == {
        "units_committed": 0,
        "units_failed": 0,
        "units_remaining": 4,
        "eta_s": None,
    }
    clock.advance(10)
    progress.unit_committed(100)
    progress.unit_failed()
    snap = progress.snapshot()
    assert (snap["units_committed"], snap["units_failed"], snap["units_remaining"]) == (1, 1, 2)
    assert snap["eta_s"] == pytest.approx(progress.eta_s()) == pytest.approx(20.0)


def test_lines_are_logged_once_per_interval(caplog):
    caplog.set_level(logging.INFO, logger="auditor.progress")
    clock = FakeClock()
    progress = make(clock, interval_s=30.0)
    for _ in range(100):  # a driver loop ticking every second for 100 s
        clock.advance(1)
        progress.tick()
    lines = progress_lines(caplog)
    assert len(lines) == 3  # at t=30, 60, 90
    assert all(line.startswith("audit progress: 0/40 units") for line in lines)
    clock.advance(5)
    progress.unit_committed(10)  # a commit does not force a line before the interval
    assert len(progress_lines(caplog)) == 3
    clock.advance(25)
    progress.tick()
    assert len(progress_lines(caplog)) == 4


def test_quiet_lines_reach_the_log_when_the_root_logger_is_raised(caplog):
    """--quiet raises other loggers; the progress lines (INFO) must still reach the root's handlers."""
    root = logging.getLogger()
    saved = root.level
    root.setLevel(logging.WARNING)
    try:
        clock = FakeClock()
        progress = make(clock, interval_s=5.0, quiet=True, tty=True)
        clock.advance(5)
        progress.tick()
    finally:
        root.setLevel(saved)
    assert [r.levelno for r in caplog.records if r.name == "auditor.progress"] == [logging.INFO]


def test_summary_with_per_node_breakdown(caplog):
    caplog.set_level(logging.INFO, logger="auditor.progress")
    clock = FakeClock()
    progress = make(clock, total_units=3)
    clock.advance(10)
    progress.unit_committed(300, node="node-a")
    progress.unit_committed(100, node="node-b")
    progress.unit_failed()
    clock.advance(10)
    summary = progress.close()
    assert summary == {
        "units_committed": 2,
        "units_failed": 1,
        "rows": 400,
        "rows_scored": 400,
        "seconds": 20.0,
        "rows_per_s": 20.0,
        "per_node": {
            "node-a": {"units": 1, "rows": 300, "rows_per_s": 15.0},
            "node-b": {"units": 1, "rows": 100, "rows_per_s": 5.0},
        },
    }
    assert progress.close() is summary  # idempotent
    assert (
        progress_lines(caplog)[-1]
        == "audit progress: done, 2/3 units, 1 failed, 400 rows in 0:00:20, 20 rows/s"
    )
    clock.advance(100)
    progress.tick()  # nothing after close
    assert len(progress_lines(caplog)) == 1


def test_summary_has_no_per_node_for_a_single_node():
    clock = FakeClock()
    with make(clock, total_units=2) as progress:
        progress.unit_committed(5, node="node-a")
        progress.unit_committed(5)
    summary = progress.close()
    assert "per_node" not in summary
    assert summary["rows_per_s"] == 0.0  # no time passed on the fake clock
    assert summary["units_committed"] == 2


def test_terminal_draws_a_bar_and_logs_no_periodic_lines(caplog):
    caplog.set_level(logging.INFO, logger="auditor.progress")
    clock = FakeClock()
    stream = io.StringIO()
    progress = AuditProgress(4, clock=clock, stream=stream, tty=True, interval_s=1.0)
    clock.advance(10)
    progress.unit_committed(1000)
    clock.advance(10)
    progress.tick()
    drawn = stream.getvalue().split("\r")[-1]
    assert drawn.startswith("audit: 1/4 units |")
    assert "1,000 rows, 50 rows/s (last 20 s), ETA 0:01:00" in drawn  # 3 units left x 20 s per unit
    assert progress_lines(caplog) == []  # the bar replaces the periodic lines
    progress.close()
    assert stream.getvalue().endswith("\n")
    assert progress_lines(caplog)[-1].startswith("audit progress: done, 1/4 units")


def test_not_a_terminal_writes_nothing_to_the_stream(caplog):
    caplog.set_level(logging.INFO, logger="auditor.progress")
    clock = FakeClock()
    stream = io.StringIO()  # isatty() is False: tty=None picks the log lines
    progress = AuditProgress(4, clock=clock, stream=stream, interval_s=1.0)
    clock.advance(1)
    progress.unit_committed(10)
    progress.close()
    assert stream.getvalue() == ""
    assert len(progress_lines(caplog)) == 2  # one periodic line, one final line


def test_tty_is_detected_from_the_stream():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Terminal()
    AuditProgress(2, stream=stream, clock=FakeClock()).close()
    assert "0/2 units" in stream.getvalue()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"total_units": -1}, "total_units must be >= 0, got -1"),
        ({"total_units": 1, "interval_s": 0}, "interval_s must be > 0 seconds, got 0"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AuditProgress(**kwargs)


def test_format_eta():
    assert format_eta(None) == "unknown"
    assert format_eta(754.4) == "0:12:34"
    assert format_eta(-3) == "0:00:00"
    assert format_eta(90_061) == "1 day, 1:01:01"


def test_does_not_import_ray():
    code = "import sys, auditor.pipeline.progress; print(any(m == 'ray' or m.startswith('ray.') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
