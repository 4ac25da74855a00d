"""Everything an audit decides before Ray starts: inputs, columns, threshold, model fingerprint, what to (re)do.

Fails fast with ConfigError on configuration problems. Never imports ray.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import hashlib
import importlib
import json
import logging
import math
import time
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from auditor.config import AuditConfig, ScoreConfig
from auditor.errors import ConfigError, InputDataError
from auditor.io import ledger as ledger_mod
from auditor.io.inputs import InputFile, list_inputs
from auditor.io.readers import columns_of, reader_for
from auditor.io.storage import filesystem_for, read_json
from auditor.redact import redact_text, redact_uri
from auditor.report.calibration import SCALE_FIELDS, calibration_mismatch, score_options_of
from auditor.scoring.cascade import Cascade, Stage

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
# Result fields added later, in the fingerprint only when set (None: the behaviour from before they existed).
OPTIONAL_RESULT_FIELDS = ("compression", "score_sigma")
PEEK_THREADS = 16
# Files whose columns the driver reads before Ray starts (footers or first lines): enough to catch a typo.
COLUMN_CHECK_FILES = 8
# Column names that usually hold captions, suggested when --caption-column is not found.
CAPTION_NAMES = ("caption", "captions", "text", "prompt", "alt", "alt_text", "description")


@dataclass(frozen=True)
class ThresholdChoice:
    """value None: nothing is flagged. origin: {"kind": "none" | "flag" | "file", ...}. cascade: the second stage
    (None: one stage, flagged = score > value); with it, value applies to the confirm score."""

    value: float | None
    origin: dict[str, Any]
    cascade: Cascade | None = None


@dataclass(frozen=True)
class WorkItem:
    """One input file to read, and the indices of its units that are already committed (skipped by the reader)."""

    file: InputFile
    done_units: frozenset[int] = frozenset()


@dataclass
class AuditPlan:
    files: list[InputFile]
    pending: list[WorkItem]
    skipped: list[InputFile]  # complete in the ledger
    fresh: list[InputFile]  # pending with no valid committed unit: old outputs are removed before the redo
    unreadable: dict[str, str]  # source -> error, found before Ray starts
    threshold: ThresholdChoice
    model_fingerprint: str
    fingerprint: str
    model_family: str
    records: dict[str, list[dict[str, Any]]]  # source -> its ledger records valid for this run
    stale_sources: set[str]  # sources in the ledger whose records no longer match (changed file or options)
    timings_s: dict[str, float] = field(default_factory=dict)
    model_variant: str | None = None  # the weights variant loaded (None: the default weights)
    # Run fingerprints of this same run under earlier model-fingerprint definitions: their records count too.
    earlier_fingerprints: frozenset[str] = frozenset()
    # The model's fingerprint under the first definition, where it was needed (else None).
    earlier_model_fingerprint: str | None = None

    @property
    def accepted_fingerprints(self) -> frozenset[str]:
        return frozenset({self.fingerprint}) | self.earlier_fingerprints


def resolve_threshold(cfg: ScoreConfig) -> ThresholdChoice:
    """The flagging threshold and the second stage, from the options and the threshold file."""
    if cfg.threshold is not None:
        value, origin = float(cfg.threshold), {"kind": "flag", "value": float(cfg.threshold)}
    elif cfg.threshold_file is None:
        value, origin = None, {"kind": "none"}
    else:
        value, origin = read_threshold_file(cfg)
    return ThresholdChoice(value, origin, resolve_cascade(cfg, origin.get("content")))


def read_threshold_file(cfg: ScoreConfig) -> tuple[float, dict[str, Any]]:
    expected = 'JSON with {"threshold": <number>, ...}, as `auditor calibrate` writes'
    try:
        content = read_json(cfg.threshold_file, cfg.storage_options)
    except Exception as exc:
        raise ConfigError(
            f"--threshold-file {cfg.threshold_file} cannot be read ({type(exc).__name__}: {exc}); it must be "
            f"{expected}."
        ) from exc
    value = content.get("threshold") if isinstance(content, dict) else None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(
            f"--threshold-file {cfg.threshold_file} has threshold {value!r}; it must be {expected} (a finite number)."
        )
    return float(value), {"kind": "file", "path": redact_uri(cfg.threshold_file), "content": content}


def resolve_cascade(cfg: ScoreConfig, content: dict[str, Any] | None) -> Cascade | None:
    """The second stage: the options' settings, each one not given taken from a two-stage threshold file (else 1);
    or the file's own when no option is given. Its screening threshold: the option's, else the file's."""
    o = cfg.option
    where = f"--threshold-file {cfg.threshold_file}"
    recorded = (content or {}).get("confirm")
    file_stage = Stage.from_dict(recorded, f"{where}: confirm") if recorded is not None else None
    if cfg.confirm_generations is None and cfg.confirm_steps is None:
        stage = file_stage
    else:
        stage = Stage(
            cfg.confirm_generations or (file_stage.generations if file_stage else 1),
            cfg.confirm_steps or (file_stage.steps if file_stage else 1),
        )
    if stage is None:
        if cfg.screen_threshold is not None:
            raise ConfigError(
                f"{o('screen-threshold')} applies to the second stage only; pass {o('confirm-generations')} "
                f"and/or {o('confirm-steps')} to turn it on, or drop {o('screen-threshold')}."
            )
        return None
    screen = cfg.screen_threshold
    if screen is None:
        screen = (content or {}).get("screen_threshold")
        if screen is not None and (
            isinstance(screen, bool) or not isinstance(screen, int | float) or not math.isfinite(screen)
        ):
            raise ConfigError(
                f"{where} has screen_threshold {screen!r}; it must be a finite number. Rewrite it with "
                "`auditor calibrate --confirm-generations N --confirm-steps K`, or pass --screen-threshold S."
            )
    if screen is None:
        raise ConfigError(
            f"the second stage ({o('confirm-generations')} {stage.generations}, {o('confirm-steps')} {stage.steps}) "
            f"needs a screening threshold: pass {o('screen-threshold')} S, or a {o('threshold-file')} written by "
            "`auditor calibrate --confirm-generations N --confirm-steps K` (it records screen_threshold)."
        )
    return Cascade(stage, float(screen))


