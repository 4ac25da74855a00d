"""The pipeline's steps as Ray Data UDFs: read an input file's pending units, tokenize on CPU, score in an actor,
stage the scored rows on the worker and acknowledge them.

Each is plain Python over pyarrow tables, so a test can call it without Ray: `ScoreActor(cfg)(table)`. Importing
this module imports neither torch nor diffusers (the read, write and commit workers load it): only the score
actor loads the model code, in its constructor.
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import sys
import time
from collections import Counter, OrderedDict
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from auditor import schema
from auditor.config import AuditConfig, ScoreConfig
from auditor.histogram import count_scores
from auditor.io.inputs import InputFile, shard_key
from auditor.io.parquet import stage_rows
from auditor.io.readers import DEFAULT_BATCH_ROWS, read_caption_batches, units_of
from auditor.io.storage import filesystem_for
from auditor.io.units import WorkUnit
from auditor.pipeline.activity import ACTOR_READY, READ, SCORE, report_activity
from auditor.pipeline.metrics import ScoreMetrics, ray_active
from auditor.pipeline.plan import load_explain, resolve_threshold
from auditor.pipeline.tokenize import CaptionTokenizer, tokenize_table, tokenized_from_table
from auditor.redact import redact_text
from auditor.scoring.cascade import CONFIRM, SCREEN, Stage, flag_rows
from auditor.scoring.tokens import TokenizedCaptions

logger = logging.getLogger(__name__)

# Scores remembered per actor across batches (20-byte key + a float each: ~10 MB at this size).
SCORE_CACHE_ROWS = 100_000
# Work item field next to the InputFile fields: indices of the file's units already committed.
DONE_UNITS = "done_units"


# 1. Read -----------------------------------------------------------------------------------------------------------
def with_unit_columns(
    table: pa.Table, unit: int, unit_rows: int | None = None, file_units: int | None = None
) -> pa.Table:
    """Append the internal unit columns: the unit on every row; its size and the file's unit count when given."""
    n = table.num_rows
    unit_field, rows_field, count_field = schema.UNIT_FIELDS
    return (
        table.append_column(unit_field, pa.array([unit] * n, pa.int32()))
        .append_column(rows_field, pa.array([unit_rows] * n, pa.int64()))
        .append_column(count_field, pa.array([file_units] * n, pa.int32()))
    )


def control_table(
    file: InputFile, status: str, unit: WorkUnit, rows: int, error: str | None, keep_columns: tuple[str, ...]
) -> pa.Table:
    """One control row (END_OF_UNIT with the unit's row count, or READ_ERROR) in the read schema + unit columns."""
    columns: dict[str, pa.Array] = {
        schema.ID: pa.array([""], pa.string()),
        schema.CAPTION: pa.nulls(1, pa.string()),
        schema.SOURCE: pa.array([file.source], pa.string()),
        schema.ROW: pa.array([unit.first_row], pa.int64()),
        schema.STATUS: pa.array([status], pa.string()),
        schema.ERROR: pa.array([error], pa.string()),
    }
    for name in keep_columns:
        columns[name] = pa.nulls(1)
    return with_unit_columns(pa.table(columns), unit.index, rows, unit.file_units)


def read_unit_rows(
    cfg: AuditConfig,
    file: InputFile,
    done_units: frozenset[int] = frozenset(),
    batch_rows: int = DEFAULT_BATCH_ROWS,
) -> Iterator[pa.Table]:
    """Every unit of the file not in done_units: its rows, then one END_OF_UNIT control row with its row count, or
    a READ_ERROR row for the unit where the file broke (later units are left for the next run).

    The broad except is the file boundary: a corrupt file is reported downstream, never raised out of the task.
    """
    unit = WorkUnit(index=0, file_units=1, first_row=0, rows=None)
    rows = 0
    try:
        fs, _ = filesystem_for(file.source, cfg.storage_options)
        for unit in units_of(fs, file, cfg.unit_rows):
            if unit.index in done_units:
                continue
            rows = 0
            for table in read_caption_batches(
                fs,
                file,
                cfg.caption_column,
                cfg.id_column,
                cfg.keep_columns,
                batch_rows=batch_rows,
                row_groups=unit.row_groups,
                first_row=unit.first_row,
            ):
                rows += table.num_rows
                yield with_unit_columns(table, unit.index)
            yield control_table(file, schema.END_OF_UNIT, unit, rows, None, cfg.keep_columns)
    except Exception as exc:
        # fsspec and aiohttp errors quote the URL they opened (file.path), credentials included.
        error = redact_text(f"{type(exc).__name__}: {exc}")
        logger.warning("input %s unit %d failed after %d rows: %s", file.source, unit.index, rows, error)
        yield control_table(file, schema.READ_ERROR, unit, rows, error, cfg.keep_columns)


