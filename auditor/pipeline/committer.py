"""`UnitCommitter`: the driver's side of committing a work unit: a Ray task per complete unit moves its staged files
into place next to the data, then the driver records the unit in the ledger. A broken unit is recorded as failed.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import ray

from auditor import schema
from auditor.config import AuditConfig
from auditor.io.lease import OutputLease
from auditor.io.ledger import DONE, FAILED, Ledger
from auditor.io.parquet import commit_unit
from auditor.io.storage import filesystem_for
from auditor.pipeline.commit import UnitState, unit_record
from auditor.pipeline.plan import AuditPlan
from auditor.pipeline.progress import AuditProgress
from auditor.redact import redact_text

logger = logging.getLogger(__name__)

COMMIT_RETRIES = 2  # attempts after the first when a commit task's worker or node dies


def commit_staged_unit(
    output: str, storage_options: dict[str, Any], shard: str, unit: int, staged: list[str], explain: bool
) -> dict[str, Any]:
    """Runs as a Ray task next to the data: merge one unit's staged files into its part files."""
    started = time.process_time()
    fs, output_path = filesystem_for(output, storage_options)
    parts = commit_unit(fs, output_path, shard, unit, staged, schema.flagged_schema(explain))
    return {**parts, "cpu_s": time.process_time() - started}


def error_text(exc: BaseException) -> str:
    """`<type>: <message>` of what went wrong; for a Ray task error, of its cause inside the task (whose traceback
    stays in the worker's log), so the ledger, _audit.json and the CLI get one clear line, not a traceback.
    Redacted: fsspec and aiohttp errors quote the URL a file was opened by, credentials included."""
    while isinstance(exc, ray.exceptions.RayTaskError) and isinstance(exc.cause, BaseException):
        exc = exc.cause
    return redact_text(f"{type(exc).__name__}: {exc}")


class UnitCommitter:
    """Turns ready units into ledger records: a commit task per complete unit, a failed record per broken one.

    The ledger record is written only after the commit task has moved the unit's parts into place.
    """

    def __init__(
        self,
        cfg: AuditConfig,
        plan: AuditPlan,
        ledger: Ledger,
        progress: AuditProgress,
        lease: OutputLease | None = None,
    ):
        self.cfg = cfg
        self.lease = lease
        self.progress = progress
        self.plan = plan
        self.ledger = ledger
        self.identities = {item.file.source: item.file.identity for item in plan.pending}
        self.in_flight: dict[ray.ObjectRef, UnitState] = {}
        self.committed: list[dict[str, Any]] = []
        self.failed: list[dict[str, Any]] = []
        # A commit whose worker or node died is retried (a node lost mid-run would otherwise fail the units it was
        # committing); an error the commit raises is not: its unit fails and the next run redoes it. A retry
        # rewrites the same part names, so it replaces what the dead attempt may have moved into place.
        self.remote = ray.remote(num_cpus=0, max_retries=COMMIT_RETRIES)(commit_staged_unit)
        self.commit_cpu_s = 0.0  # CPU time of the commit tasks (for sizing: bench/pipeline.py sizing)
        self.last_finished: float | None = (
            None  # time.monotonic() when a commit task last finished (liveness)
        )

    def submit(self, ready: list[UnitState]) -> None:
        for state in ready:
            if state.error is not None:
                self._record(state, FAILED, None)
                continue
            ref = self.remote.remote(
                self.cfg.output, self.cfg.storage_options, state.shard, state.unit, state.staged,
                self.cfg.explain_flagged,
            )  # fmt: skip
            self.in_flight[ref] = state

    def poll(self, wait: bool = False, timeout_s: float | None = None) -> None:
        """Record the commit tasks that have finished (when wait, all of them, or those done within timeout_s;
        a commit never recorded leaves its unit to the next run, which rewrites the same part files)."""
        if not self.in_flight:
            return
        refs = list(self.in_flight)
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s if wait else 0)
        if done:
            self.last_finished = time.monotonic()
        for ref in done:
            state = self.in_flight.pop(ref)
            try:
                parts = ray.get(ref)
            except Exception as exc:  # the unit is redone by the next run; the others go on
                state.error = f"commit failed: {error_text(exc)}"
                self._record(state, FAILED, None)
            else:
                self.commit_cpu_s += parts.pop("cpu_s", 0.0)
                self._record(state, DONE, parts)

    def _record(self, state: UnitState, status: str, parts: dict[str, Any] | None) -> None:
        if self.lease is not None and self.lease.lost is not None:
            return  # another run owns OUTPUT now: it redoes this unit; a record from here could outlive its parts
        record = unit_record(
            state, self.identities[state.source], self.plan.fingerprint, self.cfg.unit_rows, status, parts
        )
        record = self.ledger.mark(record)
        if status == DONE:
            self.committed.append(record)
            self.progress.unit_committed(state.received, state.main_node)
            logger.debug("committed %s unit %d: %d rows", state.source, state.unit, state.received)
        else:
            self.failed.append(record)
            self.progress.unit_failed()
            logger.warning(
                "input %s unit %d failed: %s", state.source, state.unit, redact_text(state.error or "")
            )