def no_threshold_note(cfg: AuditConfig) -> str | None:
    """The end of an audit without a threshold: why nothing is flagged and how to get one (None with a threshold).
    The calibrate command carries this audit's score options that change the scores' scale (SCALE_FIELDS)."""
    if cfg.threshold is not None or cfg.threshold_file is not None:
        return None
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    options = "".join(
        f" --{name.replace('_', '-')} {getattr(cfg, name)}"
        for name in (*SCALE_FIELDS, "confirm_generations", "confirm_steps")
        if getattr(cfg, name) != defaults[name]
    )
    return (
        "no threshold was given (--threshold or --threshold-file), so nothing could be flagged; the scores are "
        f"written.\nto flag: calibrate on clean captions, `auditor calibrate --model {cfg.model}{options} "
        "--reference CLEAN_CAPTIONS.txt --fpr 0.01 --out threshold.json`, then rerun this audit with "
        "--threshold-file threshold.json (the threshold is part of the run's fingerprint: the inputs are scored "
        "again)."
    )


def warn_if_calibrated_elsewhere(
    threshold: ThresholdChoice,
    family: str,
    model_fingerprint: str,
    score_options: dict[str, Any] | None = None,
    earlier_fingerprint: Callable[[], str] | None = None,
) -> None:
    """A threshold file from another model family, model or score options still runs, with a warning.

    earlier_fingerprint: the model's fingerprint under the first definition (`legacy_fingerprint`), computed only
    when the file's differs from `model_fingerprint`: a file calibrated on this model before counts as its own.
    """
    content = threshold.origin.get("content") if threshold.origin.get("kind") == "file" else None
    if isinstance(content, dict):
        calibrated_on = content.get("model_fingerprint")
        earlier = earlier_fingerprint is not None and calibrated_on not in (None, model_fingerprint)
        if earlier and calibrated_on == earlier_fingerprint():
            model_fingerprint = calibrated_on
        why = calibration_mismatch(content, family, model_fingerprint, score_options)
        if why is not None:
            logger.warning("--threshold-file %s %s", threshold.origin.get("path"), redact_text(why))


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
    # Only when given, so that audits from before these options existed keep their fingerprint (and their rows).
    for name in OPTIONAL_RESULT_FIELDS:
        if getattr(cfg, name) is not None:
            payload[name] = getattr(cfg, name)
    # The second stage changes confirm_score and the flags; off, the payload is what it was before it existed.
    if threshold.cascade is not None:
        payload["confirm"] = threshold.cascade.to_dict()
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=list).encode()).hexdigest()