# 2. Read + tokenize: the CPU stage ------------------------------------------------------------------------------
def read_and_tokenize(
    batch: pa.Table, cfg: AuditConfig, batch_rows: int = DEFAULT_BATCH_ROWS, activity: Any = None
) -> Iterator[pa.Table]:
    """Ray Data UDF over work items (one input file per call: its InputFile fields + done_units): tokenized rows.
    activity: the run's ActivityLog, told of every table read (None: nothing reported)."""
    tokenizer = CaptionTokenizer.from_model(cfg.model, cfg.storage_options, cfg.variant)
    for item in batch.to_pylist():
        done_units = frozenset(item.pop(DONE_UNITS) or ())
        for table in read_unit_rows(cfg, InputFile(**item), done_units, batch_rows):
            report_activity(activity, READ, table.num_rows)
            yield tokenize_table(table, tokenizer)


def current_node() -> str:
    """`<host>/<Ray node id prefix>` inside a Ray worker, the host name outside Ray (never imports ray itself)."""
    host = socket.gethostname()
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return f"{host}/{ray.get_runtime_context().get_node_id()[:8]}"
    return host


# 3. Score (actor) ------------------------------------------------------------------------------------------------
class ScoreActor:
    """Loads the Scorer once; each call scores the ok rows of a batch and sets score / flagged.

    Input: a tokenize_table output, or a read table without token columns (then it tokenizes itself).
    Output: the batch without the internal token columns, plus score (float32, null unless status ok),
    confirm_score (float32, null unless the second stage re-scored the row: auditor.scoring.cascade) and flagged
    (bool); with explain_flagged also tokens / token_significance (null unless flagged); and the internal
    denoiser-row columns per stage (schema.DENOISER_ROWS), which the write stage counts and drops.

    cfg: an AuditConfig, or a ScoreConfig (auditor.ray_data). model_fingerprint tags the actor's metrics
    (auditor.pipeline.metrics); None: the Scorer's own, computed only when the actor runs inside Ray. activity:
    the audit's ActivityLog (auditor.pipeline.monitor), told of the data rows of every batch this actor finishes:
    the driver's progress and stall watchdog count them (None: nothing reported).
    """

    def __init__(self, cfg: ScoreConfig, model_fingerprint: str | None = None, activity: Any = None):
        import torch

        from auditor.scoring import Scorer

        started = time.perf_counter()
        self.cfg = cfg
        self.activity = activity
        self.scorer = Scorer.from_pretrained(
            cfg.model,
            dtype=cfg.dtype,
            batch_size=cfg.batch_size,
            score_sigma=cfg.score_sigma,
            variant=cfg.variant,
            storage_options=cfg.storage_options,
            # None: graphs when the actor got a GPU (run() refuses --cuda-graphs when actors get none).
            cuda_graphs=cfg.cuda_graphs if torch.cuda.is_available() else False,
        )
        logger.info("ScoreActor runtime: %s", self.scorer.runtime)
        if self.scorer.device.type == "cpu":
            # Ray sets OMP threads to the actor's CPUs; torch must agree or two actors fight over cores.
            torch.set_num_threads(max(1, int(cfg.cpus_per_actor)))
        self.host_info = {"host": socket.gethostname(), "torch_threads": torch.get_num_threads()}
        self.node = current_node()
        threshold = resolve_threshold(cfg)
        self.threshold = threshold.value
        self.cascade = threshold.cascade
        # The stages this actor runs, and one bounded score cache per stage (a stage's score of a caption depends
        # on its token ids and nothing else).
        self.stages = {SCREEN: Stage(cfg.generations, cfg.steps)}
        if self.cascade is not None:
            self.stages[CONFIRM] = self.cascade.confirm
            # Under CUDA graphs: the second stage's first step replays the first stage's graph (a smaller batch is
            # padded into it), its later steps and CFG pairs run eagerly (ragged, few rows: no graph per size).
            self.scorer.runtime["second_stage"] = "first step as the first stage; later steps eager"
        self.explain = load_explain() if cfg.explain_flagged else None
        self.tokenizer = CaptionTokenizer(self.scorer.caption_tokenizer)
        self._caches: dict[str, OrderedDict[bytes, float]] = {stage: OrderedDict() for stage in self.stages}
        self.cache_hits = 0
        if model_fingerprint is None and ray_active():
            model_fingerprint = self.scorer.fingerprint
        self.metrics = ScoreMetrics(model_fingerprint)
        logger.info("ScoreActor ready on %s in %.1fs", self.scorer.device, time.perf_counter() - started)
        report_activity(activity, ACTOR_READY, 0)

    def __call__(self, batch: pa.Table) -> pa.Table:
        started = time.perf_counter()
        if schema.INPUT_IDS not in batch.column_names:
            batch = tokenize_table(batch, self.tokenizer)
        tokens, ok = tokenized_from_table(batch)
        status = batch.column(schema.STATUS).to_pylist()
        errors = batch.column(schema.ERROR).to_pylist()
        n = batch.num_rows
        scores = np.full(n, np.nan, dtype=np.float32)
        confirm = np.full(n, np.nan, dtype=np.float32)
        cost = {stage: np.zeros(n, dtype=np.int32) for stage in self.stages}
        if ok.any():
            try:
                scores[ok], cost[SCREEN][ok] = self._score(tokens, SCREEN)
                if self.cascade is not None:
                    again = ok.copy()
                    again[ok] = self.cascade.rescore(scores[ok])
                    if again.any():
                        confirm[again], cost[CONFIRM][again] = self._score(tokens.take(again[ok]), CONFIRM)
            except Exception as exc:  # batch boundary: the rows get a status, the audit goes on
                error = redact_text(f"{type(exc).__name__}: {exc}")
                logger.error("scoring a batch of %d rows failed: %s", int(ok.sum()), error)
                for index in np.flatnonzero(ok):
                    status[index], errors[index] = schema.SCORE_ERROR, error
                ok = np.zeros_like(ok)
                confirm[:] = np.nan
        rescored = ok & np.isfinite(confirm)
        flagged = ok & flag_rows(scores, self.threshold, self.cascade, confirm)
        out = batch.drop_columns([schema.INPUT_IDS, schema.ATTENTION_MASK, schema.STATUS, schema.ERROR])
        out = out.append_column(schema.SCORE, pa.array(scores, mask=~ok))
        out = out.append_column(schema.CONFIRM_SCORE, pa.array(confirm, mask=~rescored))
        out = out.append_column(schema.FLAGGED, pa.array(flagged))
        out = out.append_column(schema.STATUS, pa.array(status, pa.string()))
        out = out.append_column(schema.ERROR, pa.array(errors, pa.string()))
        if self.explain is not None:
            out = self._add_explanations(out, flagged)
        out = out.append_column(
            schema.NODE, pa.array([self.node] * out.num_rows, pa.string()).dictionary_encode()
        )
        for stage, rows in cost.items():
            out = out.append_column(schema.DENOISER_ROWS[stage], pa.array(rows, pa.int32()))
        data_rows = Counter(s for s in status if s not in schema.CONTROL_STATUSES)
        report_activity(self.activity, SCORE, sum(data_rows.values()))
        if self.metrics.enabled:
            self.metrics.record_batch(
                data_rows,
                int(flagged.sum()),
                time.perf_counter() - started,
                rescored=int(rescored.sum()),
                denoiser_rows={stage: int(rows.sum()) for stage, rows in cost.items()},
            )
        # What this actor really runs with (a capture can fail, the shared head can turn off at its first score)
        # rides along in the schema metadata of batches it scored, when that is settled: no per-row cost, and the
        # driver strips it before writing.
        if ok.any():
            runtime = json.dumps({**self.scorer.runtime, **self.host_info}, sort_keys=True)
            out = out.replace_schema_metadata({schema.ACTOR_RUNTIME_KEY: runtime.encode()})
        return out

    def _score(self, tokens: TokenizedCaptions, stage: str) -> tuple[np.ndarray, np.ndarray]:
        """(B,) float32 scores of one stage and (B,) int32 denoiser rows run for each row. Identical token ids score
        identically (the score depends on nothing else), so rows seen in an earlier batch of this actor come from
        the stage's bounded cache, and only the first of identical rows of this batch reaches the Scorer and
        carries the cost.
        """
        settings = self.stages[stage]
        cache = self._caches[stage]
        keys = [hashlib.sha1(row.tobytes()).digest() for row in tokens.input_ids]
        scores = np.array([cache.get(k, np.nan) for k in keys], dtype=np.float32)
        cost = np.zeros(len(keys), dtype=np.int32)
        missing = np.isnan(scores)
        self.cache_hits += int((~missing).sum())
        if missing.any():
            subset = tokens.take(missing)
            fresh = self.scorer.score_tokenized(
                subset, generations=settings.generations, steps=settings.steps, seed=self.cfg.seed
            )
            scores[missing] = fresh
            _, first = np.unique(subset.input_ids, axis=0, return_index=True)
            cost[np.flatnonzero(missing)[first]] = self.scorer.denoiser_rows_per_caption(settings)
            for key, value in zip((k for k, m in zip(keys, missing, strict=True) if m), fresh, strict=True):
                cache[key] = float(value)
                if len(cache) > SCORE_CACHE_ROWS:
                    cache.popitem(last=False)
        return scores, cost

    def _add_explanations(self, out: pa.Table, flagged: np.ndarray) -> pa.Table:
        tokens: list[list[str] | None] = [None] * out.num_rows
        significance: list[list[float] | None] = [None] * out.num_rows
        errors = out.column(schema.ERROR).to_pylist()
        captions = out.column(schema.CAPTION).to_pylist()
        for index in np.flatnonzero(flagged):
            try:
                result: Any = self.explain(
                    self.scorer,
                    captions[index],
                    generations=self.cfg.generations,
                    steps=self.cfg.steps,
                    seed=self.cfg.seed,
                )
                tokens[index] = list(result.tokens)
                significance[index] = np.asarray(result.significance, dtype=np.float32).tolist()
            except Exception as exc:  # row boundary: the score stands, the explanation is missing
                errors[index] = redact_text(f"explain failed: {type(exc).__name__}: {exc}")
        out = out.set_column(
            out.schema.get_field_index(schema.ERROR), schema.ERROR, pa.array(errors, pa.string())
        )
        out = out.append_column(schema.EXPLAIN_FIELDS[0], pa.array(tokens, schema.EXPLAIN_FIELDS[0].type))
        return out.append_column(
            schema.EXPLAIN_FIELDS[1], pa.array(significance, schema.EXPLAIN_FIELDS[1].type)
        )


