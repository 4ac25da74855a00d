"""`auditor evaluate`: detection quality (AUC, TPR@1%FPR) on labelled captions, the paper's protocol.

Labels come from a toy model's manifest (memorized vs held-out and seen-once) or from --positives/--negatives files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from auditor.cli.calibrate import read_caption_file
from auditor.cli.common import (
    add_model_arguments,
    add_score_sigma_argument,
    confirm_options,
    confirm_stage,
    load_scorer,
)
from auditor.config import add_confirm_arguments
from auditor.errors import ConfigError
from auditor.scoring.cascade import DEFAULT_SCREEN_FPR

EPILOG = """\
examples:
  auditor evaluate --model .cache/toy-model                      toy manifest: memorized vs held-out / seen-once
  auditor evaluate --model .cache/toy-model --generations 1 4 --steps 1 5
  auditor evaluate --model ./sd --positives mem.txt --negatives clean.parquet --caption-column TEXT --json
  auditor evaluate --model .cache/toy-model --confirm-generations 4 --confirm-steps 5 --screen-fpr 0.05

With --confirm-*, a two-stage row is added per negative set: the first --generations and --steps screen, the captions
over the screening threshold (at --screen-fpr of that set's scores, or --screen-threshold) get the confirm score,
and AUC / TPR@FPR are those of the cascade's ranking (steps and generations show as screen->confirm).

TPR@1%FPR is the TPR at the last ROC point with FPR strictly below 1% (the reference notebook's convention).
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="AUC and TPR@1%%FPR of the score on labelled (memorized / not) captions",
        description=(
            "Score memorized (positive) and non-memorized (negative) captions and print AUC and TPR@FPR for every "
            "steps x generations setting. Without --positives/--negatives the model must be a toy model folder "
            "(auditor toy-model build), whose manifest labels the captions."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--positives",
        help="memorized captions, in any audit input format (.txt one per line, .parquet, .jsonl, .csv, .tsv, compressed too)",
    )
    parser.add_argument("--negatives", help="non-memorized captions, in any audit input format")
    parser.add_argument(
        "--caption-column", default="caption", help="caption column of a non-txt file (default caption)"
    )
    parser.add_argument(
        "--generations", type=int, nargs="+", default=[1, 4], help="generation counts (default 1 4)"
    )
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 5], help="DDIM step counts (default 1 5)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    add_score_sigma_argument(parser)
    parser.add_argument("--fpr", type=float, default=0.01, help="FPR for the TPR column (default 0.01)")
    parser.add_argument("--batch-size", type=int, default=32, help="captions per UNet batch (default 32)")
    second = parser.add_argument_group("second stage")
    add_confirm_arguments(
        second,
        screen_threshold_help="the screening threshold S as given, instead of --screen-fpr of the negatives",
    )
    second.add_argument(
        "--screen-fpr",
        type=float,
        default=None,
        help=f"share of each negative set the screen passes to the second stage (default {DEFAULT_SCREEN_FPR:g})",
    )
    parser.add_argument(
        "--no-similarity",
        action="store_true",
        help="toy models: skip the DDIM check that memorized captions reproduce their training latent",
    )
    parser.add_argument(
        "--similarity-samples",
        type=int,
        default=32,
        help="toy models: captions per population sampled for the DDIM check (default 32)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object per row instead of a table"
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from auditor.report.detection import evaluate_detection, format_evaluation_table

    # 1. Check inputs
    if (args.positives is None) != (args.negatives is None):
        raise ConfigError(
            "pass both --positives and --negatives, or neither (to use a toy model's manifest)."
        )
    if not 0 < args.fpr < 1:
        raise ConfigError(f"--fpr must be in (0, 1), got {args.fpr}.")
    stage = confirm_stage(args)
    _, _, screen_threshold = confirm_options(args)
    screen_fpr = DEFAULT_SCREEN_FPR if args.screen_fpr is None else args.screen_fpr
    if stage is None and (screen_threshold is not None or args.screen_fpr is not None):
        raise ConfigError(
            "--screen-fpr and --screen-threshold apply to the second stage only; pass --confirm-generations and/or "
            "--confirm-steps to evaluate two stages, or drop them."
        )
    if stage is not None and screen_threshold is None and not 0 < screen_fpr < 1:
        raise ConfigError(f"--screen-fpr must be in (0, 1), got {screen_fpr}; e.g. --screen-fpr 0.05.")
    manifest = None
    if args.positives is not None:
        positives = read_caption_file(args.positives, args.caption_column, "--positives")
        negative_sets = {
            Path(args.negatives).name: read_caption_file(args.negatives, args.caption_column, "--negatives")
        }
    else:
        from auditor.toy.manifest import load_manifest

        manifest = load_manifest(args.model)
        positives = manifest.memorized
        negative_sets = {"held-out": manifest.held_out, "seen-once": manifest.seen_once}

    # 2. Score and tabulate
    scorer = load_scorer(args)
    rows = evaluate_detection(
        scorer,
        positives,
        negative_sets,
        generations=args.generations,
        steps=args.steps,
        seed=args.seed,
        fpr=args.fpr,
    )
    if stage is not None:
        from auditor.report.detection import evaluate_cascade
        from auditor.scoring.cascade import Stage

        rows += evaluate_cascade(
            scorer, positives, negative_sets, screen=Stage(args.generations[0], args.steps[0]), confirm=stage,
            screen_fpr=None if screen_threshold is not None else screen_fpr, screen_threshold=screen_threshold,
            seed=args.seed, fpr=args.fpr,
        )  # fmt: skip
    similarity = None
    if manifest is not None and not args.no_similarity:
        similarity = toy_similarity(scorer, manifest, args.seed, args.similarity_samples)

    # 3. Print
    if args.json:
        for row in rows:
            print(json.dumps(row.to_dict()))
        if similarity is not None:
            print(json.dumps({"memorization_check": similarity}))
        return 0
    sigma = "" if args.score_sigma is None else f"; scored at sigma {args.score_sigma:g}"
    print(f"model {args.model}  (memorized = positive; seed {args.seed}{sigma})")
    print(format_evaluation_table(rows))
    if similarity is not None:
        print(
            "DDIM (50 steps, CFG 7.5) cosine similarity of the sampled latent to the caption's training latent: "
            f"memorized mean {similarity['memorized_mean']:.3f} (min {similarity['memorized_min']:.3f}) "
            f"vs seen-once mean {similarity['seen_once_mean']:.3f} (max {similarity['seen_once_max']:.3f})"
        )
    return 0


def toy_similarity(scorer, manifest, seed: int, samples: int) -> dict[str, float]:
    """Cosine of DDIM samples to training latents for the first `samples` memorized and seen-once captions."""
    from auditor.toy.sampling import memorization_similarity

    mem = memorization_similarity(
        scorer, manifest.memorized[:samples], manifest.memorized_latents[:samples], seed
    )
    once = memorization_similarity(
        scorer, manifest.seen_once[:samples], manifest.seen_once_latents[:samples], seed
    )
    return {
        "memorized_mean": float(mem.mean()),
        "memorized_min": float(mem.min()),
        "seen_once_mean": float(once.mean()),
        "seen_once_max": float(once.max()),
        "n_memorized": len(mem),
        "n_seen_once": len(once),
    }
