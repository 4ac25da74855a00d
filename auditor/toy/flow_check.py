"""Is the flow toy real? Sample memorized captions with StableDiffusion3Pipeline itself, and detect them with the
REFERENCE text-conditional velocity magnitude (plain code: the pipeline's own encode_prompt + the transformer).

`reference_velocity_magnitudes` is the quantity the SD3 family scorer must reproduce:
    score(p) = mean over k of || v(x^(k), t, c(p)) - v(x^(k), t, c("")) ||_2      (L2 over all C*H*W values)
with v the transformer's velocity output, c = encode_prompt's (prompt_embeds, pooled_prompt_embeds), x^(k) at the
sampler's first step sigma = 1 (t = 1000) = x_T drawn per (seed, k) as `auditor.scoring.magnitude.initial_latents`,
later steps along the CFG Euler trajectory. Imports torch/diffusers/numpy, never ray.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from auditor.report.metrics import detection_metrics
from auditor.scoring.magnitude import initial_latents
from auditor.toy.manifest import load_manifest

logger = logging.getLogger(__name__)

# StableDiffusion3Pipeline.__call__'s defaults.
GUIDANCE_SCALE = 7.0
NUM_INFERENCE_STEPS = 50
# The fixed-sigma variant: one CFG Euler step from x_T (sigma 1) to this sigma, scored there.
FIXED_SIGMA = 0.94


def load_flow_pipeline(model_dir: str | Path):
    """StableDiffusion3Pipeline from a local folder, fp32 on CPU, eval mode, no progress bars.

    text_encoder_3/tokenizer_3 are null in the toy's model_index.json; diffusers then still requires them to be
    passed (None), as its SD3-without-T5 recipe does: from_pretrained(..., text_encoder_3=None, tokenizer_3=None).
    """
    from diffusers import StableDiffusion3Pipeline

    from auditor.scoring.tokens import load_tokenizer

    folder = Path(model_dir)
    pipe = StableDiffusion3Pipeline.from_pretrained(
        str(folder),
        tokenizer=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
        dtype=torch.float32,
    )
    # The toy ships tokenizer.json only: the class model_index.json names, CLIPTokenizer, is transformers 4's slow
    # one, which needs vocab.json and merges.txt (and from_pretrained refuses a fast one in its place);
    # load_tokenizer takes the fast one, as the Scorer does. __init__ read the length from the absent tokenizer.
    pipe.register_modules(
        tokenizer=load_tokenizer(folder / "tokenizer"), tokenizer_2=load_tokenizer(folder / "tokenizer_2")
    )
    pipe.tokenizer_max_length = pipe.tokenizer.model_max_length
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2):
        module.eval()
    return pipe


@torch.no_grad()
def encode_captions(pipe, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The pipeline's own encoding: prompt_embeds (B, 77-or-model_max_length + 256, D), pooled (B, P) float32."""
    prompt_embeds, _, pooled, _ = pipe.encode_prompt(
        prompt=list(captions),
        prompt_2=None,
        prompt_3=None,
        device=torch.device("cpu"),
        do_classifier_free_guidance=False,
    )
    return prompt_embeds.float(), pooled.float()


