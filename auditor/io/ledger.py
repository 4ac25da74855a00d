"""The audit ledger: one small JSON record per committed or failed work unit, under OUTPUT/_ledger/. fsspec only.

A unit's record is written after its part files are in place, so a "done" record always points at complete output.
A record counts for a later run only if it matches that run: same file identity (size + ETag/mtime), same run
fingerprint (model + options) and same unit size; anything else means the unit is redone.

Layout, made for a ledger of 100k+ units that still reads in seconds:
- `_ledger/units/<shard>-u<unit>.json`: one object per record, written as units commit;
- `_ledger/compacted/<ns>.jsonl`: snapshots. At the end of a run every record is folded into one new snapshot and
  the objects it covers are deleted, so the next run reads a handful of objects, not one per unit.
Reading takes one recursive listing and one batched read; when a unit has several records the newest wins.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fsspec.spec import AbstractFileSystem

from auditor.io.storage import TEMPORARY_PREFIX, is_local, join, write_json

logger = logging.getLogger(__name__)

LEDGER_DIR = "_ledger"
UNITS_DIR = "units"
COMPACTED_DIR = "compacted"
DONE = "done"
FAILED = "failed"
READ_THREADS = 32

UnitKey = tuple[str, int]  # (source, unit index)


def unit_key(record: dict[str, Any]) -> UnitKey:
    return record["source"], int(record["unit"])


class Ledger:
    def __init__(self, fs: AbstractFileSystem, output_path: str):
        self.fs = fs
        self.root = join(output_path, LEDGER_DIR)

    def unit_path(self, shard: str, unit: int) -> str:
        return join(self.root, UNITS_DIR, f"{shard}-u{unit:06d}.json")

    # Reading ---------------------------------------------------------------------------------------------------
    def _listing(self) -> tuple[list[str], list[str]]:
        """(snapshot paths oldest first, unit record paths): one recursive listing of the ledger."""
        if not self.fs.exists(self.root):
            return [], []
        snapshots, units = [], []
        for path in self.fs.find(self.root):
            name = path.rsplit("/", 1)[-1]
            if name.startswith((TEMPORARY_PREFIX, ".")):
                continue
            if f"/{COMPACTED_DIR}/" in path and name.endswith(".jsonl"):
                snapshots.append(path)
            elif f"/{UNITS_DIR}/" in path and name.endswith(".json"):
                units.append(path)
        return sorted(snapshots), units

    def _read_all(self, paths: list[str]) -> dict[str, bytes]:
        if not paths:
            return {}
        if is_local(self.fs):
            with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
                return dict(zip(paths, pool.map(self.fs.cat_file, paths), strict=True))
        return self.fs.cat(paths)  # one batched call; remote filesystems fetch concurrently

    def _newest(self, snapshots: list[str], units: list[str]) -> dict[UnitKey, dict[str, Any]]:
        """Read these ledger objects and keep the newest record of every unit (by committed_ns)."""
        contents = self._read_all(snapshots + units)
        records: list[dict[str, Any]] = []
        for path in snapshots:
            records.extend(json.loads(line) for line in contents[path].decode("utf-8").splitlines() if line)
        for path in units:
            records.append(json.loads(contents[path]))
        newest: dict[UnitKey, dict[str, Any]] = {}
        for record in records:
            if "unit" not in record:  # a record of an older ledger layout (one per input file): never matches
                continue
            key = unit_key(record)
            if key not in newest or record["committed_ns"] >= newest[key]["committed_ns"]:
                newest[key] = record
        return newest

    def entries(self) -> dict[UnitKey, dict[str, Any]]:
        """The newest record of every unit, keyed by (source, unit)."""
        return self._newest(*self._listing())

    # Writing ---------------------------------------------------------------------------------------------------
    def mark(self, record: dict[str, Any]) -> dict[str, Any]:
        """Write one unit's record (adds committed_ns, which orders records of the same unit)."""
        record = {**record, "committed_ns": time.time_ns()}
        write_json(self.fs, self.unit_path(record["shard"], int(record["unit"])), record)
        return record

    def compact(self, keep: Callable[[dict[str, Any]], bool] = lambda record: True) -> list[dict[str, Any]]:
        """Fold every record that `keep` accepts into one new snapshot; delete the objects it replaces.

        Safe at any crash point: the new snapshot is in place (written under a temporary name, then moved) before
        anything is deleted, and a unit record written after the listing is neither folded nor deleted.
        Returns the records kept (the newest of each unit that `keep` accepts, sorted by source and unit): what the
        ledger holds now, short of records written after the listing.
        """
        snapshots, units = self._listing()
        if not snapshots and not units:
            return []
        newest = self._newest(snapshots, units)
        kept = [r for r in newest.values() if keep(r)]
        kept.sort(key=lambda r: (r["source"], r["unit"]))
        target = join(self.root, COMPACTED_DIR, f"{time.time_ns():020d}.jsonl")
        temporary = join(self.root, COMPACTED_DIR, f"{TEMPORARY_PREFIX}{target.rsplit('/', 1)[-1]}")
        self.fs.makedirs(join(self.root, COMPACTED_DIR), exist_ok=True)
        with self.fs.open(temporary, "wb") as fh:
            fh.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in kept).encode("utf-8"))
        self.fs.mv(temporary, target)
        self._remove(snapshots + units)
        return kept

    def forget(self, sources: Iterable[str]) -> None:
        """Drop every record of these sources (before their outputs are deleted, so no record outlives them)."""
        dropped = set(sources)
        if dropped:
            self.compact(keep=lambda record: record["source"] not in dropped)

    def _remove(self, paths: list[str]) -> None:
        if not paths:
            return
        if is_local(self.fs):
            with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
                list(pool.map(self.fs.rm_file, paths))
        else:
            self.fs.rm(paths)

    def remove_legacy(self) -> None:
        """Delete records of the older one-per-input-file layout (`_ledger/<shard>.json`); they never match."""
        if not self.fs.exists(self.root):
            return
        legacy = [
            p
            for p in self.fs.ls(self.root, detail=False)
            if p.endswith(".json") and not p.rsplit("/", 1)[-1].startswith(TEMPORARY_PREFIX)
        ]
        self._remove(legacy)
