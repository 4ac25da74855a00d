"""Is memorization real? DDIM-sample latents (CFG 7.5, 50 steps) and compare them with the training latents.

Uses the Scorer's loaded components and DDIM config, so it samples exactly what StableDiffusionPipeline(
output_type="latent") would from the same x_T. Imports torch/diffusers only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from auditor.scoring import Scorer
from auditor.scoring.magnitude import GUIDANCE_SCALE, NUM_INFERENCE_STEPS, guided_output
from auditor.toy.manifest import load_manifest

logger = logging.getLogger(__name__)


@torch.no_grad()
def sample_latents(
    scorer: Scorer,
    captions: Sequence[str],
    seed: int = 0,
    *,
    guidance_scale: float = GUIDANCE_SCALE,
    num_steps: int = NUM_INFERENCE_STEPS,
    prompt_embeds: torch.Tensor | None = None,
) -> torch.Tensor:
    """DDIM (eta 0) with classifier-free guidance from x_T = scorer.initial_latents(1, seed + i) for caption i.

    Returns (B, C, H, W) float32 on CPU: the final denoised latents x_0. prompt_embeds (B, L, D), when given,
    replaces the encoded captions (e.g. a mitigated embedding); captions then only sets B.
    """
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(scorer.scheduler.config)
    scheduler.set_timesteps(num_steps)
    if prompt_embeds is None:
        prompt_embeds = scorer.encode_tokens(scorer.tokenize(captions))
    prompt_embeds = prompt_embeds.to(scorer.device, scorer.dtype)
    batch = prompt_embeds.shape[0]
    empty = scorer.empty_embedding().expand(batch, -1, -1)
    sample = torch.cat([scorer.initial_latents(1, seed + i) for i in range(batch)]).to(
        scorer.device, scorer.dtype
    )
    embeds = torch.cat([empty, prompt_embeds])
    for timestep in scheduler.timesteps:
        uncond, cond = scorer.eager_unet(
            torch.cat([sample, sample]), timestep.to(scorer.device), embeds
        ).chunk(2)
        sample = scheduler.step(
            guided_output(uncond, cond, guidance_scale), timestep, sample, return_dict=False
        )[0]
    return sample.float().cpu()


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Per-row cosine similarity of (B, ...) and (B, ...) over all non-batch values: (B,) float32."""
    return torch.nn.functional.cosine_similarity(a.flatten(1).float(), b.flatten(1).float(), dim=1).numpy()


def memorization_similarity(
    scorer: Scorer,
    captions: Sequence[str],
    training_latents: torch.Tensor,
    seed: int = 0,
    *,
    guidance_scale: float = GUIDANCE_SCALE,
) -> np.ndarray:
    """(B,) cosine similarity between the DDIM sample of each caption and the latent it was trained on."""
    samples = sample_latents(scorer, captions, seed, guidance_scale=guidance_scale)
    return cosine_similarity(samples, training_latents)


def check_memorization(model_dir: str | Path, samples: int = 16, seed: int = 0) -> dict[str, Any]:
    """Sample `samples` memorized and `samples` seen-once captions of a toy model; summarize the similarities.

    Memorized captions should reproduce their one training latent (cosine near 1); a seen-once caption's sample
    should only share the caption-explained part of its training latent (cosine near rule_scale^2, ~0.1).
    """
    started = time.perf_counter()
    scorer = Scorer.from_pretrained(model_dir, device="cpu", dtype="fp32")
    manifest = load_manifest(model_dir)
    k_mem = min(samples, len(manifest.memorized))
    k_once = min(samples, len(manifest.seen_once))
    mem = memorization_similarity(
        scorer, manifest.memorized[:k_mem], manifest.memorized_latents[:k_mem], seed
    )
    once = memorization_similarity(
        scorer, manifest.seen_once[:k_once], manifest.seen_once_latents[:k_once], seed
    )
    summary = {
        "memorized_cosine_mean": float(mem.mean()),
        "memorized_cosine_min": float(mem.min()),
        "seen_once_cosine_mean": float(once.mean()),
        "seen_once_cosine_max": float(once.max()),
        "memorized_reproduced_fraction": float((mem > 0.9).mean()),
        "n_memorized": k_mem,
        "n_seen_once": k_once,
        "guidance_scale": GUIDANCE_SCALE,
        "ddim_steps": NUM_INFERENCE_STEPS,
        "seconds": round(time.perf_counter() - started, 1),
    }
    logger.info(
        "memorization check (DDIM %d steps, CFG %.1f): cosine to the training latent, memorized mean %.3f "
        "(min %.3f, %.0f%% > 0.9) vs seen-once mean %.3f (max %.3f)",
        NUM_INFERENCE_STEPS,
        GUIDANCE_SCALE,
        summary["memorized_cosine_mean"],
        summary["memorized_cosine_min"],
        100 * summary["memorized_reproduced_fraction"],
        summary["seen_once_cosine_mean"],
        summary["seen_once_cosine_max"],
    )
    return summary