# 4. Stage and acknowledge: the write stage ----------------------------------------------------------------------
ACK_ROWS = "rows"  # rows of one unit staged in one file
ACK_END = "end"  # the unit's END_OF_UNIT: its size and its file's unit count
ACK_ERROR = "error"  # the unit's READ_ERROR
ACK_SCHEMA = pa.schema(
    [
        pa.field("kind", pa.string()),
        pa.field("source", pa.string()),
        pa.field("shard", pa.string()),
        pa.field("unit", pa.int32()),
        pa.field("rows", pa.int64()),  # staged rows (rows), the unit's row count (end), rows before the error
        pa.field("first_row", pa.int64()),
        pa.field("file_units", pa.int32()),
        pa.field("staged", pa.string()),
        pa.field("counts", pa.string()),  # JSON {status: n, "flagged": n}
        pa.field("histogram", pa.string()),  # JSON {bin: n}, bins of auditor.histogram, nonzero bins only
        pa.field("error", pa.string()),
        pa.field("runtime", pa.string()),  # the score actor's runtime JSON, when the batch carried it
        pa.field("nodes", pa.string()),  # JSON {node: rows} of the nodes that scored the staged rows
        pa.field("tokens", pa.string()),  # JSON {n_tokens: [rows, flagged]} of the rows with a caption length
        pa.field("stages", pa.string()),  # JSON stage_counts(): rows re-scored, denoiser rows by stage
        pa.field("confirm_histogram", pa.string()),  # JSON {bin: n} of the confirm scores, nonzero bins only
    ]
)


