"""Argument groups several subcommands share, so a flag means the same thing everywhere."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from auditor.config import SCORE_SIGMA_HELP, VARIANT_HELP, check_confirm_options
from auditor.errors import InputDataError

if TYPE_CHECKING:
    from auditor.scoring import Scorer
    from auditor.scoring.cascade import Stage


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        required=True,
        help="diffusers pipeline folder (SD 1.x/2.x, SDXL, SD3, PixArt): local path, hub id (owner/name) or "
        "fsspec URI (s3://bucket/model)",
    )
    group.add_argument("--variant", default=None, help=VARIANT_HELP)
    group.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    group.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "fp16", "bf16", "fp32"],
        help="weights/activations dtype; auto = fp16 on CUDA, fp32 on CPU (norms are always float32)",
    )


def add_score_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("score")
    group.add_argument(
        "--generations", type=int, default=1, help="initial noises x_T averaged per caption (n; default 1)"
    )
    group.add_argument(
        "--steps",
        type=int,
        default=1,
        help="sampler steps averaged (1 = first step only, the fast detector; >1 follows the model's CFG "
        "trajectory: DDIM 7.5 for SD)",
    )
    add_score_sigma_argument(group)
    group.add_argument(
        "--seed", type=int, default=0, help="noise seed; x_T depends only on (seed, generation)"
    )
    group.add_argument("--batch-size", type=int, default=32, help="captions per UNet batch (default 32)")


def load_scorer(args: argparse.Namespace) -> Scorer:
    """The Scorer of a single-machine command (score, calibrate, evaluate): its model group's flags, --batch-size and
    --score-sigma. Imports torch, so a command calls it only once its arguments are known to be good."""
    from auditor.scoring import Scorer

    return Scorer.from_pretrained(
        args.model,
        device=args.device,
        dtype=args.dtype,
        batch_size=args.batch_size,
        score_sigma=args.score_sigma,
        variant=args.variant,
    )


def add_score_sigma_argument(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--score-sigma", type=float, default=None, metavar="SIGMA", help=SCORE_SIGMA_HELP)


def read_caption_lines(path: str) -> list[str]:
    """Captions from a text file, one per line; blank lines are skipped."""
    file = Path(path)
    if not file.is_file():
        raise InputDataError(f"--file {path} does not exist or is not a file.")
    return [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]


def confirm_options(args: argparse.Namespace) -> tuple[int | None, int | None, float | None]:
    """(--confirm-generations, --confirm-steps, --screen-threshold) as given (None when not), checked."""
    values = (
        getattr(args, "confirm_generations", None),
        getattr(args, "confirm_steps", None),
        getattr(args, "screen_threshold", None),
    )
    check_confirm_options(*values, lambda name: f"--{name}")
    return values


def confirm_stage(args: argparse.Namespace) -> Stage | None:
    """The second stage the flags ask for (the option not given is 1), or None without --confirm-*."""
    from auditor.scoring.cascade import Stage

    generations, steps, _ = confirm_options(args)
    if generations is None and steps is None:
        return None
    return Stage(generations or 1, steps or 1)