def sampler_sigmas(pipe, num_inference_steps: int = NUM_INFERENCE_STEPS) -> torch.Tensor:
    """The Euler sampler's sigmas (num_inference_steps + 1,) with the model's shift: [1.0, sigmas[1], ..., 0]."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(num_inference_steps)
    return scheduler.sigmas.float().cpu()


def latent_shape(pipe) -> tuple[int, int, int]:
    config = pipe.transformer.config
    return (config.in_channels, config.sample_size, config.sample_size)


@torch.no_grad()
def reference_velocity_magnitudes(
    pipe,
    captions: Sequence[str],
    *,
    generations: int = 1,
    seed: int = 0,
    steps: int = 1,
    sigmas: Sequence[float] | torch.Tensor | None = None,
    guidance_scale: float = GUIDANCE_SCALE,
    batch_size: int = 64,
) -> torch.Tensor:
    """(B, steps) float64: ||v_c - v_u||_2 per caption at each of the first `steps` points of the trajectory.

    Column 0 is sigma = sigmas[0] = 1 on x_T (the default score); column i is sigmas[i] after i CFG Euler steps
    x <- x + (sigmas[i+1] - sigmas[i]) * (v_u + w (v_c - v_u)), as FlowMatchEulerDiscreteScheduler.step.
    Each entry is the mean over `generations` draws x_T^(k) = initial_latents(seed, generations)[k].
    sigmas: None = the sampler's own (50 steps, the model's shift); e.g. [1.0, 0.94] for a fixed sigma.
    The Scorer's `--steps K` score is the mean of the first K columns.
    """
    sigmas = sampler_sigmas(pipe) if sigmas is None else torch.as_tensor(sigmas, dtype=torch.float32)
    if not 1 <= steps <= len(sigmas):
        raise ValueError(f"steps must be in 1..{len(sigmas)} for these sigmas, got {steps}")
    if float(sigmas[0]) != 1.0:
        raise ValueError(
            f"the trajectory starts at sigma 1 (x_T is pure noise), got sigmas[0] = {float(sigmas[0])}"
        )
    transformer = pipe.transformer
    x_T = initial_latents(seed, generations, latent_shape(pipe), 1.0)
    empty, empty_pooled = encode_captions(pipe, [""])
    one = torch.ones(1) * 1000 * sigmas[0]
    first_uncond = [
        velocity(transformer, x_T[k : k + 1], empty, empty_pooled, one) for k in range(generations)
    ]
    totals = []
    for start in range(0, len(captions), batch_size):
        chunk = list(captions[start : start + batch_size])
        cond, cond_pooled = encode_captions(pipe, chunk)
        n = len(chunk)
        uncond, uncond_pooled = empty.expand(n, -1, -1), empty_pooled.expand(n, -1)
        total = torch.zeros((n, steps), dtype=torch.float64)
        for k in range(generations):
            x = x_T[k : k + 1].expand(n, -1, -1, -1).clone()
            for i in range(steps):
                t = (sigmas[i] * 1000).expand(n)
                v_c = velocity(transformer, x, cond, cond_pooled, t)
                # At sigma 1 every caption shares x_T, so one unconditional row serves the chunk.
                v_u = (
                    first_uncond[k].expand(n, -1, -1, -1)
                    if i == 0
                    else velocity(transformer, x, uncond, uncond_pooled, t)
                )
                total[:, i] += (v_c - v_u).flatten(1).norm(dim=1).double()
                if i + 1 < steps:
                    x = x + (sigmas[i + 1] - sigmas[i]) * (v_u + guidance_scale * (v_c - v_u))
        totals.append(total / generations)
    return torch.cat(totals)


def velocity(
    transformer, x: torch.Tensor, prompt_embeds: torch.Tensor, pooled: torch.Tensor, timestep: torch.Tensor
) -> torch.Tensor:
    """The transformer's output (B, C, H, W) as float32: the velocity eps - x0 at this timestep (1000 * sigma)."""
    return transformer(
        hidden_states=x,
        encoder_hidden_states=prompt_embeds,
        pooled_projections=pooled,
        timestep=timestep,
        return_dict=False,
    )[0].float()


def detection_scores(
    pipe, captions: Sequence[str], *, generations: int = 1, seed: int = 0, fixed_sigma: float = FIXED_SIGMA
) -> dict[str, np.ndarray]:
    """The four scores of the check per caption (B,): σ=1, 2-step mean, the 2nd step alone, and a fixed σ."""
    trajectory = reference_velocity_magnitudes(pipe, captions, generations=generations, seed=seed, steps=2)
    fixed = reference_velocity_magnitudes(
        pipe, captions, generations=generations, seed=seed, steps=2, sigmas=[1.0, fixed_sigma]
    )
    return {
        "sigma=1": trajectory[:, 0].numpy(),
        "steps=2 mean": trajectory.mean(dim=1).numpy(),
        "2nd step": trajectory[:, 1].numpy(),
        f"sigma={fixed_sigma:g}": fixed[:, 1].numpy(),
    }


@torch.no_grad()
def sample_with_pipeline(
    pipe, captions: Sequence[str], seed: int = 0, *, guidance_scale: float = GUIDANCE_SCALE
) -> torch.Tensor:
    """StableDiffusion3Pipeline(output_type="latent") from x_T = initial_latents(seed + i, 1) for caption i:
    (B, C, H, W) float32, the sampler's final latents (50 Euler steps, CFG with negative prompt "")."""
    shape = latent_shape(pipe)
    latents = torch.cat([initial_latents(seed + i, 1, shape, 1.0) for i in range(len(captions))])
    pixels = shape[1] * pipe.vae_scale_factor
    return pipe(
        prompt=list(captions),
        height=pixels,
        width=pixels,
        num_inference_steps=NUM_INFERENCE_STEPS,
        guidance_scale=guidance_scale,
        latents=latents,
        output_type="latent",
    ).images.float()


