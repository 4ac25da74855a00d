"""The audit ledger: one small JSON record per input file under OUTPUT/_ledger/, written after that file's outputs.

A record with status "done" and the run's fingerprint means the file's outputs are complete; anything else
(no record, "failed", another fingerprint) means the file is (re)done. fsspec only.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fsspec.spec import AbstractFileSystem

from auditor.io.storage import join, write_json

logger = logging.getLogger(__name__)

LEDGER_DIR = "_ledger"
DONE = "done"
FAILED = "failed"


class Ledger:
    def __init__(self, fs: AbstractFileSystem, output_path: str):
        self.fs = fs
        self.root = join(output_path, LEDGER_DIR)

    def path_for(self, shard: str) -> str:
        return join(self.root, f"{shard}.json")

    def entries(self) -> dict[str, dict[str, Any]]:
        """Every record, keyed by input source URI."""
        if not self.fs.exists(self.root):
            return {}
        paths = [p for p in self.fs.find(self.root) if p.endswith(".json") and "/_tmp-" not in p]
        if not paths:
            return {}
        contents = self.fs.cat(paths)  # one batched call; s3fs fetches concurrently
        records = [json.loads(data) for data in contents.values()]
        return {r["source"]: r for r in records}

    def mark(self, record: dict[str, Any]) -> None:
        write_json(self.fs, self.path_for(record["shard"]), record)

    def unmark(self, shard: str) -> None:
        path = self.path_for(shard)
        if self.fs.exists(path):
            self.fs.rm(path)