def check_columns(cfg: AuditConfig, files: list[InputFile]) -> dict[str, str]:
    """Peek the columns of a bounded sample of the files (COLUMN_CHECK_FILES, spread over the list), so a typo fails
    in seconds however many files there are. Returns {source: error} for sampled files that cannot be used; raises
    ConfigError when a requested column is missing from every readable sampled file that has columns (a typo, not
    a bad file); a file with no records (an empty jsonl or csv) lacks none and audits as 0 rows.
    Any other file that lacks a column fails alone, as a failed unit, when the pipeline reads it.
    """
    if len(files) > COLUMN_CHECK_FILES:
        step = len(files) / COLUMN_CHECK_FILES
        files = [files[int(i * step)] for i in range(COLUMN_CHECK_FILES)]
    wanted = [cfg.caption_column, *([cfg.id_column] if cfg.id_column else []), *cfg.keep_columns]

    def peek(file: InputFile) -> list[str] | str | None:
        fs, _ = filesystem_for(file.source, cfg.storage_options)
        try:
            return columns_of(fs, file, wanted)
        except InputDataError as exc:
            return str(exc)

    with ThreadPoolExecutor(max_workers=min(PEEK_THREADS, max(1, len(files)))) as pool:
        peeked = dict(zip([f.source for f in files], pool.map(peek, files), strict=True))
    unreadable = {s: v for s, v in peeked.items() if isinstance(v, str)}
    captions_only = [f for f in files if not reader_for(f).has_columns]
    if captions_only and (cfg.id_column or cfg.keep_columns):
        raise ConfigError(
            f"--id-column/--keep-columns need columns, but {captions_only[0].source} is a "
            f"{captions_only[0].format} file (one caption per line); drop those options or pass only column formats "
            "(parquet, jsonl, csv, tsv, webdataset)."
        )
    columnar = [
        f
        for f in files
        if reader_for(f).has_columns and f.source not in unreadable and peeked[f.source] is not None
    ]
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
    # The others fail alone, with the reader's message; jsonl too (peeked: the keys its reader checks).
    for f in columnar:
        missing = [name for name in wanted if name not in peeked[f.source]]
        if missing:
            unreadable[f.source] = reader_for(f).missing_error(f, missing, peeked[f.source])
    return unreadable


def record_matches(
    record: dict[str, Any], file: InputFile, fingerprint: str | Collection[str], unit_rows: int
) -> bool:
    """A ledger record counts for this run only for the same file content, model + options and unit size.

    fingerprint: this run's, or every run fingerprint that counts as this run's (`AuditPlan.accepted_fingerprints`).
    """
    accepted = (fingerprint,) if isinstance(fingerprint, str) else fingerprint
    return (
        record.get("identity") == file.identity
        and record.get("fingerprint") in accepted
        and record.get("unit_rows") == unit_rows
    )


def committed_units(records: list[dict[str, Any]]) -> tuple[frozenset[int], int | None]:
    """(indices of done units, the file's unit count if a record knows it)."""
    done = frozenset(r["unit"] for r in records if r["status"] == ledger_mod.DONE)
    counts = {r["file_units"] for r in records if r.get("file_units")}
    return done, (max(counts) if counts else None)


def diff_against_ledger(
    files: list[InputFile],
    entries: dict[tuple[str, int], dict[str, Any]],
    fingerprint: str | Collection[str],
    unit_rows: int,
    force: bool,
) -> tuple[list[WorkItem], list[InputFile], list[InputFile], dict[str, list[dict[str, Any]]], set[str]]:
    """(pending, skipped, fresh, valid records by source, stale sources) in one pass over files and records.

    A file is skipped when every one of its units has a matching done record; pending with its done units
    otherwise. `fresh` lists pending files with no matching done record: they are redone whole, so outputs of an
    earlier version of the file (another unit cut, rows since removed) must go first.
    """
    by_source: dict[str, list[dict[str, Any]]] = {}
    for (source, _), record in entries.items():
        by_source.setdefault(source, []).append(record)
    pending: list[WorkItem] = []
    skipped: list[InputFile] = []
    fresh: list[InputFile] = []
    valid: dict[str, list[dict[str, Any]]] = {}
    stale: set[str] = set()
    for file in files:
        records = by_source.get(file.source, [])
        matching = [r for r in records if record_matches(r, file, fingerprint, unit_rows)]
        if len(matching) < len(records):
            stale.add(file.source)
        if force:
            pending.append(WorkItem(file))
            fresh.append(file)
            continue
        valid[file.source] = matching
        done, file_units = committed_units(matching)
        if file_units is not None and done == frozenset(range(file_units)):
            skipped.append(file)
            continue
        pending.append(WorkItem(file, done))
        if not done:
            fresh.append(file)
    return pending, skipped, fresh, valid, stale


