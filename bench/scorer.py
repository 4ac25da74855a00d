"""CPU throughput of the first-step scorer on a small SD-shaped model; prints tables (run on an idle machine).

Table 1: (a) the paper's per-prompt loop ([uncond; cond] per caption), fp32 and bf16, vs (b) the batched
shared-uncond scorer, with (b)/(a) against both; (b) without the shared UNet prefix shows what that adds.
Table 2: fp32 vs bf16, eager vs torch.compile, batch 16/32/64.
Usage: python bench/scorer.py [--preset small] [--seconds 20] [--no-compile] [--json out.json]
       python bench/scorer.py --ablation [--batch-sizes 16]   (shared vs full UNet head, interleaved, eager)
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


def make_scorer(
    components, dtype: torch.dtype, batch: int, compiled: bool, shared_prefix: bool = True
) -> Scorer:
    scorer = Scorer(components, torch.device("cpu"), dtype, batch_size=batch)
    if compiled:
        scorer.unet = torch.compile(components.unet)
    if not shared_prefix:
        scorer.prefix_cache = None
    return scorer


def ablation(captions: list[str], fp32, bf16, batch: int, seconds: float, info: str, rounds: int = 2) -> int:
    """Shared vs full UNet head, eager, interleaved `rounds` times per dtype; prints mean captions/s and ratio."""
    print(f"\n{info}\nshared UNet head vs full forward, B={batch}, eager, {rounds} interleaved rounds")
    print(f"{'dtype':>5} {'full':>8} {'shared':>8} {'shared/full':>12}")
    for dtype_name, components, dtype in (("fp32", fp32, torch.float32), ("bf16", bf16, torch.bfloat16)):
        rates: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(rounds):
            for prefix in (False, True):
                scorer = make_scorer(components, dtype, batch, compiled=False, shared_prefix=prefix)
                rates[prefix].append(batched_rate(scorer, captions, seconds))
        full, shared = (sum(rates[p]) / rounds for p in (False, True))
        print(f"{dtype_name:>5} {full:8.1f} {shared:8.1f} {shared / full:12.2f}", flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--seconds", type=float, default=20.0, help="timed seconds per measurement")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument(
        "--ablation",
        action="store_true",
        help="only the shared-vs-full UNet head comparison: alternating runs, so drift hits both alike",
    )
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

    if args.ablation:
        return ablation(captions, fp32, bf16, args.batch_sizes[0], args.seconds, info)
    paper = {}
    for dtype_name, components, dtype in (("fp32", fp32, torch.float32), ("bf16", bf16, torch.bfloat16)):
        scorer = Scorer(components, torch.device("cpu"), dtype, batch_size=1)
        paper[dtype_name] = paper_loop_rate(scorer, captions, args.seconds)
        print(f"(a) paper loop {dtype_name}: {paper[dtype_name]:.1f} captions/s", flush=True)
    results = {"machine": info, "date": time.strftime("%Y-%m-%d"), "paper_loop": paper, "rows": []}
    # Discarded: the first batched run of a process is slower (allocator and thread-pool warm-up).
    batched_rate(make_scorer(fp32, torch.float32, args.batch_sizes[0], False), captions, 2.0)
    modes = [(False, True)] + ([] if args.no_compile else [(True, True)])
    for batch in args.batch_sizes:
        # The ablation without the shared prefix once, at the first batch size: it costs as much as a row.
        batch_modes = modes + [(False, False)] if batch == args.batch_sizes[0] else modes
        for dtype_name, components, dtype in (("fp32", fp32, torch.float32), ("bf16", bf16, torch.bfloat16)):
            for compiled, prefix in batch_modes:
                scorer = make_scorer(components, dtype, batch, compiled, shared_prefix=prefix)
                started = time.perf_counter()
                rate = batched_rate(scorer, captions, args.seconds)
                row = {
                    "batch_size": batch,
                    "dtype": dtype_name,
                    "compiled": compiled,
                    "shared_prefix": prefix,
                    "captions_per_s": rate,
                    "over_paper_loop_fp32": rate / paper["fp32"],
                    "over_paper_loop_same_dtype": rate / paper[dtype_name],
                    "wall_s": time.perf_counter() - started,
                }
                results["rows"].append(row)
                print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))

    print(f"\n{info}")
    print(f"(a) paper loop, eager: fp32 {paper['fp32']:.1f} captions/s, bf16 {paper['bf16']:.1f} captions/s")
    print("(b) batched shared-uncond scorer, captions/s and (b)/(a):")
    header = f"{'B':>4} {'dtype':>5} {'mode':>8} {'prefix':>7} {'captions/s':>11} {'/(a) fp32':>10} {'/(a) same dtype':>16}"
    print(header)
    for row in results["rows"]:
        mode = "compiled" if row["compiled"] else "eager"
        prefix = "shared" if row["shared_prefix"] else "full"
        print(
            f"{row['batch_size']:>4} {row['dtype']:>5} {mode:>8} {prefix:>7} {row['captions_per_s']:11.1f}"
            f" {row['over_paper_loop_fp32']:10.2f} {row['over_paper_loop_same_dtype']:16.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
