"""Work units: the slices of an input file that are read, scored, committed and resumed as one. pyarrow only.

A parquet file is cut into units of whole row groups, at most `unit_rows` rows each (a row group larger than that
is a unit of its own); its footer gives every unit's first row, so ids `<source>:<row>` do not depend on the cut.
A jsonl/csv/tsv/txt file or a WebDataset tar is one unit: its row numbers count lines (samples), which only a
read from the start can know, so cutting it would mean reading every earlier unit again (and jsonl/csv rows may
span lines). Convert large text inputs to parquet to get units. Which units a file has: auditor.io.readers.units_of.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow.parquet as pq
from fsspec.spec import AbstractFileSystem

from auditor.io.inputs import InputFile


@dataclass(frozen=True)
class WorkUnit:
    """Unit `index` of `file_units` of one input file. rows None: not known before the read (text formats).

    row_groups: the parquet row groups it covers (empty for text formats, which are read whole).
    """

    index: int
    file_units: int
    first_row: int
    rows: int | None
    row_groups: tuple[int, ...] = ()


def cut_row_groups(row_group_rows: list[int], unit_rows: int) -> list[WorkUnit]:
    """Consecutive row groups packed greedily into units of at most unit_rows rows (at least one group each).

    A file with no row groups is one empty unit, so every input file has at least one unit to commit.
    """
    spans: list[tuple[int, list[int]]] = []  # (first_row, row group indices)
    first_row = 0
    current: list[int] = []
    current_rows = 0
    for group, rows in enumerate(row_group_rows):
        if current and current_rows + rows > unit_rows:
            spans.append((first_row, current))
            first_row += current_rows
            current, current_rows = [], 0
        current.append(group)
        current_rows += rows
    if current or not spans:
        spans.append((first_row, current))
    return [
        WorkUnit(
            index=index,
            file_units=len(spans),
            first_row=start,
            rows=sum(row_group_rows[g] for g in groups),
            row_groups=tuple(groups),
        )
        for index, (start, groups) in enumerate(spans)
    ]


def row_group_units(fs: AbstractFileSystem, file: InputFile, unit_rows: int) -> list[WorkUnit]:
    """A parquet file's units, from its footer (one small read). Other formats: auditor.io.readers.units_of."""
    with fs.open(file.path, "rb") as fh:
        metadata = pq.ParquetFile(fh).metadata
        sizes = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
    return cut_row_groups(sizes, unit_rows)
