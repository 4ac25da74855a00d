"""`AuditSink`: the driver end of the pipeline. Writes each input file's scored rows to its own shard and marks it
in the ledger once the file is complete (all rows in, END_OF_FILE seen), or failed (READ_ERROR seen).

Rows of different files arrive interleaved and out of order; per-file row counts decide completion.
Never imports ray.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from fsspec.spec import AbstractFileSystem

from auditor import schema
from auditor.io.inputs import InputFile
from auditor.io.ledger import DONE, FAILED, Ledger
from auditor.io.parquet import ShardWriter
from auditor.io.storage import join

logger = logging.getLogger(__name__)

SCORES_DIR = "scores"
FLAGGED_DIR = "flagged"
CONTROL = (schema.END_OF_FILE, schema.READ_ERROR)


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class _FileState:
    file: InputFile
    scores: ShardWriter | None = None
    flagged: ShardWriter | None = None
    received: int = 0
    expected: int | None = None
    error: str | None = None
    counts: Counter = field(default_factory=Counter)


class AuditSink:
    def __init__(
        self,
        fs: AbstractFileSystem,
        output_path: str,
        ledger: Ledger,
        files: list[InputFile],
        fingerprint: str,
        explain: bool,
    ):
        self.fs = fs
        self.scores_root = join(output_path, SCORES_DIR)
        self.flagged_root = join(output_path, FLAGGED_DIR)
        self.ledger = ledger
        self.fingerprint = fingerprint
        self.flagged_schema = schema.flagged_schema(explain)
        self.states = {f.source: _FileState(f) for f in files}
        self.finished: dict[str, dict[str, Any]] = {}
        self.write_s = 0.0

    def consume(self, table: pa.Table) -> None:
        started = time.perf_counter()
        sources = table.column(schema.SOURCE)
        for source in pc.unique(sources).to_pylist():
            part = table.filter(pc.equal(sources, source))
            state = self.states[source]
            control = pc.is_in(part.column(schema.STATUS), pa.array(CONTROL))
            data = part.filter(pc.invert(control))
            if data.num_rows and state.error is None:
                self._write(state, data)
            for row in part.filter(control).select([schema.STATUS, schema.ROW, schema.ERROR]).to_pylist():
                if row[schema.STATUS] == schema.READ_ERROR:
                    state.error = row[schema.ERROR]
                else:
                    state.expected = row[schema.ROW]
            self._maybe_finish(state)
        self.write_s += time.perf_counter() - started

    def _write(self, state: _FileState, data: pa.Table) -> None:
        if state.scores is None:
            keep = [
                pa.field(f.name, pa.string() if pa.types.is_null(f.type) else f.type)
                for f in data.schema
                if f.name not in schema.SCORES_SCHEMA.names and f.name not in schema.FLAGGED_SCHEMA_EXTRA
            ]
            shard = state.file.shard
            state.scores = ShardWriter(
                self.fs, self.scores_root, shard, schema.scores_schema(keep), keep_empty=True
            )
            state.flagged = ShardWriter(
                self.fs, self.flagged_root, shard, self.flagged_schema, keep_empty=False
            )
        state.scores.write(data)
        flagged = data.filter(data.column(schema.FLAGGED))
        if flagged.num_rows:
            state.flagged.write(flagged)
        state.received += data.num_rows
        state.counts.update(Counter(data.column(schema.STATUS).to_pylist()))
        state.counts["flagged"] += flagged.num_rows

    def _maybe_finish(self, state: _FileState) -> None:
        source = state.file.source
        if source in self.finished:
            return
        if state.error is not None:
            self._fail(state, state.error)
        elif state.expected is not None and state.received == state.expected:
            if state.scores is None:  # an empty input file still gets its (empty) shard
                state.scores = ShardWriter(
                    self.fs, self.scores_root, state.file.shard, schema.scores_schema(), keep_empty=True
                )
                state.flagged = ShardWriter(
                    self.fs, self.flagged_root, state.file.shard, self.flagged_schema, keep_empty=False
                )
            state.scores.commit()
            state.flagged.commit()
            self._mark(state, DONE, None)

    def _fail(self, state: _FileState, error: str) -> None:
        for writer in (state.scores, state.flagged):
            if writer is not None:
                writer.abort()
        self._mark(state, FAILED, error)

    def _mark(self, state: _FileState, status: str, error: str | None) -> None:
        record = {
            "source": state.file.source,
            "shard": state.file.shard,
            "status": status,
            "fingerprint": self.fingerprint,
            "rows": state.received if status == DONE else 0,
            "counts": dict(state.counts) if status == DONE else {},
            "error": error,
            "finished_at": utc_now(),
        }
        self.ledger.mark(record)
        self.finished[state.file.source] = record
        if status == DONE:
            logger.info("committed %s: %d rows", state.file.source, state.received)
        else:
            logger.warning("input %s failed: %s", state.file.source, error)

    def close(self) -> None:
        """Fail every file the pipeline did not finish (it should never happen; the ledger must not lie)."""
        for state in self.states.values():
            if state.file.source not in self.finished:
                self._fail(
                    state,
                    f"incomplete: {state.received} rows written, end of file {'seen' if state.expected else 'not seen'}",
                )
