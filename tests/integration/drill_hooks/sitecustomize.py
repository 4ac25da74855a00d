"""Fault-drill probe (tests only): counts the rows each scoring actor takes in, so a drill can tell how many rows
were scored again after a fault.

Every process of the drill cluster loads this as `sitecustomize` (the drill puts this folder on PYTHONPATH). With
AUDITOR_DRILL_SCORED_DIR set, it wraps `auditor.pipeline.stages.ScoreActor.__call__` when that module is first
imported: before scoring a batch, the actor appends one line per data row, `<source> TAB <row> TAB <unix time>`,
to `<dir>/<pid>.tsv`. Logged at the start of a call, a batch cut short by a kill counts as scored, as its work is
lost. With AUDITOR_TEST_BATCH_DELAY_S set, each call first sleeps that long: a slow model, for the tests of the
stall watchdog and of progress inside a unit. Without either variable it does nothing.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
import time

SCORED_DIR = os.environ.get("AUDITOR_DRILL_SCORED_DIR")
BATCH_DELAY_S = float(os.environ.get("AUDITOR_TEST_BATCH_DELAY_S") or 0)
TARGET = "auditor.pipeline.stages"


def _record_scored_rows(stages) -> None:
    from auditor import schema

    score = stages.ScoreActor.__call__

    def recording_call(self, batch):
        time.sleep(BATCH_DELAY_S)
        if not SCORED_DIR:
            return score(self, batch)
        status = batch.column(schema.STATUS).to_pylist()
        rows = zip(
            batch.column(schema.SOURCE).to_pylist(), batch.column(schema.ROW).to_pylist(), status, strict=True
        )
        now = f"{time.time():.3f}"
        lines = "".join(f"{s}\t{r}\t{now}\n" for s, r, st in rows if st not in schema.CONTROL_STATUSES)
        fd = os.open(os.path.join(SCORED_DIR, f"{os.getpid()}.tsv"), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, lines.encode())
        finally:
            os.close(fd)
        return score(self, batch)

    stages.ScoreActor.__call__ = recording_call


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            _record_scored_rows(module)

        spec.loader.exec_module = exec_module
        return spec


if SCORED_DIR or BATCH_DELAY_S:
    sys.meta_path.insert(0, _PatchOnImport())
