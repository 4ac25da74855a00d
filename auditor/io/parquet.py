"""Audit output files: rows staged by the workers, then one part file per work unit moved into place on commit.

Layout (Hive, one partition value per input file):
    OUTPUT/scores/shard=<file-key>/part-u<unit>.parquet    every row of one committed unit
    OUTPUT/flagged/shard=<file-key>/part-u<unit>.parquet   its flagged rows (no file when it has none)
    OUTPUT/_staging/<file-key>/u<unit>-<uuid>.parquet       rows written by the workers, not yet committed
The staging area lies outside scores/ and flagged/, so no reader (pyarrow dataset, DuckDB globs, polars, Spark)
ever sees a row of an uncommitted unit. A commit merges a unit's staged files into one file written under a
temporary name and moved into place: the part appears whole or not at all, and its name is fixed by the unit,
so a redo replaces it instead of adding a second copy. pyarrow/fsspec only.
"""

from __future__ import annotations

import logging
import uuid

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.spec import AbstractFileSystem

from auditor import schema
from auditor.io.storage import TEMPORARY_PREFIX, join

logger = logging.getLogger(__name__)

SCORES_DIR = "scores"
FLAGGED_DIR = "flagged"
STAGING_DIR = "_staging"
# Dropped when rows are staged, so a commit cannot mistake one for a --keep-columns column. The node that scored a
# row is counted into the acknowledgement first (per-node throughput in _audit.json): host names stay out of files.
INTERNAL_COLUMNS = schema.INTERNAL_COLUMNS


def shard_dir(root: str, shard: str) -> str:
    return join(root, f"{schema.SHARD}={shard}")


def part_name(unit: int) -> str:
    return f"part-u{unit:06d}.parquet"


def staging_dir(output_path: str, shard: str) -> str:
    return join(output_path, STAGING_DIR, shard)


def write_parquet(fs: AbstractFileSystem, path: str, table: pa.Table) -> None:
    """Write under a temporary name beside `path`, then move into place (readers see all of it or nothing)."""
    parent, name = path.rsplit("/", 1)
    # Unique per writer: a commit retried while the first attempt still runs on a cut-off node must not share it.
    temporary = join(parent, f"{TEMPORARY_PREFIX}{uuid.uuid4().hex[:12]}-{name}")
    fs.makedirs(parent, exist_ok=True)
    with fs.open(temporary, "wb") as fh:
        pq.write_table(table, fh)
    fs.mv(temporary, path)


def stage_rows(fs: AbstractFileSystem, output_path: str, shard: str, unit: int, rows: pa.Table) -> str:
    """Write a worker's scored rows of one unit to the staging area; returns the staged file's path."""
    path = join(staging_dir(output_path, shard), f"u{unit:06d}-{uuid.uuid4().hex}.parquet")
    write_parquet(fs, path, rows.drop_columns([c for c in rows.column_names if c in INTERNAL_COLUMNS]))
    return path


def _keep_fields(table: pa.Table) -> list[pa.Field]:
    """The --keep-columns of a staged table, with the types they arrived in (all-null columns become text)."""
    fixed = set(schema.SCORES_SCHEMA.names) | set(schema.FLAGGED_SCHEMA_EXTRA) | INTERNAL_COLUMNS
    return [
        pa.field(f.name, pa.string() if pa.types.is_null(f.type) else f.type)
        for f in table.schema
        if f.name not in fixed
    ]


def commit_unit(
    fs: AbstractFileSystem,
    output_path: str,
    shard: str,
    unit: int,
    staged: list[str],
    flagged_schema: pa.Schema,
) -> dict[str, str | int | None]:
    """Merge a unit's staged files (row order) into its scores part and flagged part, then delete them.

    An empty unit (an empty input file) still gets an empty scores part, so every input file has its shard.
    Returns {"scores": path, "flagged": path or None, "rows": n}.
    """
    tables = []
    for path in staged:
        with fs.open(path, "rb") as fh:
            tables.append(pq.read_table(fh))
    if tables:
        merged = pa.concat_tables(tables, promote_options="permissive")
        merged = merged.take(pc.sort_indices(merged.column(schema.ROW)))
        scores_schema = schema.scores_schema(_keep_fields(merged))
    else:
        scores_schema = schema.scores_schema()
        merged = scores_schema.empty_table()
    scores = merged.select(scores_schema.names).cast(scores_schema)
    scores_path = join(shard_dir(join(output_path, SCORES_DIR), shard), part_name(unit))
    write_parquet(fs, scores_path, scores)
    flagged_rows = merged.filter(merged.column(schema.FLAGGED))
    flagged_path = join(shard_dir(join(output_path, FLAGGED_DIR), shard), part_name(unit))
    if flagged_rows.num_rows:
        for name in flagged_schema.names:
            if name not in flagged_rows.column_names:  # explain columns when no row of the unit was explained
                flagged_rows = flagged_rows.append_column(name, pa.nulls(flagged_rows.num_rows))
        write_parquet(fs, flagged_path, flagged_rows.select(flagged_schema.names).cast(flagged_schema))
    elif fs.exists(flagged_path):  # a redo of a unit that had flags under an earlier threshold
        fs.rm(flagged_path)
    for path in staged:
        fs.rm_file(path)
    return {
        "scores": scores_path,
        "flagged": flagged_path if flagged_rows.num_rows else None,
        "rows": scores.num_rows,
    }


def read_shard(fs: AbstractFileSystem, root: str, shard: str, columns: list[str]) -> pa.Table | None:
    """One input file's committed rows from ROOT/shard=<key>/ (all its part files), or None if it has none."""
    folder = shard_dir(root, shard)
    if not fs.exists(folder):
        return None
    parts = sorted(
        p
        for p in fs.ls(folder, detail=False)
        if p.endswith(".parquet") and not p.rsplit("/", 1)[-1].startswith(("_", "."))
    )
    if not parts:
        return None
    tables = []
    for path in parts:
        with fs.open(path, "rb") as fh:
            tables.append(pq.read_table(fh, columns=columns))
    return pa.concat_tables(tables, promote_options="permissive")
