"""`auditor calibrate`: the score threshold at a target FPR on clean reference captions, written as JSON.

The JSON is what `auditor audit --threshold-file` reads (key "threshold"); flagged means score > threshold.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from auditor import schema
from auditor.cli.common import (
    add_model_arguments,
    add_score_arguments,
    confirm_options,
    confirm_stage,
    load_scorer,
)
from auditor.config import add_confirm_arguments
from auditor.errors import InputDataError
from auditor.scoring.cascade import DEFAULT_SCREEN_FPR, check_screen_fpr

EPILOG = """\
examples:
  auditor calibrate --model ./toy-model --reference clean.txt --fpr 0.01 --out threshold.json
  auditor calibrate --model ./toy-model --reference clean.parquet --caption-column TEXT --generations 4 --out t.json
  auditor audit INPUT OUTPUT --model ./toy-model --threshold-file threshold.json
  auditor calibrate --model ./toy-model --reference clean.txt --fpr 0.01 \
      --confirm-generations 4 --confirm-steps 5 --screen-fpr 0.05 --out two-stage.json

The threshold is the (floor(fpr*N)+1)-th largest reference score: at most fpr*N reference captions score above it.
Two stages (--confirm-*): the screening threshold S is taken at --screen-fpr of the first stage's reference scores,
the captions over S are scored with the confirm settings, and the threshold T is picked on their confirm scores so
that at most fpr*N reference captions have score > S and confirm_score > T. An audit with the file runs both stages.
"""


def read_caption_file(path: str, caption_column: str = "caption", option: str = "--reference") -> list[str]:
    """Captions from one local file in any audit input format, by its extensions (auditor.formats): .txt (one per
    line, blank lines skipped), .parquet, .jsonl/.json, .csv or .tsv (column `caption_column`), the text formats
    also compressed (.gz, .bz2, .zst, .xz). Null and non-string captions are skipped; a missing column raises
    with the columns that exist.
    """
    import fsspec

    from auditor.formats import CODEC_EXTENSIONS, EXTENSIONS, split_name
    from auditor.io.inputs import TXT_COLUMN, InputFile, peek_columns
    from auditor.io.readers import read_caption_batches

    file = Path(path)
    if not file.is_file():
        raise InputDataError(f"{option} {path} does not exist or is not a file.")
    fmt, codec = split_name(file.name)
    if fmt is None:
        raise InputDataError(
            f"{option} {path} has an unknown extension; expected one of {', '.join(EXTENSIONS)}, the text ones "
            f"optionally followed by {', '.join(CODEC_EXTENSIONS)}."
        )
    fs = fsspec.filesystem("file")
    source = str(file.resolve())
    captions_file = InputFile(source, source, fmt, file.name, shard="", compression=codec)
    columns = peek_columns(fs, captions_file)
    if fmt != "txt" and columns is not None and caption_column not in columns:
        raise InputDataError(
            f"--caption-column {caption_column!r} not found in {path}; columns are: "
            f"{', '.join(columns)}. Pass --caption-column NAME."
        )
    captions: list[str] = []
    for table in read_caption_batches(fs, captions_file, TXT_COLUMN if fmt == "txt" else caption_column):
        for caption in table.column(schema.CAPTION).to_pylist():
            if caption is not None and (fmt != "txt" or caption.strip()):
                captions.append(caption)
    return captions


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
        "--reference",
        required=True,
        help="clean captions, in any audit input format: .txt (one per line), .parquet, .jsonl/.json, .csv, .tsv, the text ones also .gz/.bz2/.zst/.xz",
    )
    parser.add_argument(
        "--caption-column", default="caption", help="caption column of a non-txt file (default caption)"
    )
    parser.add_argument(
        "--fpr", type=float, default=0.01, help="target false-positive rate in [0, 1) (default 0.01)"
    )
    parser.add_argument("--out", required=True, help="where to write the threshold JSON")
    add_score_arguments(parser)
    second = parser.add_argument_group("second stage")
    add_confirm_arguments(
        second,
        screen_threshold_help="the screening threshold S as given, instead of taking it at --screen-fpr",
    )
    second.add_argument(
        "--screen-fpr",
        type=float,
        default=None,
        help=f"share of the clean reference captions the screen passes to the second stage, in (--fpr, 1) "
        f"(default {DEFAULT_SCREEN_FPR:g}; README 'Two-stage audit' says why)",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from auditor.errors import ConfigError
    from auditor.report.calibration import calibrate_threshold, calibrate_two_stage, write_threshold_file

    if not 0 <= args.fpr < 1:
        raise ConfigError(f"--fpr must be in [0, 1), got {args.fpr}; e.g. --fpr 0.01 for 1%.")
    captions = read_caption_file(args.reference, args.caption_column)
    if not captions:
        raise InputDataError(f"--reference {args.reference} holds no captions.")
    stage = confirm_stage(args)
    _, _, screen_threshold = confirm_options(args)
    if stage is None and (screen_threshold is not None or args.screen_fpr is not None):
        raise ConfigError(
            "--screen-fpr and --screen-threshold apply to the second stage only; pass --confirm-generations and/or "
            "--confirm-steps to calibrate two stages, or drop them."
        )
    screen_fpr = args.screen_fpr if args.screen_fpr is not None else DEFAULT_SCREEN_FPR
    if screen_threshold is not None:
        screen_fpr = None
    if stage is not None and screen_fpr is not None:
        check_screen_fpr(args.fpr, screen_fpr)  # before the model loads
    scorer = load_scorer(args)
    common = dict(
        fpr=args.fpr, generations=args.generations, steps=args.steps, seed=args.seed,
        reference=str(args.reference), model=str(args.model),
    )  # fmt: skip
    if stage is None:
        record = calibrate_threshold(scorer, captions, **common)
    else:
        record = calibrate_two_stage(
            scorer,
            captions,
            confirm=stage,
            screen_fpr=screen_fpr,
            screen_threshold=screen_threshold,
            **common,
        )
    path = write_threshold_file(record, args.out)
    # The reference histograms (146 counts each, for the report) stay in the file only.
    print(json.dumps({k: v for k, v in record.items() if not k.endswith("score_histogram")}, indent=2))
    if stage is None:
        print(
            f"threshold {record['threshold']:.6f}: flags score > threshold; {record['reference_fpr']:.2%} of "
            f"{record['n_reference']} reference captions are above it (target fpr {args.fpr:g}). Written to {path}"
        )
    else:
        print(
            f"screen threshold {record['screen_threshold']:.6f}: {record['n_rescored']} of {record['n_reference']} "
            f"reference captions ({record['screen_reference_fpr']:.2%}) go to the second stage "
            f"({stage.generations} generations x {stage.steps} steps); threshold {record['threshold']:.6f} on "
            f"their confirm scores: {record['reference_fpr']:.2%} of the reference captions are flagged "
            f"(target fpr {args.fpr:g}). Written to {path}"
        )
    return 0
