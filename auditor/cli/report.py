"""`auditor report OUTPUT`: argparse -> auditor.report.html.write_report; prints where the report went."""

from __future__ import annotations

import argparse

from auditor.config import SECRET_OPTION_KEYS, parse_storage_option
from auditor.errors import ConfigError

DESCRIPTION = """\
Build the HTML report of an audit output: one self-contained file (plots inline, no script, no network) that
opens offline, from a bucket or as an email attachment. `auditor audit` writes it as OUTPUT/report.html at the
end of every run (--no-report turns that off); this command rebuilds it from any audit output, local or s3://.

It shows: a summary (rows and counts by status, flagged count and rate, the threshold and its origin, model
fingerprint, config, timings, actor runtime, versions, failed files or units); the score distribution (log count
axis, the threshold, and the calibration reference beside it when the threshold came from `auditor calibrate`);
where the flags are (flagged rate per input file, flags by caption length in tokens); the top flagged captions
(duplicates grouped, tokens shaded by significance with --explain-flagged); and with --against, the comparison
with another audit of the same data (newly flagged, no longer flagged, score shift of the rows in both).

The score histogram comes from _audit.json when the audit recorded it, else from one streaming pass over the
score column; flagged captions are read from OUTPUT/flagged/. Nothing loads a whole corpus into memory.
"""

EPILOG = """\
examples:
  auditor report runs/audit1                                  writes runs/audit1/report.html
  auditor report runs/audit1 --out /tmp/audit1.html --top 200
  auditor report runs/2026-12 --against runs/2026-11 --out runs/2026-12/vs-november.html
  auditor report s3://bucket/audits/run1 --storage-option endpoint_url=http://127.0.0.1:9000

Exit codes: 0 written, 2 OUTPUT (or --against) is not an audit output or an option is invalid.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report",
        help="write the HTML report of an audit output (plots, top flagged captions, --against comparison)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument(
        "output", metavar="OUTPUT", help="an audit output folder or URI (holds _audit.json and scores/)"
    )
    parser.add_argument(
        "--out", default=None, help="where to write the report (path or URI; default OUTPUT/report.html)"
    )
    parser.add_argument(
        "--top",
        type=int,
        default=50,
        help="distinct flagged captions to list, highest score first (default 50)",
    )
    parser.add_argument(
        "--against",
        metavar="OTHER_OUTPUT",
        default=None,
        help="another audit output of the same data (e.g. last month's, or before a model change) to compare with",
    )
    parser.add_argument(
        "--storage-option",
        dest="storage_options",
        metavar="KEY=VALUE",
        type=parse_storage_option,
        action="append",
        default=[],
        help="fsspec option for every URI, repeatable (e.g. endpoint_url=http://127.0.0.1:9000). Credentials "
        "are refused here: they come from AWS_* environment variables or the default chain",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from auditor.report.html import write_report

    options = dict(args.storage_options)
    secret = sorted(SECRET_OPTION_KEYS.intersection(k.lower() for k in options))
    if secret:
        raise ConfigError(
            f"--storage-option {', '.join(secret)} would put a credential on the command line; export "
            "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or use a profile or instance role) instead."
        )
    path = write_report(args.output, options, out=args.out, top_k=args.top, against=args.against)
    print(f"report: {path}")
    return 0
