"""CPU cost of the scorer on every model family, side by side in one run: captions/s of the batched shared-uncond
`Scorer` against each family's own per-prompt loop (encode ["", p], one denoiser call on both), on the tiny random
pipelines the tests use (auditor.toy.families; SD: the tiny SD preset). Run on an otherwise idle machine.

Usage: python bench/families.py [--seconds 10] [--batch-size 32] [--threads 2]
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from rates import batched_rate, paper_loop_rate  # noqa: E402

from auditor.scoring.scorer import Scorer  # noqa: E402
from auditor.toy import families  # noqa: E402
from auditor.toy.models import TINY, build_random_sd, default_corpus  # noqa: E402

BUILDERS = {
    "sd": lambda out: build_random_sd(out, TINY, seed=0),
    "sdxl": families.build_random_sdxl,
    "sd3": families.build_random_sd3,
    "pixart-sigma": families.build_random_pixart,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="timed seconds per measurement")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--families", nargs="+", default=list(BUILDERS), choices=list(BUILDERS))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    captions = default_corpus(seed=1, size=4 * args.batch_size)
    print(
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads, fp32"
    )
    print(
        f"{'family':<13} {'latent':<11} {'paper loop':>11} {'scorer':>9} {'scorer/loop':>12}   (captions/s)"
    )
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.families:
            folder = BUILDERS[name](Path(scratch) / name)
            scorer = Scorer.from_pretrained(folder, device="cpu", dtype="fp32", batch_size=args.batch_size)
            loop = paper_loop_rate(scorer, captions, args.seconds)
            batched = batched_rate(scorer, captions, args.seconds)
            shape = "x".join(str(d) for d in scorer.latent_shape)
            print(f"{name:<13} {shape:<11} {loop:11.1f} {batched:9.1f} {batched / loop:12.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