@contextlib.contextmanager
def garbage_collection_paused() -> Iterator[None]:
    """Planning allocates a few objects per input file and keeps them all; with 100k files Python's cyclic
    collector rescans them again and again (measured: the ledger diff of 100k files 0.64 s with it, 0.22 s without).
    None of them form cycles, so the collector is paused while they are built."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def plan_audit(cfg: AuditConfig) -> AuditPlan:
    with garbage_collection_paused():
        return _plan_audit(cfg)


def _plan_audit(cfg: AuditConfig) -> AuditPlan:
    from auditor.scoring.loading import fingerprint_model, legacy_fingerprint, model_files, resolve_model_dir

    timings: dict[str, float] = {}
    started = time.perf_counter()
    # 1. Cheap option checks first, so a typo fails in milliseconds.
    threshold = resolve_threshold(cfg)
    if cfg.explain_flagged:
        load_explain()
    # 2. Inputs (one listing, identities included) and what the ledger already holds.
    files = list_inputs(cfg.inputs, cfg.format, cfg.storage_options, cfg.compression, cfg.read_sidecars)
    timings["list_inputs"] = time.perf_counter() - started
    started = time.perf_counter()
    out_fs, out_path = filesystem_for(cfg.output, cfg.storage_options)
    try:
        entries = ledger_mod.Ledger(out_fs, out_path).entries()
    except Exception as exc:
        raise ConfigError(
            f"cannot read the ledger under OUTPUT {cfg.output} ({type(exc).__name__}: {exc}); check the path, "
            "the endpoint and credentials."
        ) from exc
    timings["read_ledger"] = time.perf_counter() - started
    # 3. The model: local copy, layout check and fingerprint (hashing weights takes seconds for SD-sized models
    # on a first start; later starts read per-file digests from the cache).
    started = time.perf_counter()
    root = resolve_model_dir(cfg.model, cfg.storage_options, cfg.variant)
    selected = model_files(root, cfg.variant)
    model_family = selected.layout.name
    model_fingerprint = fingerprint_model(root, cfg.variant)
    # Read only when a ledger record or the threshold file needs it. The first definition knew no variants (auditor
    # then loaded every component's default weights): only a run that loads those can match an audit made under it.
    earlier_model = functools.cache(lambda: legacy_fingerprint(root))
    has_earlier = all(variant is None for variant in selected.weights.values())
    score_options = score_options_of(cfg.to_json(), threshold.cascade)
    warn_if_calibrated_elsewhere(
        threshold, model_family, model_fingerprint, score_options, earlier_model if has_earlier else None
    )
    fingerprint = run_fingerprint(cfg, model_fingerprint, threshold)
    earlier: frozenset[str] = frozenset()
    if has_earlier and any(record.get("fingerprint") != fingerprint for record in entries.values()):
        # Records of audits from before the fingerprint covered only what scores read: the same run under the
        # first definition, when the model files are unchanged (computed once per state of the folder, cached).
        earlier = frozenset({run_fingerprint(cfg, earlier_model(), threshold)}) - {fingerprint}
    timings["model_fingerprint"] = time.perf_counter() - started
    # 4. What to do, file by file and unit by unit.
    started = time.perf_counter()
    pending, skipped, fresh, valid, stale = diff_against_ledger(
        files, entries, {fingerprint, *earlier}, cfg.unit_rows, cfg.force
    )
    timings["diff_ledger"] = time.perf_counter() - started
    # 5. Columns of a sample of the files that will be read.
    started = time.perf_counter()
    unreadable = check_columns(cfg, [item.file for item in pending]) if pending else {}
    timings["check_columns"] = time.perf_counter() - started
    logger.info(
        "%d input files: %d to audit (%d resumed), %d already complete, %d unreadable",
        len(files),
        len(pending) - len(unreadable),
        sum(1 for item in pending if item.done_units),
        len(skipped),
        len(unreadable),
    )
    return AuditPlan(
        files=files,
        pending=[item for item in pending if item.file.source not in unreadable],
        skipped=skipped,
        fresh=fresh,
        unreadable=unreadable,
        threshold=threshold,
        model_fingerprint=model_fingerprint,
        fingerprint=fingerprint,
        model_family=model_family,
        records=valid,
        stale_sources=stale,
        timings_s=timings,
        model_variant=selected.variant,
        earlier_fingerprints=earlier,
        earlier_model_fingerprint=earlier_model() if earlier_model.cache_info().currsize else None,
    )
