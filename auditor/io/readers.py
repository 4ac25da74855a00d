"""Stream one input file as Arrow tables with a row index: one reader class per format (parquet, jsonl, csv/tsv,
txt here, WebDataset tars in auditor.io.webdataset), registered in READERS; the text formats and tars also
compressed (fsspec decompresses them on the fly). pyarrow/fsspec only.

A file is read front to back so every row gets its index in the file (`row`), which synthetic ids need.
Row numbering: parquet and csv/tsv count data rows (no header); jsonl counts non-blank lines; txt counts every line,
blank ones included (they become empty captions). A compressed file numbers the lines of its decompressed text. Bad records never raise: they come back with a status.
A UTF-8 byte order mark (Excel and Notepad start files with one) is not part of a csv/tsv header, a first jsonl
record or a first txt caption. A file without a requested column fails whole: csv/tsv by its header, parquet by its
footer, jsonl when none of its first KEY_CHECK_RECORDS records has the key.
Types: csv/tsv columns and jsonl id/keep columns are read as text (JSON text for non-string values), so chunks
and files always agree; parquet columns keep their types.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from fsspec.spec import AbstractFileSystem

from auditor import schema
from auditor.errors import InputDataError
from auditor.io.format_reader import ERROR_FIELD, STATUS_FIELD, SYNTHETIC_ID_FIELD, FormatReader
from auditor.io.inputs import (
    DECOMPRESSION_ERRORS,
    KEY_CHECK_RECORDS,
    TXT_COLUMN,
    UTF8_BOM,
    InputFile,
    decompression_error,
    json_array_error,
    missing_columns_error,
    open_input,
)
from auditor.io.units import WorkUnit, row_group_units
from auditor.io.webdataset import SidecarReader, WebDatasetReader

logger = logging.getLogger(__name__)

DEFAULT_BATCH_ROWS = 4096


def _to_string_array(values: list[Any]) -> pa.Array:
    return pa.array([None if v is None else str(v) for v in values], type=pa.string())


def _loose_array(values: list[Any]) -> pa.Array:
    """Arrow array for a keep-column from JSON values; mixed types fall back to their JSON text."""
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array(
            [v if v is None or isinstance(v, str) else json.dumps(v) for v in values], type=pa.string()
        )


def _text_array(values: list[Any]) -> pa.Array:
    """JSON values as text (strings as they are, other values as JSON): one type for every chunk and file."""
    return pa.array(
        [v if v is None or isinstance(v, str) else json.dumps(v) for v in values], type=pa.string()
    )


def _records_table(records: list[dict[str, Any]], first: pa.Schema | None) -> pa.Table:
    """Records -> table; after the first chunk, columns follow its schema (new keys dropped, odd values as text)."""
    names = list(first.names) if first is not None else list(dict.fromkeys(k for r in records for k in r))
    columns = {}
    for name in names:
        array = _loose_array([r.get(name) for r in records])
        if first is not None and array.type != first.field(name).type:
            try:
                array = array.cast(first.field(name).type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
                array = _loose_array([r.get(name) for r in records]).cast(pa.string())
        columns[name] = array
    return pa.table(columns)


# Raw record batches -----------------------------------------------------------------------------------------------
def _csv_batches(fs: AbstractFileSystem, file: InputFile, columns: list[str] | None) -> Iterator[pa.Table]:
    delimiter = "\t" if file.format == "tsv" else ","
    parse = pacsv.ParseOptions(delimiter=delimiter)
    with open_input(fs, file) as fh:
        try:
            names = pacsv.open_csv(fh, parse_options=parse).schema.names
        except pa.ArrowInvalid:
            if _has_text(fs, file):
                raise
            return  # no header and no row (0 bytes, or blank lines only): 0 rows, as an empty jsonl
    # CSV has no types: every column stays a string, so no block can disagree with the first one.
    convert = pacsv.ConvertOptions(
        column_types={n: pa.string() for n in names},
        include_columns=[c for c in columns if c in names] if columns is not None else None,
        strings_can_be_null=False,
    )
    with open_input(fs, file) as fh:
        reader = pacsv.open_csv(fh, parse_options=parse, convert_options=convert)
        for batch in reader:
            yield pa.Table.from_batches([batch])


def _has_text(fs: AbstractFileSystem, file: InputFile) -> bool:
    """Whether the (decompressed) file holds anything but whitespace and a UTF-8 byte order mark."""
    with open_input(fs, file) as fh:
        first = True
        while chunk := fh.read(1 << 16):
            if (chunk.removeprefix(UTF8_BOM) if first else chunk).strip():
                return True
            first = False
    return False


def _jsonl_records(
    fs: AbstractFileSystem, file: InputFile
) -> Iterator[tuple[dict[str, Any] | None, str | None]]:
    """(record, None) per non-blank line, or (None, error) for a line that is not a JSON object. Raises
    InputDataError for a file that holds one JSON array (its first non-blank line starts with "[").
    """
    first = True
    with open_input(fs, file) as fh:
        for number, raw in enumerate(fh, start=1):
            if number == 1:
                raw = raw.removeprefix(UTF8_BOM)
            if not raw.strip():
                continue
            if first and raw.lstrip().startswith(b"["):
                raise InputDataError(f"{file.source}: {json_array_error()}")
            first = False
            try:
                record = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                yield None, f"line {number}: not JSON ({exc})"
                continue
            if not isinstance(record, dict):
                yield None, f"line {number}: a JSON {type(record).__name__}, expected an object"
                continue
            yield record, None


def _txt_lines(fs: AbstractFileSystem, file: InputFile) -> Iterator[tuple[str | None, str | None]]:
    with open_input(fs, file) as fh:
        for number, raw in enumerate(fh, start=1):
            try:
                yield raw.removeprefix(UTF8_BOM if number == 1 else b"").decode("utf-8").rstrip("\r\n"), None
            except UnicodeDecodeError as exc:
                yield None, f"line {number}: not UTF-8 ({exc})"


@contextlib.contextmanager
def _decompressing(file: InputFile) -> Iterator[None]:
    """Turn a codec's error while a compressed file is read into an InputDataError that names the file."""
    try:
        yield
    except DECOMPRESSION_ERRORS as exc:
        if file.compression is None:
            raise
        raise InputDataError(decompression_error(file, exc)) from exc


