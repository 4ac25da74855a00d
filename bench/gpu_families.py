"""GPU cost of the newer families at their real sizes (random weights, real shapes): SDXL (4x128x128 latents) and
SD3 medium (16x128x128, T5-XXL), fp16. Per family: captions/s of the paper loop and of the batched scorer (eager
and with CUDA graphs), FLOP per caption counted on the device, TFLOP/s and its fraction of the bf16 matmul peak
measured in the same run, and the fp16-vs-fp32 Spearman correlation of scores. Writes gpu_families.json.

Usage: python bench/gpu_families.py --out DIR [--families sdxl sd3] [--batch-sizes 8 32] [--seconds 5]
       python bench/gpu_families.py --smoke --out DIR   (CPU, tiny shapes: checks the script, measures nothing)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from gpu_bench import bf16_matmul_peak_tflops  # noqa: E402
from rates import batched_rate, paper_loop_rate  # noqa: E402

from auditor.scoring.scorer import Scorer  # noqa: E402
from auditor.toy.families import shaped_components  # noqa: E402
from auditor.toy.models import default_corpus  # noqa: E402


def tflop_per_caption(scorer: Scorer, caption: str) -> float:
    """FLOPs of encoding one caption and one first-step denoiser row, counted while they run."""
    from torch.utils.flop_counter import FlopCounterMode

    x_T = scorer.initial_latents(1, 0)
    scorer.magnitudes(
        scorer.condition_tokens(scorer.tokenize([caption])), x_T
    )  # uncond cached outside the count
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        scorer.magnitudes(scorer.condition_tokens(scorer.tokenize([caption])), x_T)
    return counter.get_total_flops() / 1e12


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ranks = [np.argsort(np.argsort(v)).astype(np.float64) for v in (a, b)]
    return float(np.corrcoef(*ranks)[0, 1])


def measure(family: str, args: argparse.Namespace, device: torch.device, real: bool, peak: float) -> dict:
    captions = sorted(set(default_corpus(seed=3, size=2000)))
    half = torch.float16 if device.type == "cuda" else torch.float32
    components = shaped_components(family, device, half, real=real)
    row: dict = {"family": family, "dtype": str(half).removeprefix("torch.")}
    eager = Scorer(components, device, half, batch_size=1)
    row["latent_shape"] = list(eager.latent_shape)
    row["tflop_per_caption"] = tflop_per_caption(eager, captions[0])
    row["paper_loop"] = paper_loop_rate(eager, captions, args.seconds)
    for batch in args.batch_sizes:
        scorer = Scorer(components, device, half, batch_size=batch)
        row[f"batched_{batch}"] = batched_rate(scorer, captions, args.seconds)
        if device.type == "cuda":
            scorer.optimize_for_cuda(cuda_graphs=True)
            row[f"graphs_captured_{batch}"] = bool(scorer.runtime["cuda_graphs"])
            row[f"graphs_{batch}"] = batched_rate(scorer, captions, args.seconds)
        best = max(
            v for k, v in row.items() if k.startswith(("batched_", "graphs_")) and isinstance(v, float)
        )
        row["best_tflops"] = best * row["tflop_per_caption"]
        row["best_fraction_of_peak"] = row["best_tflops"] / peak
        print(json.dumps(row), flush=True)
    sample = captions[: args.spearman_captions]
    low = Scorer(components, device, half, batch_size=max(args.batch_sizes)).score(sample)
    del components, eager
    if device.type == "cuda":
        torch.cuda.empty_cache()
    high = Scorer(shaped_components(family, device, torch.float32, real=real), device, torch.float32).score(
        sample
    )
    row["spearman_fp16_fp32"] = spearman(low, high)
    row["max_relative_difference"] = float(np.max(np.abs(low - high) / np.maximum(np.abs(high), 1e-6)))
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--out", default="bench-out")
    parser.add_argument("--families", nargs="+", default=["sdxl", "sd3"], choices=["sdxl", "sd3"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--spearman-captions", type=int, default=64)
    parser.add_argument(
        "--smoke", action="store_true", help="CPU, tiny shapes: a check of the script, not a measurement"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        device, real, peak = torch.device("cpu"), False, float("nan")
    elif torch.cuda.is_available():
        device, real = torch.device("cuda"), True
        torch.backends.cuda.matmul.allow_tf32 = True
        peak = bf16_matmul_peak_tflops()
    else:
        print("gpu_families: no CUDA device; nothing measured.", file=sys.stderr)
        return 2
    rows = [measure(family, args, device, real, peak) for family in args.families]
    result = {
        "device": torch.cuda.get_device_name()
        if device.type == "cuda"
        else "CPU smoke run, not a measurement",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "bf16_matmul_peak_tflops": peak,
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_families.json").write_text(json.dumps(result, indent=2))
    print(f"\n{result['device']}; bf16 matmul peak {peak:.0f} TFLOP/s (measured)")
    print(
        f"{'family':<6} {'latent':<10} {'TFLOP/cap':>9} {'paper/s':>8} {'best/s':>8} {'TFLOP/s':>8} {'% peak':>7} {'spearman':>9}"
    )
    for row in rows:
        best = row["best_tflops"] / row["tflop_per_caption"]
        shape = "x".join(map(str, row["latent_shape"]))
        print(
            f"{row['family']:<6} {shape:<10} {row['tflop_per_caption']:9.3f} {row['paper_loop']:8.1f} {best:8.1f} "
            f"{row['best_tflops']:8.1f} {100 * row['best_fraction_of_peak']:6.1f}% {row['spearman_fp16_fp32']:9.4f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
