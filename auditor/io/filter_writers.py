"""What `auditor filter` writes per input file, one writer per format: parquet for the caption formats (the rows
with their columns), tar shards of the same names for WebDataset (auditor.io.webdataset). pyarrow/fsspec only.
"""

from __future__ import annotations

from typing import IO, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.spec import AbstractFileSystem

from auditor import schema
from auditor.formats import strip_extensions
from auditor.io.format_reader import Companion, FilterWriter, Verdicts
from auditor.io.inputs import InputFile
from auditor.io.readers import read_record_batches
from auditor.io.storage import join
from auditor.io.webdataset import TarShardWriter


def row_ids(table: pa.Table, rows: pa.Array, source: str, id_column: str | None) -> pa.Array:
    synthetic = pa.array([f"{source}:{r}" for r in rows.to_pylist()], pa.string())
    if id_column and id_column in table.column_names:
        return pc.coalesce(table.column(id_column).cast(pa.string()), synthetic)
    return synthetic


class ParquetFilterWriter(FilterWriter):
    """OUT/<path under DATASET without extensions>.parquet: the rows not flagged (drop), or every row with
    memorization_flag and memorization_score (mark), joined on `id` as the audit built it."""

    def target(self, root: str, file: InputFile, mode: str) -> str:
        return join(root, f"{strip_extensions(file.relative)}.parquet")

    def write(
        self,
        fs: AbstractFileSystem,
        file: InputFile,
        out: IO[bytes],
        verdicts: Verdicts,
        mode: str,
        id_column: str | None,
        summary: dict[str, Any],
    ) -> list[Companion]:
        audited = verdicts.table
        audit_ids = audited.column(schema.ID)
        writer = None
        for table, rows in read_record_batches(fs, file):
            index = pc.index_in(row_ids(table, rows, file.source, id_column), value_set=audit_ids)
            found = pc.is_valid(index)
            if verdicts.audited:
                flag = pc.take(audited.column(schema.FLAGGED), index)
                score = pc.take(audited.column(schema.SCORE), index)
            else:
                flag, score = pa.nulls(table.num_rows, pa.bool_()), pa.nulls(table.num_rows, pa.float32())
            is_flagged = pc.fill_null(flag, False)
            summary["rows"] += table.num_rows
            summary["flagged"] += pc.sum(is_flagged).as_py() or 0
            summary["unaudited"] += table.num_rows - (pc.sum(found).as_py() or 0)
            if mode == "drop":
                table = table.filter(pc.invert(is_flagged))
            else:
                table = table.append_column(pa.field(schema.MEMORIZATION_FLAG, pa.bool_()), flag)
                table = table.append_column(pa.field(schema.MEMORIZATION_SCORE, pa.float32()), score)
            if writer is None:
                writer = pq.ParquetWriter(out, table.schema)
            writer.write_table(table.cast(writer.schema))
            summary["written"] += table.num_rows
        if writer is not None:
            writer.close()
        return []


# The one table from format to filter writer; formats not named write parquet.
WRITERS: dict[str, FilterWriter] = {"webdataset": TarShardWriter()}
PARQUET_WRITER = ParquetFilterWriter()


def writer_for(file: InputFile) -> FilterWriter:
    return WRITERS.get(file.format, PARQUET_WRITER)
