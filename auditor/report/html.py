"""The audit report: an audit output -> OUTPUT/report.html, one self-contained file (inline SVG plots, inline CSS,
no script, no network). Jinja2 with autoescape renders it: captions come from the web and contain markup.

Reads through `auditor.report.audit_output` (pyarrow/fsspec), draws with `auditor.report.plots` (matplotlib);
never imports torch or ray, so it runs anywhere the output can be read.
"""

from __future__ import annotations

import json
import logging
import posixpath
import time
from collections.abc import Sequence
from typing import Any

import jinja2
import numpy as np

from auditor import __version__, histogram
from auditor.errors import ConfigError
from auditor.io.storage import TEMPORARY_PREFIX, filesystem_for, join, to_uri
from auditor.redact import redact_uri
from auditor.report import plots
from auditor.report.audit_output import (
    AuditOutput,
    Comparison,
    FlaggedCaption,
    ScoreScan,
    compare_outputs,
    open_audit_output,
    scan_scores,
    top_flagged,
)
from auditor.report.calibration import calibration_mismatch, score_options_of

logger = logging.getLogger(__name__)

REPORT_FILE = "report.html"
TEMPLATE = "report.html.j2"
# Shards listed in the table (all of them go into the plot) and the count from which the plot is drawn.
SHARD_TABLE_ROWS = 50
SHARD_PLOT_MIN = 8
TOKEN_TABLE_ROWS = 12
CHANGED_ROWS = 20
# Runtime keys a reviewer looks for first, in this order; the rest follow alphabetically.
RUNTIME_FIRST = (
    "device",
    "actor_device",
    "dtype",
    "cuda_graphs",
    "shared_prefix",
    "channels_last",
    "batch_size",
)
STATUS_FIRST = ("ok",)
COUNT_KEYS = ("rows", "flagged")


