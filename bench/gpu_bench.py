"""GPU throughput of the first-step scorer on an SD v1.5-sized random model; prints a table, writes JSON.

Modes (same captions, fp16, 64x64 latents, n=1):
  (a) paper loop   one prompt at a time, CFG batch [uncond; cond] of 2 rows, eager
  (b) batched      shared-uncond scorer at batch B, eager (channels_last), with the shared UNet head
  (c) graphs       (b) + CUDA graphs for text encoder and first-step UNet (the graph holds the full UNet
                   forward: the shared head is not captured yet)
  (d) compiled     (b) with torch.compile(mode="reduce-overhead") on the UNet (optional, --compile)
Then the two-stage audit at --cascade-batch (graphs on): one stage 1x1, one stage 4 generations x 5 steps, and the
cascade 1x1 -> 4x5 with the screening threshold at the top --screen-share of these captions' first-stage scores:
captions/s and denoiser rows per caption.
Usage: python bench/gpu_bench.py --out DIR [--batch-sizes 8 32 64 128] [--seconds 6]
       python bench/gpu_bench.py --smoke --out DIR   (CPU, tiny model, no graphs: checks the script, measures nothing)
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from rates import batched_rate, now, paper_loop_rate, stages_rate  # noqa: E402

from auditor.scoring.cascade import Cascade, Stage  # noqa: E402
from auditor.scoring.scorer import Scorer  # noqa: E402
from auditor.toy.models import (  # noqa: E402
    SD15,
    TINY,
    TinySDSpec,
    build_random_components,
    build_text_encoder,
    build_unet,
    default_corpus,
)


def count_tflop(spec) -> tuple[float, float]:
    """FLOPs of one UNet sample-forward and one text encoding, counted on the meta device (matmul/conv/attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet, text = build_unet(spec), build_text_encoder(spec, vocab_size=spec.vocab_size)
        sample = torch.empty(1, spec.latent_channels, spec.sample_size, spec.sample_size)
        context = torch.empty(1, spec.model_max_length, spec.cross_attention_dim)
        ids = torch.zeros(1, spec.model_max_length, dtype=torch.long)
        with FlopCounterMode(display=False) as unet_counter:
            unet(sample, torch.tensor(981), encoder_hidden_states=context)
        with FlopCounterMode(display=False) as text_counter:
            text(ids)
    return unet_counter.get_total_flops() / 1e12, text_counter.get_total_flops() / 1e12


def bf16_matmul_peak_tflops(size: int = 8192, repeats: int = 10) -> float:
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    cuda = torch.device("cuda")
    start = now(cuda)
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (now(cuda) - start) / 1e12


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--out", default="bench-out", help="folder for gpu_bench.json")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32, 64, 128])
    parser.add_argument("--cascade-batch", type=int, default=64, help="batch size of the two-stage rows")
    parser.add_argument(
        "--screen-share", type=float, default=0.05, help="share of captions over the screening threshold"
    )
    parser.add_argument("--seconds", type=float, default=6.0, help="timed seconds per measurement")
    parser.add_argument(
        "--compile", action="store_true", help="also time torch.compile(mode='reduce-overhead')"
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="run the script's code paths on CPU with the tiny model (no graphs, no peak): a check, not a measurement",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        return run(args, torch.device("cpu"), TINY, torch.float32)
    if not torch.cuda.is_available():
        print("gpu_bench: no CUDA device; nothing measured.", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    return run(args, torch.device("cuda"), SD15, torch.float16)


def run(args: argparse.Namespace, device: torch.device, spec: TinySDSpec, dtype: torch.dtype) -> int:
    on_gpu = device.type == "cuda"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    captions = sorted(set(default_corpus(seed=3, size=4000)))
    unet_tflop, text_tflop = count_tflop(spec)
    flop_per_caption = unet_tflop + text_tflop
    peak = bf16_matmul_peak_tflops() if on_gpu else float("nan")
    components = build_random_components(spec, device, dtype)
    rows = []
    eager = Scorer(components, device, dtype, batch_size=1)
    if on_gpu:
        eager.optimize_for_cuda(cuda_graphs=False)
    paper = paper_loop_rate(eager, captions, args.seconds)
    for batch in args.batch_sizes:
        row = {"batch_size": batch, "paper_loop": paper}
        scorer = Scorer(components, device, dtype, batch_size=batch)
        if on_gpu:
            scorer.optimize_for_cuda(cuda_graphs=False)
        row["batched"] = batched_rate(scorer, captions, args.seconds)
        if on_gpu:
            scorer.optimize_for_cuda(cuda_graphs=True)
        # A failed capture falls back to eager: then this row is not a graph row, and the table says so.
        row["graphs_captured"] = bool(scorer.runtime["cuda_graphs"])
        row["graphs"] = batched_rate(scorer, captions, args.seconds)
        if args.compile:
            compiled = Scorer(components, device, dtype, batch_size=batch)
            compiled.unet = torch.compile(components.unet, mode="reduce-overhead")
            start = time.perf_counter()
            row["compiled"] = batched_rate(compiled, captions, args.seconds)
            row["compile_wall_s"] = time.perf_counter() - start
        row["graphs_tflops"] = row["graphs"] * flop_per_caption
        row["graphs_fraction_of_peak"] = row["graphs_tflops"] / peak
        row["graphs_over_paper"] = row["graphs"] / paper
        rows.append(row)
        print(json.dumps(row), flush=True)
        del scorer
        if on_gpu:
            torch.cuda.empty_cache()
    cascade_rows = cascade_table(args, components, device, dtype, captions, on_gpu)
    result = {
        "device": torch.cuda.get_device_name()
        if on_gpu
        else f"{platform.machine()} CPU (smoke run, not a measurement)",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
        "unet_tflop_per_sample": unet_tflop,
        "text_tflop_per_caption": text_tflop,
        "bf16_matmul_peak_tflops": peak,
        "rows": rows,
        "two_stage": cascade_rows,
    }
    (out / "gpu_bench.json").write_text(json.dumps(result, indent=2))
    print(
        f"\n{result['device']}, torch {result['torch']}; FLOP/caption {flop_per_caption:.3f} T; "
        f"bf16 matmul peak {peak:.0f} TFLOP/s (measured)"
    )
    header = f"{'B':>4} {'(a) paper/s':>12} {'(b) batched/s':>14} {'(c) graphs/s':>13}"
    header += f" {'(d) compiled/s':>15}" if args.compile else ""
    header += f" {'(c) TFLOP/s':>12} {'% peak':>7} {'(c)/(a)':>8}"
    print(header)
    for row in rows:
        line = (
            f"{row['batch_size']:>4} {row['paper_loop']:12.1f} {row['batched']:14.1f} {row['graphs']:13.1f}"
        )
        line += f" {row['compiled']:15.1f}" if args.compile else ""
        line += f" {row['graphs_tflops']:12.1f} {100 * row['graphs_fraction_of_peak']:6.1f}% {row['graphs_over_paper']:8.2f}"
        print(line + ("" if row["graphs_captured"] else "  (no graph captured: (c) ran eagerly)"))
    print(f"\ntwo-stage audit at B={args.cascade_batch} (CUDA graphs {'on' if on_gpu else 'off'})")
    print(f"{'setting':<34} {'captions/s':>11} {'denoiser rows/caption':>22}")
    for row in cascade_rows:
        print(f"{row['setting']:<34} {row['captions_per_s']:11.1f} {row['denoiser_rows_per_caption']:22.3f}")
    return 0


def cascade_table(args, components, device, dtype, captions, on_gpu: bool) -> list[dict]:
    """One stage 1x1, one stage 4x5, and the cascade between them, on one graphed scorer."""
    scorer = Scorer(components, device, dtype, batch_size=args.cascade_batch)
    if on_gpu:
        scorer.optimize_for_cuda(cuda_graphs=True)
    sample = captions[: args.cascade_batch * 4]
    first = scorer.score(sample)
    screen_threshold = float(torch.tensor(first).quantile(1 - args.screen_share))
    screen, confirm = Stage(1, 1), Stage(4, 5)
    rows = []
    for name, stage, cascade in (
        ("one stage 1x1", screen, None),
        ("one stage 4x5", confirm, None),
        (
            f"cascade 1x1 -> 4x5 ({args.screen_share:.0%} re-scored)",
            screen,
            Cascade(confirm, screen_threshold),
        ),
    ):
        rate, per_caption = stages_rate(scorer, sample, stage, cascade, args.seconds)
        rows.append({"setting": name, "captions_per_s": rate, "denoiser_rows_per_caption": per_caption})
        print(json.dumps(rows[-1]), flush=True)
    return rows


if __name__ == "__main__":
    sys.exit(main())
