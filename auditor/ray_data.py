"""The audit's scoring as one step of your own Ray Data pipeline: `add_memorization_scores(ds, ...)`, and the
callable class behind it, `MemorizationScorer`, for wiring `map_batches` yourself.

A thin wrapper over auditor.pipeline: the same tokenize stage, `ScoreActor`, shared noise, caption dedup and
bad-row statuses as `auditor audit`, so a caption scores the same here, in the audit and in `Scorer.score` (same
model and seed). No resume and no ledger: those belong to your pipeline; for resumable audits of a corpus, with
outputs, a report and exactly-once rows, use `auditor audit`. Imports ray (users import this module explicitly;
`import auditor` never does).

    from auditor.ray_data import add_memorization_scores
    ds = ray.data.read_parquet("s3://bucket/captions/")
    ds = add_memorization_scores(ds, model="s3://bucket/models/sd15", caption_column="caption", threshold=0.35)
    ds.filter(expr="memorization_flag == False").write_parquet("s3://bucket/clean/")
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from auditor import schema
from auditor.config import ScoreConfig
from auditor.errors import ConfigError
from auditor.io.readers import string_captions
from auditor.pipeline import ray_compat
from auditor.pipeline.plan import resolve_threshold
from auditor.pipeline.stages import ScoreActor

logger = logging.getLogger(__name__)

__all__ = ["OUTPUT_COLUMNS", "MemorizationScorer", "add_memorization_scores"]

# What the step adds to every row: the score (float32, null unless the status is ok), the flag (bool: score >
# threshold; False without a threshold or a score) and the row status (schema.ROW_STATUSES).
OUTPUT_COLUMNS = (schema.MEMORIZATION_SCORE, schema.MEMORIZATION_FLAG, schema.MEMORIZATION_STATUS)
OUTPUT_FIELDS = (
    pa.field(schema.MEMORIZATION_SCORE, pa.float32()),
    pa.field(schema.MEMORIZATION_FLAG, pa.bool_()),
    pa.field(schema.MEMORIZATION_STATUS, pa.string()),
)
# With the second stage on (confirm_generations / confirm_steps, or a two-stage threshold file), also: the confirm
# score (float32, null unless the row's score was over the screening threshold), placed after memorization_score.
CONFIRM_FIELD = pa.field(schema.MEMORIZATION_CONFIRM_SCORE, pa.float32())


def check_columns(columns: Sequence[str], caption_column: str) -> None:
    """ConfigError when the caption column is missing or an output column is already there."""
    if caption_column not in columns:
        raise ConfigError(
            f"caption_column {caption_column!r} is not a column of the dataset; its columns are: "
            f"{', '.join(columns)}. Pass caption_column=<one of them>."
        )
    clashes = [name for name in (*OUTPUT_COLUMNS, CONFIRM_FIELD.name) if name in columns]
    if clashes:
        raise ConfigError(
            f"the dataset already has column(s) {', '.join(clashes)}, which add_memorization_scores writes "
            f"({', '.join(OUTPUT_COLUMNS)}); drop or rename them first "
            f"(ds.drop_columns([...]) or ds.rename_columns({{...}}))."
        )


def _caption_array(values: Any) -> tuple[pa.Array, pa.Array]:
    """(caption array, NOT_STRING mask) from an Arrow column, a pandas Series or a numpy array of objects."""
    if isinstance(values, pa.ChunkedArray | pa.Array):
        return values, pa.nulls(len(values), pa.bool_())
    try:
        return pa.array(values, from_pandas=True), pa.nulls(len(values), pa.bool_())
    except (
        pa.ArrowInvalid,
        pa.ArrowTypeError,
    ):  # mixed Python objects: strings and bytes stay, the rest is not a string
        items = list(values)
        if any(isinstance(v, bytes) for v in items) and all(
            isinstance(v, str | bytes) or v is None for v in items
        ):
            return pa.array([v.encode() if isinstance(v, str) else v for v in items], pa.binary()), pa.nulls(
                len(items), pa.bool_()
            )
        captions = pa.array([v if isinstance(v, str) else None for v in items], pa.string())
        mask = [not isinstance(v, str) and v is not None and v == v for v in items]  # v != v: NaN, a null
        return captions, pa.array(mask, pa.bool_())


def _decoded(caption: pa.Array | pa.ChunkedArray) -> tuple[pa.Array | pa.ChunkedArray, list[bool] | None]:
    """Bytes captions as UTF-8 text (a WebDataset `txt` member as `ray.data.read_webdataset(decoder=None)` gives
    it); bytes that are not UTF-8 become null, True in the mask (None: the captions were not bytes)."""
    if not (pa.types.is_binary(caption.type) or pa.types.is_large_binary(caption.type)):
        return caption, None
    texts: list[str | None] = []
    bad: list[bool] = []
    for value in caption.to_pylist():
        try:
            texts.append(None if value is None else value.decode("utf-8"))
            bad.append(False)
        except UnicodeDecodeError:
            texts.append(None)
            bad.append(True)
    return pa.array(texts, pa.string()), bad


class MemorizationScorer:
    """Ray Data callable class (load once in `__init__`, score each batch in `__call__`): adds
    memorization_score / memorization_flag / memorization_status to every row and leaves every other column
    as it came. Use it with an actor pool:

        ds.map_batches(
            MemorizationScorer,
            fn_constructor_kwargs={"model": "s3://bucket/models/sd15", "caption_column": "caption", "threshold": 0.35},
            batch_size=64, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=8), num_gpus=1,
        )

    Keyword arguments are `ScoreConfig`'s (model, caption_column, threshold or threshold_file, generations,
    steps, score_sigma, seed, batch_size, dtype, cuda_graphs, cpus_per_actor, storage_options, variant, and the
    second stage's confirm_generations, confirm_steps, screen_threshold: then memorization_confirm_score too).
    Batches may be pyarrow Tables, pandas DataFrames or dicts of numpy arrays; the result has the same kind. Only the caption column
    goes through the audit's stages, so user columns named like the audit's own (status, score, id, ...) are
    never read or changed. Bad rows (null, empty, not a string) get their status and no score, never an error;
    a batch the model fails on gets score_error. Metrics: see auditor.pipeline.metrics. No resume, no ledger.
    """

    def __init__(self, *, model: str, caption_column: str, **options: Any) -> None:
        self.config = ScoreConfig(model=model, caption_column=caption_column, **options)
        self.actor = ScoreActor(self.config)
        fields = list(OUTPUT_FIELDS)
        if self.actor.cascade is not None:
            fields.insert(1, CONFIRM_FIELD)
        self.fields = tuple(fields)

    def __call__(self, batch: Any) -> Any:
        # 1. Check inputs.
        columns = list(batch.column_names) if isinstance(batch, pa.Table) else list(batch.keys())
        check_columns(columns, self.config.caption_column)
        values = batch[self.config.caption_column]
        if isinstance(batch, pa.Table):
            values = batch.column(self.config.caption_column)
        elif hasattr(values, "to_numpy") and not isinstance(values, np.ndarray):  # a pandas Series
            values = values.to_numpy(dtype=object)
        # 2. Score the captions alone, through the audit's tokenize stage and score actor.
        caption, not_string = _caption_array(values)
        caption, not_utf8 = _decoded(caption)
        n = len(caption)
        caption, status, error = string_captions(
            caption, self.config.caption_column, pa.nulls(n, pa.string()), pa.nulls(n, pa.string())
        )
        status = pc.if_else(pc.fill_null(not_string, False), schema.NOT_STRING, status)
        if not_utf8 is not None and any(not_utf8):
            mask = pa.array(not_utf8, pa.bool_())
            status = pc.if_else(mask, schema.BAD_RECORD, status)
            error = pc.if_else(mask, pa.scalar("caption bytes are not UTF-8 text"), error)
        status = pc.coalesce(status, pa.scalar(schema.OK))
        scored = self.actor(pa.table({schema.CAPTION: caption, schema.STATUS: status, schema.ERROR: error}))
        results = {
            schema.MEMORIZATION_SCORE: scored.column(schema.SCORE),
            schema.MEMORIZATION_CONFIRM_SCORE: scored.column(schema.CONFIRM_SCORE),
            schema.MEMORIZATION_FLAG: scored.column(schema.FLAGGED),
            schema.MEMORIZATION_STATUS: scored.column(schema.STATUS),
        }
        # 3. The results beside the user's columns, in the batch's own kind.
        if isinstance(batch, pa.Table):
            for field in self.fields:
                batch = batch.append_column(field, results[field.name].cast(field.type))
            return batch
        arrays = {f.name: results[f.name].to_numpy(zero_copy_only=False) for f in self.fields}
        for field in self.fields:
            if field.type == pa.float32():
                arrays[field.name] = arrays[field.name].astype(np.float32)
        if isinstance(batch, dict):
            return {**batch, **arrays}
        return batch.assign(**arrays)  # pandas


def add_memorization_scores(
    ds: ray.data.Dataset,
    *,
    model: str,
    caption_column: str,
    threshold: float | None = None,
    threshold_file: str | None = None,
    generations: int = 1,
    steps: int = 1,
    score_sigma: float | None = None,
    seed: int = 0,
    batch_size: int = 32,
    actors: int = 1,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float | None = None,
    dtype: str = "auto",
    cuda_graphs: bool | None = None,
    storage_options: dict[str, Any] | None = None,
    confirm_generations: int | None = None,
    confirm_steps: int | None = None,
    screen_threshold: float | None = None,
    variant: str | None = None,
) -> ray.data.Dataset:
    """A new Dataset: every column of `ds`, plus memorization_score (float32, null unless memorization_status is
    ok), memorization_flag (bool, score > threshold) and memorization_status (the audit's row statuses).

    Scored by `actors` MemorizationScorer actors (an ActorPoolStrategy), `batch_size` captions per call, each
    with `cpus_per_actor` CPUs and `gpus_per_actor` GPUs (None: 1 when the Ray cluster reports GPUs, else 0;
    resolving it connects to or starts Ray, as running the dataset would). threshold / threshold_file as in
    `auditor audit` (neither: nothing is flagged); variant: the weights variant (`Scorer.from_pretrained`).
    confirm_generations / confirm_steps turn on the second stage as in `auditor audit --confirm-*`
    (screen_threshold, or the threshold file's): rows whose score is over the screening threshold are scored again
    in the same actor, memorization_confirm_score holds that score, and memorization_flag = score >
    screen_threshold and confirm score > threshold. The options are checked now, before anything runs: a bad
    value, a missing caption column or an output column already in the dataset (when its schema is known without
    running it) raises ConfigError. No resume and no ledger: a failed pipeline is rerun by its owner; use
    `auditor audit` for resumable audits of a corpus.
    """
    # 1. Check inputs before any actor starts.
    options: dict[str, Any] = dict(
        model=model, caption_column=caption_column, threshold=threshold, threshold_file=threshold_file,
        generations=generations, steps=steps, score_sigma=score_sigma, seed=seed, batch_size=batch_size,
        cpus_per_actor=cpus_per_actor,
        dtype=dtype, cuda_graphs=cuda_graphs, storage_options=dict(storage_options or {}), variant=variant,
        confirm_generations=confirm_generations, confirm_steps=confirm_steps, screen_threshold=screen_threshold,
    )  # fmt: skip
    config = ScoreConfig(**options)
    resolve_threshold(config)  # a threshold file that cannot be read fails here, not in every actor
    if not isinstance(actors, int) or isinstance(actors, bool) or actors < 1:
        raise ConfigError(f"actors must be an int >= 1, got {actors!r}.")
    if gpus_per_actor is not None and not gpus_per_actor >= 0:
        raise ConfigError(f"gpus_per_actor must be >= 0 (0 = CPU actors) or None, got {gpus_per_actor!r}.")
    known = ds.schema(fetch_if_missing=False)
    if known is not None:
        check_columns(list(known.names), caption_column)
    # 2. Resources.
    if gpus_per_actor is None:
        if not ray.is_initialized():
            ray.init()
        gpus_per_actor = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    if cuda_graphs and not gpus_per_actor:
        raise ConfigError(
            "cuda_graphs=True needs GPU actors, but gpus_per_actor is 0 (or the cluster reports no GPUs). "
            "Drop cuda_graphs or pass gpus_per_actor=1 on a cluster with GPUs."
        )
    # 3. One actor pool step; rows are never added or dropped.
    return ds.map_batches(
        MemorizationScorer,
        fn_constructor_kwargs=options,
        batch_size=batch_size,
        batch_format="pyarrow",
        num_cpus=cpus_per_actor,
        num_gpus=gpus_per_actor,
        **ray_compat.actor_pool(actors),
        **ray_compat.keeps_row_count(),
    )
