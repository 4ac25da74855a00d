"""The interfaces every input format implements: one small reader class per format, registered by name in
auditor.io.readers.READERS, and for `auditor filter` one writer (auditor.io.filter_writers.WRITERS). pyarrow/fsspec
only.

The plan, the read stage and `auditor filter` ask a file's reader; none of them branches on the format.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any, ClassVar

import pyarrow as pa
from fsspec.spec import AbstractFileSystem

from auditor import schema
from auditor.errors import InputDataError
from auditor.io.inputs import InputFile, missing_columns_error, peek_columns
from auditor.io.units import WorkUnit

# Columns a reader may add to its raw tables besides the requested ones: a row's status and error (bad records)
# and its synthetic id, for formats whose rows have a name of their own (a WebDataset sample's key).
STATUS_FIELD = "_status"
ERROR_FIELD = "_error"
SYNTHETIC_ID_FIELD = "_id"


class FormatReader:
    """One input format. Subclasses set `name` and implement `caption_tables` and `record_batches`.

    has_columns: False for formats whose rows are a caption only (txt): --id-column/--keep-columns do not apply.
    fixed_caption: the one column such a format has, read whatever --caption-column says (None: the option's).
    header_columns: a requested column missing from the file fails it whole as the read starts (a header or
    footer says what it has); the other formats check a first stretch of records themselves.
    """

    name: ClassVar[str] = ""
    has_columns: ClassVar[bool] = True
    fixed_caption: ClassVar[str | None] = None
    header_columns: ClassVar[bool] = False

    def columns(
        self, fs: AbstractFileSystem, file: InputFile, wanted: Sequence[str] = ()
    ) -> list[str] | None:
        """The column names a plan checks the options against (wanted: stop reading once all are seen). None: a
        file with no records, which lacks no column and audits as 0 rows."""
        return peek_columns(fs, file, wanted)

    def missing_error(self, file: InputFile, missing: list[str], present: list[str]) -> str:
        """The message for a file that lacks requested columns, while the audit goes on with the others."""
        return missing_columns_error(file, missing, present)

    def units(self, fs: AbstractFileSystem, file: InputFile, unit_rows: int) -> list[WorkUnit]:
        """The file's work units: one of unknown size, read front to back (row numbers need the whole stream)."""
        return [WorkUnit(index=0, file_units=1, first_row=0, rows=None)]

    def caption_tables(
        self,
        fs: AbstractFileSystem,
        file: InputFile,
        wanted: list[str],
        batch_rows: int,
        row_groups: Sequence[int] | None = None,
    ) -> Iterator[pa.Table]:
        """Raw tables with the wanted columns (wanted[0] is the caption), plus optional STATUS_FIELD, ERROR_FIELD
        and SYNTHETIC_ID_FIELD columns. row_groups: the unit's row groups, for formats with units."""
        raise NotImplementedError

    def record_batches(
        self, fs: AbstractFileSystem, file: InputFile, batch_rows: int
    ) -> Iterator[tuple[pa.Table, pa.Array]]:
        """(table of every column, row indices (int64)) per batch, for `auditor filter`'s parquet output."""
        raise NotImplementedError

    def check_row_groups(self, file: InputFile, row_groups: Sequence[int] | None) -> None:
        if row_groups is not None and list(row_groups):
            raise InputDataError(f"{file.source}: row groups exist only in parquet, not in {file.format}.")


@dataclass(frozen=True)
class Verdicts:
    """An audit's verdicts on one input file's rows: id, flagged, score columns (empty when it has none).
    audited: the audit has rows for the file at all."""

    table: pa.Table
    audited: bool

    def lookup(self) -> dict[str, tuple[bool | None, float | None]]:
        """{id: (flagged, score)}: one file's ids, for writers that look rows up one at a time."""
        flags = self.table.column(schema.FLAGGED).to_pylist() if self.audited else []
        scores = self.table.column(schema.SCORE).to_pylist() if self.audited else []
        return dict(
            zip(self.table.column(schema.ID).to_pylist(), zip(flags, scores, strict=True), strict=True)
        )


class FilterWriter:
    """What `auditor filter` writes for one input file of a format: its output path under OUT, and the output
    itself (every row not flagged in drop mode; every row with its flag and score in mark mode)."""

    def target(self, root: str, file: InputFile, mode: str) -> str:
        raise NotImplementedError

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
        """Write the output to out (the temporary file the caller moves into place); count into summary's rows,
        flagged, written and unaudited. Returns the files to write beside it once it is in place."""
        raise NotImplementedError


@dataclass(frozen=True)
class Companion:
    """A file `auditor filter` writes beside a file's output (a cleaned shard's sidecar parquet): its name in the
    output's folder, and what writes it to a binary stream."""

    name: str
    write: Callable[[IO[bytes]], None]
