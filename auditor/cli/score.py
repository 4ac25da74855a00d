"""`auditor score`: score a few captions on this machine, no Ray; prints a table or JSON."""

from __future__ import annotations

import argparse
import json

from auditor.cli.common import (
    add_model_arguments,
    add_score_arguments,
    confirm_options,
    confirm_stage,
    load_scorer,
    read_caption_lines,
)
from auditor.config import add_confirm_arguments
from auditor.errors import ConfigError, InputDataError

EPILOG = """\
examples:
  auditor score --model ./toy-model "a red cat sitting in a park" "mona lisa"
  auditor score --model s3://models/sd15 --file captions.txt --generations 4 --json
  auditor score --model ./toy-model --file captions.txt --confirm-generations 4 --confirm-steps 5 --screen-threshold 0.3

With --confirm-*, every caption over --screen-threshold (every caption when it is not given) also gets the second
stage's confirm_score: the score with the confirm generations and steps.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "score",
        help="score captions locally and print a table",
        description="Score captions with one model on this machine (no Ray). Higher = more likely memorized.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("captions", nargs="*", help="captions to score (quote each one)")
    parser.add_argument(
        "--file", help="text file with one caption per line (added after positional captions)"
    )
    add_model_arguments(parser)
    add_score_arguments(parser)
    add_confirm_arguments(
        parser.add_argument_group("second stage"),
        screen_threshold_help="captions with a score > S also get confirm_score (default: every caption)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object per caption instead of a table"
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from auditor.scoring.cascade import Cascade, Stage, score_stages

    captions = list(args.captions) + (read_caption_lines(args.file) if args.file else [])
    if not captions:
        raise InputDataError("no captions given; pass them as arguments or with --file captions.txt.")
    stage = confirm_stage(args)
    _, _, screen_threshold = confirm_options(args)
    if stage is None and screen_threshold is not None:
        raise ConfigError(
            "--screen-threshold applies to the second stage only; pass --confirm-generations and/or "
            "--confirm-steps to turn it on, or drop --screen-threshold."
        )
    scorer = load_scorer(args)
    tokens = scorer.tokenize(captions)
    # Without --screen-threshold every caption gets the second stage (-inf is below every score).
    cascade = (
        None
        if stage is None
        else Cascade(stage, -float("inf") if screen_threshold is None else screen_threshold)
    )
    result = score_stages(scorer, tokens, Stage(args.generations, args.steps), cascade, args.seed)
    rows = []
    for score, confirm, n, t, caption in zip(
        result.score, result.confirm_score, tokens.n_tokens, tokens.truncated, captions, strict=True
    ):
        row = {"score": float(score), "n_tokens": int(n), "truncated": bool(t), "caption": caption}
        if cascade is not None:
            row = {
                "score": row["score"],
                "confirm_score": None if confirm != confirm else float(confirm),
                **row,
            }
        rows.append(row)
    if args.json:
        for row in rows:
            print(json.dumps(row, ensure_ascii=False))
        return 0
    confirm_header = f"  {'confirm':>10}" if cascade is not None else ""
    print(f"{'score':>10}{confirm_header}  {'tokens':>6}  caption")
    for row in rows:
        mark = " (truncated)" if row["truncated"] else ""
        confirm = ""
        if cascade is not None:
            confirm = "  " + ("-" if row["confirm_score"] is None else f"{row['confirm_score']:.4f}").rjust(
                10
            )
        print(f"{row['score']:10.4f}{confirm}  {row['n_tokens']:6d}  {row['caption']}{mark}")
    return 0