def write_report(
    output: str,
    storage_options: dict[str, Any] | None = None,
    *,
    out: str | None = None,
    top_k: int = 50,
    against: str | None = None,
) -> str:
    """Render the report of the audit output at `output` (local path or fsspec URI) and write it.

    out: where to write (default OUTPUT/report.html); top_k: distinct flagged captions listed; against: another
    audit output to compare with (newly / no longer flagged, score shift). storage_options apply to every URI.
    Returns the path or URI written. Raises ConfigError when `output` or `against` is not an audit output.
    """
    # 1. Check inputs
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ConfigError(f"--top must be an int >= 0, got {top_k!r}.")
    started = time.perf_counter()
    current = open_audit_output(output, storage_options)
    other = open_audit_output(against, storage_options) if against else None

    # 2. Render
    html = render_report(current, top_k=top_k, other=other)

    # 3. Write: under a temporary name, then moved into place, so a reader never opens half a report.
    target = out or join(output.rstrip("/"), REPORT_FILE)
    fs, path = filesystem_for(target, storage_options)
    parent, name = posixpath.split(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    temporary = posixpath.join(parent, f"{TEMPORARY_PREFIX}{name}")
    with fs.open(temporary, "wb") as fh:
        fh.write(html.encode("utf-8"))
    fs.mv(temporary, path)
    written = redact_uri(to_uri(fs, path))
    logger.info("report written to %s in %.2fs", written, time.perf_counter() - started)
    return written


def render_report(current: AuditOutput, *, top_k: int = 50, other: AuditOutput | None = None) -> str:
    """The report as one HTML string (see `write_report`)."""
    scan = scan_scores(current)
    flagged, n_flagged_rows = top_flagged(current, top_k)
    comparison = compare_outputs(current, other, CHANGED_ROWS) if other is not None else None
    context = {
        "title": f"Audit report: {current.uri}",
        "output": current.uri,
        "generated_by": f"auditor {__version__}",
        "summary": summary_section(current, scan),
        "distribution": distribution_section(current, scan),
        "where": where_section(scan),
        "flagged": flagged_section(current, flagged, n_flagged_rows, top_k),
        "comparison": comparison_section(current, other, comparison) if comparison is not None else None,
    }
    return template_environment().get_template(TEMPLATE).render(**context)


def template_environment() -> jinja2.Environment:
    # autoescape=True for every template, whatever its name: every value from the data is escaped.
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("auditor.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["score"] = format_score
    env.filters["count"] = lambda n: f"{int(n):,}"
    env.filters["percent"] = format_percent
    return env


# Formatting --------------------------------------------------------------------------------------------------
def format_score(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.4f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3g}"


def format_percent(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{100 * value:.2f}%" if value >= 1e-4 or value == 0 else f"{100 * value:.2g}%"


def format_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, default=str)


def ordered_items(mapping: dict[str, Any], first: Sequence[str]) -> list[tuple[str, Any]]:
    keys = [k for k in first if k in mapping] + sorted(k for k in mapping if k not in first)
    return [(k, mapping[k]) for k in keys]


def short_source(source: str) -> str:
    source = redact_uri(source)
    return source.rstrip("/").rsplit("/", 1)[-1] or source


# 1. Summary ----------------------------------------------------------------------------------------------------
def output_counts(summary: dict[str, Any], scan: ScoreScan) -> dict[str, int]:
    """Counts of the whole output (by status, plus rows and flagged): _audit.json's, else the scan's."""
    counts = dict((summary.get("counts") or {}).get("output_total") or {})
    counts.setdefault("rows", scan.rows)
    counts.setdefault("flagged", scan.flagged)
    if "ok" not in counts:
        counts["ok"] = int(sum(scan.histogram))
    return {k: int(v) for k, v in counts.items() if isinstance(v, int | float)}


def threshold_view(current: AuditOutput) -> dict[str, Any]:
    """The threshold and where it came from, as the report states it."""
    summary = current.summary
    origin = summary.get("threshold_origin") or {}
    kind = origin.get("kind", "none" if current.threshold is None else "unknown")
    view: dict[str, Any] = {"value": current.threshold, "kind": kind, "details": [], "warning": None}
    if current.threshold is None:
        view["origin"] = "none"
        view["why_nothing_flagged"] = (
            "This audit ran without a threshold (neither --threshold nor --threshold-file), so no row is flagged: "
            "every row has flagged = false. The scores are written; pick a threshold with `auditor calibrate` "
            "(or from the distribution below) and rerun the audit with --threshold-file."
        )
        return view
    if kind == "flag":
        view["origin"] = "--threshold on the command line"
    elif kind == "file":
        content = origin.get("content") or {}
        view["origin"] = f"--threshold-file {origin.get('path', '')}"
        if content.get("method") == "calibrate":
            view["origin"] += " (auditor calibrate)"
        for key, label in (
            ("fpr", "target false-positive rate"),
            ("reference_fpr", "FPR at the threshold on the reference"),
            ("screen_threshold", "screening threshold (second stage)"),
            ("screen_fpr", "target screening FPR"),
            ("screen_reference_fpr", "reference share over the screening threshold"),
            ("n_reference", "reference captions"),
            ("reference", "reference set"),
            ("created_at", "calibrated at"),
        ):
            if key in content:
                value = content[key]
                shown = format_percent(value) if key.endswith("fpr") else format_value(value)
                if key == "screen_threshold" and isinstance(value, int | float):
                    shown = format_score(value)
                view["details"].append((label, shown))
        config = summary.get("config") or {}
        model_fingerprint = summary.get("model_fingerprint") or ""
        if content.get("model_fingerprint") == summary.get("model_fingerprint_earlier"):
            model_fingerprint = content["model_fingerprint"]  # this model, under the first definition
        why = calibration_mismatch(
            content,
            summary.get("model_family") or "",
            model_fingerprint,
            score_options_of(config, (summary.get("stages") or {}).get("confirm")),
        )
        if why is not None:
            view["warning"] = f"The threshold {why}"
    else:
        view["origin"] = kind
    return view


def failures_view(summary: dict[str, Any]) -> dict[str, Any]:
    """Failed units when _audit.json lists units, else failed input files."""
    units = summary.get("units") or {}
    files = summary.get("files") or {}
    if units.get("failed"):
        rows = [(f.get("source", ""), f.get("unit", ""), f.get("error", "")) for f in units["failed"]]
        return {"what": "units", "rows": rows}
    rows = [(f.get("source", ""), "", f.get("error", "")) for f in files.get("failed") or []]
    return {"what": "input files", "rows": rows}


def summary_section(current: AuditOutput, scan: ScoreScan) -> dict[str, Any]:
    summary = current.summary
    counts = output_counts(summary, scan)
    statuses = {k: v for k, v in counts.items() if k not in COUNT_KEYS}
    scored = counts.get("ok", 0)
    runtime = dict(summary.get("runtime") or {})
    actors = [a for a in runtime.pop("actors", None) or [] if isinstance(a, dict)]
    actor_keys = [k for k in RUNTIME_FIRST if any(k in a for a in actors)]
    actor_keys += sorted({k for a in actors for k in a} - set(actor_keys))
    files = summary.get("files") or {}
    units = summary.get("units") or {}
    return {
        "rows": counts.get("rows", 0),
        "scored": scored,
        "flagged": counts.get("flagged", 0),
        "flagged_rate": counts.get("flagged", 0) / scored if scored else None,
        "statuses": ordered_items(statuses, STATUS_FIRST),
        "threshold": threshold_view(current),
        "run": [
            (label, format_value(summary[key]))
            for key, label in (
                ("model_family", "model family"),
                ("model_fingerprint", "model fingerprint"),
                ("model_variant", "model weights variant"),
                ("run_fingerprint", "run fingerprint"),
                ("auditor_version", "auditor version"),
                ("started_at", "started"),
                ("finished_at", "finished"),
            )
            if summary.get(key)
        ],
        "model": (summary.get("config") or {}).get("model", ""),
        "inputs": [
            (label, files[key])
            for key, label in (
                ("inputs", "input files"),
                ("audited_this_run", "audited by the last run"),
                ("skipped_complete", "skipped (already complete)"),
                ("complete_in_output", "complete in this output"),
            )
            if key in files
        ]
        + [
            (f"units {label}", units[key])
            for key, label in (("total", "in total"), ("done", "done"))
            if key in units
        ],
        "timings": [
            (k, v) for k, v in (summary.get("timings_s") or {}).items() if isinstance(v, int | float)
        ],
        "runtime": [(k, format_value(v)) for k, v in ordered_items(runtime, RUNTIME_FIRST)],
        "actor_keys": actor_keys,
        "actors": [[format_value(a.get(k, "")) for k in actor_keys] for a in actors],
        "versions": sorted((summary.get("versions") or {}).items()),
        "config": [(k, format_value(v)) for k, v in sorted((summary.get("config") or {}).items())],
        "argv": " ".join(str(a) for a in summary.get("argv") or []),
        "failures": failures_view(summary),
    }


# 2. Score distribution -----------------------------------------------------------------------------------------
def reference_histogram(current: AuditOutput) -> list[int] | None:
    """The calibration reference's score histogram, when the threshold file recorded one in the same bins."""
    origin = current.summary.get("threshold_origin") or {}
    content = origin.get("content") or {}
    counts = (content.get("reference_score_histogram") or {}).get("counts")
    if counts is not None and len(counts) == histogram.N_COUNTS:
        return [int(c) for c in counts]
    return None


def distribution_section(current: AuditOutput, scan: ScoreScan) -> dict[str, Any]:
    counts = scan.histogram
    reference = reference_histogram(current)
    second = second_stage_section(current)
    # With a second stage the first stage's line is the screening threshold; the threshold applies to confirm scores.
    threshold = current.threshold if second is None else second["screen_threshold"]
    content = ((current.summary.get("threshold_origin") or {}).get("content")) or {}
    above = None
    if threshold is not None:
        # Bins wholly above the threshold: a lower bound from counts alone (the exact count is the flagged one).
        above = histogram.count_above(counts, threshold)
    quantiles = content.get("reference_score_quantiles") or {}
    return {
        "svg": plots.plot_score_histogram(
            counts,
            threshold,
            reference,
            threshold_label="threshold" if second is None else "screening threshold",
        ),
        "second_stage": second,
        "scored": int(sum(counts)),
        "threshold": threshold,
        "above_lower_bound": above,
        "origin": scan.histogram_origin,
        "scan_seconds": scan.seconds,
        "below_range": counts[0],
        "above_range": counts[-1],
        "range": (histogram.LOW, histogram.HIGH),
        "has_reference": reference is not None,
        # With a second stage the first panel's line is the screening threshold: its share of the reference.
        "reference_fpr": content.get("reference_fpr" if second is None else "screen_reference_fpr")
        if reference is not None or quantiles
        else None,
        "target_fpr": content.get("fpr" if second is None else "screen_fpr"),
        "threshold_label": "threshold" if second is None else "screening threshold",
        "n_reference": content.get("n_reference"),
        "reference_quantiles": sorted((float(q), float(v)) for q, v in quantiles.items()),
    }


def second_stage_section(current: AuditOutput) -> dict[str, Any] | None:
    """The two-stage audit's view from _audit.json["stages"]: the confirm scores' distribution with the threshold
    (and the calibration reference's, when the threshold file recorded it), the share re-scored and the cost in
    denoiser rows per caption by stage. None for a one-stage audit."""
    stages = current.summary.get("stages") or {}
    confirm = stages.get("confirm")
    if not confirm:
        return None
    counts = [int(c) for c in (confirm.get("confirm_score_histogram") or {}).get("counts") or []]
    if len(counts) != histogram.N_COUNTS:
        counts = [0] * histogram.N_COUNTS
    content = ((current.summary.get("threshold_origin") or {}).get("content")) or {}
    reference = (content.get("reference_confirm_score_histogram") or {}).get("counts")
    if reference is not None and len(reference) != histogram.N_COUNTS:
        reference = None
    screen = stages.get("screen") or {}
    scored = screen.get("rows") or 0
    per_caption = {
        name: (stages.get(name) or {}).get("denoiser_rows", 0) / scored if scored else None
        for name in ("screen", "confirm")
    }
    return {
        "svg": plots.plot_score_histogram(
            counts,
            current.threshold,
            reference,
            reference_label="reference over the screen",
            score_label="confirm score (second stage, log scale)",
        ),  # fmt: skip
        "screen_threshold": confirm.get("screen_threshold"),
        "threshold": current.threshold,
        "screen": (screen.get("generations"), screen.get("steps")),
        "confirm": (confirm.get("generations"), confirm.get("steps")),
        "rescored": confirm.get("rows", 0),
        "share": confirm.get("share_of_scored"),
        "rows_per_caption": per_caption,
        "total_per_caption": stages.get("denoiser_rows_per_caption"),
        "has_reference": reference is not None,
        "reference_screen_fpr": content.get("screen_reference_fpr"),
        "n_reference": content.get("n_reference"),
    }


# 3. Where the flags are ----------------------------------------------------------------------------------------
def where_section(scan: ScoreScan) -> dict[str, Any]:
    shards = [
        {"key": key, "rows": rows, "flagged": flagged, "rate": flagged / rows if rows else 0.0}
        for key, (rows, flagged) in scan.shards.items()
    ]
    shards.sort(key=lambda s: (-s["rate"], -s["flagged"], s["key"]))
    rows_by_length = scan.by_tokens_rows
    flagged_by_length = np.pad(scan.by_tokens_flagged, (0, len(rows_by_length) - len(scan.by_tokens_flagged)))
    lengths = [
        {"tokens": n, "rows": int(rows), "flagged": int(flagged), "rate": flagged / rows}
        for n, (rows, flagged) in enumerate(zip(rows_by_length, flagged_by_length, strict=True))
        if flagged > 0
    ]
    lengths.sort(key=lambda s: (-s["rate"], s["tokens"]))
    return {
        "n_shards": len(shards),
        "shards": shards[:SHARD_TABLE_ROWS],
        "shards_more": max(0, len(shards) - SHARD_TABLE_ROWS),
        "shard_svg": plots.plot_shard_rates([s["rate"] for s in shards])
        if len(shards) >= SHARD_PLOT_MIN
        else None,
        "token_svg": (
            plots.plot_token_lengths(rows_by_length, flagged_by_length) if rows_by_length.sum() else None
        ),
        "lengths": lengths[:TOKEN_TABLE_ROWS],
        "tallies_origin": scan.tallies_origin,
        "scan_seconds": scan.seconds,
        "mean_tokens_all": _mean_length(rows_by_length),
        "mean_tokens_flagged": _mean_length(flagged_by_length),
    }


def _mean_length(counts: np.ndarray) -> float | None:
    total = counts.sum()
    return float((np.arange(len(counts)) * counts).sum() / total) if total else None


# 4. The flagged captions ---------------------------------------------------------------------------------------
def token_spans(tokens: Sequence[str], significance: Sequence[float] | None) -> list[dict[str, Any]]:
    """CLIP BPE pieces as display text ("cat</w>" -> "cat ") with a shade in [0, 1] relative to the top token."""
    values = np.asarray(
        [0.0 if v is None else float(v) for v in (significance or [0.0] * len(tokens))], dtype=float
    )
    top = float(values.max()) if len(values) and np.isfinite(values).all() and values.max() > 0 else 0.0
    total = float(values.sum()) if top else 0.0
    spans = []
    for piece, value in zip(tokens, values, strict=False):
        text = str(piece)
        end = text.endswith("</w>")
        spans.append(
            {
                "text": text.removesuffix("</w>") + (" " if end else ""),
                "shade": round(value / top, 3) if top else 0.0,
                "share": value / total if total else 0.0,
            }
        )
    return spans


def flagged_section(
    current: AuditOutput, flagged: list[FlaggedCaption], n_flagged_rows: int, top_k: int
) -> dict[str, Any]:
    rows = []
    for rank, entry in enumerate(flagged, start=1):
        rows.append(
            {
                "rank": rank,
                "score": entry.score,
                "caption": entry.caption,
                "count": entry.count,
                "id": entry.id,
                "source": short_source(entry.source),
                "source_full": redact_uri(entry.source),
                "sources": entry.sources,
                "tokens": token_spans(entry.tokens, entry.significance) if entry.tokens else None,
            }
        )
    return {
        "threshold": current.threshold,
        "n_rows": n_flagged_rows,
        "top_k": top_k,
        "rows": rows,
        "explained": any(r["tokens"] for r in rows),
    }


# 5. Comparison -------------------------------------------------------------------------------------------------
def comparison_section(current: AuditOutput, other: AuditOutput, comparison: Comparison) -> dict[str, Any]:
    def changed(rows):
        return [
            {
                "id": r.id,
                "score": r.score,
                "score_other": r.score_other,
                "caption": r.caption,
                "source": short_source(r.source),
                "source_full": redact_uri(r.source),
            }
            for r in rows
        ]

    same_model = current.summary.get("model_fingerprint") == other.summary.get("model_fingerprint")
    return {
        "other": other.uri,
        "threshold": current.threshold,
        "threshold_other": other.threshold,
        "same_model": same_model,
        "model": current.summary.get("model_fingerprint", ""),
        "model_other": other.summary.get("model_fingerprint", ""),
        "c": comparison,
        "svg": plots.plot_score_shift(comparison.shift_counts, current.threshold, other.threshold),
        "newly": changed(comparison.newly_top),
        "no_longer": changed(comparison.no_longer_top),
    }
