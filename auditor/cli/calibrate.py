"""`auditor calibrate`: the score threshold at a target FPR on clean reference captions, written as JSON.

The JSON is what `auditor audit --threshold-file` reads (key "threshold"); flagged means score > threshold.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from auditor.cli.common import add_model_arguments, add_score_arguments
from auditor.errors import InputDataError

EPILOG = """\
examples:
  auditor calibrate --model ./toy-model --reference clean.txt --fpr 0.01 --out threshold.json
  auditor calibrate --model ./toy-model --reference clean.parquet --caption-column TEXT --generations 4 --out t.json
  auditor audit INPUT OUTPUT --model ./toy-model --threshold-file threshold.json

The threshold is the (floor(fpr*N)+1)-th largest reference score: at most fpr*N reference captions score above it.
"""
CAPTION_SUFFIXES = (".txt", ".parquet", ".jsonl", ".json")


def read_caption_file(path: str, caption_column: str = "caption", option: str = "--reference") -> list[str]:
    """Captions from .txt (one per line, blank lines skipped), .parquet or .jsonl (column `caption_column`).

    Null captions in parquet/jsonl are skipped; a missing column raises with the columns that exist.
    """
    file = Path(path)
    if not file.is_file():
        raise InputDataError(f"{option} {path} does not exist or is not a file.")
    suffix = file.suffix.lower()
    if suffix == ".txt":
        return [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(file)
    elif suffix in (".jsonl", ".json"):
        import pyarrow.json as pj

        table = pj.read_json(file)
    else:
        raise InputDataError(
            f"{option} {path} has suffix {suffix!r}; expected one of {', '.join(CAPTION_SUFFIXES)}."
        )
    if caption_column not in table.column_names:
        raise InputDataError(
            f"--caption-column {caption_column!r} not found in {path}; columns are: "
            f"{', '.join(table.column_names)}. Pass --caption-column NAME."
        )
    return [str(value) for value in table.column(caption_column).to_pylist() if value is not None]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "calibrate",
        help="pick the flagging threshold at a target false-positive rate on clean captions",
        description=(
            "Score a reference set of captions believed clean (not memorized) and write the threshold at which "
            "at most --fpr of them would be flagged (flagged = score > threshold)."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--reference", required=True, help="clean captions: .txt (one per line), .parquet or .jsonl"
    )
    parser.add_argument(
        "--caption-column", default="caption", help="caption column of .parquet/.jsonl (default caption)"
    )
    parser.add_argument(
        "--fpr", type=float, default=0.01, help="target false-positive rate in [0, 1) (default 0.01)"
    )
    parser.add_argument("--out", required=True, help="where to write the threshold JSON")
    add_score_arguments(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from auditor.errors import ConfigError
    from auditor.report.calibration import calibrate_threshold, write_threshold_file
    from auditor.scoring import Scorer

    if not 0 <= args.fpr < 1:
        raise ConfigError(f"--fpr must be in [0, 1), got {args.fpr}; e.g. --fpr 0.01 for 1%.")
    captions = read_caption_file(args.reference, args.caption_column)
    if not captions:
        raise InputDataError(f"--reference {args.reference} holds no captions.")
    scorer = Scorer.from_pretrained(
        args.model, device=args.device, dtype=args.dtype, batch_size=args.batch_size
    )
    record = calibrate_threshold(
        scorer,
        captions,
        fpr=args.fpr,
        generations=args.generations,
        steps=args.steps,
        seed=args.seed,
        reference=str(args.reference),
        model=str(args.model),
    )
    path = write_threshold_file(record, args.out)
    # The reference histogram (146 counts, for the report) stays in the file only.
    print(json.dumps({k: v for k, v in record.items() if k != "reference_score_histogram"}, indent=2))
    print(
        f"threshold {record['threshold']:.6f}: flags score > threshold; {record['reference_fpr']:.2%} of "
        f"{record['n_reference']} reference captions are above it (target fpr {args.fpr:g}). Written to {path}"
    )
    return 0
