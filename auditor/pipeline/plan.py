"""Everything an audit decides before Ray starts: inputs, columns, threshold, model fingerprint, what to (re)do.

Fails fast with ConfigError on configuration problems. Never imports ray.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from auditor.config import AuditConfig
from auditor.errors import ConfigError, InputDataError
from auditor.io import ledger as ledger_mod
from auditor.io.inputs import InputFile, list_inputs, peek_columns
from auditor.io.storage import filesystem_for, read_json

logger = logging.getLogger(__name__)

# Config fields that change what a row's output is; batch size, actors, quiet and friends do not.
RESULT_FIELDS = (
    "caption_column",
    "id_column",
    "keep_columns",
    "format",
    "generations",
    "steps",
    "seed",
    "dtype",
    "explain_flagged",
)
PEEK_THREADS = 16
# Column names that usually hold captions, suggested when --caption-column is not found.
CAPTION_NAMES = ("caption", "captions", "text", "prompt", "alt", "alt_text", "description")


@dataclass(frozen=True)
class ThresholdChoice:
    """value None: nothing is flagged. origin: {"kind": "none" | "flag" | "file", ...}."""

    value: float | None
    origin: dict[str, Any]


@dataclass
class AuditPlan:
    files: list[InputFile]
    pending: list[InputFile]
    skipped: list[InputFile]
    unreadable: dict[str, str]  # source -> error, found before Ray starts
    threshold: ThresholdChoice
    model_fingerprint: str
    fingerprint: str
    timings_s: dict[str, float] = field(default_factory=dict)


def resolve_threshold(cfg: AuditConfig) -> ThresholdChoice:
    if cfg.threshold is not None:
        return ThresholdChoice(float(cfg.threshold), {"kind": "flag", "value": float(cfg.threshold)})
    if cfg.threshold_file is None:
        return ThresholdChoice(None, {"kind": "none"})
    expected = 'JSON with {"threshold": <number>, ...}, as `auditor calibrate` writes'
    try:
        content = read_json(cfg.threshold_file, cfg.storage_options)
    except Exception as exc:
        raise ConfigError(
            f"--threshold-file {cfg.threshold_file} cannot be read ({type(exc).__name__}: {exc}); it must be {expected}."
        ) from exc
    value = content.get("threshold") if isinstance(content, dict) else None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(
            f"--threshold-file {cfg.threshold_file} has threshold {value!r}; it must be {expected} (a finite number)."
        )
    return ThresholdChoice(float(value), {"kind": "file", "path": cfg.threshold_file, "content": content})


def load_explain() -> Callable[..., Any]:
    """`auditor.scoring.explain.explain`, or ConfigError when that module is missing or broken."""
    try:
        return importlib.import_module("auditor.scoring.explain").explain
    except (ImportError, AttributeError) as exc:
        raise ConfigError(
            f"--explain-flagged: explain is not available ({type(exc).__name__}: {exc}); "
            "run without --explain-flagged or install an auditor version that has auditor.scoring.explain."
        ) from exc


def run_fingerprint(cfg: AuditConfig, model_fingerprint: str, threshold: ThresholdChoice) -> str:
    """sha256 of the model and every option that changes output rows: a ledger record is reused only on a match."""
    payload = {name: getattr(cfg, name) for name in RESULT_FIELDS}
    payload.update(model=model_fingerprint, threshold=threshold.value)
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=list).encode()).hexdigest()


def check_columns(cfg: AuditConfig, files: list[InputFile]) -> dict[str, str]:
    """Peek every file's columns. Returns {source: error} for files that cannot be used; raises ConfigError when a
    requested column is missing from every readable file (a typo, not a bad file).
    """

    def peek(file: InputFile) -> list[str] | str:
        fs, _ = filesystem_for(file.source, cfg.storage_options)
        try:
            return peek_columns(fs, file)
        except InputDataError as exc:
            return str(exc)

    with ThreadPoolExecutor(max_workers=min(PEEK_THREADS, max(1, len(files)))) as pool:
        peeked = dict(zip([f.source for f in files], pool.map(peek, files), strict=True))
    unreadable = {s: v for s, v in peeked.items() if isinstance(v, str)}
    txt = [f.source for f in files if f.format == "txt"]
    if txt and (cfg.id_column or cfg.keep_columns):
        raise ConfigError(
            f"--id-column/--keep-columns need columns, but {txt[0]} is a txt file (one caption per line); "
            "drop those options or pass only column formats (parquet, jsonl, csv, tsv)."
        )
    wanted = [cfg.caption_column, *([cfg.id_column] if cfg.id_column else []), *cfg.keep_columns]
    columnar = [f for f in files if f.format != "txt" and f.source not in unreadable]
    for name in wanted:
        lacking = [f for f in columnar if name not in peeked[f.source]]
        if columnar and len(lacking) == len(columnar):
            first = columnar[0]
            option = "--caption-column" if name == cfg.caption_column else "--id-column/--keep-columns"
            hint = next(
                (c for c in peeked[first.source] if c.lower() in (name.lower(), *CAPTION_NAMES)), None
            )
            fix = f" Pass {option} {hint}." if hint and name == cfg.caption_column else ""
            raise ConfigError(
                f"{option} {name!r} not found in {first.source}; columns are: "
                f"{', '.join(peeked[first.source]) or '(none)'}.{fix}"
            )
        for f in lacking:
            if f.format != "jsonl":  # a jsonl record may leave out a null field; its rows get null_caption
                unreadable[f.source] = (
                    f"{f.source} has no column {name!r}; columns are: {', '.join(peeked[f.source])}."
                )
    return unreadable


def plan_audit(cfg: AuditConfig) -> AuditPlan:
    from auditor.scoring.loading import check_model_dir, fingerprint_model, resolve_model_dir

    timings: dict[str, float] = {}
    started = time.perf_counter()
    # 1. Cheap option checks first, so a typo fails in milliseconds.
    threshold = resolve_threshold(cfg)
    if cfg.explain_flagged:
        load_explain()
    # 2. Inputs and what the ledger already holds.
    files = list_inputs(cfg.inputs, cfg.format, cfg.storage_options)
    out_fs, out_path = filesystem_for(cfg.output, cfg.storage_options)
    try:
        records = ledger_mod.Ledger(out_fs, out_path).entries()
    except Exception as exc:
        raise ConfigError(
            f"cannot read the ledger under OUTPUT {cfg.output} ({type(exc).__name__}: {exc}); check the path, "
            "the endpoint and credentials."
        ) from exc
    timings["list_inputs"] = time.perf_counter() - started
    # 3. The model: local copy, layout check and fingerprint (hashing weights takes seconds for SD-sized models).
    started = time.perf_counter()
    root = resolve_model_dir(cfg.model, cfg.storage_options)
    check_model_dir(root)
    model_fingerprint = fingerprint_model(root)
    fingerprint = run_fingerprint(cfg, model_fingerprint, threshold)
    timings["model_fingerprint"] = time.perf_counter() - started

    def complete(file: InputFile) -> bool:
        record = records.get(file.source)
        return bool(record) and record["status"] == ledger_mod.DONE and record["fingerprint"] == fingerprint

    pending = [f for f in files if cfg.force or not complete(f)]
    skipped = [f for f in files if f not in pending]
    # 4. Columns of the files that will be read.
    started = time.perf_counter()
    unreadable = check_columns(cfg, pending) if pending else {}
    timings["check_columns"] = time.perf_counter() - started
    logger.info(
        "%d input files: %d to audit, %d already complete, %d unreadable",
        len(files),
        len(pending) - len(unreadable),
        len(skipped),
        len(unreadable),
    )
    return AuditPlan(
        files=files,
        pending=[f for f in pending if f.source not in unreadable],
        skipped=skipped,
        unreadable=unreadable,
        threshold=threshold,
        model_fingerprint=model_fingerprint,
        fingerprint=fingerprint,
        timings_s=timings,
    )
