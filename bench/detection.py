"""Detection quality on the toy memorizing model (the paper's protocol); prints the table for BENCHMARKS.md.

Builds (or reuses) the toy model, then AUC and TPR@1%FPR of memorized vs held-out and vs seen-once captions for
steps in {1, 5} x generations in {1, 4}, plus the DDIM check that memorized captions reproduce their latent.
Usage: python bench/detection.py [--model-dir .cache/toy-model] [--preset full] [--seed 0] [--json out.json]
Run on an otherwise idle machine (the build takes ~9 min of one core when not cached).
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

from auditor.report.detection import evaluate_detection, format_evaluation_table  # noqa: E402
from auditor.scoring import Scorer  # noqa: E402
from auditor.toy.manifest import load_manifest  # noqa: E402
from auditor.toy.sampling import memorization_similarity  # noqa: E402
from auditor.toy.train import build_toy_model  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--model-dir", default=".cache/toy-model")
    parser.add_argument("--preset", default="full", choices=["full", "test"])
    parser.add_argument("--seed", type=int, default=0, help="toy model seed")
    parser.add_argument("--noise-seed", type=int, default=0, help="x_T seed of the scores")
    parser.add_argument("--threads", type=int, default=1, help="torch threads while scoring (default 1)")
    parser.add_argument("--json", help="also write the rows as JSON here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)

    started = time.perf_counter()
    model_dir, info = build_toy_model(args.model_dir, args.preset, seed=args.seed)
    build_seconds = time.perf_counter() - started
    torch.set_num_threads(args.threads)
    manifest = load_manifest(model_dir)
    scorer = Scorer.from_pretrained(model_dir, device="cpu", dtype="fp32")
    rows = evaluate_detection(
        scorer,
        manifest.memorized,
        {"held-out": manifest.held_out, "seen-once": manifest.seen_once},
        generations=(1, 4),
        steps=(1, 5),
        seed=args.noise_seed,
    )
    mem = memorization_similarity(scorer, manifest.memorized, manifest.memorized_latents, args.noise_seed)
    once = memorization_similarity(scorer, manifest.seen_once, manifest.seen_once_latents, args.noise_seed)

    print(
        f"toy model {model_dir}: preset {info['preset']}, seed {args.seed}, {len(manifest.memorized)} memorized / "
        f"{len(manifest.held_out)} held-out / {len(manifest.seen_once)} seen-once captions; trained in "
        f"{info['train_seconds']:.0f}s ({'cached' if build_seconds < 60 else 'built now'})"
    )
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    )
    print(format_evaluation_table(rows))
    print(
        f"DDIM 50 steps, CFG 7.5, cosine(sample, training latent): memorized mean {mem.mean():.3f} "
        f"(min {mem.min():.3f}, {(mem > 0.9).mean():.0%} > 0.9); seen-once mean {once.mean():.3f} (max {once.max():.3f})"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "rows": [row.to_dict() for row in rows],
                    "cosine": {"memorized": mem.tolist(), "seen_once": once.tolist()},
                    "build": info,
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