def length_counts(rows: pa.Table) -> dict[int, list[int]]:
    """{n_tokens: [rows, flagged rows]} over the rows that have a caption length (what the report plots)."""
    lengths = rows.column(schema.N_TOKENS).to_pylist()
    flagged = rows.column(schema.FLAGGED).to_pylist()
    counts: dict[int, list[int]] = {}
    for length, is_flagged in zip(lengths, flagged, strict=True):
        if length is not None:
            pair = counts.setdefault(length, [0, 0])
            pair[0] += 1
            pair[1] += bool(is_flagged)
    return counts


def stage_counts(rows: pa.Table, confirm: pa.ChunkedArray | None) -> dict[str, int]:
    """{"rescored": rows with a confirm score, "denoiser_rows_<stage>": rows run} for a unit's scored rows and
    their confirm_score column (None: rows staged without one)."""
    counts = {schema.RESCORED_COUNT: 0 if confirm is None else rows.num_rows - confirm.null_count}
    for stage, column in schema.DENOISER_ROWS.items():
        if column in rows.column_names:
            counts[schema.DENOISER_ROWS_COUNT[stage]] = int(pc.sum(rows.column(column)).as_py() or 0)
    return counts


def sparse_counts(scores: pa.ChunkedArray | None) -> dict[int, int]:
    """{bin: n} of the scores' histogram (auditor.histogram), nonzero bins only; {} for no column."""
    if scores is None:
        return {}
    values = scores.to_numpy(zero_copy_only=False).astype(np.float64)
    return {i: n for i, n in enumerate(count_scores(values)) if n}


