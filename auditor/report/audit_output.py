"""Reading an audit output for the report: _audit.json, one streaming pass over scores/, the top flagged captions,
and the row-by-row comparison of two audits. pyarrow, fsspec and numpy only; never torch or ray.

Nothing here loads a whole column of a corpus: scores/ is read in batches of a few columns, flagged/ in batches
with a running top K, and a comparison joins the two outputs one input file (shard) at a time.
"""

from __future__ import annotations

import heapq
import json
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
from fsspec.spec import AbstractFileSystem

from auditor import histogram, schema
from auditor.errors import ConfigError
from auditor.io.parquet import FLAGGED_DIR, SCORES_DIR
from auditor.io.storage import filesystem_for, join, to_uri
from auditor.redact import redact_uri, redact_value

logger = logging.getLogger(__name__)

# The summary `auditor.pipeline.audit.run` writes (that module imports ray, so the name is repeated here).
AUDIT_FILE = schema.AUDIT_FILE
BATCH_ROWS = 1 << 18
FOOTER_THREADS = 16
# Shard keys are file stems plus a hash; hive inference would turn a key like "00001" into an int.
PARTITIONING = ds.partitioning(pa.schema([(schema.SHARD, pa.string())]), flavor="hive")
NO_SHARD = "(no shard folder)"
# The columns a comparison joins on and keeps, side by side; the "_other" side is the --against output.
OTHER_SUFFIX = "_other"


@dataclass
class AuditOutput:
    """An audit output folder (local or fsspec URI) whose _audit.json and scores/ exist."""

    uri: str
    fs: AbstractFileSystem
    path: str
    summary: dict[str, Any]

    @property
    def threshold(self) -> float | None:
        value = self.summary.get("threshold")
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None

    def dataset(self, folder: str) -> ds.Dataset | None:
        """The hive-partitioned parquet dataset under OUTPUT/<folder>, or None when the folder holds no file."""
        root = join(self.path, folder)
        if not self.fs.exists(root):
            return None
        dataset = ds.dataset(
            root,
            filesystem=self.fs,
            format="parquet",
            partitioning=PARTITIONING,
            ignore_prefixes=[".", "_"],
        )
        return dataset if dataset.files else None


