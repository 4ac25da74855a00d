"""`UnitTracker`: the driver's view of the audit. It reads only acknowledgements from the write stage and says
which units are ready to commit (every row staged and the unit's END_OF_UNIT seen) or have failed.

Acknowledgements of one unit arrive out of order and from many workers; staged row counts decide completeness.
Never imports ray; holds a few bytes per unit in flight, nothing per row.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa

from auditor.histogram import N_COUNTS
from auditor.pipeline.stages import ACK_END, ACK_ERROR, ACK_ROWS
from auditor.redact import redact_text


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class UnitState:
    source: str
    shard: str
    unit: int
    staged: list[str] = field(default_factory=list)
    received: int = 0
    expected: int | None = None
    first_row: int | None = None
    file_units: int | None = None
    error: str | None = None
    counts: Counter = field(default_factory=Counter)
    histogram: list[int] = field(default_factory=lambda: [0] * N_COUNTS)
    nodes: Counter = field(default_factory=Counter)  # rows scored per Ray node
    lengths: dict[int, list[int]] = field(default_factory=dict)  # n_tokens -> [rows, flagged]
    stages: Counter = field(default_factory=Counter)  # rows re-scored, denoiser rows by stage (stage_counts)
    confirm_histogram: list[int] = field(default_factory=lambda: [0] * N_COUNTS)

    @property
    def main_node(self) -> str | None:
        return self.nodes.most_common(1)[0][0] if self.nodes else None

    @property
    def complete(self) -> bool:
        return self.error is None and self.expected is not None and self.received == self.expected


class UnitTracker:
    def __init__(self) -> None:
        self.units: dict[tuple[str, int], UnitState] = {}
        self.runtimes: set[str] = set()
        self.ack_bytes = 0
        self.acks = 0
        self.last_ack = time.monotonic()
        self.cpu_s = 0.0  # driver CPU spent on acknowledgements
        self.file_units: dict[str, int] = {}  # source -> units, learnt from END_OF_UNIT acknowledgements

    def consume(self, acks: pa.Table) -> list[UnitState]:
        """Take one table of acknowledgements; return the units it made ready (complete or failed), once each."""
        started = time.process_time()
        ready = self._consume(acks)
        self.cpu_s += time.process_time() - started
        return ready

    def _consume(self, acks: pa.Table) -> list[UnitState]:
        self.ack_bytes += acks.nbytes
        self.acks += acks.num_rows
        self.last_ack = time.monotonic()
        touched: dict[tuple[str, int], UnitState] = {}
        for ack in acks.to_pylist():
            key = (ack["source"], int(ack["unit"]))
            state = self.units.get(key)
            if state is None:
                state = self.units[key] = UnitState(ack["source"], ack["shard"], int(ack["unit"]))
            if ack["runtime"]:
                self.runtimes.add(ack["runtime"])
            if ack["kind"] == ACK_ROWS:
                state.staged.append(ack["staged"])
                state.received += ack["rows"]
                state.counts.update(json.loads(ack["counts"]))
                for index, count in json.loads(ack["histogram"]).items():
                    state.histogram[int(index)] += count
                state.nodes.update(json.loads(ack["nodes"] or "{}"))
                for length, (rows, flagged) in json.loads(ack["tokens"] or "{}").items():
                    pair = state.lengths.setdefault(int(length), [0, 0])
                    pair[0] += rows
                    pair[1] += flagged
                state.stages.update(json.loads(ack["stages"] or "{}"))
                for index, count in json.loads(ack["confirm_histogram"] or "{}").items():
                    state.confirm_histogram[int(index)] += count
            elif ack["kind"] == ACK_END:
                state.expected, state.first_row, state.file_units = (
                    ack["rows"],
                    ack["first_row"],
                    ack["file_units"],
                )
            elif ack["kind"] == ACK_ERROR:
                state.error = ack["error"] or "read failed"
                state.first_row, state.file_units = ack["first_row"], ack["file_units"]
            touched[key] = state
        ready = [s for s in touched.values() if s.complete or s.error is not None]
        for state in ready:
            del self.units[(state.source, state.unit)]
        return ready

    def unfinished(self) -> list[UnitState]:
        """Units with staged rows or an end seen but never ready: what a broken stream leaves behind."""
        return list(self.units.values())


def sparse_histogram(counts: list[int]) -> dict[str, int]:
    return {str(i): n for i, n in enumerate(counts) if n}


def dense_histogram(sparse: dict[str, int] | None) -> list[int]:
    dense = [0] * N_COUNTS
    for index, count in (sparse or {}).items():
        dense[int(index)] += count
    return dense


def merge_lengths(records: list[dict[str, Any]]) -> dict[str, list[int]]:
    """{"rows": [...], "flagged": [...]} indexed by n_tokens, summed over the records' "lengths"."""
    rows: list[int] = []
    flagged: list[int] = []
    for record in records:
        for length, (n, f) in (record.get("lengths") or {}).items():
            index = int(length)
            if index >= len(rows):
                rows.extend([0] * (index + 1 - len(rows)))
                flagged.extend([0] * (index + 1 - len(flagged)))
            rows[index] += n
            flagged[index] += f
    return {"rows": rows, "flagged": flagged}


def unit_record(
    state: UnitState,
    identity: str,
    fingerprint: str,
    unit_rows: int,
    status: str,
    parts: dict[str, Any] | None,
) -> dict[str, Any]:
    """The ledger record of a committed (status done) or failed unit."""
    done = status == "done"
    return {
        "source": state.source,
        "shard": state.shard,
        "unit": state.unit,
        "first_row": state.first_row,
        "rows": state.received if done else 0,
        "file_units": state.file_units,
        "identity": identity,
        "fingerprint": fingerprint,
        "unit_rows": unit_rows,
        "status": status,
        "counts": dict(state.counts) if done else {},
        "histogram": sparse_histogram(state.histogram) if done else {},
        "lengths": {str(k): v for k, v in sorted(state.lengths.items())} if done else {},
        "stages": dict(state.stages) if done else {},
        "confirm_histogram": sparse_histogram(state.confirm_histogram) if done else {},
        "parts": parts,
        "error": redact_text(state.error) if state.error else state.error,
        "finished_at": utc_now(),
    }
