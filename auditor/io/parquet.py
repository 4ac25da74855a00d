"""Per-input-file parquet output: one deterministic file per (input file, output table), written via a temporary
name and moved into place on commit. pyarrow/fsspec only.
"""

from __future__ import annotations

import logging

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.spec import AbstractFileSystem

from auditor import schema
from auditor.io.storage import join

logger = logging.getLogger(__name__)

# One input file -> one output file per table, so a rerun of that input replaces it (never adds a second one).
PART_NAME = "part-0.parquet"
# pyarrow.dataset, polars and Spark skip names starting with "_" or ".", so a half-written file is never read.
TEMPORARY_PREFIX = "_tmp-"


def shard_dir(root: str, shard: str) -> str:
    return join(root, f"{schema.SHARD}={shard}")


class ShardWriter:
    """Streams one input file's rows into ROOT/shard=<key>/part-0.parquet with a fixed schema.

    Rows are written to a temporary name; `commit()` moves the file into place, `abort()` deletes it.
    keep_empty: commit a file with no rows (scores do, so every input file has its shard; flagged does not).
    """

    def __init__(
        self, fs: AbstractFileSystem, root: str, shard: str, file_schema: pa.Schema, keep_empty: bool
    ):
        folder = shard_dir(root, shard)
        self.fs = fs
        self.path = join(folder, PART_NAME)
        self.temporary = join(folder, TEMPORARY_PREFIX + PART_NAME)
        self.schema = file_schema
        self.keep_empty = keep_empty
        self.rows = 0
        self._handle = None
        self._writer: pq.ParquetWriter | None = None

    def write(self, table: pa.Table) -> None:
        if self._writer is None:
            self.fs.makedirs(self.path.rsplit("/", 1)[0], exist_ok=True)
            self._handle = self.fs.open(self.temporary, "wb")
            self._writer = pq.ParquetWriter(self._handle, self.schema)
        if table.num_rows:
            self._writer.write_table(table.select(self.schema.names).cast(self.schema))
            self.rows += table.num_rows

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._handle.close()
            self._writer = self._handle = None

    def commit(self) -> bool:
        """Move the file into place; False (and nothing written) when it has no rows and keep_empty is False."""
        if self.rows == 0 and not self.keep_empty:
            self.abort()
            return False
        if self._writer is None:
            self.write(self.schema.empty_table())
        self._close()
        self.fs.mv(self.temporary, self.path)
        return True

    def abort(self) -> None:
        self._close()
        if self.fs.exists(self.temporary):
            self.fs.rm(self.temporary)


def read_shard(fs: AbstractFileSystem, root: str, shard: str, columns: list[str]) -> pa.Table | None:
    """One input file's committed rows from ROOT/shard=<key>/, or None if that shard was never written."""
    path = join(shard_dir(root, shard), PART_NAME)
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as fh:
        return pq.read_table(fh, columns=columns)
