"""`auditor audit`: argparse -> AuditConfig -> auditor.pipeline.audit.run; prints the summary."""

from __future__ import annotations

import argparse

from auditor.config import AuditConfig, add_audit_arguments

DESCRIPTION = """\
Score every caption of a dataset on Ray (local by default) and write:
  OUTPUT/scores/shard=<input file>/part-u<unit>.parquet   every input row once: id, caption, score, flagged,
                                                           source, row, n_tokens, truncated, status, error
                                                           (+ --keep-columns); one part file per work unit
  OUTPUT/flagged/shard=<input file>/part-u<unit>.parquet  flagged rows only (id, caption, score, source, row)
  OUTPUT/_audit.json     config, model fingerprint, threshold and origin, counts, score histogram, timings
  OUTPUT/_ledger/        one record per committed or failed work unit, for resume and periodic audits
  OUTPUT/report.html     a page with the summary, plots and the top flagged captions (--no-report: none)

Work units: a parquet file is cut into units of whole row groups (--unit-rows); a text file is one unit. Workers
write each unit's rows straight to OUTPUT; a unit becomes visible whole, when all of its rows are in.
A rerun skips committed units (same file content, model and options), redoes partial and failed ones, and audits
new files and files changed since (size + ETag/mtime): their old output is replaced. --force redoes all.
Without --threshold / --threshold-file nothing is flagged; the last lines say so and how to calibrate one.
Exit codes: 0 all inputs audited; 1 some units failed (listed in _audit.json); 2 configuration error;
3 the run stopped early (SIGTERM, or nothing moved for --stall-timeout-s): rerun the same command to resume.
"""

EPILOG = """\
examples:
  auditor audit captions/ runs/audit1 --model ./toy-model --threshold 2.5
  auditor audit 'data/*.jsonl' runs/a --model ./m --caption-column text --id-column key --keep-columns url
  AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... auditor audit s3://bucket/captions/ s3://bucket/audits/run1 \\
      --model s3://bucket/models/sd15 --storage-option endpoint_url=http://127.0.0.1:9000 --threshold-file t.json
  RAY_ADDRESS=ray://head:10001 auditor audit s3://b/in/ s3://b/out --model s3://b/m --actors 8 --gpus-per-actor 1
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "audit",
        help="score a dataset on Ray: parquet/jsonl/csv/tsv/txt in, partitioned parquet out (resumable)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    add_audit_arguments(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    cfg = AuditConfig.from_namespace(args)
    from auditor.pipeline.audit import run as run_audit
    from auditor.pipeline.plan import no_threshold_note

    result = run_audit(cfg)
    counts = result.counts
    print(
        f"audited {result.units_done} work units of {result.files_done} files ({result.files_skipped} files already "
        f"complete), {counts.get('rows', 0)} rows: {counts.get('ok', 0)} scored, {counts.get('flagged', 0)} flagged"
    )
    confirm = (result.summary.get("stages") or {}).get("confirm")
    if confirm:
        print(
            f"second stage: {confirm['rows']} rows of the output over the screening threshold "
            f"{confirm['screen_threshold']:g} scored again ({confirm['generations']} generations x "
            f"{confirm['steps']} steps); {result.summary['stages']['denoiser_rows_per_caption']} denoiser rows "
            "per scored caption"
        )
    other = {k: v for k, v in counts.items() if k not in ("rows", "ok", "flagged")}
    if other:
        print("rows not scored: " + ", ".join(f"{k}={v}" for k, v in sorted(other.items())))
    for failed in result.failed_units:
        print(f"FAILED {failed['source']} unit {failed['unit']}: {failed['error']}")
    note = no_threshold_note(cfg)
    if note:
        print(note)
    print(f"results: {result.output}")
    return result.exit_code
