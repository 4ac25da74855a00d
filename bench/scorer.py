"""CPU throughput of the first-step scorer on a small SD-shaped model; prints tables (run on an idle machine).

Table 1: (a) the paper's per-prompt loop ([uncond; cond] per caption) vs (b) the batched shared-uncond scorer.
Table 2: fp32 vs bf16, eager vs torch.compile, batch 16/32/64.
Usage: python bench/scorer.py [--preset small] [--seconds 20] [--no-compile] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from rates import batched_rate, paper_loop_rate  # noqa: E402

from auditor.scoring.scorer import Scorer  # noqa: E402
from auditor.toy.models import PRESETS, build_random_components, default_corpus  # noqa: E402


def make_scorer(components, dtype: torch.dtype, batch: int, compiled: bool) -> Scorer:
    scorer = Scorer(components, torch.device("cpu"), dtype, batch_size=batch)
    if compiled:
        scorer.unet = torch.compile(components.unet)
    return scorer


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--seconds", type=float, default=20.0, help="timed seconds per measurement")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    spec = PRESETS[args.preset]
    captions = sorted(set(default_corpus(seed=3, size=3000)))
    fp32 = build_random_components(spec, "cpu", torch.float32)
    bf16 = build_random_components(spec, "cpu", torch.bfloat16)
    info = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
    )
    info += f"{torch.get_num_threads()} threads, preset {args.preset} ({spec.latent_channels}x{spec.sample_size}²)"
    print(info, flush=True)

    paper = paper_loop_rate(
        Scorer(fp32, torch.device("cpu"), torch.float32, batch_size=1), captions, args.seconds
    )
    print(f"(a) paper loop fp32: {paper:.1f} captions/s", flush=True)
    results = {"machine": info, "date": time.strftime("%Y-%m-%d"), "paper_loop_fp32": paper, "rows": []}
    for batch in args.batch_sizes:
        for dtype_name, components, dtype in (("fp32", fp32, torch.float32), ("bf16", bf16, torch.bfloat16)):
            for compiled in (False,) if args.no_compile else (False, True):
                scorer = make_scorer(components, dtype, batch, compiled)
                started = time.perf_counter()
                rate = batched_rate(scorer, captions, args.seconds)
                row = {
                    "batch_size": batch,
                    "dtype": dtype_name,
                    "compiled": compiled,
                    "captions_per_s": rate,
                    "over_paper_loop": rate / paper,
                    "wall_s": time.perf_counter() - started,
                }
                results["rows"].append(row)
                print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))

    print(f"\n{info}\nTable 1 (fp32, eager): (a) paper loop {paper:.1f} captions/s")
    print(f"{'B':>4} {'(b) captions/s':>15} {'(b)/(a)':>8}")
    for row in results["rows"]:
        if row["dtype"] == "fp32" and not row["compiled"]:
            print(f"{row['batch_size']:>4} {row['captions_per_s']:15.1f} {row['over_paper_loop']:8.2f}")
    print("\nTable 2: batched shared-uncond scorer, captions/s")
    print(f"{'B':>4} {'dtype':>5} {'mode':>8} {'captions/s':>11}")
    for row in results["rows"]:
        mode = "compiled" if row["compiled"] else "eager"
        print(f"{row['batch_size']:>4} {row['dtype']:>5} {mode:>8} {row['captions_per_s']:11.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