def _cosine(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.cosine_similarity(a.flatten(1).float(), b.flatten(1).float(), dim=1).numpy()


def check_flow_toy(
    model_dir: str | Path,
    *,
    samples: int = 16,
    generations: int = 4,
    seed: int = 0,
    fixed_sigma: float = FIXED_SIGMA,
) -> dict[str, Any]:
    """Sampling (cosine of `samples` memorized / seen-once samples to their training latents) and detection
    (AUC, TPR@1%FPR of all memorized vs all held-out and vs all seen-once captions, for each score of
    `detection_scores`). A JSON-ready dict; `format_flow_check` prints it."""
    started = time.perf_counter()
    pipe = load_flow_pipeline(model_dir)
    manifest = load_manifest(model_dir)
    k_mem, k_once = min(samples, len(manifest.memorized)), min(samples, len(manifest.seen_once))
    mem = _cosine(
        sample_with_pipeline(pipe, manifest.memorized[:k_mem], seed), manifest.memorized_latents[:k_mem]
    )
    once = _cosine(
        sample_with_pipeline(pipe, manifest.seen_once[:k_once], seed), manifest.seen_once_latents[:k_once]
    )
    sampled = time.perf_counter()
    sigmas = sampler_sigmas(pipe)
    negatives = {"held-out": manifest.held_out, "seen-once": manifest.seen_once}
    positive = detection_scores(
        pipe, manifest.memorized, generations=generations, seed=seed, fixed_sigma=fixed_sigma
    )
    negative = {
        name: detection_scores(pipe, captions, generations=generations, seed=seed, fixed_sigma=fixed_sigma)
        for name, captions in negatives.items()
    }
    # ratio: lowest memorized score / highest negative score (> 1: the sets do not overlap, by that factor).
    detection = {
        score: {
            name: {
                **detection_metrics(positive[score], negative[name][score]).to_dict(),
                "ratio": float(positive[score].min() / negative[name][score].max()),
            }
            for name in negatives
        }
        for score in positive
    }
    summary = {
        "sampling": {
            "memorized_cosine_mean": float(mem.mean()),
            "memorized_cosine_min": float(mem.min()),
            "memorized_reproduced_fraction": float((mem >= 0.9).mean()),
            "seen_once_cosine_mean": float(once.mean()),
            "seen_once_cosine_max": float(once.max()),
            "n_memorized": k_mem,
            "n_seen_once": k_once,
            "guidance_scale": GUIDANCE_SCALE,
            "euler_steps": NUM_INFERENCE_STEPS,
            "seconds": round(sampled - started, 1),
        },
        "detection": detection,
        "sigmas": {"first": float(sigmas[0]), "second": float(sigmas[1]), "fixed": fixed_sigma},
        "generations": generations,
        "noise_seed": seed,
        "seconds": round(time.perf_counter() - started, 1),
    }
    logger.info("flow toy check:\n%s", format_flow_check(summary))
    return summary


def format_flow_check(summary: Mapping[str, Any]) -> str:
    """The check as a small text table (one row per score and negative set) plus the sampling line."""
    s = summary["sampling"]
    sig = summary["sigmas"]
    lines = [
        f"sigmas: first {sig['first']:g}, second step {sig['second']:.4f}, fixed {sig['fixed']:g}; "
        f"{summary['generations']} generations, noise seed {summary['noise_seed']}",
        f"{'score':<14} {'negatives':<10} {'AUC':>6} {'TPR@1%FPR':>10} {'mem mean':>9} {'neg mean':>9} "
        f"{'min/max':>8}",
    ]
    for score, by_negatives in summary["detection"].items():
        for name, m in by_negatives.items():
            lines.append(
                f"{score:<14} {name:<10} {m['auc']:>6.3f} {m['tpr_at_fpr']:>10.3f} "
                f"{m['positive_mean']:>9.3f} {m['negative_mean']:>9.3f} {m.get('ratio', float('nan')):>8.2f}"
            )
    lines.append(
        f"sampling (StableDiffusion3Pipeline, Euler {s['euler_steps']}, CFG {s['guidance_scale']:g}): cosine to the "
        f"training latent, memorized mean {s['memorized_cosine_mean']:.3f} (min {s['memorized_cosine_min']:.3f}, "
        f"{s['memorized_reproduced_fraction']:.0%} >= 0.9, n={s['n_memorized']}) vs seen-once mean "
        f"{s['seen_once_cosine_mean']:.3f} (max {s['seen_once_cosine_max']:.3f}, n={s['n_seen_once']})"
    )
    return "\n".join(lines)
