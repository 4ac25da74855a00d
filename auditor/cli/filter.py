"""`auditor filter`: argparse -> FilterConfig -> auditor.pipeline.filter.run_filter; prints the counts."""

from __future__ import annotations

import argparse

from auditor.config import FilterConfig, add_filter_arguments

DESCRIPTION = """\
Apply an audit's flags to the dataset it audited. Streams DATASET with Ray Data (same formats and storage as
`auditor audit`), joins each row on the audit's id (the --id-column, or <source-file>:<row>) and writes
OUT/<path under DATASET>.parquet, one file per input file:
  --mode drop  leave flagged rows out (rows the audit has no record of are kept and counted as unaudited)
  --mode mark  keep every row, add memorization_flag (bool) and memorization_score (float32)
WebDataset shards (.tar, .tar.gz) are cleaned as shards: --mode drop writes OUT/<same path>, a tar holding every
sample not flagged, each kept member's bytes and header in the original order (a sidecar parquet beside it is
written without the dropped rows); --mode mark leaves the tars and writes OUT/<stem>.parquet keyed by __key__.
Counts go to OUT/_filter.json. Exit code 1 when a file failed or had no audit results.
"""

EPILOG = """\
examples:
  auditor filter captions/ runs/audit1 runs/clean
  auditor filter 's3://b/laion/{00000..01023}.tar' s3://b/audits/laion s3://b/laion-clean
  auditor filter s3://b/captions/ s3://b/audits/run1 s3://b/marked --mode mark \\
      --storage-option endpoint_url=http://127.0.0.1:9000
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "filter",
        help="drop (or mark) an audit's flagged rows in the dataset it audited",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    add_filter_arguments(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    cfg = FilterConfig.from_namespace(args)
    from auditor.pipeline.filter import run_filter

    result = run_filter(cfg)
    c = result.counts
    verb = "dropped" if cfg.mode == "drop" else "marked"
    print(
        f"{c.get('files', 0)} files, {c.get('rows', 0)} rows: {c.get('flagged', 0)} {verb}, "
        f"{c.get('written', 0)} written, {c.get('unaudited', 0)} without an audit record"
    )
    for f in result.files:
        if f["error"] or not f["audited"]:
            print(f"WARNING {f['source']}: {f['error'] or 'no audit results for this file (kept unaudited)'}")
    print(f"results: {result.output}")
    return result.exit_code