def _chunks(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _jsonl_table(
    columns: dict[str, list[Any]], line_errors: list[str | None], caption_column: str
) -> pa.Table:
    captions = columns[caption_column]
    status: list[str | None] = []
    errors: list[str | None] = []
    for caption, line_error in zip(captions, line_errors, strict=True):
        if line_error is not None:
            status.append(schema.BAD_RECORD)
            errors.append(line_error)
        elif caption is not None and not isinstance(caption, str):
            status.append(schema.NOT_STRING)
            errors.append(f"caption is {type(caption).__name__} ({caption!r:.60}), expected a string")
        else:
            status.append(None)
            errors.append(None)
    arrays = {
        name: (
            pa.array([c if isinstance(c, str) else None for c in values], type=pa.string())
            if name == caption_column
            else _text_array(values)
        )
        for name, values in columns.items()
    }
    arrays[STATUS_FIELD] = pa.array(status, type=pa.string())
    arrays[ERROR_FIELD] = pa.array(errors, type=pa.string())
    return pa.table(arrays)


def string_captions(
    caption: pa.Array | pa.ChunkedArray, caption_column: str, status: Any, error: Any
) -> tuple[Any, Any, Any]:
    """(caption as string, status, error): a caption column of another type gives null captions, and NOT_STRING
    with an error on its non-null rows. status / error: the rows' current values (null where none yet)."""
    if not (
        pa.types.is_string(caption.type)
        or pa.types.is_large_string(caption.type)
        or pa.types.is_null(caption.type)
    ):
        bad = pc.invert(pc.is_null(caption))
        status = pc.if_else(bad, pa.scalar(schema.NOT_STRING), status)
        error = pc.if_else(
            bad, pa.scalar(f"caption column {caption_column!r} is {caption.type}, expected string"), error
        )
        caption = pa.nulls(len(caption), pa.string())
    return caption.cast(pa.string()), status, error


def _normalise(
    table: pa.Table,
    file: InputFile,
    caption_column: str,
    id_column: str | None,
    keep_columns: tuple[str, ...],
    start: int,
) -> pa.Table:
    n = table.num_rows
    rows = pa.array(range(start, start + n), type=pa.int64())
    status = table.column(STATUS_FIELD) if STATUS_FIELD in table.column_names else pa.nulls(n, pa.string())
    error = table.column(ERROR_FIELD) if ERROR_FIELD in table.column_names else pa.nulls(n, pa.string())
    caption, status, error = string_captions(table.column(caption_column), caption_column, status, error)
    if SYNTHETIC_ID_FIELD in table.column_names:
        synthetic = table.column(SYNTHETIC_ID_FIELD)
    else:
        synthetic = pa.array([f"{file.source}:{r}" for r in range(start, start + n)], type=pa.string())
    if id_column:
        ids = table.column(id_column)
        ids = ids.cast(pa.string()) if not pa.types.is_string(ids.type) else ids
        ids = pc.coalesce(ids, synthetic)
    else:
        ids = synthetic
    columns = {
        schema.ID: ids,
        schema.CAPTION: caption,
        schema.SOURCE: pa.array([file.source] * n, type=pa.string()),
        schema.ROW: rows,
        schema.STATUS: pc.coalesce(status, pa.scalar(schema.OK)),
        schema.ERROR: error,
    }
    for name in keep_columns:
        columns[name] = table.column(name) if name in table.column_names else pa.nulls(n)
    return pa.table(columns)


# One reader per format ----------------------------------------------------------------------------------------
class ParquetReader(FormatReader):
    name = "parquet"
    header_columns = True

    def units(self, fs: AbstractFileSystem, file: InputFile, unit_rows: int) -> list[WorkUnit]:
        return row_group_units(fs, file, unit_rows)

    def caption_tables(
        self,
        fs: AbstractFileSystem,
        file: InputFile,
        wanted: list[str],
        batch_rows: int,
        row_groups: Sequence[int] | None = None,
    ) -> Iterator[pa.Table]:
        with fs.open(file.path, "rb") as fh:
            parquet = pq.ParquetFile(fh)
            names = parquet.schema_arrow.names
            missing = [c for c in wanted if c not in names]
            if missing:
                raise InputDataError(missing_columns_error(file, missing, names))
            groups = list(range(parquet.num_row_groups)) if row_groups is None else list(row_groups)
            if not groups:
                return
            for batch in parquet.iter_batches(batch_size=batch_rows, columns=wanted, row_groups=groups):
                yield pa.Table.from_batches([batch])

    def record_batches(
        self, fs: AbstractFileSystem, file: InputFile, batch_rows: int
    ) -> Iterator[tuple[pa.Table, pa.Array]]:
        start = 0
        with fs.open(file.path, "rb") as fh:
            for batch in pq.ParquetFile(fh).iter_batches(batch_size=batch_rows):
                yield (
                    pa.Table.from_batches([batch]),
                    pa.array(range(start, start + batch.num_rows), pa.int64()),
                )
                start += batch.num_rows


class CsvReader(FormatReader):
    """csv and tsv (the delimiter from the file's format)."""

    name = "csv"
    header_columns = True

    def caption_tables(
        self,
        fs: AbstractFileSystem,
        file: InputFile,
        wanted: list[str],
        batch_rows: int,
        row_groups: Sequence[int] | None = None,
    ) -> Iterator[pa.Table]:
        self.check_row_groups(file, row_groups)
        for table in _csv_batches(fs, file, wanted):
            for offset in range(0, table.num_rows, batch_rows):
                yield table.slice(offset, batch_rows)

    def record_batches(
        self, fs: AbstractFileSystem, file: InputFile, batch_rows: int
    ) -> Iterator[tuple[pa.Table, pa.Array]]:
        start = 0
        for table in _csv_batches(fs, file, None):
            yield table, pa.array(range(start, start + table.num_rows), pa.int64())
            start += table.num_rows


class TsvReader(CsvReader):
    name = "tsv"


class JsonlReader(FormatReader):
    name = "jsonl"

    def caption_tables(
        self,
        fs: AbstractFileSystem,
        file: InputFile,
        wanted: list[str],
        batch_rows: int,
        row_groups: Sequence[int] | None = None,
    ) -> Iterator[pa.Table]:
        self.check_row_groups(file, row_groups)
        # No header: the first records stand for one, so a key none of them has fails the file as a missing csv
        # column does, before any row is read on (inputs.KEY_CHECK_RECORDS).
        lines = _jsonl_records(fs, file)
        head = list(itertools.islice(lines, KEY_CHECK_RECORDS))
        keys = list(dict.fromkeys(k for record, _ in head if record is not None for k in record))
        missing = [c for c in wanted if c not in keys]
        if missing and any(record is not None for record, _ in head):
            raise InputDataError(missing_columns_error(file, missing, keys))
        for chunk in _chunks(itertools.chain(head, lines), batch_rows):
            columns: dict[str, list[Any]] = {}
            for name in wanted:
                columns[name] = [None if r is None else r.get(name) for r, _ in chunk]
            yield _jsonl_table(columns, [e for _, e in chunk], wanted[0])

    def record_batches(
        self, fs: AbstractFileSystem, file: InputFile, batch_rows: int
    ) -> Iterator[tuple[pa.Table, pa.Array]]:
        start = 0
        first_schema: pa.Schema | None = None
        for chunk in _chunks(_jsonl_records(fs, file), batch_rows):
            rows = [start + i for i, (record, _) in enumerate(chunk) if record is not None]
            records = [record for record, _ in chunk if record is not None]
            start += len(chunk)
            if not records:
                continue
            table = _records_table(records, first_schema)
            if first_schema is None:
                # A column that is all null in the first chunk is read as text from then on.
                first_schema = pa.schema(
                    [pa.field(f.name, pa.string()) if pa.types.is_null(f.type) else f for f in table.schema]
                )
                table = table.cast(first_schema)
            yield table, pa.array(rows, pa.int64())


class TxtReader(FormatReader):
    name = "txt"
    has_columns = False
    fixed_caption = TXT_COLUMN

    def caption_tables(
        self,
        fs: AbstractFileSystem,
        file: InputFile,
        wanted: list[str],
        batch_rows: int,
        row_groups: Sequence[int] | None = None,
    ) -> Iterator[pa.Table]:
        self.check_row_groups(file, row_groups)
        for chunk in _chunks(_txt_lines(fs, file), batch_rows):
            errors = [e for _, e in chunk]
            yield pa.table(
                {
                    TXT_COLUMN: pa.array([c for c, _ in chunk], type=pa.string()),
                    STATUS_FIELD: pa.array(
                        [schema.BAD_RECORD if e else None for e in errors], type=pa.string()
                    ),
                    ERROR_FIELD: pa.array(errors, type=pa.string()),
                }
            )

    def record_batches(
        self, fs: AbstractFileSystem, file: InputFile, batch_rows: int
    ) -> Iterator[tuple[pa.Table, pa.Array]]:
        start = 0
        for chunk in _chunks(_txt_lines(fs, file), batch_rows):
            yield (
                pa.table({TXT_COLUMN: pa.array([c for c, _ in chunk], type=pa.string())}),
                pa.array(range(start, start + len(chunk)), pa.int64()),
            )
            start += len(chunk)


# The one table from format name to reader: the plan, the read stage and `auditor filter` ask it.
READERS: dict[str, FormatReader] = {
    reader.name: reader
    for reader in (
        ParquetReader(),
        CsvReader(),
        TsvReader(),
        JsonlReader(),
        TxtReader(),
        WebDatasetReader(),
        SidecarReader(),
    )
}


def reader_for(file: InputFile) -> FormatReader:
    """The reader of a file's format; InputDataError for a format no reader has."""
    try:
        return READERS[file.format]
    except KeyError:
        raise InputDataError(f"{file.source}: unknown format {file.format!r}.") from None


def columns_of(fs: AbstractFileSystem, file: InputFile, wanted: Sequence[str] = ()) -> list[str] | None:
    """The column names of one file as its reader sees them (None: no records; see FormatReader.columns)."""
    return reader_for(file).columns(fs, file, wanted)


def units_of(fs: AbstractFileSystem, file: InputFile, unit_rows: int) -> list[WorkUnit]:
    """The file's work units: parquet from its footer (one small read), every other format one unit of unknown
    size."""
    return reader_for(file).units(fs, file, unit_rows)


# Captions for the audit ------------------------------------------------------------------------------------------
def read_caption_batches(
    fs: AbstractFileSystem,
    file: InputFile,
    caption_column: str,
    id_column: str | None = None,
    keep_columns: tuple[str, ...] = (),
    batch_rows: int = DEFAULT_BATCH_ROWS,
    row_groups: Sequence[int] | None = None,
    first_row: int = 0,
) -> Iterator[pa.Table]:
    """Tables of READ_SCHEMA + keep columns. status is OK, NOT_STRING or BAD_RECORD; null/empty captions stay OK
    here (the tokenize stage names them). Raises InputDataError (or the reader's own error) if the file is unusable.

    row_groups (parquet only): read just these row groups, whose first row in the file is first_row (a work unit);
    None reads the whole file.
    """
    reader = reader_for(file)
    caption_column = reader.fixed_caption or caption_column
    wanted = [caption_column, *([id_column] if id_column else []), *keep_columns]
    if not reader.has_columns and (id_column or keep_columns):
        raise InputDataError(
            f"{file.source} is a {file.format} file (captions only); --id-column/--keep-columns do not apply."
        )
    start = first_row
    with _decompressing(file):
        for table in reader.caption_tables(fs, file, wanted, batch_rows, row_groups):
            missing = [c for c in wanted if c not in table.column_names]
            if missing and reader.header_columns:
                raise InputDataError(missing_columns_error(file, missing, table.column_names))
            yield _normalise(table, file, caption_column, id_column, keep_columns, start)
            start += table.num_rows


# Whole records for `auditor filter` -----------------------------------------------------------------------------
def read_record_batches(
    fs: AbstractFileSystem, file: InputFile, batch_rows: int = DEFAULT_BATCH_ROWS
) -> Iterator[tuple[pa.Table, pa.Array]]:
    """(table of all columns, row indices (int64)) per batch. jsonl lines that are not objects are skipped
    (the audit recorded them as bad_record); their row indices are skipped with them.
    """
    reader = reader_for(file)
    with _decompressing(file):
        yield from reader.record_batches(fs, file, batch_rows)
