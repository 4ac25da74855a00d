"""Detection quality on the SD3-shaped flow toy (StableDiffusion3Pipeline); prints the table for BENCHMARKS.md.

Builds (or reuses) the flow toy, then scores memorized vs held-out and vs seen-once captions with the REFERENCE
velocity magnitude (`auditor.toy.flow_check.reference_velocity_magnitudes`: the pipeline's own encode_prompt and
the transformer, fp32) at sigma = 1, along the CFG Euler trajectory (2-step mean, 2nd step alone) and at a fixed
sigma, for each number of generations; plus the pipeline sampling check (cosine to the training latent).
Usage: python bench/detection_flow.py [--model-dir .cache/toy-sd3] [--preset full] [--generations 1 4]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]

from auditor.toy.flow import build_flow_toy_model  # noqa: E402
from auditor.toy.flow_check import FIXED_SIGMA, check_flow_toy, format_flow_check  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--model-dir", default=".cache/toy-sd3")
    parser.add_argument("--preset", default="full", choices=["full", "test"])
    parser.add_argument("--seed", type=int, default=0, help="toy model seed")
    parser.add_argument("--noise-seed", type=int, default=0, help="x_T seed of the scores")
    parser.add_argument("--generations", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--fixed-sigma", type=float, default=FIXED_SIGMA)
    parser.add_argument("--samples", type=int, default=40, help="captions per population sampled")
    parser.add_argument("--json", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    torch.set_num_threads(1)

    started = time.perf_counter()
    model_dir, info = build_flow_toy_model(args.model_dir, args.preset, seed=args.seed, check=False)
    built = time.perf_counter() - started
    print(
        f"flow toy {model_dir}: preset {info['preset']}, seed {args.seed}; trained in {info['train_seconds']:.0f}s "
        f"({'cached' if built < 60 else 'built now'}); machine: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}, 1 thread"
    )
    results = {}
    for generations in args.generations:
        summary = check_flow_toy(
            model_dir,
            samples=args.samples,
            generations=generations,
            seed=args.noise_seed,
            fixed_sigma=args.fixed_sigma,
        )
        results[generations] = summary
        print(f"\n{generations} generation(s), {summary['seconds']:.0f}s")
        print(format_flow_check(summary))
    if args.json:
        Path(args.json).write_text(json.dumps({"build": info, "checks": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
