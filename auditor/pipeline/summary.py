"""What an audit run did: `summarize` puts `_audit.json` together (counts, files, units, histograms, runtime,
versions) from the ledger records and the driver's trackers, redacted in one place; `AuditResult` is what `run`
returns. Imports no model code: versions come from the installed packages' metadata.
"""

from __future__ import annotations

import importlib.metadata
import platform
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from auditor import __version__, schema
from auditor.config import AuditConfig
from auditor.histogram import EDGES, merge_counts
from auditor.io.ledger import DONE, FAILED
from auditor.io.parquet import FLAGGED_DIR, SCORES_DIR
from auditor.pipeline.commit import UnitTracker, dense_histogram, merge_lengths, utc_now
from auditor.pipeline.committer import UnitCommitter
from auditor.pipeline.plan import AuditPlan, committed_units
from auditor.pipeline.stage_summary import stages_summary
from auditor.redact import redact_uri, redact_value
from auditor.scoring.cascade import Stage


@dataclass
class AuditResult:
    output: str
    files_done: int  # files with a unit committed by this run
    files_skipped: int
    failed: dict[str, str]  # source -> error of a failed unit of it, as the output stands now
    counts: dict[str, int]  # this run, by status, plus "flagged" and "rows"
    units_done: int = 0
    failed_units: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)  # what _audit.json holds

    @property
    def exit_code(self) -> int:
        """0: every input audited; 1: some units failed (see failed / _audit.json)."""
        return 1 if self.failed else 0


# Read from the installed packages' metadata, not by importing them: importing torch, diffusers and transformers
# cost the driver about 10 CPU-seconds per run (2-core AVX2 EPYC), for three version strings.
VERSIONED_PACKAGES = ("torch", "diffusers", "transformers", "ray", "pyarrow")


def versions() -> dict[str, str]:
    found = {"auditor": __version__, "python": platform.python_version()}
    for package in VERSIONED_PACKAGES:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def summarize(
    cfg: AuditConfig,
    plan: AuditPlan,
    committer: UnitCommitter | None,
    tracker: UnitTracker,
    records: list[dict[str, Any]],
    timings: dict[str, float],
    ray_stats: str,
    started_at: str,
    runtime: dict[str, Any],
) -> AuditResult:
    committed = committer.committed if committer else []
    failed_now = committer.failed if committer else []
    run_counts: Counter = Counter()
    for record in committed:
        run_counts.update(record["counts"])
        run_counts["rows"] += record["rows"]
    # records: what the output holds for this run's inputs, each matching this run (compact kept only those).
    done_records = [r for r in records if r["status"] == DONE]
    total: Counter = Counter()
    for record in done_records:
        total.update(record["counts"])
        total["rows"] += record["rows"]
    histogram = merge_counts(dense_histogram(r.get("histogram")) for r in done_records)
    by_source: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_source.setdefault(record["source"], []).append(record)
    complete_files = 0
    for file_records in by_source.values():
        done, file_units = committed_units(file_records)
        complete_files += file_units is not None and done == frozenset(range(file_units))
    failed_units = sorted(
        (
            {"source": r["source"], "unit": r["unit"], "error": r["error"]}
            for r in records
            if r["status"] == FAILED
        ),
        key=lambda f: (f["source"], f["unit"]),
    )
    failed_sources = {f["source"]: f["error"] for f in failed_units}
    unfinished = [
        {"source": s.source, "unit": s.unit, "rows_staged": s.received} for s in tracker.unfinished()
    ]
    files_done = len({r["source"] for r in committed})
    summary = {
        "auditor_version": __version__,
        "started_at": started_at,
        "finished_at": utc_now(),
        "config": cfg.to_json(),
        "model_fingerprint": plan.model_fingerprint,
        "model_family": plan.model_family,
        "model_variant": plan.model_variant,
        **(
            {"model_fingerprint_earlier": plan.earlier_model_fingerprint}
            if plan.earlier_model_fingerprint and plan.earlier_model_fingerprint != plan.model_fingerprint
            else {}
        ),
        "run_fingerprint": plan.fingerprint,
        "threshold": plan.threshold.value,
        "threshold_origin": plan.threshold.origin,
        "screen_threshold": plan.threshold.cascade.screen_threshold if plan.threshold.cascade else None,
        "stages": stages_summary(Stage(cfg.generations, cfg.steps), plan.threshold, done_records),
        "partitioning": {"style": "hive", "column": schema.SHARD, "meaning": "one value per input file"},
        "layout": {
            "scores": f"{SCORES_DIR}/{schema.SHARD}=<file-key>/part-u<unit>.parquet: every row of one work unit",
            "flagged": f"{FLAGGED_DIR}/{schema.SHARD}=<file-key>/part-u<unit>.parquet: its flagged rows",
            "work_unit": f"whole parquet row groups, at most {cfg.unit_rows} rows; a text file is one unit",
            "ledger": "_ledger/: one record per committed or failed unit (file identity, fingerprint, counts)",
        },
        "files": {
            "inputs": len(plan.files),
            "audited_this_run": files_done,
            "skipped_complete": len(plan.skipped),
            "failed": [{"source": s, "error": e} for s, e in sorted(failed_sources.items())],
            "complete_in_output": complete_files,
        },
        "units": {
            "committed_this_run": len(committed),
            "failed_this_run": len(failed_now),
            "done_in_output": len(done_records),
            "failed": failed_units,
            "unfinished_this_run": unfinished,
        },
        "counts": {"this_run": dict(run_counts), "output_total": dict(total)},
        "score_histogram": {"edges": EDGES.tolist(), "counts": histogram},
        "token_histogram": merge_lengths(done_records),
        "driver": {
            "acknowledgements": tracker.acks,
            "acknowledgement_bytes": tracker.ack_bytes,
            "acknowledgement_cpu_s": round(tracker.cpu_s, 4),
            "commit_task_cpu_s": round(committer.commit_cpu_s, 4) if committer else 0.0,
        },
        "runtime": runtime,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "ray_stats": ray_stats,
        "versions": versions(),
        "argv": sys.argv,
    }
    # The one place _audit.json is put together: every URI, option value and error text in it loses its
    # credentials (INPUT and argv may be signed URLs, an endpoint_url may carry userinfo).
    summary = redact_value(summary)
    return AuditResult(
        redact_uri(cfg.output),
        files_done=files_done,
        files_skipped=len(plan.skipped),
        failed=failed_sources,
        counts=dict(run_counts),
        units_done=len(committed),
        failed_units=failed_units,
        summary=summary,
    )
