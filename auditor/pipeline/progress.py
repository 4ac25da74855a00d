"""Audit-level progress: units committed of the total, rows scored and rows/s over the last minute, ETA, and the
final summary. Rows count as the score actors finish batches (the driver's monitor passes the count on), so a unit
of hours shows rows rising long before it commits; units count when committed, which is what resume trusts.

Ray Data's bars show its operators; this shows the audit. A tqdm bar in a terminal, otherwise one log line every
`interval_s` (what a Ray job's log keeps). Pure Python (tqdm only for the bar): must not import ray, so the driver
loop feeds it and it is tested with a fake clock.
"""

from __future__ import annotations

import datetime
import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import IO, Any

logger = logging.getLogger("auditor.progress")

RATE_WINDOW_S = 60.0  # rows/s and time per unit are measured over this much recent time
BAR_REFRESH_S = 1.0  # the bar's rate and ETA are redrawn at most this often on tick()


def format_eta(seconds: float | None) -> str:
    """`0:12:34`; `unknown` when nothing has committed recently (no rate to extrapolate from)."""
    if seconds is None:
        return "unknown"
    return str(datetime.timedelta(seconds=round(max(seconds, 0.0))))


class AuditProgress:
    """Progress of one audit run, fed by the driver as units commit or fail and as rows are scored (rows_scored).

    total_units: units this run will process (skipped ones excluded). total_rows: their rows when known (parquet
    metadata), which makes the ETA rows-based; None makes it units remaining x recent seconds per unit.
    tty None: a bar when `stream` is a terminal. quiet: no bar even in a terminal, only the periodic lines (what
    `--quiet` keeps).

    The lines are logged at INFO on `auditor.progress`, which is set to INFO itself unless someone set its level:
    `--quiet` raises Ray's loggers, not this one, and a root logger raised to WARNING still lets them through
    (records propagate to the root's handlers without the root's level check). INFO, not WARNING: progress is not
    a problem, and log alerting keyed on WARNING must not fire every 30 s.
    """

    def __init__(
        self,
        total_units: int,
        total_rows: int | None = None,
        interval_s: float = 30.0,
        quiet: bool = False,
        stream: IO[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        tty: bool | None = None,
    ) -> None:
        if total_units < 0:
            raise ValueError(f"total_units must be >= 0, got {total_units}.")
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0 seconds, got {interval_s!r}.")
        self.total_units = total_units
        self.total_rows = total_rows
        self.interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._start = clock()
        self._last_line = self._start
        self._last_bar = self._start
        self.units_committed = 0
        self.units_failed = 0
        self.rows = 0  # rows of committed units
        # Rows scored so far: the score actors' count, or the committed rows where no count arrives (a run without
        # an activity log) or they are ahead of it. Never goes down.
        self.rows_seen = 0
        self._recent: deque[tuple[float, int]] = deque()  # (time, new rows seen) within the rate window
        self._per_node: dict[str, list[int]] = {}  # node -> [units, rows]
        self._summary: dict[str, Any] | None = None
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)
        stream = sys.stderr if stream is None else stream
        if tty is None:
            tty = bool(getattr(stream, "isatty", lambda: False)())
        self._bar = None
        if tty and not quiet:
            from tqdm import tqdm

            # The bar counts units done (committed or failed, so it ends full); our own rate and ETA go in the
            # postfix: tqdm's would be units per second since the start, by its own clock.
            self._bar = tqdm(
                total=total_units,
                desc="audit",
                unit="unit",
                file=stream,
                mininterval=0,
                bar_format="{desc}: {n_fmt}/{total_fmt} units |{bar}| {percentage:3.0f}%{postfix}",
            )

    # 1. Events from the driver -----------------------------------------------------------------------------------
    def set_total(self, total_units: int) -> None:
        """A better count of the units this run will process (unit counts of files are learnt as they are read)."""
        with self._lock:
            self.total_units = max(total_units, self.units_committed + self.units_failed)
            if self._bar is not None:
                self._bar.total = self.total_units
                self._bar.refresh()

    def unit_committed(self, rows: int, node: str | None = None) -> None:
        """A unit's rows are all in the output. node: where it was scored (a per-node summary needs two or more)."""
        with self._lock:
            now = self._clock()
            self.units_committed += 1
            self.rows += rows
            self._see_rows(now, self.rows)
            if node is not None:
                counts = self._per_node.setdefault(node, [0, 0])
                counts[0] += 1
                counts[1] += rows
            if self._bar is not None:
                self._bar.update(1)
                self._draw_bar(now)
        self.tick()

    def rows_scored(self, rows: int) -> None:
        """The score actors have finished `rows` data rows in all so far (a running total, from the activity log)."""
        with self._lock:
            self._see_rows(self._clock(), rows)

    def unit_failed(self) -> None:
        """A unit failed (it is redone by the next run); it no longer counts as remaining."""
        with self._lock:
            self.units_failed += 1
            if self._bar is not None:
                self._bar.update(1)
                self._draw_bar(self._clock())
        self.tick()

    def tick(self) -> None:
        """Call often: logs a line when interval_s has passed since the last one (or redraws the bar's rate)."""
        with self._lock:
            if self._summary is not None:
                return
            now = self._clock()
            if self._bar is not None:
                if now - self._last_bar >= BAR_REFRESH_S:
                    self._draw_bar(now)
            elif now - self._last_line >= self.interval_s:
                self._last_line = now
                logger.info("%s", self.line(now))

    def close(self) -> dict[str, Any]:
        """Stop the bar, log the final line, return the summary (what `_audit.json` records). Idempotent.

        {"units_committed", "units_failed", "rows", "rows_scored", "seconds", "rows_per_s", "per_node"?}: rows
        of committed units; rows_scored and rows_per_s count every row scored, committed or not (a stopped run
        scored rows that its rerun scores again). per_node ({node: {"units", "rows", "rows_per_s"}}, committed
        rows over the whole run) only when more than one node was seen.
        """
        with self._lock:
            if self._summary is not None:
                return self._summary
            now = self._clock()
            # The total is an estimate until every file's unit count is known; never end below what was done.
            self.total_units = max(self.total_units, self.units_committed + self.units_failed)
            if self._bar is not None:
                self._bar.total = self.total_units
                self._draw_bar(now)
                self._bar.close()
            seconds = now - self._start
            summary: dict[str, Any] = {
                "units_committed": self.units_committed,
                "units_failed": self.units_failed,
                "rows": self.rows,
                "rows_scored": self.rows_seen,
                "seconds": round(seconds, 3),
                "rows_per_s": _rate(self.rows_seen, seconds),
            }
            if len(self._per_node) > 1:
                summary["per_node"] = {
                    node: {"units": units, "rows": rows, "rows_per_s": _rate(rows, seconds)}
                    for node, (units, rows) in sorted(self._per_node.items())
                }
            self._summary = summary
        failed = f", {self.units_failed} failed" if self.units_failed else ""
        logger.info(
            "audit progress: done, %d/%d units%s, %s rows in %s, %s rows/s",
            self.units_committed,
            self.total_units,
            failed,
            f"{self.rows_seen:,}",
            format_eta(seconds),
            f"{summary['rows_per_s']:,.0f}",
        )
        return summary

    def __enter__(self) -> AuditProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # 2. What is shown --------------------------------------------------------------------------------------------
    def rate(self, now: float | None = None) -> tuple[float, float]:
        """(rows/s, window seconds) over the last RATE_WINDOW_S, or since the start when the run is younger."""
        now = self._clock() if now is None else now
        window = min(RATE_WINDOW_S, now - self._start)
        self._drop_old(now)
        if window <= 0:
            return 0.0, 0.0
        return sum(rows for _, rows in self._recent) / window, window

    def eta_s(self, now: float | None = None) -> float | None:
        """Seconds left: rows left / recent rows/s, the rows left from total_rows when it is known, else from the
        units left x the mean rows of a committed unit, less the rows already scored of units in flight.

        None (unknown) when no row was scored in the window (a stalled run has no honest ETA), and, without
        total_rows, until a unit has committed (a text file's rows are not known before it is read).
        """
        now = self._clock() if now is None else now
        rows_per_s, window = self.rate(now)
        units_left = max(self.total_units - self.units_committed - self.units_failed, 0)
        if units_left == 0:
            return 0.0
        if window <= 0 or rows_per_s <= 0:
            return None
        # rows left from the total, unless the total was an underestimate (units remain with no rows left)
        if self.total_rows is not None and self.total_rows > self.rows_seen:
            return (self.total_rows - self.rows_seen) / rows_per_s
        if not self.units_committed:
            return None
        expected_rows = self.rows + units_left * self.rows / self.units_committed
        return max(expected_rows - self.rows_seen, 0.0) / rows_per_s

    def snapshot(self) -> dict[str, Any]:
        """{"units_committed", "units_failed", "units_remaining", "eta_s"} now, read under the lock (safe from the
        monitor thread while the driver loop commits); eta_s None: unknown. What the Prometheus metrics export."""
        with self._lock:
            now = self._clock()
            return {
                "units_committed": self.units_committed,
                "units_failed": self.units_failed,
                "units_remaining": max(self.total_units - self.units_committed - self.units_failed, 0),
                "eta_s": self.eta_s(now),
            }

    def line(self, now: float | None = None) -> str:
        """`audit progress: 12/40 units (30.0%), 1,234,567 rows, 1,234 rows/s (last 60 s), ETA 0:12:34`: rows scored,
        committed or not."""
        now = self._clock() if now is None else now
        done = self.units_committed
        share = 100.0 * done / self.total_units if self.total_units else 100.0
        failed = f", {self.units_failed} failed" if self.units_failed else ""
        return (
            f"audit progress: {done}/{self.total_units} units ({share:.1f}%){failed}, {self.rows_seen:,} rows, "
            f"{self._rate_text(now)}, ETA {format_eta(self.eta_s(now))}"
        )

    # 3. Internals --------------------------------------------------------------------------------------------------
    def _rate_text(self, now: float) -> str:
        rows_per_s, window = self.rate(now)
        return f"{rows_per_s:,.0f} rows/s (last {window:.0f} s)"

    def _draw_bar(self, now: float) -> None:
        self._last_bar = now
        failed = f", {self.units_failed} failed" if self.units_failed else ""
        self._bar.set_postfix_str(
            f"{self.rows_seen:,} rows{failed}, {self._rate_text(now)}, ETA {format_eta(self.eta_s(now))}",
            refresh=True,
        )

    def _see_rows(self, now: float, total: int) -> None:
        """Rows seen so far are `total` (scored, or committed): the increase counts towards the rate."""
        if total > self.rows_seen:
            self._recent.append((now, total - self.rows_seen))
            self.rows_seen = total

    def _drop_old(self, now: float) -> None:
        while self._recent and self._recent[0][0] <= now - RATE_WINDOW_S:
            self._recent.popleft()


def _rate(rows: int, seconds: float) -> float:
    return round(rows / seconds, 1) if seconds > 0 else 0.0