def open_audit_output(uri: str, storage_options: dict[str, Any] | None = None) -> AuditOutput:
    """Check that `uri` is an audit output (OUTPUT/_audit.json and OUTPUT/scores/) and read its summary."""
    fs, path = filesystem_for(uri, storage_options)
    path = path.rstrip("/")
    summary_path, scores_path = join(path, AUDIT_FILE), join(path, SCORES_DIR)
    missing = [
        name for name, p in ((AUDIT_FILE, summary_path), (f"{SCORES_DIR}/", scores_path)) if not fs.exists(p)
    ]
    if missing:
        raise ConfigError(
            f"{uri} is not an audit output: {' and '.join(missing)} not found there. An audit output is the OUTPUT "
            f"folder of `auditor audit INPUT OUTPUT`, holding {AUDIT_FILE}, {SCORES_DIR}/shard=<key>/*.parquet and "
            f"{FLAGGED_DIR}/; pass that folder."
        )
    try:
        with fs.open(summary_path, "rb") as fh:
            summary = json.loads(fh.read().decode("utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"{to_uri(fs, summary_path)} cannot be read as JSON ({type(exc).__name__}: {exc}); it should be the "
            "summary `auditor audit` writes. Rerun the audit to rewrite it."
        ) from exc
    if not isinstance(summary, dict):
        raise ConfigError(
            f"{to_uri(fs, summary_path)} holds a JSON {type(summary).__name__}, expected the object `auditor audit` "
            "writes. Rerun the audit to rewrite it."
        )
    # Shown in the report and logs: without credentials, also for outputs written before _audit.json was redacted.
    return AuditOutput(uri=redact_uri(uri), fs=fs, path=path, summary=redact_value(summary))


# 1. One streaming pass over scores/ -----------------------------------------------------------------------------
@dataclass
class ScoreScan:
    """What one pass over scores/ counts. shards: key -> [rows, flagged]. by_tokens_*: index = n_tokens.

    histogram: counts over `auditor.histogram` bins of every score (from _audit.json when it has them).
    """

    rows: int = 0
    flagged: int = 0
    histogram: list[int] = field(default_factory=lambda: [0] * histogram.N_COUNTS)
    histogram_origin: str = "scan"
    # "rows": one streaming pass over the rows; "footers": parquet footers and _audit.json's token histogram.
    tallies_origin: str = "rows"
    shards: dict[str, list[int]] = field(default_factory=dict)
    by_tokens_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    by_tokens_flagged: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    seconds: float = 0.0


def _add(total: np.ndarray, counts: np.ndarray) -> np.ndarray:
    if len(counts) > len(total):
        total = np.pad(total, (0, len(counts) - len(total)))
    total[: len(counts)] += counts
    return total


def stored_token_counts(summary: dict[str, Any]) -> tuple[np.ndarray, np.ndarray] | None:
    """(rows, flagged) per caption length from _audit.json's "token_histogram" ({"rows": [...], "flagged": [...]},
    index = n_tokens, merged from the committed units), or None when the audit did not record it."""
    stored = summary.get("token_histogram") or {}
    rows, flagged = stored.get("rows"), stored.get("flagged")
    if not isinstance(rows, list) or not isinstance(flagged, list) or len(flagged) > len(rows):
        return None
    return np.asarray(rows, np.int64), np.asarray(flagged, np.int64)


def scan_scores(output: AuditOutput) -> ScoreScan:
    """Rows and flags per shard, rows and flags per caption length, and the score histogram.

    When _audit.json holds both histograms ("score_histogram", "token_histogram", merged from the committed units),
    no row is read: rows and flags per shard come from the parquet footers of scores/ and flagged/, so the cost
    follows the number of part files, not of rows. Otherwise one streaming pass over a few columns counts them.
    """
    started = time.perf_counter()
    scan = ScoreScan()
    stored = (output.summary.get("score_histogram") or {}).get("counts")
    if stored is not None and len(stored) == histogram.N_COUNTS:
        scan.histogram = [int(c) for c in stored]
        scan.histogram_origin = "_audit.json"
    dataset = output.dataset(SCORES_DIR)
    if dataset is None:
        return scan
    tokens = stored_token_counts(output.summary)
    if scan.histogram_origin == "_audit.json" and tokens is not None:
        scan.by_tokens_rows, scan.by_tokens_flagged = tokens
        _count_from_footers(scan, dataset, output.dataset(FLAGGED_DIR))
        scan.tallies_origin = "footers"
    else:
        _count_from_rows(scan, dataset)
    scan.seconds = time.perf_counter() - started
    logger.info(
        "counted %d rows of %s in %.2fs (histogram from %s, tallies from %s)",
        scan.rows,
        output.uri,
        scan.seconds,
        scan.histogram_origin,
        scan.tallies_origin,
    )
    return scan


def _fragment_rows(dataset: ds.Dataset | None) -> list[tuple[str, int]]:
    """(shard, row count) of every part file, from its parquet footer; footers are read in parallel (object stores)."""
    if dataset is None:
        return []
    fragments = list(dataset.get_fragments())

    def count(fragment) -> tuple[str, int]:
        key = ds.get_partition_keys(fragment.partition_expression).get(schema.SHARD)
        return key or NO_SHARD, fragment.count_rows()

    with ThreadPoolExecutor(max_workers=FOOTER_THREADS) as pool:
        return list(pool.map(count, fragments))


def _count_from_footers(scan: ScoreScan, scores: ds.Dataset, flagged: ds.Dataset | None) -> None:
    for key, rows in _fragment_rows(scores):
        scan.shards.setdefault(key, [0, 0])[0] += rows
        scan.rows += rows
    for key, rows in _fragment_rows(flagged):
        scan.shards.setdefault(key, [0, 0])[1] += rows
        scan.flagged += rows


def _count_from_rows(scan: ScoreScan, dataset: ds.Dataset) -> None:
    names = set(dataset.schema.names)
    columns = [c for c in (schema.SHARD, schema.FLAGGED, schema.N_TOKENS) if c in names]
    need_scores = scan.histogram_origin == "scan" and schema.SCORE in names
    if need_scores:
        columns.append(schema.SCORE)
    for batch in dataset.to_batches(columns=columns, batch_size=BATCH_ROWS):
        n = batch.num_rows
        if n == 0:
            continue
        # A scanner batch never spans two files, so its shard value is constant.
        key = batch.column(schema.SHARD)[0].as_py() if schema.SHARD in columns else None
        flags = (
            batch.column(schema.FLAGGED).to_numpy(zero_copy_only=False).astype(bool)
            if schema.FLAGGED in columns
            else np.zeros(n, bool)
        )
        n_flagged = int(flags.sum())
        shard = scan.shards.setdefault(key or NO_SHARD, [0, 0])
        shard[0] += n
        shard[1] += n_flagged
        scan.rows += n
        scan.flagged += n_flagged
        if schema.N_TOKENS in columns:
            tokens = batch.column(schema.N_TOKENS)
            valid = pc.is_valid(tokens).to_numpy(zero_copy_only=False)
            lengths = tokens.to_numpy(zero_copy_only=False)[valid].astype(np.int64)
            scan.by_tokens_rows = _add(scan.by_tokens_rows, np.bincount(lengths))
            scan.by_tokens_flagged = _add(scan.by_tokens_flagged, np.bincount(lengths[flags[valid]]))
        if need_scores:
            counts = histogram.count_scores(batch.column(schema.SCORE).to_numpy(zero_copy_only=False))
            scan.histogram = histogram.merge_counts([scan.histogram, counts])


# 2. The top flagged captions ------------------------------------------------------------------------------------
@dataclass
class FlaggedCaption:
    """One distinct flagged caption: its highest score, how many rows hold it, and the first of them."""

    caption: str
    score: float
    count: int
    id: str
    source: str
    sources: int
    tokens: list[str] | None = None
    significance: list[float] | None = None


def _flagged_batches(output: AuditOutput, columns: list[str]) -> Iterator[pa.RecordBatch]:
    dataset = output.dataset(FLAGGED_DIR)
    if dataset is None:
        return
    names = set(dataset.schema.names)
    yield from dataset.to_batches(columns=[c for c in columns if c in names], batch_size=BATCH_ROWS)


def top_flagged(output: AuditOutput, k: int) -> tuple[list[FlaggedCaption], int]:
    """The k distinct flagged captions with the highest scores (duplicates grouped), and the flagged row count.

    Two passes over flagged/: the first keeps a running top k of distinct captions, the second counts their rows
    and takes their ids, sources and (with --explain-flagged) token significance. Memory: k captions per batch.
    """
    if k <= 0:
        dataset = output.dataset(FLAGGED_DIR)
        return [], dataset.count_rows() if dataset is not None else 0
    # 1. Running top k of (score, caption): captions under the k-th best score so far can never enter it.
    best: dict[str, float] = {}
    cutoff = -np.inf
    n_flagged = 0
    for batch in _flagged_batches(output, [schema.CAPTION, schema.SCORE]):
        n_flagged += batch.num_rows
        scores = batch.column(schema.SCORE).to_numpy(zero_copy_only=False).astype(np.float64)
        keep = np.flatnonzero(np.isfinite(scores) & (scores >= cutoff))
        captions = batch.column(schema.CAPTION).take(pa.array(keep)).to_pylist()
        for caption, score in zip(captions, scores[keep].tolist(), strict=True):
            if caption is not None and score > best.get(caption, -np.inf):
                best[caption] = score
        if len(best) > 4 * k:
            best = dict(heapq.nlargest(k, best.items(), key=lambda item: item[1]))
            cutoff = min(best.values())
    ranked = heapq.nlargest(k, best.items(), key=lambda item: item[1])
    if not ranked:
        return [], n_flagged

    # 2. Rows of those captions: count, first id and source, distinct sources, explain columns.
    top = {caption: FlaggedCaption(caption, score, 0, "", "", 0) for caption, score in ranked}
    sources: dict[str, set[str]] = {caption: set() for caption in top}
    wanted = pa.array(list(top), pa.string())
    columns = [schema.CAPTION, schema.ID, schema.SOURCE, schema.TOKENS, schema.TOKEN_SIGNIFICANCE]
    for batch in _flagged_batches(output, columns):
        rows = batch.filter(pc.is_in(batch.column(schema.CAPTION), value_set=wanted))
        if rows.num_rows == 0:
            continue
        data = {name: rows.column(name).to_pylist() for name in rows.schema.names}
        for i, caption in enumerate(data[schema.CAPTION]):
            entry = top[caption]
            entry.count += 1
            source = data.get(schema.SOURCE, [""] * rows.num_rows)[i] or ""
            sources[caption].add(source)
            if entry.count == 1:
                entry.id = str(data.get(schema.ID, [""] * rows.num_rows)[i])
                entry.source = source
            if entry.tokens is None and data.get(schema.TOKENS, [None] * rows.num_rows)[i] is not None:
                entry.tokens = data[schema.TOKENS][i]
                entry.significance = data.get(schema.TOKEN_SIGNIFICANCE, [None] * rows.num_rows)[i]
    for caption, entry in top.items():
        entry.sources = len(sources[caption])
    return list(top.values()), n_flagged


# 3. Comparison of two audits ------------------------------------------------------------------------------------
@dataclass
class ChangedRow:
    id: str
    score: float | None
    score_other: float | None
    caption: str = ""
    source: str = ""


@dataclass
class Comparison:
    """This audit against an --against audit, joined on id. shift = score - score_other for rows in both.

    shift_counts: (N_COUNTS, N_COUNTS) rows by (bin of score_other, bin of score), `auditor.histogram` bins.
    """

    other_uri: str
    both: int = 0
    only_this: int = 0
    only_other: int = 0
    only_this_flagged: int = 0
    newly_flagged: int = 0
    no_longer_flagged: int = 0
    flagged_both: int = 0
    scored_both: int = 0
    shift_sum: float = 0.0
    shift_abs_sum: float = 0.0
    shift_abs_max: float = 0.0
    changed: int = 0
    shift_counts: np.ndarray = field(
        default_factory=lambda: np.zeros((histogram.N_COUNTS, histogram.N_COUNTS), np.int64)
    )
    newly_top: list[ChangedRow] = field(default_factory=list)
    no_longer_top: list[ChangedRow] = field(default_factory=list)
    joined_in_one_piece: int = 0
    seconds: float = 0.0

    @property
    def shift_mean(self) -> float:
        return self.shift_sum / self.scored_both if self.scored_both else 0.0

    @property
    def shift_abs_mean(self) -> float:
        return self.shift_abs_sum / self.scored_both if self.scored_both else 0.0


SIDE_COLUMNS = [schema.ID, schema.SCORE, schema.FLAGGED]


def _read_side(dataset: ds.Dataset | None, expression: pc.Expression | None, suffix: str) -> pa.Table:
    """id, score<suffix>, flagged<suffix> of the rows `expression` selects (None: every row)."""
    side = pa.schema(
        [
            pa.field(schema.ID, pa.string()),
            pa.field(schema.SCORE + suffix, pa.float32()),
            pa.field(schema.FLAGGED + suffix, pa.bool_()),
        ]
    )
    if dataset is None:
        return side.empty_table()
    table = dataset.to_table(columns=SIDE_COLUMNS, filter=expression)
    return table.rename_columns(side.names).cast(side)


def _shard_keys(dataset: ds.Dataset | None) -> set[str]:
    if dataset is None or schema.SHARD not in dataset.schema.names:
        return set()
    keys = set()
    for fragment in dataset.get_fragments():
        value = ds.get_partition_keys(fragment.partition_expression).get(schema.SHARD)
        if value is not None:
            keys.add(value)
    return keys


def _keep_top(heap: list, k: int, key: float, row: ChangedRow) -> None:
    # The id breaks ties so rows of equal scores never compare as ChangedRow.
    item = (key, row.id, row)
    if len(heap) < k:
        heapq.heappush(heap, item)
    elif item[:2] > heap[0][:2]:
        heapq.heapreplace(heap, item)


def compare_outputs(current: AuditOutput, other: AuditOutput, k: int = 20) -> Comparison:
    """Join `current` and `other` on id: newly flagged, no longer flagged, only in one, and the score shift.

    Shards (input files) present in both are joined one at a time, so memory follows the largest input file; the
    rows of shards present in only one output are joined together at the end (ids may have moved between files).
    """
    started = time.perf_counter()
    result = Comparison(other_uri=other.uri)
    this_scores, other_scores = current.dataset(SCORES_DIR), other.dataset(SCORES_DIR)
    common = sorted(_shard_keys(this_scores) & _shard_keys(other_scores))
    newly: list = []
    no_longer: list = []
    # Each common shard alone, then the rows of all other shards at once.
    shard = pc.field(schema.SHARD)
    pieces = [shard == key for key in common]
    pieces.append(pc.invert(shard.isin(common)) | shard.is_null() if common else None)
    for expression in pieces:
        left = _read_side(this_scores, expression, "")
        right = _read_side(other_scores, expression, OTHER_SUFFIX)
        if left.num_rows == 0 and right.num_rows == 0:
            continue
        if expression is pieces[-1]:
            result.joined_in_one_piece = left.num_rows + right.num_rows
        joined = left.join(right, keys=schema.ID, join_type="full outer")
        _accumulate(result, joined, newly, no_longer, k)
    result.newly_top = [row for _, _, row in sorted(newly, reverse=True)]
    result.no_longer_top = [row for _, _, row in sorted(no_longer, reverse=True)]
    _attach_captions(current, result.newly_top)
    _attach_captions(other, result.no_longer_top)
    result.seconds = time.perf_counter() - started
    logger.info("compared %s with %s in %.2fs", current.uri, other.uri, result.seconds)
    return result


def _accumulate(result: Comparison, joined: pa.Table, newly: list, no_longer: list, k: int) -> None:
    this_present = pc.is_valid(joined.column(schema.FLAGGED)).to_numpy(zero_copy_only=False)
    other_present = pc.is_valid(joined.column(schema.FLAGGED + OTHER_SUFFIX)).to_numpy(zero_copy_only=False)
    flagged = pc.fill_null(joined.column(schema.FLAGGED), False).to_numpy(zero_copy_only=False)
    flagged_other = pc.fill_null(joined.column(schema.FLAGGED + OTHER_SUFFIX), False).to_numpy(
        zero_copy_only=False
    )
    score = joined.column(schema.SCORE).to_numpy(zero_copy_only=False).astype(np.float64)
    score_other = joined.column(schema.SCORE + OTHER_SUFFIX).to_numpy(zero_copy_only=False).astype(np.float64)
    both = this_present & other_present
    result.both += int(both.sum())
    result.only_this += int((this_present & ~other_present).sum())
    result.only_other += int((other_present & ~this_present).sum())
    result.only_this_flagged += int((flagged & ~other_present).sum())
    result.flagged_both += int((both & flagged & flagged_other).sum())
    new_mask = both & flagged & ~flagged_other
    gone_mask = both & ~flagged & flagged_other
    result.newly_flagged += int(new_mask.sum())
    result.no_longer_flagged += int(gone_mask.sum())
    scored = both & np.isfinite(score) & np.isfinite(score_other)
    shift = score[scored] - score_other[scored]
    result.scored_both += int(scored.sum())
    result.shift_sum += float(shift.sum())
    result.shift_abs_sum += float(np.abs(shift).sum())
    if len(shift):
        result.shift_abs_max = max(result.shift_abs_max, float(np.abs(shift).max()))
    result.changed += int((shift != 0).sum())
    rows = np.searchsorted(histogram.EDGES, score_other[scored], side="right")
    cols = np.searchsorted(histogram.EDGES, score[scored], side="right")
    n = histogram.N_COUNTS
    result.shift_counts += np.bincount(rows * n + cols, minlength=n * n).reshape(n, n)
    ids = joined.column(schema.ID)
    for mask, heap, key_scores in ((new_mask, newly, score), (gone_mask, no_longer, score_other)):
        index = np.flatnonzero(mask)
        if len(index) > k:
            index = index[np.argsort(-np.nan_to_num(key_scores[index], nan=-np.inf), kind="stable")[:k]]
        for i in index.tolist():
            row = ChangedRow(str(ids[i].as_py()), _finite(score[i]), _finite(score_other[i]))
            _keep_top(heap, k, float(np.nan_to_num(key_scores[i], nan=-np.inf)), row)


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def _attach_captions(output: AuditOutput, rows: list[ChangedRow]) -> None:
    """Caption and source of a few flagged rows, from that output's flagged/ (small: flagged rows only)."""
    if not rows:
        return
    wanted = {row.id: row for row in rows}
    value_set = pa.array(list(wanted), pa.string())
    for batch in _flagged_batches(output, [schema.ID, schema.CAPTION, schema.SOURCE]):
        found = batch.filter(pc.is_in(batch.column(schema.ID).cast(pa.string()), value_set=value_set))
        for record in found.to_pylist():
            row = wanted.get(str(record.get(schema.ID)))
            if row is not None and not row.caption:
                row.caption = record.get(schema.CAPTION) or ""
                row.source = record.get(schema.SOURCE) or ""
