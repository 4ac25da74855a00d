"""The two-stage audit's cost and accuracy on the shipped toy model; prints the tables for BENCHMARKS.md §3d.

(a) one stage, 1 generation x 1 step; (b) one stage, 4 generations x 5 steps; (c) the cascade (a) -> (b) with the
screening threshold calibrated at each --screen-fpr. For each: captions/s and denoiser rows per caption on the demo
corpus (`make demo`'s 3000 rows), thresholds calibrated at 1% FPR on the held-out captions, the corpus rows they flag,
and AUC / TPR@1%FPR of memorized vs held-out and vs seen-once manifest captions (`auditor evaluate`'s protocol).
Usage: python bench/cascade.py [--rows 3000] [--screen-fpr 0.02 0.05 0.1 0.2] [--threads 1] [--json out.json]
Run on an otherwise idle machine; every setting is timed in this one process, side by side.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]

from auditor.report.calibration import calibrate_threshold, calibrate_two_stage  # noqa: E402
from auditor.report.detection import evaluate_cascade, evaluate_detection  # noqa: E402
from auditor.scoring import Scorer  # noqa: E402
from auditor.scoring.cascade import Cascade, Stage, flag_rows, score_stages  # noqa: E402
from auditor.toy.demo import write_corpus  # noqa: E402
from auditor.toy.manifest import load_manifest  # noqa: E402
from auditor.toy.shipped import shipped_model_dir  # noqa: E402

SCREEN = Stage(1, 1)
CONFIRM = Stage(4, 5)


def corpus_captions(manifest, rows: int) -> tuple[list[str], set[str]]:
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory() as folder:
        files, _ = write_corpus(Path(folder), manifest, rows=rows, seed=0)
        captions: list[str] = []
        for path in files:
            if path.suffix == ".parquet":
                captions += pq.read_table(path).column("caption").to_pylist()
            else:
                captions += [json.loads(line)["caption"] for line in path.read_text().splitlines()]
    return captions, set(manifest.memorized)


def timed(fn):
    started = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--screen-fpr", type=float, nargs="+", default=[0.02, 0.05, 0.1, 0.2])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--json", help="also write the rows as JSON here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    torch.set_num_threads(args.threads)

    model_dir = shipped_model_dir()
    manifest = load_manifest(model_dir)
    scorer = Scorer.from_pretrained(model_dir, device="cpu", dtype="fp32")
    captions, memorized = corpus_captions(manifest, args.rows)
    is_memorized = np.array([c in memorized for c in captions])
    tokens = scorer.tokenize(captions)
    scorer.score(captions[:8])  # warm-up: the shared uncond pass and the prefix check
    scorer.score(captions[:8], generations=CONFIRM.generations, steps=CONFIRM.steps)
    negatives = {"held-out": manifest.held_out, "seen-once": manifest.seen_once}

    results: list[dict] = []

    def add(name, seconds, denoiser_rows, flagged, detection):
        row = {
            "setting": name,
            "captions_per_s": round(len(captions) / seconds, 1),
            "seconds": round(seconds, 2),
            "denoiser_rows_per_caption": round(denoiser_rows / len(captions), 3),
            "flagged_memorized_rows": int((flagged & is_memorized).sum()),
            "flagged_other_rows": int((flagged & ~is_memorized).sum()),
            **{
                f"{d.negatives}_{key}": round(getattr(d.metrics, key), 4)
                for d in detection
                for key in ("auc", "tpr_at_fpr")
            },
        }
        results.append(row)
        print(json.dumps(row), flush=True)

    # (a) and (b): one stage.
    for name, stage in (("a: 1 gen x 1 step", SCREEN), ("b: 4 gen x 5 steps", CONFIRM)):
        result, seconds = timed(lambda stage=stage: score_stages(scorer, tokens, stage, None, seed=0))
        record = calibrate_threshold(
            scorer, manifest.held_out, fpr=0.01, generations=stage.generations, steps=stage.steps
        )
        flagged = flag_rows(result.score, record["threshold"])
        detection = evaluate_detection(
            scorer, manifest.memorized, negatives, generations=(stage.generations,), steps=(stage.steps,)
        )
        add(name, seconds, sum(result.denoiser_rows.values()), flagged, detection)

    # (c): the cascade, S calibrated at each screening FPR on the held-out captions.
    for screen_fpr in args.screen_fpr:
        record = calibrate_two_stage(
            scorer, manifest.held_out, confirm=CONFIRM, fpr=0.01, screen_fpr=screen_fpr
        )
        cascade = Cascade(CONFIRM, record["screen_threshold"])
        result, seconds = timed(lambda cascade=cascade: score_stages(scorer, tokens, SCREEN, cascade, seed=0))
        flagged = flag_rows(result.score, record["threshold"], cascade, result.confirm_score)
        detection = evaluate_cascade(
            scorer, manifest.memorized, negatives, screen=SCREEN, confirm=CONFIRM, screen_fpr=screen_fpr
        )
        add(
            f"c: cascade a -> b, screen fpr {screen_fpr:g} ({result.rescored.mean():.1%} of corpus rows re-scored)",
            seconds,
            sum(result.denoiser_rows.values()),
            flagged,
            detection,
        )

    print(
        f"\nshipped toy, corpus of {len(captions)} rows ({int(is_memorized.sum())} memorized), "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s)"
    )
    keys = list(results[0])
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for row in results:
        print("| " + " | ".join(str(row.get(k, "")) for k in keys) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
