"""`auditor explain` (token significance as a terminal bar chart) and `auditor mitigate` (optimised prompt embedding).

Argument parsing and printing only; the math is auditor.scoring.explain / auditor.scoring.mitigate.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from auditor.cli.common import add_model_arguments, add_score_sigma_argument
from auditor.errors import ConfigError, ModelLoadError

BAR_WIDTH = 32
EIGHTHS = " ▏▎▍▌▋▊▉█"

EXPLAIN_EPILOG = """\
examples:
  auditor explain --model ./toy-model "a red cat sitting in a park"
  auditor explain --model ./sd15 "mona lisa" --generations 4 --steps 10 --json
"""

MITIGATE_EPILOG = """\
examples:
  auditor mitigate --model ./toy-model "a red cat sitting in a park" --target 1.0 --out emb.safetensors
  auditor mitigate --model ./sd15 "mona lisa" --target 2 --generations 4 --out emb.safetensors --generate out.png

The embedding only applies with the same initial noise: generate with the same --generations and --seed
(`--generate` does), or load x_T with Scorer.initial_latents(generations, seed).
"""


def add_noise_arguments(parser: argparse.ArgumentParser, steps: bool) -> None:
    group = parser.add_argument_group("noise")
    group.add_argument(
        "--generations", type=int, default=1, help="initial noises x_T averaged over (n; default 1)"
    )
    if steps:
        group.add_argument(
            "--steps",
            type=int,
            default=1,
            help="sampler steps averaged (1 = first step; >1 follows the caption's CFG trajectory: DDIM 7.5 for SD)",
        )
        add_score_sigma_argument(group)
    group.add_argument(
        "--seed", type=int, default=0, help="noise seed; x_T depends only on (seed, generation)"
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    explain = subparsers.add_parser(
        "explain",
        help="show which tokens of a caption drive its memorization score",
        description=(
            "Token significance (Wen et al. 2024, §3): per token, the L2 norm of the gradient of the per-sample "
            "first-step magnitude with respect to that position of the text-encoder output."
        ),
        epilog=EXPLAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    explain.add_argument("caption", help="the caption to explain (quote it)")
    add_model_arguments(explain)
    add_noise_arguments(explain, steps=True)
    explain.add_argument("--json", action="store_true", help="print one JSON object instead of the chart")
    explain.set_defaults(handler=run_explain)

    mitigate = subparsers.add_parser(
        "mitigate",
        help="optimise a caption's prompt embedding until its memorization score is below a target",
        description=(
            "Inference-time mitigation (Wen et al. 2024, §4): AdamW on the text-encoder output (BOS frozen) at the "
            "first DDIM step until the per-sample magnitude, averaged over generations, is <= --target."
        ),
        epilog=MITIGATE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    mitigate.add_argument("caption", help="the caption to mitigate (quote it)")
    mitigate.add_argument(
        "--target",
        type=float,
        required=True,
        help="stop once the magnitude is <= this (same scale as `score`)",
    )
    mitigate.add_argument(
        "--lr", type=float, default=0.05, help="AdamW learning rate (default 0.05, the paper's)"
    )
    mitigate.add_argument(
        "--max-iters", type=int, default=10, help="most AdamW updates (default 10, the paper's)"
    )
    mitigate.add_argument(
        "--out",
        required=True,
        help="write the (1, L, D) float32 embedding here (safetensors key prompt_embeds)",
    )
    mitigate.add_argument(
        "--generate",
        metavar="PNG",
        help="also generate with the embedding and the same x_T (needs the model's vae/); n images side by side",
    )
    add_model_arguments(mitigate)
    add_noise_arguments(mitigate, steps=False)
    mitigate.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    mitigate.set_defaults(handler=run_mitigate)


def load_caption_scorer(args: argparse.Namespace, score_sigma: float | None = None):
    from auditor.scoring import Scorer

    # One caption: CUDA graphs for a batch would cost more to capture than they save.
    return Scorer.from_pretrained(
        args.model,
        device=args.device,
        dtype=args.dtype,
        cuda_graphs=False,
        score_sigma=score_sigma,
        variant=args.variant,
    )


def format_bar(fraction: float, width: int = BAR_WIDTH) -> str:
    """A horizontal bar of `fraction` (0..1) of `width` cells, in eighth-cell steps."""
    eighths = round(max(0.0, min(1.0, fraction)) * width * 8) if math.isfinite(fraction) else 0
    full, rest = divmod(eighths, 8)
    return ("█" * full + (EIGHTHS[rest] if rest else "")).ljust(width)


def display_token(token: str) -> str:
    # CLIP marks a word's last piece with "</w>"; a piece without it continues into the next one.
    return token[: -len("</w>")] if token.endswith("</w>") else token + "-"


def run_explain(args: argparse.Namespace) -> int:
    from auditor.scoring.explain import explain

    scorer = load_caption_scorer(args, args.score_sigma)
    result = explain(scorer, args.caption, generations=args.generations, steps=args.steps, seed=args.seed)
    if args.json:
        row = {
            "caption": result.caption,
            "magnitude": result.magnitude,
            "tokens": result.tokens,
            "significance": [float(v) for v in result.significance],
            "share": [float(v) for v in result.share],
            "truncated": result.truncated,
            # The rows of the family's other tokenizers (SD3: "t5"), each with its own tokens.
            "other": {
                label: {
                    "tokens": block.tokens,
                    "significance": [float(v) for v in block.significance],
                    "share": [float(v) for v in block.share],
                    "truncated": block.truncated,
                }
                for label, block in result.other.items()
            },
            "generations": args.generations,
            "steps": args.steps,
            "seed": args.seed,
        }
        print(json.dumps(row, ensure_ascii=False))
        return 0
    print(f"caption    {result.caption}")
    print(
        f"magnitude  {result.magnitude:.4f}  (generations {args.generations}, steps {args.steps}, seed {args.seed})"
    )
    if result.truncated:
        print(
            f"note       only the first {len(result.tokens)} tokens fit the model; the rest are not explained"
        )
    width = max(5, *(len(display_token(t)) for t in result.tokens))
    top = float(result.significance.max())
    print(f"{'#':>3}  {'token':<{width}}  {'significance':<{BAR_WIDTH}}  {'value':>10}  {'share':>6}")
    for index, (token, value, share) in enumerate(
        zip(result.tokens, result.significance, result.share, strict=True), start=1
    ):
        bar = format_bar(float(value) / top if top > 0 else 0.0)
        print(f"{index:>3}  {display_token(token):<{width}}  {bar}  {value:10.4g}  {100 * share:5.1f}%")
    return 0


def run_mitigate(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    from auditor.scoring.mitigate import check_mitigate_args, mitigate

    # 1. Check inputs before loading anything heavy
    check_mitigate_args(args.target, args.lr, args.max_iters)
    scorer = load_caption_scorer(args)
    root = Path(scorer.components.root)
    if args.generate and scorer.family_name != "sd":
        raise ConfigError(
            f"--generate renders SD 1.x/2.x models only; this is a {scorer.family_name} model. Drop --generate: "
            "the embedding written to --out goes to the model's own pipeline as prompt_embeds (and "
            "pooled_prompt_embeds)."
        )
    if args.generate and not (root / "vae").is_dir():
        raise ModelLoadError(
            f"--generate needs the model's VAE to decode latents, and {root} has no vae/ folder. "
            "Drop --generate (the embedding is still written to --out) or pass a full Stable Diffusion folder."
        )
    if args.generate:
        from auditor.scoring.layout import vae_variant

        vae_variant(root, scorer.components.variant)  # VAE weights there (a hub or s3:// copy has none)

    # 2. Optimise and save
    result = mitigate(
        scorer,
        args.caption,
        target=args.target,
        lr=args.lr,
        max_iters=args.max_iters,
        generations=args.generations,
        seed=args.seed,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = {
        "caption": args.caption,
        "target": args.target,
        "magnitude_before": result.magnitude_before,
        "magnitude_after": result.magnitude_after,
        "iterations": result.iterations,
        "reached_target": result.reached_target,
        "generations": args.generations,
        "seed": args.seed,
        "lr": args.lr,
        "model": str(args.model),
    }
    tensors = {"prompt_embeds": result.prompt_embeds.contiguous()}
    if result.pooled_prompt_embeds is not None:
        tensors["pooled_prompt_embeds"] = result.pooled_prompt_embeds.contiguous()
    save_file(
        tensors,
        out,
        metadata={key: json.dumps(value) for key, value in summary.items()},
    )
    summary["out"] = str(out)

    # 3. Generate with the same x_T
    if args.generate:
        summary["image"] = str(
            generate_image(scorer, result.prompt_embeds, args.generations, args.seed, args.generate)
        )

    if args.json:
        print(json.dumps(summary, ensure_ascii=False))
        return 0
    status = "reached" if result.reached_target else "NOT reached"
    print(f"caption    {args.caption}")
    print(
        f"magnitude  {result.magnitude_before:.4f} -> {result.magnitude_after:.4f}  "
        f"(target {args.target:g} {status}; {result.iterations} AdamW updates)"
    )
    print(f"embedding  {out}  (generate with --generations {args.generations} --seed {args.seed})")
    if args.generate:
        print(f"image      {summary['image']}")
    return 0


def generate_image(scorer, prompt_embeds, generations: int, seed: int, path: str) -> Path:
    """StableDiffusionPipeline (DDIM 50, CFG 7.5) from the mitigation's x_T; the n images side by side in one PNG."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from PIL import Image

    from auditor.scoring.layout import vae_variant
    from auditor.scoring.magnitude import GUIDANCE_SCALE, NUM_INFERENCE_STEPS

    root = Path(scorer.components.root)
    variant = vae_variant(root, scorer.components.variant)
    vae = AutoencoderKL.from_pretrained(
        root / "vae", torch_dtype=scorer.dtype, use_safetensors=True, variant=variant
    )
    pipe = StableDiffusionPipeline(
        vae=vae.to(scorer.device),
        text_encoder=scorer.text_encoder,
        tokenizer=scorer.tokenizer,
        unet=scorer.unet,
        scheduler=DDIMScheduler.from_config(scorer.scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    x_T = scorer.initial_latents(generations, seed)
    # The pipeline multiplies given latents by init_noise_sigma; the scorer's x_T already includes it.
    latents = (x_T / pipe.scheduler.init_noise_sigma).to(scorer.device, scorer.dtype)
    _, height, width = scorer.latent_shape
    images = pipe(
        prompt_embeds=prompt_embeds.to(scorer.device, scorer.dtype).expand(generations, -1, -1),
        negative_prompt_embeds=scorer.empty_embedding().expand(generations, -1, -1),
        latents=latents,
        num_inference_steps=NUM_INFERENCE_STEPS,
        guidance_scale=GUIDANCE_SCALE,
        height=height * pipe.vae_scale_factor,
        width=width * pipe.vae_scale_factor,
    ).images
    strip = Image.new("RGB", (sum(image.width for image in images), images[0].height))
    offset = 0
    for image in images:
        strip.paste(image, (offset, 0))
        offset += image.width
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    strip.save(out)
    return out