def stage_and_acknowledge(batch: pa.Table, cfg: AuditConfig) -> pa.Table:
    """Ray Data UDF after the score actors: write each unit's rows of the batch to the staging area (on this
    worker, straight to the output store) and return only acknowledgements (ACK_SCHEMA), a few hundred bytes per
    unit and batch, for the driver to commit units by.
    """
    fs, output_path = filesystem_for(cfg.output, cfg.storage_options)
    runtime = (batch.schema.metadata or {}).get(schema.ACTOR_RUNTIME_KEY)
    batch = batch.replace_schema_metadata(None)
    acks: list[dict[str, Any]] = []
    control = pc.is_in(batch.column(schema.STATUS), pa.array(schema.CONTROL_STATUSES))
    for row in batch.filter(control).to_pylist():
        end = row[schema.STATUS] == schema.END_OF_UNIT
        acks.append(
            {
                "kind": ACK_END if end else ACK_ERROR,
                "source": row[schema.SOURCE],
                "shard": shard_key(row[schema.SOURCE]),
                "unit": row[schema.UNIT],
                "rows": row[schema.UNIT_ROWS],
                "first_row": row[schema.ROW],
                "file_units": row[schema.FILE_UNITS],
                "error": row[schema.ERROR],
            }
        )
    data = batch.filter(pc.invert(control))
    groups: dict[tuple[str, int], list[int]] = {}
    for index, key in enumerate(
        zip(data.column(schema.SOURCE).to_pylist(), data.column(schema.UNIT).to_pylist(), strict=True)
    ):
        groups.setdefault(key, []).append(index)
    for (source, unit), indices in groups.items():
        rows = data.take(pa.array(indices, pa.int64()))
        shard = shard_key(source)
        counts = Counter(rows.column(schema.STATUS).to_pylist())
        flagged = rows.column(schema.FLAGGED)
        counts["flagged"] = int(pc.sum(flagged).as_py() or 0)
        histogram = sparse_counts(rows.column(schema.SCORE))
        confirm = rows.column(schema.CONFIRM_SCORE) if schema.CONFIRM_SCORE in rows.column_names else None
        nodes = (
            Counter(rows.column(schema.NODE).to_pylist()) if schema.NODE in rows.column_names else Counter()
        )
        acks.append(
            {
                "kind": ACK_ROWS,
                "source": source,
                "shard": shard,
                "unit": unit,
                "rows": rows.num_rows,
                "staged": stage_rows(fs, output_path, shard, unit, rows),
                "counts": json.dumps(dict(counts)),
                "histogram": json.dumps(histogram),
                "nodes": json.dumps(dict(nodes)),
                "tokens": json.dumps(length_counts(rows)),
                "stages": json.dumps(stage_counts(rows, confirm)),
                "confirm_histogram": json.dumps(sparse_counts(confirm)),
            }
        )
    if acks and runtime is not None:
        acks[0]["runtime"] = runtime.decode()
    return pa.Table.from_pylist(acks, schema=ACK_SCHEMA)
