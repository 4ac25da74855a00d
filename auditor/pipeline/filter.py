"""`run_filter(cfg)`: apply an audit's flags to a dataset; one Ray Data task per input file streams it through.

Each task reads its file batch by batch, looks its rows up in the audit shard of the same file (joined on `id`,
which is the id column or `<source>:<row>` exactly as the audit built it) and streams the result through the
format's writer (auditor.io.filter_writers): OUT/<path under DATASET>.parquet, or for WebDataset shards a cleaned
tar of the same name. Memory per task is one batch (one sample) plus one file's (id, flagged, score).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import ray

from auditor import schema
from auditor.config import FilterConfig
from auditor.errors import ConfigError
from auditor.io.filter_writers import writer_for
from auditor.io.format_reader import FilterWriter, Verdicts
from auditor.io.inputs import InputFile, list_inputs
from auditor.io.parquet import SCORES_DIR, read_shard
from auditor.io.storage import TEMPORARY_PREFIX, filesystem_for, join, read_json, write_json
from auditor.pipeline.audit import AUDIT_FILE, init_ray
from auditor.pipeline.commit import utc_now
from auditor.redact import redact_text, redact_uri

logger = logging.getLogger(__name__)

FILTER_FILE = "_filter.json"


@dataclass
class FilterResult:
    output: str
    counts: dict[str, int]
    files: list[dict[str, Any]] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """1 when a file failed or had no audit results (its rows were kept unaudited), else 0."""
        return 1 if any(f["error"] or not f["audited"] for f in self.files) else 0


def filter_file(cfg: FilterConfig, id_column: str | None, file: InputFile) -> dict[str, Any]:
    """Filter or mark one file with its format's writer; returns its counts. The broad except is the file
    boundary. The output appears whole or not at all: it is written to a temporary name, then moved."""
    summary: dict[str, Any] = {"source": file.source, "rows": 0, "flagged": 0, "written": 0, "unaudited": 0}
    summary.update(audited=False, error=None)
    writer = writer_for(file)
    try:
        in_fs, _ = filesystem_for(file.source, cfg.storage_options)
        audit_fs, audit_path = filesystem_for(cfg.audit_output, cfg.storage_options)
        out_fs, out_root = filesystem_for(cfg.output, cfg.storage_options)
        audited = read_shard(
            audit_fs, join(audit_path, SCORES_DIR), file.shard, [schema.ID, schema.FLAGGED, schema.SCORE]
        )
        summary["audited"] = audited is not None
        verdicts = Verdicts(
            audited if audited is not None else pa.table({schema.ID: pa.array([], pa.string())}),
            audited is not None,
        )
        target = writer.target(out_root, file, cfg.mode)
        parent, name = target.rsplit("/", 1)
        temporary = f"{parent}/{TEMPORARY_PREFIX}{name}"
        out_fs.makedirs(parent, exist_ok=True)
        with out_fs.open(temporary, "wb") as handle:
            companions = writer.write(in_fs, file, handle, verdicts, cfg.mode, id_column, summary)
        out_fs.mv(temporary, target)
        summary["output"] = redact_uri(target)
        for companion in companions:
            with out_fs.open(f"{parent}/{TEMPORARY_PREFIX}{companion.name}", "wb") as handle:
                companion.write(handle)
            out_fs.mv(f"{parent}/{TEMPORARY_PREFIX}{companion.name}", f"{parent}/{companion.name}")
    except Exception as exc:  # fsspec errors quote the URL opened (file.path), credentials included
        summary["error"] = redact_text(f"{type(exc).__name__}: {exc}")
        logger.warning("filter of %s failed: %s", file.source, summary["error"])
        _remove_quietly(cfg, file, writer)
    return summary


def _remove_quietly(cfg: FilterConfig, file: InputFile, writer: FilterWriter) -> None:
    try:
        out_fs, out_root = filesystem_for(cfg.output, cfg.storage_options)
        parent, name = writer.target(out_root, file, cfg.mode).rsplit("/", 1)
        if out_fs.exists(f"{parent}/{TEMPORARY_PREFIX}{name}"):
            out_fs.rm(f"{parent}/{TEMPORARY_PREFIX}{name}")
    except Exception:  # cleanup after a failure must not hide the failure
        logger.debug("could not remove the temporary output of %s", file.source, exc_info=True)


def filter_files(batch: pa.Table, cfg: FilterConfig, id_column: str | None) -> pa.Table:
    """Ray Data UDF: one summary row per InputFile row (JSON text, so every summary has one type)."""
    import json

    summaries = [json.dumps(filter_file(cfg, id_column, InputFile(**item))) for item in batch.to_pylist()]
    return pa.table({"summary": pa.array(summaries, pa.string())})


def run_filter(cfg: FilterConfig) -> FilterResult:
    import json

    started = time.perf_counter()
    # 1. Check the audit output and list the dataset before Ray starts.
    audit_fs, audit_path = filesystem_for(cfg.audit_output, cfg.storage_options)
    if not audit_fs.isdir(join(audit_path, SCORES_DIR)):
        raise ConfigError(
            f"AUDIT_OUTPUT {cfg.audit_output} has no {SCORES_DIR}/ folder; pass the OUTPUT folder of "
            "`auditor audit` (it holds scores/, flagged/ and _audit.json)."
        )
    id_column = cfg.id_column
    audit_file = join(cfg.audit_output, AUDIT_FILE)
    if id_column is None and audit_fs.exists(join(audit_path, AUDIT_FILE)):
        id_column = read_json(audit_file, cfg.storage_options).get("config", {}).get("id_column")
    files = list_inputs(cfg.inputs, cfg.format, cfg.storage_options, cfg.compression)
    # 2. One task per file.
    init_ray(cfg.address, cfg.num_cpus, cfg.quiet)
    items = [dataclasses.asdict(f) for f in files]
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        filter_files, batch_size=1, batch_format="pyarrow", fn_kwargs={"cfg": cfg, "id_column": id_column}
    )
    summaries = [json.loads(row["summary"]) for row in ds.iter_rows()]
    counts: Counter = Counter()
    for s in summaries:
        counts.update({k: s[k] for k in ("rows", "flagged", "written", "unaudited")})
        counts["files"] += 1
        counts["files_failed"] += bool(s["error"])
        counts["files_without_audit"] += not s["audited"]
    out_fs, out_root = filesystem_for(cfg.output, cfg.storage_options)
    result = FilterResult(redact_uri(cfg.output), dict(counts), sorted(summaries, key=lambda s: s["source"]))
    write_json(
        out_fs,
        join(out_root, FILTER_FILE),
        {
            "config": cfg.to_json(),
            "id_column": id_column,
            "counts": result.counts,
            "files": result.files,
            "finished_at": utc_now(),
            "elapsed_s": round(time.perf_counter() - started, 3),
        },
    )
    logger.info("filter done: %s", result.counts)
    return result
