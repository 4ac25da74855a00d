"""`auditor score`: score a few captions on this machine, no Ray; prints a table or JSON."""

from __future__ import annotations

import argparse
import json

from auditor.cli.common import add_model_arguments, add_score_arguments, load_scorer, read_caption_lines
from auditor.errors import InputDataError

EPILOG = """\
examples:
  auditor score --model ./toy-model "a red cat sitting in a park" "mona lisa"
  auditor score --model s3://models/sd15 --file captions.txt --generations 4 --json
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
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object per caption instead of a table"
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    captions = list(args.captions) + (read_caption_lines(args.file) if args.file else [])
    if not captions:
        raise InputDataError("no captions given; pass them as arguments or with --file captions.txt.")
    scorer = load_scorer(args)
    tokens = scorer.tokenize(captions)
    scores = scorer.score_tokenized(tokens, generations=args.generations, steps=args.steps, seed=args.seed)
    rows = [
        {"score": float(s), "n_tokens": int(n), "truncated": bool(t), "caption": c}
        for s, n, t, c in zip(scores, tokens.n_tokens, tokens.truncated, captions, strict=True)
    ]
    if args.json:
        for row in rows:
            print(json.dumps(row, ensure_ascii=False))
        return 0
    print(f"{'score':>10}  {'tokens':>6}  caption")
    for row in rows:
        mark = " (truncated)" if row["truncated"] else ""
        print(f"{row['score']:10.4f}  {row['n_tokens']:6d}  {row['caption']}{mark}")
    return 0
